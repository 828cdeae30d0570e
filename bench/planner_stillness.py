"""How much of the scene does a model's forecast say will move? The example planner's view of stillness.

For every ``--every``-th agent-view frame of the scored sim bag (``data/sample_bag/sim_heldout``), forecast K samples
under the bag's latest instruction and report the share of the query grid where more than half of the samples move
a point more than ``--threshold`` px from frame 0 at some frame: the pixels the example planner's
``~/motion_probability`` map marks above 128, and its ``keep_out`` map marks at all. The bag's exact futures give the
same share for the truth. Unlike the evaluation's static drift (the mean FINAL displacement of static points), this
counts every frame, so a forecast whose still points wander mid-horizon scores badly here.

    .venv/bin/python bench/planner_stillness.py --model models/sim-manipulation --model runs/sim10/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traj_forecast_ros.bag.io import deserialize, read_messages  # noqa: E402
from traj_forecast_ros.bag.report import read_forecasts, stamp_ns  # noqa: E402
from traj_forecast_ros.bag.sim_sample import INSTRUCTION_TOPIC, SIM_SAMPLE_BAG  # noqa: E402
from traj_forecast_ros.forecaster import Forecaster  # noqa: E402
from traj_forecast_ros.ros.conversions import msg_to_arrays  # noqa: E402
from traj_forecast_ros.summaries import DEFAULT_MOVING_THRESHOLD_PX  # noqa: E402

CAMERA = "/agentview"


def agent_view_frames(bag: Path, every: int) -> List[Tuple[int, np.ndarray, str]]:
    """``(stamp_ns, image [H, W, 3] uint8, latest instruction)`` of every ``every``-th agent-view frame."""
    frames, instruction = [], ""
    for message in read_messages(bag, [f"{CAMERA}/image_raw", INSTRUCTION_TOPIC]):
        msg = deserialize(message)
        if message.topic == INSTRUCTION_TOPIC:
            instruction = msg.data
            continue
        image = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        frames.append((stamp_ns(msg.header), image, instruction))
    return frames[::every]


def moving_share(fraction: np.ndarray) -> float:
    """Share of the grid where more than half of the samples move."""
    return float((np.asarray(fraction) > 0.5).mean())


def marked_shares(forecaster: Forecaster, frames: List[Tuple[int, np.ndarray, str]], samples: int,
                  steps: Optional[int], threshold_px: float) -> List[float]:
    """Per frame, the share of the grid where more than half of ``forecaster``'s samples move (frame i: seed i)."""
    return [moving_share(forecaster.forecast(image, instruction=instruction or None, num_samples=samples,
                                             steps=steps, seed=index).moving_fraction(threshold_px))
            for index, (_, image, instruction) in enumerate(frames)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model directory or name (repeatable)")
    parser.add_argument("--bag", type=Path, default=SIM_SAMPLE_BAG)
    parser.add_argument("--samples", type=int, default=4, help="K (the replay test's 4)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_MOVING_THRESHOLD_PX,
                        help="pixels that count as moving (default: the node's)")
    parser.add_argument("--every", type=int, default=3, help="use every N-th frame")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    frames = agent_view_frames(args.bag, args.every)
    truths: Dict[int, np.ndarray] = {stamp: msg_to_arrays(msg)["moving_fraction"]
                                     for stamp, msg in read_forecasts(args.bag, f"{CAMERA}/true_future")}
    truth = [moving_share(truths[stamp]) for stamp, _, _ in frames if stamp in truths]
    print(f"{len(frames)} agent-view frames of {args.bag}; K = {args.samples}, threshold {args.threshold} px")
    print(f"truth: share of the view that moves: mean {np.mean(truth):.2f}, max {np.max(truth):.2f}")
    for model in args.model:
        shares = marked_shares(Forecaster.from_pretrained(model, device="cpu"), frames, args.samples, args.steps,
                               args.threshold)
        print(f"{model}: share where more than half of the samples move: mean {np.mean(shares):.2f}, "
              f"max {np.max(shares):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
