"""Benchmark of the bag tools: rosbags read/write throughput, offline ``bag run`` and the DDS replay.

    .venv/bin/python bench/bag_bench.py                      # untrained tiny model (pipeline cost only)
    .venv/bin/python bench/bag_bench.py --model demo-blocks  # a registry name or model directory
    .venv/bin/python bench/bag_bench.py --skip-replay        # no node process / DDS

Reports, as JSON: MB/s writing and reading the sample bag's 128x128 rgb8 frames (the 16 frames repeated 20 times,
so the zstd size per image is optimistic; the sample bag itself compresses 2.8x) in sqlite3 and MCAP, the
wall time per image of ``bag run`` (decode + forecast + three output messages + write), and the replay's
end-to-end latency (image published -> forecast received, p50/p95) with the node's drops at 1x and 0.25x speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from traj_forecast_ros.bag.io import BagWriter, read_messages  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402
from traj_forecast_ros.bag.typestore import make_typestore  # noqa: E402


def storage_throughput(work: Path, repeats: int = 20) -> Dict[str, Dict[str, float]]:
    """MB/s to write and read ``repeats`` copies of the sample bag's image messages."""
    messages = [m for m in read_messages(SAMPLE_BAG) if m.msgtype == "sensor_msgs/msg/Image"]
    megabytes = sum(len(m.data) for m in messages) * repeats / 1e6
    store = make_typestore()
    results = {}
    for storage, compress in (("sqlite3", False), ("mcap", False), ("mcap", True)):
        name = f"{storage}{'+zstd' if compress else ''}"
        path = work / name
        started = time.perf_counter()
        with BagWriter(path, storage, store, compress=compress) as writer:
            for repeat in range(repeats):
                for index, message in enumerate(messages):
                    writer.write(message.topic, message.msgtype, (repeat * len(messages) + index) * 10**8,
                                 message.data)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        count = sum(1 for _ in read_messages(path))
        read_s = time.perf_counter() - started
        assert count == repeats * len(messages)
        size = sum(p.stat().st_size for p in path.iterdir())
        results[name] = {"write_MBps": round(megabytes / write_s, 1), "read_MBps": round(megabytes / read_s, 1),
                         "bytes_per_image": round(size / count)}
    return results


def offline_run(work: Path, model: str) -> Dict[str, Any]:
    """Wall time per image of ``bag run`` over the sample bag (16 images, K=4, 10 steps)."""
    from traj_forecast_ros.bag.offline import run_bag

    started = time.perf_counter()
    summary = run_bag(SAMPLE_BAG, work / "run", model=model, num_samples=4, steps=10, device="cpu",
                      dtype="float32", progress=False)
    wall = time.perf_counter() - started
    return {"images": summary["frames_in"], "wall_s_incl_model_load": round(wall, 2),
            "inference_p50_s": round(summary["inference_p50_s"], 4)}


def replay(work: Path, model: str, rate: float) -> Dict[str, Any]:
    """The DDS replay's latency and drops (K=4)."""
    from traj_forecast_ros.bag.replay import replay_through_node

    summary = replay_through_node(SAMPLE_BAG, work / f"replay_{rate}", model=model, rate=rate,
                                  extra_params=["num_samples:=4"], print_summary=False)
    return {"rate": rate, "frames_in": summary["frames_in"], "forecasts_out": summary["forecasts_out"],
            "dropped": summary["dropped"], "rejected": summary.get("rejected", {}), "latency_ms": summary["latency_ms"],
            "node_inference_p50_ms": summary["node_diagnostics"].get("inference_p50_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="registry name or model dir (default: untrained tiny)")
    parser.add_argument("--skip-replay", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # On a busy 2-core machine torch's default 2 OpenMP threads measured 22 s per demo-blocks forecast (threads
    # spinning against another process) instead of 0.34 s with one thread: pin it unless the caller chose.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from traj_forecast_ros.bag.model_choice import write_untrained_model

            model = write_untrained_model(str(work / "untrained-tiny"))
        results: Dict[str, Any] = {"model": args.model or "untrained-tiny", "cpu_threads": os.cpu_count(),
                                   "storage": storage_throughput(work), "bag_run": offline_run(work, model)}
        if not args.skip_replay:
            results["replay"] = [replay(work, model, rate) for rate in (1.0, 0.25)]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
