"""Cost of the planner summaries the node puts in every TrajectoryForecast, against a same-run reference.

    .venv/bin/python bench/summaries_bench.py                    # LIBERO size: K=8, T=16, 64x64 grid
    .venv/bin/python bench/summaries_bench.py --samples 8 --frames 16 --grid 64 --repeat 200

Measures :func:`traj_forecast_ros.summaries.planner_summaries` (motion probability, first-move frame, per-frame
spread, mean displacement, sample weights) on random-walk tracks, and, in the same run, the reference: copying the
tracks into the message's ``float32[]`` buffer (what the node pays for ``tracks`` alone). Prints the median of each,
their ratio and the issue-19 target (summaries <= 2 ms). A timing, not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import array
import time
from typing import Callable, List, Optional

import numpy as np

from traj_forecast_ros.summaries import planner_summaries

TARGET_MS = 2.0


def median_ms(work: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``work`` in milliseconds over ``repeat`` runs, after 3 warm-up runs."""
    for _ in range(3):
        work()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def pack_tracks(tracks: np.ndarray) -> array.array:
    """The reference: the tracks copied into a message's float32[] buffer (as ``forecast_to_msg`` does)."""
    flat = array.array("f")
    flat.frombytes(np.ascontiguousarray(tracks, dtype=np.float32).tobytes())
    return flat


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8, help="K")
    parser.add_argument("--frames", type=int, default=16, help="T")
    parser.add_argument("--grid", type=int, default=64, help="query grid side (H = W)")
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per measurement")
    parser.add_argument("--threshold", type=float, default=2.0, help="moving_threshold, px")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    steps = rng.normal(0.0, 1.5, (args.samples, args.frames, args.grid, args.grid, 2)).astype(np.float32)
    steps[:, 0] = rng.uniform(0, 128, (args.grid, args.grid, 2))  # frame 0: the query points
    tracks = np.cumsum(steps, axis=1)  # [K, T, H, W, 2] random walks from the query points

    summaries_ms = median_ms(lambda: planner_summaries(tracks, args.threshold), args.repeat)
    reference_ms = median_ms(lambda: pack_tracks(tracks), args.repeat)
    size = f"K={args.samples}, T={args.frames}, {args.grid}x{args.grid}"
    print(f"planner summaries ({size}): {summaries_ms:.2f} ms (median of {args.repeat})")
    print(f"reference, tracks packed into float32[]: {reference_ms:.2f} ms")
    print(f"ratio summaries / reference: {summaries_ms / reference_ms:.1f}x")
    verdict = "meets" if summaries_ms <= TARGET_MS else "misses"
    print(f"target: summaries <= {TARGET_MS:.0f} ms: {verdict} it on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
