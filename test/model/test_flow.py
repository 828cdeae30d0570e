"""Rectified flow: Euler sampler semantics, flow-matching loss, latent layout helpers."""

from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.flow import (
    euler_sample,
    flow_matching_loss,
    grid_to_latents,
    instruction_contrast_loss,
    latents_to_grid,
    sample_flow_time,
)


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


class TextShiftField(nn.Module):
    """Velocity ``x * 0 + text[:, 0]`` on every element: an instruction-reading field with known errors."""

    def forward(self, x, t, frame_features, text_embeds=None):
        return torch.zeros_like(x) + text_embeds[:, :1, None, None, None]


def test_instruction_contrast_shares_the_flow_loss_and_scores_the_error_gap() -> None:
    """The flow part equals flow_matching_loss with the same generator (one denoiser call for both instructions);
    the contrast is softplus((err_own - err_crossed) / temperature) over the rows with a crossed instruction."""
    x1, cond = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 1, 2, 2, 2)
    features = torch.zeros(3, 1, 1)
    own, crossed_text = torch.tensor([[0.5], [0.0], [-1.0]]), torch.tensor([[3.0], [0.0], [0.5]])
    crossed = torch.tensor([True, False, True])

    def generator():
        return torch.Generator().manual_seed(5)

    flow, gap, still = instruction_contrast_loss(TextShiftField(), x1, cond, features, own, crossed_text, crossed,
                                                 generator(), temperature=0.5)
    assert still.item() == 0.0  # no region: no crossed-still term
    torch.testing.assert_close(flow, flow_matching_loss(TextShiftField(), x1, cond, features, own, generator()))
    field = ZeroField()  # the same noised inputs, recovered from a recording field
    flow_matching_loss(field, x1, cond, features, None, generator())
    x_t, t = field.inputs
    t_b = t.view(3, 1, 1, 1, 1)
    target = x1[:, 1:] - (x_t[:, 1:] - t_b * x1[:, 1:]) / (1 - t_b)  # (3, T-1, C, h, w)

    def err(row, value):
        return ((value - target[row]) ** 2).mean()

    expected = torch.stack([F.softplus((err(r, own[r, 0]) - err(r, crossed_text[r, 0])) / 0.5) for r in (0, 2)])
    torch.testing.assert_close(gap, expected.mean(), atol=1e-5, rtol=1e-4)
    # a field that ignores the instruction sits at chance, log 2; no crossed rows: no contrast
    _, blind, _ = instruction_contrast_loss(ZeroField(), x1, cond, features, own, crossed_text, crossed, generator())
    torch.testing.assert_close(blind, torch.tensor(math.log(2.0)))
    _, none, _ = instruction_contrast_loss(TextShiftField(), x1, cond, features, own, crossed_text,
                                        torch.zeros(3, dtype=torch.bool), generator())
    assert none.item() == 0.0


class TokenTextField(nn.Module):
    """Velocity ``text[:, 0]`` on the latent token (0, 0) and ``text[:, 1]`` everywhere else."""

    def forward(self, x, t, frame_features, text_embeds=None):
        out = torch.zeros_like(x) + text_embeds[:, 1, None, None, None, None]
        out[..., 0, 0] = text_embeds[:, :1, None]
        return out


