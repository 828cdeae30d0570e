"""The sampling plan: per-device defaults, the per-model CPU choice (size rule, timed probe, cache), what runs once
per forecaster / image / sample, plan switches, forecasters in different threads, fast vs reference accuracy."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from traj_forecast_ros.cpu_cores import available_cores, cgroup_cpu_limit
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.fast_cpu_path import VAEWithOps
from traj_forecast_ros.model.denoiser import DenoiserWithOps, LatteDenoiser
from traj_forecast_ros.model.presets import libero_config, tiny_config
from traj_forecast_ros.sampling_plan import (
    DEFAULT_SAMPLE_BATCH_SIZE,
    ROWS_PER_CALL,
    SamplingPlan,
    choose_sampling_plan,
    cpu_size_rule,
    plan_for_model,
    weights_identity,
)

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo-blocks"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)


@pytest.fixture
def forecaster() -> Forecaster:
    return Forecaster.from_config(tiny_config(), seed=0)


def count_calls(monkeypatch, owner, name: str) -> list:
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0] if args and hasattr(args[0], "shape") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_cpu_defaults_and_validation() -> None:
    plan = choose_sampling_plan("cpu")
    assert plan == SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=1)
    # the CPU device default is what the size rule picks for a LIBERO-size model (the fallback when no model is
    # known), and every device default is a valid plan ("cuda": None runs all K in one call)
    with torch.device("meta"):
        libero = LatteDenoiser(libero_config("atm").denoiser)
    assert DEFAULT_SAMPLE_BATCH_SIZE["cpu"] == cpu_size_rule(libero, torch.float32)["sample_batch_size"]
    for device_type, batch in DEFAULT_SAMPLE_BATCH_SIZE.items():
        assert "sample batch " + (str(batch) if batch else "all") in SamplingPlan(
            device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=batch).summary(), device_type
    assert plan.fast_cpu_kernels and plan.cache_query_tokens and not plan.use_compile and not plan.use_cuda_graph
    assert plan.fold_modulation and plan.attention == "sdpa" and plan.chosen_by == "device default"
    assert choose_sampling_plan("cpu", "bf16", sample_batch_size=0).dtype == torch.bfloat16
    assert choose_sampling_plan("cpu", sample_batch_size=0).sample_batch_size is None
    assert "sample batch 1" in plan.summary() and "float32" in plan.summary()
    with pytest.raises(ValueError, match="CUDA graphs"):
        choose_sampling_plan("cpu", use_cuda_graph=True)
    with pytest.raises(ValueError, match="sample_batch_size"):
        SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=-2)
    with pytest.raises(ValueError, match="attention"):
        SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=1, attention="flash")
    with pytest.raises(ValueError, match="threads"):
        SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=1, threads=0)
    assert set(SamplingPlan.PER_IMAGE + SamplingPlan.PER_INSTRUCTION + SamplingPlan.PER_SAMPLE) == {
        "image_encoder", "vae_encode", "text_encoder", "denoise", "vae_decode"}


def test_size_rule_batches_small_models_and_not_libero() -> None:
    """All K at once for small models; one LIBERO-size sample already fills a call; bf16 takes explicit attention."""
    with torch.device("meta"):  # shapes only: no 25M-parameter allocation
        libero = LatteDenoiser(libero_config("atm").denoiser)
    small = LatteDenoiser(tiny_config().denoiser)
    assert libero.num_frames * libero.num_tokens == ROWS_PER_CALL
    assert cpu_size_rule(libero, torch.float32) == {"sample_batch_size": 1, "fold_modulation": True,
                                                     "attention": "sdpa"}
    assert cpu_size_rule(libero, torch.bfloat16)["attention"] == "explicit"
    rule = cpu_size_rule(small, torch.float32)
    assert rule["sample_batch_size"] >= 8  # a K=8 forecast in one call
    base = choose_sampling_plan("cpu")
    planned = plan_for_model(base, small, 8)
    assert planned.chosen_by == "size rule" and planned.threads == torch.get_num_threads()
    assert planned.sample_batch_size == rule["sample_batch_size"] and "size rule" in planned.summary()
    unchanged = dataclasses.replace(base, fast_cpu_kernels=False)
    assert plan_for_model(unchanged, small, 8) is unchanged  # reference modules: nothing to choose


def test_probe_decision_is_cached_and_survives_bad_caches(tmp_path) -> None:
    small = LatteDenoiser(tiny_config().denoiser).eval()
    base = choose_sampling_plan("cpu")
    probed = plan_for_model(base, small, 4, probe=True, cache_dir=tmp_path, model_name="tiny/model")
    assert probed.chosen_by == "probe" and probed.attention in ("sdpa", "explicit")
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("tiny_model-")  # no path separator from the name
    stored = json.loads(files[0].read_text())
    assert len(stored["probe_ms_per_sample"]) == 4 and all(ms > 0 for ms in stored["probe_ms_per_sample"].values())
    cached = plan_for_model(base, small, 4, probe=True, cache_dir=tmp_path, model_name="tiny/model")
    assert cached.chosen_by == "cache"
    assert (cached.sample_batch_size, cached.fold_modulation, cached.attention) == (
        probed.sample_batch_size, probed.fold_modulation, probed.attention)
    files[0].write_text('{"sample_batch_size": -3, "fold_modulation": true, "attention": "sdpa"}')
    assert plan_for_model(base, small, 4, probe=True, cache_dir=tmp_path).chosen_by == "probe"  # invalid: redone
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert plan_for_model(base, small, 4, probe=True, cache_dir=blocked / "plans").chosen_by == "probe"  # unwritable


def test_forecaster_exposes_and_switches_its_plan(forecaster) -> None:
    assert forecaster.plan.device == forecaster.device and forecaster.plan.dtype == forecaster.dtype
    assert forecaster.plan.chosen_by == "size rule" and forecaster.sample_batch_size >= 8
    forecaster.sample_batch_size = 0  # legacy shortcut: 0 / None = all K at once
    assert forecaster.plan.sample_batch_size is None and forecaster.sample_batch_size is None
    assert forecaster.plan.chosen_by == "given"  # no longer the size rule's choice
    forecaster.plan = dataclasses.replace(forecaster.plan, sample_batch_size=2, chosen_by="size rule")
    assert forecaster.plan.chosen_by == "given"
    assert forecaster.sample_batch_size == 2
    with pytest.raises(ValueError, match="does not fit"):
        forecaster.plan = choose_sampling_plan("cpu", "bfloat16")
    custom = choose_sampling_plan("cpu", "bfloat16", sample_batch_size=3)
    built = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                       forecaster.text_encoder, "custom", plan=custom)
    assert built.plan is custom and built.dtype == torch.bfloat16
    pinned = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                        forecaster.text_encoder, "pinned", device="cpu", sample_batch_size=1)
    assert pinned.sample_batch_size == 1 and pinned.plan.chosen_by == "device default"  # explicit: kept


def test_work_per_forecaster_image_and_sample(forecaster, image, monkeypatch) -> None:
    """Query tokens once per forecaster, DINO and the posterior once per image, the per-image denoiser work
    (context projections) once per chunk of samples, the per-step work once per Euler step and chunk."""
    embeds = count_calls(monkeypatch, VAEWithOps, "embed_tracks")
    encodes = count_calls(monkeypatch, VAEWithOps, "encode_tokens")
    decodes = []
    original_decode = VAEWithOps.decode
    monkeypatch.setattr(VAEWithOps, "decode", lambda self, z, f: decodes.append(z.shape[0]) or original_decode(
        self, z, f))
    images = count_calls(monkeypatch, forecaster.conditioner, "encode_image")
    binds, steps = [], []
    original_bind = DenoiserWithOps.bind

    def counted_bind(self, features, text=None):
        binds.append(features.shape[0])
        step = original_bind(self, features, text)
        return lambda x, t: steps.append(x.shape[0]) or step(x, t)

    monkeypatch.setattr(DenoiserWithOps, "bind", counted_bind)
    for _ in range(2):
        forecaster.forecast(image, "push", num_samples=3, steps=4, seed=1)
    assert len(embeds) == 1
    assert len(images) == 2 and len(encodes) == 2
    assert binds == [1, 1] and steps == [3] * (2 * 3) and decodes == [3, 3]  # all K per call, one image row
    forecaster.sample_batch_size = 1
    binds.clear(), steps.clear(), decodes.clear()
    forecaster.forecast(image, "push", num_samples=3, steps=4, seed=1)
    assert binds == [1] * 3 and steps == [1] * 9 and decodes == [1] * 3


def test_cached_query_tokens_give_the_full_encode(forecaster) -> None:
    features = torch.randn(1, forecaster.denoiser.num_frame_tokens, forecaster.denoiser.frame_features_dim)
    with torch.inference_mode():
        mean, std = forecaster.condition_posterior(features)  # [1, 1, C, h, w]
        full_mean, full_std = forecaster.vae.encode(forecaster.conditioner.static_tracks, features)  # [1, T, L, C]
    from traj_forecast_ros.model.flow import latents_to_grid

    scale = forecaster.conditioner.latent_scale
    torch.testing.assert_close(mean, latents_to_grid(full_mean[:, :1], forecaster.vae.latent_grid) * scale)
    torch.testing.assert_close(std, latents_to_grid(full_std[:, :1], forecaster.vae.latent_grid) * scale)


def test_plans_agree_on_the_same_noise(forecaster, image) -> None:
    """Every CPU kernel choice, batch 1/all, and the reference modules: the same forecast up to float32 rounding;
    bfloat16 within a pixel."""
    reference_plan = dataclasses.replace(forecaster.plan, fast_cpu_kernels=False, sample_batch_size=1)
    reference = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                           forecaster.text_encoder, "reference", plan=reference_plan)
    expected = reference.forecast(image, "lift", num_samples=2, steps=4, seed=5, anchor=False).tracks  # raw
    for batch in (1, None):
        for fold in (True, False):
            for attention in ("sdpa", "explicit"):
                forecaster.plan = dataclasses.replace(forecaster.plan, sample_batch_size=batch, fold_modulation=fold,
                                                      attention=attention)
                tracks = forecaster.forecast(image, "lift", num_samples=2, steps=4, seed=5, anchor=False).tracks
                np.testing.assert_allclose(tracks, expected, rtol=0, atol=1e-4)
    low = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                     forecaster.text_encoder, "bf16", dtype="bfloat16")
    assert low.plan.attention == "explicit"
    low_tracks = low.forecast(image, "lift", num_samples=2, steps=4, seed=5, anchor=False).tracks
    assert np.abs(low_tracks - expected).mean() < 1.0


@pytest.mark.skipif(not (DEMO_MODEL / "denoiser.safetensors").is_file(), reason="demo-blocks weights not shipped")
def test_shipped_model_fast_plan_matches_reference_within_1e4_px(tmp_path) -> None:
    """fp32 accuracy of the plan a user gets (demo-blocks, K=8, 10 time points, a real LIBERO frame): the same
    tracks as the reference modules one sample at a time, within 1e-4 px plus 2e-6 of the coordinate (float32
    sums in another order: on an AVX2-only CPU 7 of 196,608 values far from the origin, at 54-72 px, differ by
    1.2e-4 px, 2e-6 relative), and within 1e-5 px on average (measured 6.5e-6)."""
    from PIL import Image

    frame = np.asarray(Image.open(REPO.parent / "shared" / "data" / "images" / "libero_agent_0.jpg").convert("RGB"))
    fast = Forecaster.from_pretrained(DEMO_MODEL, device="cpu", dtype="float32", plan_probe=False)
    assert fast.plan.fast_cpu_kernels and fast.sample_batch_size >= 8
    reference = Forecaster(fast.config, fast.denoiser, fast.vae, fast.image_encoder, fast.text_encoder, "reference",
                           plan=dataclasses.replace(fast.plan, fast_cpu_kernels=False, sample_batch_size=1))
    tracks = fast.forecast(frame, num_samples=8, steps=10, seed=3, anchor=False).tracks  # the raw decoder output
    expected = reference.forecast(frame, num_samples=8, steps=10, seed=3, anchor=False).tracks
    assert np.abs(tracks[:, -1] - tracks[:, 0]).max() > 1.0  # the tracks move: the comparison means something
    np.testing.assert_allclose(tracks, expected, rtol=2e-6, atol=1e-4)
    assert np.abs(tracks - expected).mean() < 1e-5


def test_forecasters_in_different_threads_do_not_affect_each_other(forecaster, image) -> None:
    """A fast-kernel and a reference forecaster over the same modules, run concurrently from two threads, give
    bit for bit what each gives alone (a process-wide kernel switch flipped per call would mix their paths)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread per caller: results bit-reproducible whatever ran before
    try:
        _check_concurrent_forecasters(forecaster, image)
    finally:
        torch.set_num_threads(previous_threads)


