"""The one place outside ``model/`` that calls the fast CPU kernels (:mod:`traj_forecast_ros.model.kernels`).

The plan runtime (:mod:`traj_forecast_ros.plan_runtime`) and the CPU plan probe
(:func:`traj_forecast_ros.sampling_plan.probe_cpu_plan`) get their fast denoiser, VAE and encoder mode from here,
so how the model runs its fast path can change behind these few functions. No ROS imports here.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, ContextManager, Optional

import torch

from traj_forecast_ros.model.kernels import (
    DenoiserKernels,
    EncoderWeightCache,
    KernelOptions,
    OneDNNLinearMode,
    VAEKernels,
    kernels_available,
)

if TYPE_CHECKING:
    from traj_forecast_ros.sampling_plan import SamplingPlan

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, T, C, h, w], t [B]) -> velocity


def kernel_options(plan: "SamplingPlan", device: torch.device, dtype: torch.dtype) -> Optional[KernelOptions]:
    """The kernels' options for ``plan``, or None where the reference modules run (GPU, compile,
    ``fast_cpu_kernels=False``, a dtype the kernels do not serve)."""
    if not (plan.fast_cpu_kernels and not plan.use_compile and kernels_available(device, dtype)):
        return None
    return KernelOptions(dtype=dtype, fold_modulation=plan.fold_modulation, attention=plan.attention)


def fast_denoiser(denoiser: torch.nn.Module, options: KernelOptions) -> Callable[..., torch.Tensor]:
    """The denoiser's inference forward through the kernels (``(x, t, features, text)``, with ``bind``)."""
    return DenoiserKernels(denoiser, options)


def fast_vae(vae: torch.nn.Module, options: KernelOptions) -> VAEKernels:
    """The VAE's inference forward through the kernels (``embed_tracks``, ``encode_tokens``, ``decode``)."""
    return VAEKernels(vae, options)


def encoder_weight_cache() -> EncoderWeightCache:
    """A per-forecaster cache of the encoders' weights cast for the kernels (``clear()`` frees it)."""
    return EncoderWeightCache()


def encoder_mode(plan: "SamplingPlan", device: torch.device,
                 weights: Optional[EncoderWeightCache]) -> ContextManager:
    """Context in which the frozen encoders' linear layers run through oneDNN (CPU plans with the kernels)."""
    if weights is None or not (plan.fast_cpu_kernels and device.type == "cpu"):
        return nullcontext()
    return OneDNNLinearMode(weights)


def probe_step(denoiser: torch.nn.Module, dtype: torch.dtype, fold_modulation: bool, attention: str,
               features: torch.Tensor, text: Optional[torch.Tensor]) -> Step:
    """One candidate of the CPU plan probe: the kernels' step for fixed image tokens and text."""
    options = KernelOptions(dtype=dtype, fold_modulation=fold_modulation, attention=attention)
    return DenoiserKernels(denoiser, options).bind(features, text)