def test_instruction_contrast_on_motion_compares_errors_only_where_a_branch_moves() -> None:
    """With ``region``, the error gap counts only the region's tokens, rows without any are left out, and
    ``crossed_still`` is the crossed pass's mean squared error on the other tokens (frames 1..)."""
    x1, cond = torch.randn(3, 3, 2, 2, 2), torch.randn(3, 1, 2, 2, 2)
    features = torch.zeros(3, 1, 1)
    own = torch.tensor([[0.5, 0.0], [0.0, 0.0], [-1.0, 0.2]])
    crossed_text = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.5, -4.0]])
    crossed = torch.tensor([True, True, True])
    region = torch.zeros(3, 2, 2, dtype=torch.bool)
    region[0, 0, 0] = region[2, 0, 0] = True  # row 1: nothing moves in its group

    def generator():
        return torch.Generator().manual_seed(9)

    flow, gap, still = instruction_contrast_loss(TokenTextField(), x1, cond, features, own, crossed_text, crossed,
                                                 generator(), temperature=0.5, region=region)
    torch.testing.assert_close(flow, flow_matching_loss(TokenTextField(), x1, cond, features, own, generator()))
    field = ZeroField()
    flow_matching_loss(field, x1, cond, features, None, generator())
    x_t, t = field.inputs
    t_b = t.view(3, 1, 1, 1, 1)
    target = x1[:, 1:] - (x_t[:, 1:] - t_b * x1[:, 1:]) / (1 - t_b)  # (3, T-1, C, h, w)

    def token_err(row, value):  # the region: token (0, 0) only
        return ((value - target[row, :, :, 0, 0]) ** 2).mean()

    expected = torch.stack([F.softplus((token_err(r, own[r, 0]) - token_err(r, crossed_text[r, 0])) / 0.5)
                            for r in (0, 2)])
    torch.testing.assert_close(gap, expected.mean(), atol=1e-5, rtol=1e-4)
    outside = torch.ones(2, 2, dtype=torch.bool)
    outside[0, 0] = False
    errors = torch.cat([((crossed_text[r, 1] - target[r][..., outside]) ** 2).flatten() for r in (0, 2)])
    torch.testing.assert_close(still, errors.mean(), atol=1e-5, rtol=1e-4)
    # the same field without the region: the still background's large crossed error would win the contrast
    _, whole, _ = instruction_contrast_loss(TokenTextField(), x1, cond, features, own, crossed_text, crossed,
                                            generator(), temperature=0.5)
    assert not torch.allclose(whole, gap)
    # no row with a moving token: no contrast and no crossed-still term
    _, none, none_still = instruction_contrast_loss(TokenTextField(), x1, cond, features, own, crossed_text, crossed,
                                                    generator(), region=torch.zeros_like(region))
    assert none.item() == 0.0 and none_still.item() == 0.0


def test_instruction_contrast_trains_a_denoiser_to_read_the_instruction(tiny: ModelConfig) -> None:
    """Two futures of one image, told apart only by the instruction: the contrast alone teaches the denoiser to
    give the lower error to the matching instruction (at t near the noise end, where x_t cannot tell them apart)."""
    torch.manual_seed(0)
    model = LatteDenoiser(tiny.denoiser)
    gen = torch.Generator().manual_seed(0)
    shape = (1, 4, 4, 4, 4)
    left, right = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    x1 = torch.cat([left, right])  # (2, T, C, h, w): one frame 0, two futures
    x1[1, 0] = x1[0, 0]
    cond = x1[:, :1].clone()
    features = torch.randn(1, 16, 32, generator=gen).expand(2, -1, -1)
    texts = torch.randn(2, 32, generator=gen)
    swapped, both = texts.flip(0), torch.ones(2, dtype=torch.bool)

    def gap(seed):
        with torch.no_grad():
            return instruction_contrast_loss(model, x1, cond, features, texts, swapped, both,
                                             torch.Generator().manual_seed(seed), time_mean=-2.0)[1].item()

    before = sum(gap(seed) for seed in range(100, 110)) / 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        flow, contrast, _ = instruction_contrast_loss(model, x1, cond, features, texts, swapped, both,
                                                   torch.Generator().manual_seed(step), time_mean=-2.0)
        optimizer.zero_grad()
        (flow + 0.1 * contrast).backward()
        optimizer.step()
    after = sum(gap(seed) for seed in range(100, 110)) / 10
    assert before > 0.6 and after < 0.6 * before  # from chance (log 2) towards the right answer


def test_flow_time_mean_moves_the_training_times_toward_the_noise_end() -> None:
    default = sample_flow_time(4000, torch.device("cpu"), torch.Generator().manual_seed(0))
    noisy = sample_flow_time(4000, torch.device("cpu"), torch.Generator().manual_seed(0), mean=-1.0)
    assert abs(default.median().item() - 0.5) < 0.03 and noisy.median().item() < 0.3
    assert bool((noisy < default).all())  # the same draws, shifted