def _check_concurrent_forecasters(forecaster: Forecaster, image: np.ndarray) -> None:
    reference = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                           forecaster.text_encoder, "reference",
                           plan=dataclasses.replace(forecaster.plan, fast_cpu_kernels=False))
    alone = {name: f.forecast(image, "push", num_samples=2, steps=4, seed=9).tracks
             for name, f in (("fast", forecaster), ("reference", reference))}
    assert not np.array_equal(alone["fast"], alone["reference"])  # the two paths round differently
    results = {"fast": [], "reference": []}
    errors = []
    start = threading.Barrier(2)

    def run(name: str, runner: Forecaster) -> None:
        try:
            start.wait()
            for _ in range(4):
                results[name].append(runner.forecast(image, "push", num_samples=2, steps=4, seed=9).tracks)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in (("fast", forecaster), ("reference", reference))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    for name, runs in results.items():
        assert len(runs) == 4
        for tracks in runs:
            np.testing.assert_array_equal(tracks, alone[name])


def test_plan_setters_take_the_forecast_lock(forecaster) -> None:
    """Switching the plan waits for a running forecast: both setters apply it under the forecaster's lock."""
    held = []
    apply_plan = forecaster.runtime.apply

    def recording(plan):
        held.append(forecaster._lock.locked())
        apply_plan(plan)

    forecaster.runtime.apply = recording
    forecaster.sample_batch_size = 3
    forecaster.plan = dataclasses.replace(forecaster.plan, sample_batch_size=2)
    assert held == [True, True] and forecaster.sample_batch_size == 2


