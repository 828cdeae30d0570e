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
        # 3 time points = 2 evaluations per chunk of sample_batch_size samples (the tiny model: all K at once).
        assert run["sample_batch_size"] >= run["samples"]
        assert len(run["denoiser_evals"]) == 2
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
