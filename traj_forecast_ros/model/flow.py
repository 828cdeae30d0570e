"""Rectified flow over latent trajectory videos (spec section 5): Euler sampler, training loss, layout helpers.

Convention: t = 0 is noise, t = 1 is data, x_t = t * x1 + (1 - t) * eps, velocity target x1 - eps. Frame 0 is the
conditioning frame (latent of the static query grid): it is pinned to ``cond_latent`` and its velocity is zero.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from traj_forecast_ros.errors import ForecastCancelled
from traj_forecast_ros.model.config import Size2, as_pair


def latents_to_grid(latents: torch.Tensor, grid_size: Optional[Union[int, Size2]] = None) -> torch.Tensor:
    """VAE latents [B, T, L, C] -> denoiser layout [B, T, C, h, w] (tokens row-major; square grid by default)."""
    if grid_size is None:
        side = math.isqrt(latents.shape[2])
        if side * side != latents.shape[2]:
            raise ValueError(f"{latents.shape[2]} latent tokens are not a square grid; pass grid_size=(h, w)")
        grid_size = side
    rows, cols = as_pair(grid_size)
    return rearrange(latents, "b t (h w) c -> b t c h w", h=rows, w=cols)  # (B, T, C, h, w)


def grid_to_latents(grid: torch.Tensor) -> torch.Tensor:
    """Denoiser layout [B, T, C, h, w] -> VAE latents [B, T, h*w, C] (tokens row-major)."""
    return rearrange(grid, "b t c h w -> b t (h w) c")  # (B, T, L, C)


def _frame0_mask(like: torch.Tensor) -> torch.Tensor:
    """[1, T, 1, 1, 1] mask: 0 on frame 0, 1 elsewhere."""
    mask = torch.ones(1, like.shape[1], 1, 1, 1, dtype=like.dtype, device=like.device)
    mask[:, 0] = 0
    return mask


@torch.no_grad()
def euler_sample(
    denoiser: nn.Module,
    cond_latent: torch.Tensor,
    noise: torch.Tensor,
    frame_features: torch.Tensor,
    text_embeds: Optional[torch.Tensor] = None,
    steps: int = 10,
    cancel: Optional[Callable[[], bool]] = None,
    guidance_scale: float = 1.0,
    null_text_embeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Integrate the velocity field from noise (t=0) to data (t=1) with explicit Euler.

    ``steps`` is the number of time points of ``linspace(0, 1, steps)`` (the official ``odeint`` grid), so the
    denoiser is evaluated ``steps - 1`` times, at t = 0, 1/(steps-1), ..., (steps-2)/(steps-1). Before every call
    frame 0 is set to ``cond_latent`` and its velocity is masked to zero.

    Args:
        denoiser: ``LatteDenoiser`` (any callable ``(x, t, frame_features, text_embeds)``), or an object with
            ``bind(frame_features, text_embeds) -> step(x, t)`` (``LatteDenoiser.with_ops(ops)``: the per-image
            work is then done once, not once per step).
        cond_latent: [B, 1, C, h, w] conditioning frame (scaled latent of the static query grid).
        noise: [B, T-1, C, h, w] initial state of frames 1..T-1.
        frame_features: [B, N, D] image tokens, or [1, N, D] shared by all B samples.
        text_embeds: [B or 1, E] pooled instruction embedding, or None for models without language conditioning.
        cancel: optional ``() -> bool`` polled before every denoiser evaluation; True stops the integration.
        guidance_scale: classifier-free guidance ``s``: the velocity is ``v(null) + s * (v(text) - v(null))``, with
            the conditional and unconditional rows in one denoiser call of batch 2B. 1 (the default) is plain
            conditional sampling, computed exactly as without guidance.
        null_text_embeds: [1, E] the unconditional instruction embedding; required when ``guidance_scale != 1``.
    Returns:
        [B, T, C, h, w] final state, frame 0 equal to ``cond_latent``.
    Raises:
        ForecastCancelled: ``cancel()`` returned True.
    """
    if steps < 2:
        raise ValueError(f"steps counts time points including t=0 and t=1: need steps >= 2, got {steps}")
    if cond_latent.dim() != 5 or cond_latent.shape[1] != 1:
        raise ValueError(f"cond_latent must be [B, 1, C, h, w], got {tuple(cond_latent.shape)}")
    if noise.dim() != 5 or noise.shape[0] != cond_latent.shape[0] or noise.shape[2:] != cond_latent.shape[2:]:
        raise ValueError(f"noise must be [B, T-1, C, h, w] matching cond_latent {tuple(cond_latent.shape)}, "
                         f"got {tuple(noise.shape)}")
    batch = cond_latent.shape[0]
    x = torch.cat([cond_latent, noise.to(cond_latent.dtype)], dim=1)  # (B, T, C, h, w)
    velocity_at = _guided(denoiser, frame_features, text_embeds, batch, guidance_scale, null_text_embeds)
    times = torch.linspace(0.0, 1.0, steps, device=x.device)  # (steps,) float32 whatever the state dtype
    step_sizes = (times[1:] - times[:-1]).tolist()  # (steps - 1,) Python floats: no per-step tensor maths
    for k in range(steps - 1):
        if cancel is not None and cancel():
            raise ForecastCancelled(f"cancelled before denoiser step {k + 1} of {steps - 1}")
        x[:, :1] = cond_latent  # re-impose the conditioning frame
        velocity = velocity_at(x, times[k])  # (B, T, C, h, w)
        x[:, 1:] += step_sizes[k] * velocity[:, 1:].to(x.dtype)  # frame 0's velocity is masked out
    x[:, :1] = cond_latent
    return x


