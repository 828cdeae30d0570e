"""Rectified flow: Euler sampler semantics, flow-matching loss, latent layout helpers."""

from __future__ import annotations

from typing import List, Optional

import pytest
import torch
from torch import nn

from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.flow import euler_sample, flow_matching_loss, grid_to_latents, latents_to_grid


class RecordingField(nn.Module):
    """Velocity v(x) = -x (also on frame 0, which the sampler must mask); records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[tuple] = []

    def forward(self, x, t, frame_features, text_embeds=None):
        self.calls.append((x.clone(), t.clone(), frame_features, text_embeds))
        return -x


class ZeroField(nn.Module):
    """Predicts zero velocity; records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.inputs: Optional[tuple] = None

    def forward(self, x, t, frame_features, text_embeds=None):
        self.inputs = (x.clone(), t.clone())
        return torch.zeros_like(x) + self.anchor


def test_latent_layout_round_trip_row_major() -> None:
    latents = torch.randn(2, 3, 12, 5)
    grid = latents_to_grid(latents, (3, 4))
    assert grid.shape == (2, 3, 5, 3, 4)
    torch.testing.assert_close(grid[1, 2, :, 1, 3], latents[1, 2, 1 * 4 + 3])  # token k -> (k // w, k % w)
    torch.testing.assert_close(grid_to_latents(grid), latents)
    square = torch.randn(1, 2, 16, 8)
    assert latents_to_grid(square).shape == (1, 2, 8, 4, 4)
    with pytest.raises(ValueError, match="square"):
        latents_to_grid(latents)


@pytest.mark.parametrize("steps", [2, 4, 10])
def test_euler_sample_evaluations_times_and_pinned_frame(steps: int) -> None:
    field = RecordingField()
    cond = torch.randn(2, 1, 3, 2, 2)
    noise = torch.randn(2, 4, 3, 2, 2)
    features = torch.randn(2, 5, 6)
    text = torch.randn(2, 7)
    out = euler_sample(field, cond, noise, features, text, steps=steps)

    assert len(field.calls) == steps - 1
    for k, (x, t, f, e) in enumerate(field.calls):
        torch.testing.assert_close(t, torch.full((2,), k / (steps - 1)))
        torch.testing.assert_close(x[:, :1], cond)  # frame 0 re-imposed before every call
        assert f is features and e is text
    assert out.shape == (2, 5, 3, 2, 2)
    torch.testing.assert_close(out[:, :1], cond)
    # v = -x integrated with steps-1 Euler steps of size 1/(steps-1)
    factor = (1 - 1 / (steps - 1)) ** (steps - 1)
    torch.testing.assert_close(out[:, 1:], noise * factor)


def test_euler_sample_validates_inputs() -> None:
    cond, noise, features = torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="steps >= 2"):
        euler_sample(RecordingField(), cond, noise, features, steps=1)
    with pytest.raises(ValueError, match="noise"):
        euler_sample(RecordingField(), cond, noise[:, :, :1], features)


def test_euler_sample_with_tiny_denoiser(tiny: ModelConfig, randomize) -> None:
    model = randomize(LatteDenoiser(tiny.denoiser), std=0.05).eval()
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 1, 4, 4, 4, generator=gen)
    noise = torch.randn(2, 3, 4, 4, 4, generator=gen)
    features, text = torch.randn(2, 16, 32, generator=gen), torch.randn(2, 32, generator=gen)
    out = euler_sample(model, cond, noise, features, text, steps=4)
    assert out.shape == (2, 4, 4, 4, 4) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[:, :1], cond)
    assert not torch.allclose(out[:, 1:], noise)
    torch.testing.assert_close(out, euler_sample(model, cond, noise, features, text, steps=4))


def test_flow_loss_interpolant_target_and_mask() -> None:
    field = ZeroField()
    x1 = torch.randn(3, 4, 2, 2, 2)
    cond = torch.randn(3, 1, 2, 2, 2)
    loss = flow_matching_loss(field, x1, cond, torch.zeros(3, 1, 1), None, torch.Generator().manual_seed(1))
    x_t, t = field.inputs
    assert bool(((t > 0) & (t < 1)).all()) and t.shape == (3,)
    torch.testing.assert_close(x_t[:, :1], cond)  # frame 0 pinned to the conditioning latent
    t_b = t.view(3, 1, 1, 1, 1)
    eps = (x_t[:, 1:] - t_b * x1[:, 1:]) / (1 - t_b)  # recover the noise of frames 1..T-1
    target = x1[:, 1:] - eps
    expected = target.pow(2).sum() / x1.numel()  # frame 0 zeroed, mean over all elements
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)


def test_flow_loss_weights_latent_tokens() -> None:
    """Per-token weights give the weighted mean sum(w err^2) / sum(w); all-ones weights the plain mean."""
    x1, cond = torch.randn(2, 3, 2, 2, 2), torch.randn(2, 1, 2, 2, 2)

    def loss(weight):
        return flow_matching_loss(ZeroField(), x1, cond, torch.zeros(2, 1, 1), None,
                                  torch.Generator().manual_seed(3), weight)

    plain = loss(None)
    torch.testing.assert_close(loss(torch.ones(2, 1, 1, 2, 2)), plain)
    field = ZeroField()
    flow_matching_loss(field, x1, cond, torch.zeros(2, 1, 1), None, torch.Generator().manual_seed(3))
    x_t, t = field.inputs
    t_b = t.view(2, 1, 1, 1, 1)
    eps = (x_t[:, 1:] - t_b * x1[:, 1:]) / (1 - t_b)
    err = torch.zeros_like(x1)
    err[:, 1:] = (x1[:, 1:] - eps) ** 2  # the zero field's squared error; frame 0 masked
    weight = torch.ones(2, 1, 1, 2, 2)
    weight[0, ..., 0, 1] = 9.0  # one moving token of sample 0 weighs 9
    expected = (weight.expand_as(x1) * err).sum() / weight.expand_as(x1).sum()
    torch.testing.assert_close(loss(weight), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loss(weight), plain)


def test_flow_loss_uses_only_the_given_generator() -> None:
    x1, cond = torch.randn(2, 3, 2, 2, 2), torch.randn(2, 1, 2, 2, 2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = flow_matching_loss(ZeroField(), x1, cond, torch.zeros(2, 1, 1), None, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = flow_matching_loss(ZeroField(), x1, cond, torch.zeros(2, 1, 1), None, torch.Generator().manual_seed(7))
    c = flow_matching_loss(ZeroField(), x1, cond, torch.zeros(2, 1, 1), None, torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_flow_loss_decreases_when_training_tiny_denoiser(tiny: ModelConfig) -> None:
    torch.manual_seed(0)
    model = LatteDenoiser(tiny.denoiser)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 4, 4, 4, 4, generator=gen)
    cond = x1[:, :1].clone()
    features, text = torch.randn(2, 16, 32, generator=gen), torch.randn(2, 32, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = flow_matching_loss(model, x1, cond, features, text, torch.Generator().manual_seed(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.pos_embed.grad is None