def test_probe_cache_is_keyed_by_weights_dtype_and_threads(tmp_path) -> None:
    """Two models with one architecture but other weights never share a cached decision; nor do dtypes or
    thread counts. The same weights (another module object) find it."""
    torch.manual_seed(0)
    first = LatteDenoiser(tiny_config().denoiser).eval()
    torch.manual_seed(1)
    second = LatteDenoiser(tiny_config().denoiser).eval()
    twin = LatteDenoiser(tiny_config().denoiser).eval()
    twin.load_state_dict(first.state_dict())
    assert weights_identity(first.state_dict()) == weights_identity(twin.state_dict())
    assert weights_identity(first.state_dict()) != weights_identity(second.state_dict())
    with torch.device("meta"):
        assert weights_identity(LatteDenoiser(tiny_config().denoiser).state_dict()) is None
    base = choose_sampling_plan("cpu")
    assert plan_for_model(base, first, 4, probe=True, cache_dir=tmp_path).chosen_by == "probe"
    assert plan_for_model(base, twin, 4, probe=True, cache_dir=tmp_path).chosen_by == "cache"
    assert plan_for_model(base, second, 4, probe=True, cache_dir=tmp_path).chosen_by == "probe"
    other_threads = dataclasses.replace(base, threads=torch.get_num_threads() + 1)
    assert plan_for_model(other_threads, first, 4, cache_dir=tmp_path, cache_only=True).chosen_by == "size rule"
    bf16 = choose_sampling_plan("cpu", "bfloat16")
    assert plan_for_model(bf16, first, 4, cache_dir=tmp_path, cache_only=True).chosen_by == "size rule"
    assert len(list(tmp_path.glob("*.json"))) == 2
    # cache_only (traj-forecast info) never probes: the cached decision, else the size rule, and nothing written
    assert plan_for_model(base, first, 4, cache_dir=tmp_path, cache_only=True).chosen_by == "cache"
    assert plan_for_model(base, first, 4, cache_dir=tmp_path / "empty", cache_only=True).chosen_by == "size rule"
    assert not (tmp_path / "empty").exists()


