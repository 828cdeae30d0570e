"""Classifier-free guidance: the sampler's batched conditional + unconditional call, and the Forecaster's switch."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch
from torch import nn

from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.config import ModelConfig, check_guidance_scale
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.flow import euler_sample
from traj_forecast_ros.model.presets import tiny_config


class CountingDenoiser(nn.Module):
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: List[int] = []

    def forward(self, x, t, frame_features, text_embeds=None):
        self.batches.append(int(x.shape[0]))
        return self.inner(x, t, frame_features, text_embeds)


def _inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(batch, 1, 4, 4, 4, generator=gen)
    noise = torch.randn(batch, 3, 4, 4, 4, generator=gen)
    features = torch.randn(1, 16, 32, generator=gen)
    text, null = torch.randn(1, 32, generator=gen), torch.randn(1, 32, generator=gen)
    return cond, noise, features, text, null


def _reference_guided(model, cond, noise, features, text, null, scale: float, steps: int) -> torch.Tensor:
    """Euler with guidance written out: two separate denoiser calls per step."""
    batch = cond.shape[0]
    x = torch.cat([cond, noise], dim=1)
    times = torch.linspace(0.0, 1.0, steps)
    features = features.expand(batch, -1, -1)
    for k in range(steps - 1):
        x[:, :1] = cond
        t = times[k].expand(batch)
        conditional = model(x, t, features, text.expand(batch, -1))
        unconditional = model(x, t, features, null.expand(batch, -1))
        velocity = unconditional + scale * (conditional - unconditional)
        x[:, 1:] += (times[k + 1] - times[k]) * velocity[:, 1:]
    x[:, :1] = cond
    return x


def test_guided_sampling_is_one_batched_call_per_step_and_matches_two_calls(tiny: ModelConfig, randomize):
    model = CountingDenoiser(randomize(LatteDenoiser(tiny.denoiser), std=0.05).eval())
    cond, noise, features, text, null = _inputs()
    guided = euler_sample(model, cond, noise, features, text, steps=5, guidance_scale=3.0, null_text_embeds=null)
    assert model.batches == [4] * 4  # conditional and unconditional rows of both samples, one call per step
    reference = _reference_guided(model.inner, cond, noise, features, text, null, 3.0, steps=5)
    torch.testing.assert_close(guided, reference, rtol=1e-5, atol=1e-5)
    plain = euler_sample(model.inner, cond, noise, features, text, steps=5)
    assert (guided - plain).abs().max() > 1e-3  # guidance changes the result


def test_guidance_one_is_exactly_the_plain_sampler(tiny: ModelConfig, randomize):
    model = CountingDenoiser(randomize(LatteDenoiser(tiny.denoiser), std=0.05).eval())
    cond, noise, features, text, null = _inputs()
    plain = euler_sample(model, cond, noise, features, text, steps=4)
    same = euler_sample(model, cond, noise, features, text, steps=4, guidance_scale=1.0, null_text_embeds=null)
    assert torch.equal(plain, same) and model.batches == [2] * 6  # no unconditional rows at all


def test_guidance_needs_the_null_embedding(tiny: ModelConfig, randomize):
    model = randomize(LatteDenoiser(tiny.denoiser), std=0.05).eval()
    cond, noise, features, text, _ = _inputs()
    with pytest.raises(ValueError, match="null_text_embeds"):
        euler_sample(model, cond, noise, features, text, steps=3, guidance_scale=2.0)


@pytest.mark.parametrize("bad", [float("nan"), -0.5, 21.0, True, "2"])
def test_guidance_scale_is_checked(bad):
    with pytest.raises(ValueError, match="guidance_scale"):
        check_guidance_scale(bad)


def test_config_refuses_default_guidance_without_a_null_instruction():
    with pytest.raises(ValueError, match="null_instruction"):
        ModelConfig(guidance_scale=2.0)
    with pytest.raises(ValueError, match="text encoder"):  # nothing to embed the null instruction with
        ModelConfig(guidance_scale=2.0, null_instruction="", text_encoder=None)
    assert not ModelConfig().supports_guidance  # the LIBERO default: no null embedding, guidance off
    restored = ModelConfig.from_dict({**tiny_config().to_dict(), "null_instruction": "", "guidance_scale": 2.5})
    assert restored.supports_guidance and restored.guidance_scale == 2.5


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def test_forecaster_guidance_switch(image):
    config = tiny_config()
    config.null_instruction = ""
    model = Forecaster.from_config(config, seed=0)
    base = model.forecast(image, "pick up the cube", num_samples=2, steps=4, seed=3)
    explicit_one = model.forecast(image, "pick up the cube", num_samples=2, steps=4, seed=3, guidance_scale=1.0)
    assert np.array_equal(base.tracks, explicit_one.tracks) and base.guidance_scale == 1.0
    guided = model.forecast(image, "pick up the cube", num_samples=2, steps=4, seed=3, guidance_scale=4.0)
    assert guided.guidance_scale == 4.0 and np.abs(guided.tracks - base.tracks).max() > 1e-4
    config.guidance_scale = 4.0  # the model's stored default is used when the caller gives none
    assert np.array_equal(model.forecast(image, "pick up the cube", num_samples=2, steps=4, seed=3).tracks,
                          guided.tracks)


def test_forecaster_without_null_embedding_refuses_guidance(image):
    model = Forecaster.from_config(tiny_config(), seed=0)  # like the LIBERO checkpoints: no null_instruction
    with pytest.raises(ValueError, match="instruction dropout"):
        model.forecast(image, "x", num_samples=1, steps=2, seed=0, guidance_scale=2.0)
    assert model.forecast(image, "x", num_samples=1, steps=2, seed=0, guidance_scale=1.0).guidance_scale == 1.0
