"""Does the instruction change the forecast, and could it? Two measurements on a split with branch groups.

* **Could it:** for every ordered pair of one branch group (same frame 0, two instructions), how far apart the two
  TRUE futures are over the points moving in either (per-coordinate MSE, px^2), by pair of task modes (the first
  word of each instruction). A pair whose futures coincide within the horizon cannot tell its instructions apart.
* **Does it:** for the first pair of each of ``--groups`` groups whose futures differ, the mean distance (px)
  between the model's K forecasts of the same image and noise under the two instructions, beside the distance
  between two noise seeds under the same instruction.

    .venv/bin/python bench/instruction_probe.py --model models/sim-manipulation --data runs/sim2/test --groups 8
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traj_forecast_ros.data.dataset import TrajectoryDataset  # noqa: E402
from traj_forecast_ros.forecaster import Forecaster  # noqa: E402
from traj_forecast_ros.metrics import MOVING_THRESHOLD_PX, branch_pairs, moving_mask  # noqa: E402


def future_distances(dataset: TrajectoryDataset, pairs: Sequence[tuple], groups: np.ndarray,
                     instruction_ids: np.ndarray) -> List[Dict]:
    """Per ordered pair: its branch group, the two instructions and their true futures' MSE over the points moving
    in either (each sample's tracks read once)."""
    texts = [dataset.meta.instructions[int(k)] for k in instruction_ids]
    members = sorted({int(k) for pair in pairs for k in pair})
    tracks = dict(zip(members, dataset.gather("tracks", members)[:, 0].astype(np.float64)))  # [T, H, W, 2] each
    rows = []
    for i, j in pairs:
        region = moving_mask(tracks[i]) | moving_mask(tracks[j])  # [H, W]
        if not region.any():
            continue
        diff = tracks[i][:, region] - tracks[j][:, region]  # [T, M, 2]
        rows.append({"pair": (int(i), int(j)), "group": int(groups[i]), "mse_px2": float((diff ** 2).mean()),
                     "parting_px": float(np.linalg.norm(diff, axis=-1).mean()),
                     "instructions": (texts[i], texts[j])})
    return rows


def forecast_sensitivity(forecaster: Forecaster, dataset: TrajectoryDataset, rows: List[Dict], groups: int,
                         samples: int) -> List[Dict]:
    """Forecast distance between the two instructions (same noise) and between two seeds (same instruction)."""
    out, seen = [], set()
    for row in rows:
        if row["group"] in seen or row["parting_px"] <= MOVING_THRESHOLD_PX:
            continue
        seen.add(row["group"])
        image = dataset.gather("images", [row["pair"][0]])[0]
        own = forecaster.forecast(image, row["instructions"][0], num_samples=samples, seed=0).tracks
        other = forecaster.forecast(image, row["instructions"][1], num_samples=samples, seed=0).tracks
        reseeded = forecaster.forecast(image, row["instructions"][0], num_samples=samples, seed=1).tracks
        out.append({**row, "instruction_effect_px": float(np.linalg.norm(own - other, axis=-1).mean()),
                    "seed_effect_px": float(np.linalg.norm(own - reseeded, axis=-1).mean())})
        if len(out) == groups:
            break
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or registry name (omit: data only)")
    parser.add_argument("--data", type=Path, required=True, help="split with branch groups and instructions")
    parser.add_argument("--groups", type=int, default=8, help="branch groups whose forecasts to compare")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = TrajectoryDataset(args.data)
    if not (dataset.has("branch_groups") and dataset.has("instructions")):
        parser.error(f"{args.data} has no branch groups or instructions")
    branch_groups, instruction_ids = dataset.load("branch_groups"), dataset.load("instructions")
    pairs = branch_pairs(branch_groups, instruction_ids)
    rows = future_distances(dataset, pairs, branch_groups, instruction_ids)
    mse = np.array([row["mse_px2"] for row in rows])
    by_modes = collections.defaultdict(list)
    for row in rows:
        by_modes[" / ".join(sorted(text.split()[0] for text in row["instructions"]))].append(row["mse_px2"])
    report = {"pairs": len(rows), "future_mse_median_px2": float(np.median(mse)),
              "share_under_20_px2": float((mse < 20).mean()),
              "share_parting_over_5_px": float(np.mean([row["parting_px"] > MOVING_THRESHOLD_PX for row in rows])),
              "future_mse_median_by_modes": {k: float(np.median(v)) for k, v in sorted(by_modes.items())}}
    print(f"{report['pairs']} ordered pairs: true futures differ by a median {report['future_mse_median_px2']:.1f} "
          f"px^2; {report['share_under_20_px2']:.0%} under 20 px^2; {report['share_parting_over_5_px']:.0%} part "
          f"by more than {MOVING_THRESHOLD_PX:.0f} px")
    for modes, value in report["future_mse_median_by_modes"].items():
        print(f"  {modes}: {value:.1f} px^2 ({len(by_modes[modes])} pairs)")
    if args.model:
        sensitivity = forecast_sensitivity(Forecaster.from_pretrained(args.model), dataset, rows, args.groups,
                                           args.samples)
        report["sensitivity"] = sensitivity
        for row in sensitivity:
            print(f"  {row['instructions'][0]!r} vs {row['instructions'][1]!r}: futures part {row['parting_px']:.1f} "
                  f"px; forecasts move {row['instruction_effect_px']:.2f} px between the instructions, "
                  f"{row['seed_effect_px']:.2f} px between two seeds")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
