"""The forecast benchmark script runs end to end (tiny model): guards it against API drift. No timings asserted."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "forecast_bench.py"


def test_forecast_bench_quick_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("forecast_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--dtype", "float32,bfloat16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "denoiser evaluations" in printed and "GFLOP/s overall" in printed
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["dtype"], r["samples"]) for r in runs] == [("float32", 1), ("float32", 2), ("bfloat16", 1),
                                                         ("bfloat16", 2)]
    for run in runs:
        # 3 time points = 2 evaluations per chunk of sample_batch_size samples. The plan's timed probe picks the
        # batch (all K at once on an idle machine; one per call can win on a loaded one), so any batch is accepted.
        chunks = -(-run["samples"] // run["sample_batch_size"])
        assert run["sample_batch_size"] >= 1 and len(run["denoiser_evals"]) == 2 * chunks
        assert run["total_flops"] > 0 and run["peak_rss_mb"] > 0
        assert run["flops"]["denoise"] == run["samples"] * 2 * report["flops_per_call"]["denoiser_eval"]


def test_forecast_bench_times_a_batch_of_cameras(tmp_path, capsys):
    """--cameras 2: forecast_batch of two images is timed against one camera's forecast, per K."""
    spec = importlib.util.spec_from_file_location("forecast_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--dtype", "float32", "--no-official", "--cameras", "2", "--json", str(out)]) == 0
    assert "2 cameras in one forecast_batch" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert [run["samples"] for run in runs] == [1, 2]
    for run in runs:
        assert run["cameras"] == 2 and run["batch_s"] > 0
        assert run["batch_peak_rss_mb"] > 0 and run["batch_rss_ratio"] > 0
        assert run["batch_ratio"] == run["batch_s"] / run["timings"]["total"]


def test_denoiser_profile_quick_run(capsys, monkeypatch):
    """bench/profile_denoiser.py (the efficiency bound's breakdown) runs on the tiny model and accounts for its time."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("profile_denoiser", BENCH.parent / "profile_denoiser.py")
    profiler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profiler)
    assert profiler.category("mkldnn::_linear_pointwise") == "linear GEMMs (oneDNN/addmm)"
    assert profiler.category("aten::_softmax") == "attention (bmm, softmax, SDPA)"
    assert profiler.category("aten::copy_") == "layout copies and casts"
    assert profiler.category("aten::something_new") == "other"
    assert profiler.main(["--quick", "--matmul-seconds", "0.02", "--evals", "2"]) == 0
    printed = capsys.readouterr().out
    assert "denoiser evaluation:" in printed and "linear GEMMs alone:" in printed
    assert "between ops (Python, dispatch" in printed and "efficiency 0.7: an evaluation must take" in printed


def test_planner_stillness_reads_the_sim_bag_and_scores_a_model(capsys):
    """bench/planner_stillness.py: the sim bag's agent-view frames with their instructions, the truth's marked share,
    and one model's per-frame shares, all in [0, 1]; zero motion marks nothing."""
    import numpy as np
    import pytest

    spec = importlib.util.spec_from_file_location("planner_stillness", BENCH.parent / "planner_stillness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not (BENCH.parents[1] / "models" / "sim-manipulation" / "denoiser.safetensors").is_file():
        pytest.skip("models/sim-manipulation is not in this checkout")
    frames = bench.agent_view_frames(bench.SIM_SAMPLE_BAG, every=16)
    assert len(frames) >= 2 and all(image.shape == (128, 128, 3) and instruction for _, image, instruction in frames)
    assert bench.moving_share(np.zeros((32, 32))) == 0.0 and bench.moving_share(np.full((32, 32), 0.75)) == 1.0
    assert bench.main(["--model", "sim-manipulation", "--every", "16", "--samples", "2", "--steps", "2",
                       "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    shares = [float(line.split("mean ")[1].split(",")[0]) for line in printed.splitlines() if "mean " in line]
    assert "truth: share of the view that moves" in printed and len(shares) == 2
    assert all(0.0 <= share <= 1.0 for share in shares)
