"""The GPU path without a GPU: dtype policy, half-precision forward of the reference modules (the code CUDA runs),
float32 fallback, CUDA-graph cache bookkeeping and device binding, and ``bench/gpu_check.py --device cpu --quick``.

Half-precision tolerance: ``max |half - fp32| / max |fp32|`` of one denoiser evaluation within 8 unit roundoffs of
the dtype (float16 2^-11, bfloat16 2^-8): measured 1-2 unit roundoffs (tiny model: 4.9e-4 float16, 4.6e-3 bfloat16;
LIBERO width: 8.4e-4, 6.7e-3), so a dtype mistake (a layer left in the wrong dtype, an overflow, a lost cast) fails
while rounding does not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from traj_forecast_ros.errors import DeviceError, TrajForecastError
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.checkpoint import randomise_zero_parameters
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.presets import libero_config, tiny_config
from traj_forecast_ros.plan_runtime import CapturedGraph, CudaGraphDenoiser, bound_to_device
from traj_forecast_ros.sampling_plan import LRUCache, SamplingPlan, choose_sampling_plan, resolve_dtype

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "bench" / "gpu_check.py"
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
HALF_TOLERANCE = {dtype: 8 * u for dtype, u in UNIT_ROUNDOFF.items()}  # 3.9e-3 float16, 3.1e-2 bfloat16
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def modules():
    """A tiny random-weight forecaster's modules (shared by the forecasters built in these tests)."""
    return Forecaster.from_config(tiny_config(), seed=0)


def sibling(base: Forecaster, dtype: str) -> Forecaster:
    """``base.sibling`` on the CPU with the plain reference kernels (what runs on CUDA), all K at once."""
    return base.sibling("t", plan=choose_sampling_plan("cpu", dtype, sample_batch_size=0, fast_cpu_kernels=False))


def relative_max_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).abs().max() / reference.abs().max())


# ---------------------------------------------------------------------------------------------- dtype policy
@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((6, 1), torch.float16)])
def test_auto_dtype_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, capability, expected) -> None:
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    second_gpu = torch.device("cuda", 1)
    assert resolve_dtype("auto", second_gpu) == expected
    assert asked == [second_gpu]  # the forecaster's own GPU, not the thread's current one
    assert resolve_dtype("float16", second_gpu) == torch.float16
    if expected == torch.float16:  # no native bfloat16: refused when asked for explicitly
        with pytest.raises(DeviceError, match="not supported natively"):
            resolve_dtype("bfloat16", second_gpu)
    else:
        assert resolve_dtype("bf16", second_gpu) == torch.bfloat16


def test_cpu_policy_is_fp32_with_bf16_opt_in() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


# ---------------------------------------------------------------------------------------------- CUDA code path on CPU