def _guided(denoiser: Callable[..., torch.Tensor], frame_features: torch.Tensor, text_embeds: Optional[torch.Tensor],
            batch: int, guidance_scale: float,
            null_text_embeds: Optional[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x [B, ...], t scalar) -> velocity``: the conditional field, or with ``guidance_scale != 1`` the guided one
    from a single call on the conditional and unconditional rows stacked (batch 2B)."""
    if guidance_scale == 1.0:
        velocity_at = _bind(denoiser, frame_features, text_embeds, batch)
        return lambda x, t: velocity_at(x, t.expand(batch))
    if text_embeds is None or null_text_embeds is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs text_embeds and null_text_embeds")
    both = torch.cat([text_embeds.expand(batch, -1), null_text_embeds.to(text_embeds).expand(batch, -1)])  # (2B, E)
    if frame_features.shape[0] != 1:  # per-row image tokens: the unconditional rows see the same images
        frame_features = torch.cat([frame_features.expand(batch, -1, -1)] * 2)  # (2B, N, D)
    velocity_at = _bind(denoiser, frame_features, both, 2 * batch)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = velocity_at(torch.cat([x, x]), t.expand(2 * batch)).chunk(2)  # (B, ...) each
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided


def _bind(denoiser: Callable[..., torch.Tensor], frame_features: torch.Tensor, text_embeds: Optional[torch.Tensor],
          batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, t) -> velocity`` for fixed image tokens and text: ``denoiser.bind`` when it has one, else a closure
    that expands one shared row of features / text to the batch."""
    if hasattr(denoiser, "bind"):
        return denoiser.bind(frame_features, text_embeds)
    if frame_features.shape[0] != batch:
        frame_features = frame_features.expand(batch, -1, -1)  # (B, N, D) view
    if text_embeds is not None and text_embeds.shape[0] != batch:
        text_embeds = text_embeds.expand(batch, -1)  # (B, E) view

    def velocity_at(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, frame_features, text_embeds)

    return velocity_at


def sample_flow_time(batch: int, device: torch.device, generator: Optional[torch.Generator] = None,
                     mean: float = 0.0) -> torch.Tensor:
    """Logit-normal flow times ``sigmoid(N(mean, 1))`` [batch] (a negative ``mean`` trains nearer the noise end, where
    only the conditioning can tell the futures apart)."""
    return torch.sigmoid(torch.randn(batch, generator=generator, device=device) + mean)


def _noised(x1: torch.Tensor, cond_latent: torch.Tensor, generator: Optional[torch.Generator],
            time_mean: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, target)`` of the rectified-flow loss: t [B] logit-normal, frame 0 of x_t pinned to ``cond_latent``,
    target ``x1 - eps``."""
    if x1.dim() != 5 or cond_latent.shape != (x1.shape[0], 1, *x1.shape[2:]):
        raise ValueError(f"x1 must be [B, T, C, h, w] and cond_latent [B, 1, C, h, w]; got {tuple(x1.shape)} and "
                         f"{tuple(cond_latent.shape)}")
    batch = x1.shape[0]
    t = sample_flow_time(batch, x1.device, generator, time_mean).to(x1.dtype)  # (B,)
    eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)  # (B, T, C, h, w)
    t_b = t.view(batch, 1, 1, 1, 1)
    x_t = t_b * x1 + (1.0 - t_b) * eps  # (B, T, C, h, w)
    x_t = torch.cat([cond_latent.to(x1.dtype), x_t[:, 1:]], dim=1)  # (B, T, C, h, w), frame 0 pinned
    return x_t, t, x1 - eps


def _masked_loss(prediction: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error with frame 0 masked (its zeros counted), or ``sum(w * err^2) / sum(w)``."""
    mask = _frame0_mask(target)  # (1, T, 1, 1, 1)
    if weight is None:
        return F.mse_loss(prediction * mask, target * mask)
    weight = weight.to(target.dtype).expand_as(target)  # (B, T, C, h, w)
    return (weight * (prediction * mask - target * mask) ** 2).sum() / weight.sum()


def flow_matching_loss(
    denoiser: nn.Module,
    x1: torch.Tensor,
    cond_latent: torch.Tensor,
    frame_features: torch.Tensor,
    text_embeds: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    weight: Optional[torch.Tensor] = None,
    time_mean: float = 0.0,
) -> torch.Tensor:
    """Rectified-flow loss ``mean((v(x_t, t) - (x1 - eps))^2)`` with frame 0 pinned to ``cond_latent`` and masked.

    x1 [B, T, C, h, w] are the scaled data latents, cond_latent [B, 1, C, h, w]. t ~ sigmoid(N(time_mean, 1)) per
    sample, eps ~ N(0, I); both come from ``generator`` when given (device of x1), else from torch's global RNG.
    Prediction and target are zeroed on frame 0; the mean runs over all elements (frame 0's zeros included).
    ``weight`` (broadcastable to x1, e.g. [B, 1, 1, h, w] per latent token) makes it the weighted mean
    ``sum(w * err^2) / sum(w)``; all-ones weights give the plain mean.
    """
    x_t, t, target = _noised(x1, cond_latent, generator, time_mean)
    prediction = denoiser(x_t, t, frame_features, text_embeds)  # (B, T, C, h, w)
    return _masked_loss(prediction, target, weight)


def _sample_errors(prediction: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """[B] per-sample weighted mean squared error over frames 1.. ."""
    err = (prediction[:, 1:] - target[:, 1:]) ** 2  # (B, T-1, C, h, w)
    if weight is None:
        return err.flatten(1).mean(1)
    weight = weight.to(err.dtype).expand(target.shape[0], *err.shape[1:])  # (B, T-1, C, h, w)
    return (weight * err).flatten(1).sum(1) / weight.flatten(1).sum(1)


class ContrastLosses(NamedTuple):
    """The parts of :func:`instruction_contrast_loss` (scalars)."""

    flow: torch.Tensor  # the flow-matching loss under the samples' own instructions
    contrast: torch.Tensor  # the two-way cross-entropy of telling the own instruction from the crossed one
    crossed_still: torch.Tensor  # the crossed pass's error on the tokens no branch moves (0 without ``region``)


def instruction_contrast_loss(denoiser: nn.Module, x1: torch.Tensor, cond_latent: torch.Tensor,
                              frame_features: torch.Tensor, text_embeds: torch.Tensor,
                              crossed_text_embeds: torch.Tensor, crossed: torch.Tensor,
                              generator: Optional[torch.Generator] = None, weight: Optional[torch.Tensor] = None,
                              time_mean: float = 0.0, temperature: float = 0.01,
                              region: Optional[torch.Tensor] = None) -> ContrastLosses:
    """:func:`flow_matching_loss` and, on the same noised inputs, how well the denoiser's error tells the sample's
    own instruction from a sibling's.

    ``crossed`` [B] bool marks the samples with a crossed instruction ``crossed_text_embeds`` [B, E] (another branch
    of the same frame 0, whose true future differs). For those rows the denoiser also runs with the crossed
    instruction (in the same call), and the contrast is the two-way cross-entropy of a classifier whose logit is
    the error difference: ``mean(softplus((err_own - err_crossed) / temperature))`` (``err``: per-sample weighted
    mean squared error). It is zero when no row has a crossed instruction.

    ``region`` [B, h, w] bool, when given, marks the latent tokens where some branch of the sample's group moves.
    The contrast then compares errors on those tokens only (rows without any are left out), so that it cannot be won
    by moving what no instruction moves; and ``crossed_still`` is the crossed pass's mean squared error on the other
    tokens, where the crossed instruction's true future stands as still as the sample's own.
    """
    x_t, t, target = _noised(x1, cond_latent, generator, time_mean)
    crossed = crossed.to(x1.device)
    if region is not None:
        region = region.to(device=x1.device, dtype=torch.bool)  # (B, h, w)
        crossed = crossed & region.flatten(1).any(1)
    rows = torch.nonzero(crossed, as_tuple=False).flatten()  # (P,)
    inputs = torch.cat([x_t, x_t[rows]])  # (B + P, T, C, h, w)
    texts = torch.cat([text_embeds, crossed_text_embeds[rows].to(text_embeds)])  # (B + P, E)
    prediction = denoiser(inputs, torch.cat([t, t[rows]]), torch.cat([frame_features, frame_features[rows]]), texts)
    own, other = prediction[:x1.shape[0]], prediction[x1.shape[0]:]  # (B, ...), (P, ...)
    flow = _masked_loss(own, target, weight)
    zero = flow.new_zeros(())
    if rows.numel() == 0:
        return ContrastLosses(flow, zero, zero)
    row_weight = None if weight is None else weight.expand(x1.shape[0], *weight.shape[1:])[rows]
    crossed_still = zero
    if region is not None:
        inside = region[rows][:, None, None].to(x1.dtype)  # (P, 1, 1, h, w)
        row_weight = inside if row_weight is None else row_weight * inside
        outside = 1.0 - inside
        if bool(outside.any()):
            err = (other[:, 1:] - target[rows][:, 1:]) ** 2  # (P, T-1, C, h, w)
            crossed_still = (outside * err).sum() / outside.expand_as(err).sum()
    gap = _sample_errors(own[rows], target[rows], row_weight) - _sample_errors(other, target[rows], row_weight)
    return ContrastLosses(flow, F.softplus(gap / temperature).mean(), crossed_still)