@pytest.mark.skipif(not (DEMO_MODEL / "denoiser.safetensors").is_file(), reason="demo-blocks weights not shipped")
def test_from_pretrained_keeps_probe_decisions_in_its_cache_dir(tmp_path) -> None:
    """from_pretrained(cache_dir=...) probes into <cache_dir>/plans, not the cache home; a second load reads it."""
    from traj_forecast_ros.registry import cache_home

    home_plans = cache_home() / "plans"
    before = sorted(home_plans.glob("*.json")) if home_plans.is_dir() else []
    first = Forecaster.from_pretrained(DEMO_MODEL, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert first.plan.chosen_by == "probe" and len(list((tmp_path / "plans").glob("*.json"))) == 1
    again = Forecaster.from_pretrained(DEMO_MODEL, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert again.plan.chosen_by == "cache" and again.plan.attention == first.plan.attention
    assert (sorted(home_plans.glob("*.json")) if home_plans.is_dir() else []) == before
    sibling = again.sibling(dtype="float32", plan_probe=True)  # the same cache travels with the modules
    assert sibling.plan.chosen_by == "cache"


def test_tests_never_touch_the_user_cache() -> None:
    """test/conftest.py points TRAJ_FORECAST_HOME at a per-run temporary folder."""
    import os
    import tempfile

    from traj_forecast_ros.registry import cache_home

    assert Path(os.environ["TRAJ_FORECAST_HOME"]) == cache_home()
    assert Path(tempfile.gettempdir()).resolve() in cache_home().resolve().parents


def _cgroup(tmp_path: Path, files: dict) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cgroup_cpu_quota_caps_the_available_cores(tmp_path) -> None:
    v2 = _cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(v2) == 1.5
    assert available_cores(v2) == min(2, available_cores(tmp_path / "none"))  # 1.5 cores: 2 threads, rounded up
    assert cgroup_cpu_limit(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) is None
    small = _cgroup(tmp_path / "v2small", {"cpu.max": "20000 100000"})
    assert cgroup_cpu_limit(small) == 0.2 and available_cores(small) == 1  # never below one core
    v1 = _cgroup(tmp_path / "v1", {"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "50000"})
    assert cgroup_cpu_limit(v1) == 2.0
    unlimited = _cgroup(tmp_path / "v1none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(unlimited) is None
    garbage = _cgroup(tmp_path / "bad", {"cpu.max": "lots 0"})
    assert cgroup_cpu_limit(garbage) is None and cgroup_cpu_limit(tmp_path / "none") is None
    assert available_cores(tmp_path / "none") >= 1


def test_cpu_plan_probe_is_keyed_on_the_k_it_will_serve(tmp_path, monkeypatch) -> None:
    """The forecaster probes for its configured K (num_samples), and the cached decision is per K: another K
    probes again into its own file, the same K reads the cache."""
    import traj_forecast_ros.sampling_plan as sampling_plan

    probed = []
    probe = sampling_plan.probe_cpu_plan

    def recording(plan, denoiser, num_samples, repeats=3):
        probed.append(num_samples)
        return probe(plan, denoiser, num_samples, repeats=1)

    monkeypatch.setattr(sampling_plan, "probe_cpu_plan", recording)
    options = dict(device="cpu", dtype="float32", plan_probe=True, plan_cache_dir=tmp_path)
    two = Forecaster.from_config(tiny_config(), num_samples=2, **options)
    assert two.plan.chosen_by == "probe" and probed == [2]
    assert Forecaster.from_config(tiny_config(), num_samples=2, **options).plan.chosen_by == "cache"
    eight = Forecaster.from_config(tiny_config(), **options)  # the default K
    assert eight.plan.chosen_by == "probe" and probed == [2, DEFAULT_NUM_SAMPLES]
    assert Forecaster.from_config(tiny_config(), num_samples=DEFAULT_NUM_SAMPLES, **options).plan.chosen_by == "cache"
    assert len(list(tmp_path.glob("*.json"))) == 2 and probed == [2, DEFAULT_NUM_SAMPLES]
    with pytest.raises(ValueError, match="num_samples"):
        Forecaster.from_config(tiny_config(), num_samples=0, **options)