def random_denoiser(config) -> LatteDenoiser:
    torch.manual_seed(0)
    model = LatteDenoiser(config).eval()
    randomise_zero_parameters(model, torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("size", ["tiny", "libero-width"])
def test_reference_denoiser_in_half_precision_matches_fp32(dtype, size, denoiser_inputs) -> None:
    """The modules CUDA runs (no CPU kernels exist for float16), under autocast, against float32."""
    config = tiny_config().denoiser
    if size == "libero-width":  # the real widths, token counts and heads; one spatial+temporal pair keeps it fast
        config = dataclasses.replace(libero_config("atm").denoiser, depth=2)
    model = random_denoiser(config)
    inputs = denoiser_inputs(model, batch=2)
    with torch.inference_mode():
        reference = model(*inputs)
        with torch.autocast("cpu", dtype=dtype):
            out = model(*inputs)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # parameters stay float32
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert reference.abs().max() > 0.05  # every path contributes
    difference = relative_max_difference(out, reference)
    assert difference < HALF_TOLERANCE[dtype], f"{dtype}: {difference:.2e}"
    assert difference > UNIT_ROUNDOFF[dtype] / 64  # it really ran in half precision


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
def test_forecaster_half_precision_tracks_match_fp32(modules, image, dtype) -> None:
    """The forecaster's whole path (encoders, VAE, sampler, decode) in half precision vs float32, same noise."""
    reference = sibling(modules, "float32").forecast(image, "push", num_samples=3, steps=4, seed=7).tracks
    low = sibling(modules, "bfloat16")
    with low.runtime.precision(dtype):  # float16 is refused on CPU for speed only: emulate the CUDA path's dtype
        result = low.forecast(image, "push", num_samples=3, steps=4, seed=7)
    assert result.dtype == str(dtype).replace("torch.", "") and low.fp32_fallbacks == 0
    difference = np.abs(result.tracks - reference)
    spacing = float(np.diff(result.query_points[0, :, 0]).mean())  # px between query points
    assert np.isfinite(result.tracks).all()
    assert 0 < difference.mean() < {torch.float16: 0.02, torch.bfloat16: 0.2}[dtype] * spacing
    assert difference.max() < spacing


# ---------------------------------------------------------------------------------------------- fp32 fallback
@contextmanager
def non_finite_in_half_precision(denoiser: torch.nn.Module):
    """The denoiser returns Inf whenever autocast is on: what a float16 overflow does to a forecast."""
    handle = denoiser.register_forward_hook(
        lambda module, inputs, output: output * float("inf") if torch.is_autocast_enabled("cpu") else output)
    try:
        yield
    finally:
        handle.remove()


def test_non_finite_half_precision_forecast_is_rerun_in_fp32(modules, image, caplog) -> None:
    low = sibling(modules, "bfloat16")
    reference = sibling(modules, "float32").forecast(image, "push", num_samples=2, steps=3, seed=11)
    low.forecast(image, "push", num_samples=2, steps=3, seed=11)  # caches the bfloat16 text embedding
    cached = low.text_cache.get("push").clone()
    with non_finite_in_half_precision(modules.denoiser), caplog.at_level(logging.WARNING):
        first = low.forecast(image, "push", num_samples=2, steps=3, seed=11)
        second = low.forecast(image, "push", num_samples=2, steps=3, seed=None)
    assert low.fp32_fallbacks == 2
    assert first.dtype == "float32" and first.seed == 11 and np.isfinite(first.tracks).all()
    np.testing.assert_allclose(first.tracks, reference.tracks, atol=1e-3)  # the same noise, rerun in float32
    assert second.seed is not None and np.isfinite(second.tracks).all()
    assert first.timings["total"] >= first.timings["fp32_rerun"] > 0
    warnings = [r for r in caplog.records if "fp32_fallbacks" in r.getMessage()]
    assert len(warnings) == 1  # warned once
    torch.testing.assert_close(low.text_cache.get("push"), cached)  # the rerun did not replace the cache entry
    after = low.forecast(image, "push", num_samples=2, steps=3, seed=11)  # stress gone: half precision again
    assert after.dtype == "bfloat16" and low.fp32_fallbacks == 2


def test_fallback_reuses_given_noise(modules, image) -> None:
    low = sibling(modules, "bfloat16")
    noise = torch.randn(2, *low.latent_shape, generator=torch.Generator().manual_seed(3))
    expected = sibling(modules, "float32").forecast(image, "push", num_samples=2, steps=3, initial_noise=noise)
    with non_finite_in_half_precision(modules.denoiser):
        result = low.forecast(image, "push", num_samples=2, steps=3, initial_noise=noise)
    assert result.seed is None and low.fp32_fallbacks == 1
    np.testing.assert_allclose(result.tracks, expected.tracks, atol=1e-3)


def test_real_fp16_overflow_falls_back_and_fp32_failure_still_raises(image) -> None:
    """Weights scaled so that the MLP updates overflow float16 (65504) but not float32."""
    base = Forecaster.from_config(tiny_config(), seed=1)
    with torch.no_grad():
        for block in base.denoiser.blocks:
            block.mlp.fc2.weight.mul_(3e5)
    low = sibling(base, "bfloat16")
    with low.runtime.precision(torch.float16):  # the CUDA float16 path, emulated
        result = low.forecast(image, "push", num_samples=2, steps=3, seed=0)
    assert low.fp32_fallbacks == 1 and result.dtype == "float32" and np.isfinite(result.tracks).all()
    with torch.no_grad():
        base.denoiser.blocks[0].mlp.fc2.weight.fill_(float("nan"))
    full = sibling(base, "float32")
    with pytest.raises(TrajForecastError, match="even in float32"):
        full.forecast(image, "push", num_samples=1, steps=2, seed=0)
    assert full.fp32_fallbacks == 0


# ---------------------------------------------------------------------------------------------- graph cache
def test_lru_cache_evicts_least_recently_used_with_a_callback() -> None:
    evicted = []
    cache = LRUCache(2, on_evict=lambda key, value: evicted.append((key, value)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3)
    assert evicted == [("b", 2)] and cache.keys() == ["a", "c"]
    assert cache.get("b") is None and (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)
    cache.put("a", 10)  # replacing a key evicts nothing
    assert len(cache) == 2 and cache.evictions == 1 and cache.get("a") == 10
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            LRUCache(bad)


class FakeGraphDenoiser(CudaGraphDenoiser):
    """CudaGraphDenoiser's bookkeeping on CPU: 'capture' keeps the static buffers, 'replay' runs the denoiser on
    them; the device binding is recorded. Only the cache, buffer and binding logic is tested here: the real
    capture/replay path (torch.cuda.graph) runs only on a GPU, via ``bench/gpu_check.py``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replays = 0

    def _capture(self, x, t, features, text):
        static_inputs = [x.clone(), t.clone(), features.clone(), None if text is None else text.clone()]
        return CapturedGraph(graph=object(), static_inputs=static_inputs,
                             static_output=torch.empty_like(self.denoiser(*static_inputs)))

    def _replay(self, entry):
        self.replays += 1
        entry.static_output.copy_(self.denoiser(*entry.static_inputs))


def test_graph_cache_is_a_bounded_lru_per_batch_shape(denoiser_inputs) -> None:
    model = random_denoiser(tiny_config().denoiser)
    graphs = FakeGraphDenoiser(model, None, "cuda:1", cache_size=2)
    graphs._bound = lambda: torch.inference_mode()  # no CUDA here; the binding has its own test
    entries = {}
    with torch.inference_mode():
        for batch in (1, 8, 1, 32, 8, 1):
            inputs = denoiser_inputs(model, batch)
            out = graphs(*inputs)
            torch.testing.assert_close(out, model(*inputs))  # the call's own inputs, copied into the buffers
            key = CudaGraphDenoiser.key(inputs[0], inputs[2], inputs[3], None)
            entries.setdefault(batch, graphs.cache._items.get(key))
    # 1 and 8 captured, 1 hit, 32 evicts 8, 8 again evicts 1, 1 again evicts 32: 5 captures in 6 calls.
    assert graphs.captures == 5 and graphs.replays == 6
    assert graphs.cache.evictions == 3 and len(graphs.cache) == 2
    assert [key[0][0] for key in graphs.cache.keys()] == [8, 1]
    assert entries[32].graph is None and entries[32].static_output is None  # evicted: buffers (and pool) dropped
    with pytest.raises(ValueError, match="graph_cache_size"):
        SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=None, graph_cache_size=0)


def test_graph_denoiser_binds_its_own_device_from_any_thread(monkeypatch, denoiser_inputs) -> None:
    entered = []

    @contextmanager
    def fake_device(device):
        entered.append((threading.current_thread().name, torch.device(device)))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    model = random_denoiser(tiny_config().denoiser)
    graphs = FakeGraphDenoiser(model, None, torch.device("cuda", 1), cache_size=1)
    inputs = denoiser_inputs(model, 1)

    def call():
        with torch.inference_mode():
            graphs(*inputs)

    workers = [threading.Thread(target=call, name=f"worker-{i}") for i in range(2)]
    for worker in workers:
        worker.start()
        worker.join()
    assert entered == [("worker-0", torch.device("cuda", 1)), ("worker-1", torch.device("cuda", 1))]


def test_bound_to_device_enters_device_and_stream_only_on_cuda(monkeypatch) -> None:
    entered = []

    def recorder(kind):
        @contextmanager
        def enter(value):
            entered.append((kind, value, threading.current_thread().name))
            yield
        return enter

    monkeypatch.setattr(torch.cuda, "device", recorder("device"))
    monkeypatch.setattr(torch.cuda, "stream", recorder("stream"))
    with bound_to_device(torch.device("cpu"), stream="unused"):
        pass
    assert entered == []
    gpu = torch.device("cuda", 1)

    def call():
        with bound_to_device(gpu, stream="the forecaster's stream"):
            pass

    worker = threading.Thread(target=call, name="executor-thread")
    worker.start()
    worker.join()
    assert entered == [("device", gpu, "executor-thread"), ("stream", "the forecaster's stream", "executor-thread")]


def test_every_forecast_runs_bound_to_the_forecasters_device_and_stream(modules, image, monkeypatch) -> None:
    import traj_forecast_ros.forecaster as forecaster_module

    bound = []

    @contextmanager
    def recording(device, stream=None):
        bound.append((threading.current_thread().name, device, stream))
        yield

    monkeypatch.setattr(forecaster_module, "bound_to_device", recording)
    forecaster = sibling(modules, "float32")
    worker = threading.Thread(target=lambda: forecaster.forecast(image, "push", num_samples=1, steps=2, seed=0),
                              name="node-worker")
    worker.start()
    worker.join()
    assert bound == [("node-worker", forecaster.device, forecaster.runtime.stream)]
    assert forecaster.runtime.stream is None  # CPU: no stream; on CUDA a torch.cuda.Stream of forecaster.device


# ---------------------------------------------------------------------------------------------- gpu_check.py
def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_matches_the_most_specific_name() -> None:
    gpu_check = load_gpu_check()
    assert gpu_check.peaks_for_name("NVIDIA H200")[0] == "H200"
    assert gpu_check.peaks_for_name("NVIDIA GH200 480GB")[0] == "GH200"
    assert gpu_check.peaks_for_name("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert gpu_check.peaks_for_name("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert gpu_check.peaks_for_name("NVIDIA L40S")[0] == "L40S"
    assert gpu_check.peaks_for_name("NVIDIA L4")[0] == "L4"
    assert gpu_check.peaks_for_name("Tesla V100-SXM2-16GB")[1]["bfloat16"] is None
    assert gpu_check.peaks_for_name("Some Future GPU") == (None, {})


def test_gpu_check_quick_runs_end_to_end_on_cpu(tmp_path) -> None:
    """The CI proof that the device script works: every section runs (or says why not) and passes."""
    out = tmp_path / "check"
    run = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--quick", "--out", str(out),
                          "--budget-s", "240"],  # a loaded CI machine must not skip the node for time
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert report["result"] == "pass" and report["quick"]
    assert sections["policy"]["auto_dtype"] == "float32" and sections["policy"]["status"] == "pass"
    accuracy = sections["accuracy"]["dtypes"]
    assert accuracy["float16"]["status"] == "skipped" and "CPU" in accuracy["float16"]["reason"]
    assert accuracy["bfloat16"]["status"] == "pass" and 0 < accuracy["bfloat16"]["mean_px"]
    assert set(sections["stress"]["non_finite_samples"]) == {"float32", "bfloat16"}
    timed = [row for row in sections["timing"]["rows"] if row["status"] == "pass"]
    assert {(row["dtype"], row["samples"]) for row in timed} == {(d, k) for d in ("float32", "bfloat16")
                                                                 for k in (1, 2)}
    assert all(row["median_s"] > 0 and row["repeats"] == 3 and row["achieved_tflops"] > 0 for row in timed)
    assert report["flops_per_forecast"]["2"] > report["flops_per_forecast"]["1"] > 0
    assert sections["second_device"]["status"] == "skipped"
    node = sections["node"]
    if node["status"] == "skipped":  # only where the node cannot run at all
        assert "rclpy" in node["reason"]
    else:
        assert node["status"] == "pass" and node["all_frames_accounted"] and node["frames_unaccounted"] == 0
        assert node["forecasts_out"] >= 1 and node["node_device"] == "cpu" and node["fp32_fallbacks"] == "0"
        assert node["latency_ms"]["count"] == node["forecasts_out"]
        assert node["frames_in"] == 2  # --quick replays a 2-frame bag (the node run is the slow part)
    table = (out / "gpu_check.md").read_text()
    assert "| float32 | 1 | plain |" in table and "# gpu_check: PASS" in table


def test_gpu_check_fails_loudly_without_the_device(tmp_path) -> None:
    run = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cuda:3", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode != 0 and "CUDA is not available" in run.stderr


def test_gpu_check_report_fails_on_a_failed_section() -> None:
    gpu_check = load_gpu_check()
    report = {"device": "cuda:0", "quick": False, "wall_s": 1.0, "result": "fail",
              "sections": {"policy": {"status": "pass", "auto_dtype": "bfloat16"},
                           "timing": {"status": "fail", "rows": [
                               {"dtype": "float16", "samples": 8, "mode": "graphs", "status": "fail",
                                "error": "differs from the plain run"}]}}}
    table = gpu_check.markdown(report)
    assert "# gpu_check: FAIL" in table and "| timing | fail |" in table
    assert "| float16 | 8 | graphs | - |" in table and "differs from the plain run" in table


# ---------------------------------------------------------------------------------------------- node parameters
def test_node_parameters_for_the_gpu_path() -> None:
    pytest.importorskip("rcl_interfaces.msg")
    from traj_forecast_ros.ros.params import PARAMETER_SPECS

    assert PARAMETER_SPECS["use_cuda_graphs"].default is False and PARAMETER_SPECS["compile"].default is False
    assert PARAMETER_SPECS["graph_cache_size"].check(4) is None
    assert PARAMETER_SPECS["graph_cache_size"].check(0) is not None
    device = PARAMETER_SPECS["device"]
    assert device.check("cuda:1") is None and device.check("auto") is None
    assert "mps" in device.check("mps")  # refused: resolve_device does not support it
    assert "mps" not in device.description
    for path in (REPO / "README.md", REPO / "config" / "forecast.yaml"):
        assert not re.search(r"\bmps\b", path.read_text()), path


def test_diagnostics_report_fp32_fallbacks() -> None:
    pytest.importorskip("diagnostic_msgs.msg")
    from traj_forecast_ros.ros.diagnostics import diagnostic_status
    from traj_forecast_ros.ros.pipeline import PipelineStats

    snapshot = PipelineStats(window=10).snapshot()
    status = diagnostic_status("n", "active", snapshot, {"dtype": "bfloat16"}, 0, fp32_fallbacks=3)
    assert {kv.key: kv.value for kv in status.values}["fp32_fallbacks"] == "3"
