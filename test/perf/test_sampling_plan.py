"""The sampling plan: per-device defaults, what runs once per forecaster / image / sample, plan switches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.sampling_plan import DEFAULT_SAMPLE_BATCH_SIZE, SamplingPlan, choose_sampling_plan
from traj_forecast_ros.model.config import tiny_config


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
    assert DEFAULT_SAMPLE_BATCH_SIZE == {"cpu": 1, "cuda": None}
    assert plan.fast_cpu_kernels and plan.cache_query_tokens and not plan.use_compile and not plan.use_cuda_graph
    assert choose_sampling_plan("cpu", "bf16", sample_batch_size=0).dtype == torch.bfloat16
    assert choose_sampling_plan("cpu", sample_batch_size=0).sample_batch_size is None
    assert "sample batch 1" in plan.summary() and "float32" in plan.summary()
    with pytest.raises(ValueError, match="CUDA graphs"):
        choose_sampling_plan("cpu", use_cuda_graph=True)
    with pytest.raises(ValueError, match="sample_batch_size"):
        SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, sample_batch_size=-2)
    assert set(SamplingPlan.PER_IMAGE + SamplingPlan.PER_INSTRUCTION + SamplingPlan.PER_SAMPLE) == {
        "image_encoder", "vae_encode", "text_encoder", "denoise", "vae_decode"}


def test_forecaster_exposes_and_switches_its_plan(forecaster) -> None:
    assert forecaster.plan.device == forecaster.device and forecaster.plan.dtype == forecaster.dtype
    assert forecaster.sample_batch_size == 1
    forecaster.sample_batch_size = 0  # legacy shortcut: 0 / None = all K at once
    assert forecaster.plan.sample_batch_size is None and forecaster.sample_batch_size is None
    forecaster.plan = dataclasses.replace(forecaster.plan, sample_batch_size=2)
    assert forecaster.sample_batch_size == 2
    with pytest.raises(ValueError, match="does not fit"):
        forecaster.plan = choose_sampling_plan("cpu", "bfloat16")
    custom = choose_sampling_plan("cpu", "bfloat16", sample_batch_size=3)
    built = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                       forecaster.text_encoder, "custom", plan=custom)
    assert built.plan is custom and built.dtype == torch.bfloat16


def test_work_per_forecaster_image_and_sample(forecaster, image, monkeypatch) -> None:
    """Query tokens once per forecaster, DINO and the posterior once per image, denoiser/decoder per sample."""
    embeds = count_calls(monkeypatch, forecaster.vae, "embed_tracks")
    encodes = count_calls(monkeypatch, forecaster.vae, "encode_tokens")
    decodes = count_calls(monkeypatch, forecaster.vae, "decode")
    images = count_calls(monkeypatch, forecaster, "encode_image")
    denoised = count_calls(monkeypatch, forecaster.denoiser, "forward")
    for _ in range(2):
        forecaster.forecast(image, "push", num_samples=3, steps=4, seed=1)
    assert len(embeds) == 1
    assert len(images) == 2 and len(encodes) == 2
    assert denoised == [1] * (2 * 3 * 3) and decodes == [1] * (2 * 3)  # batch 1 on CPU: K x 3 evaluations
    forecaster.sample_batch_size = None
    denoised.clear(), decodes.clear()
    forecaster.forecast(image, "push", num_samples=3, steps=4, seed=1)
    assert denoised == [3] * 3 and decodes == [3]


def test_cached_query_tokens_give_the_full_encode(forecaster) -> None:
    features = torch.randn(1, forecaster.denoiser.num_frame_tokens, forecaster.denoiser.frame_features_dim)
    with torch.inference_mode():
        mean, std = forecaster.condition_posterior(features)  # [1, 1, C, h, w]
        full_mean, full_std = forecaster.vae.encode(forecaster._static_tracks, features)  # [1, T, L, C]
    from traj_forecast_ros.model.flow import latents_to_grid

    scale = forecaster._latent_scale
    torch.testing.assert_close(mean, latents_to_grid(full_mean[:, :1], forecaster.vae.latent_grid) * scale)
    torch.testing.assert_close(std, latents_to_grid(full_std[:, :1], forecaster.vae.latent_grid) * scale)


def test_plans_agree_on_the_same_noise(forecaster, image) -> None:
    """Fast kernels on/off, batch 1/all: the same forecast up to float32 rounding; bfloat16 within a pixel."""
    reference = forecaster.forecast(image, "lift", num_samples=2, steps=4, seed=5).tracks
    forecaster.plan = dataclasses.replace(forecaster.plan, fast_cpu_kernels=False, sample_batch_size=None)
    plain = forecaster.forecast(image, "lift", num_samples=2, steps=4, seed=5).tracks
    np.testing.assert_allclose(plain, reference, rtol=0, atol=1e-3)
    low = Forecaster(forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                     forecaster.text_encoder, "bf16", dtype="bfloat16")
    low_tracks = low.forecast(image, "lift", num_samples=2, steps=4, seed=5).tracks
    assert np.abs(low_tracks - reference).mean() < 1.0
