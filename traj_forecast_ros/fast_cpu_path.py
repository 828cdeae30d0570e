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
    EncoderWeightCache,
    FastCPUOps,
    KernelOptions,
    OneDNNLinearMode,
    kernels_available,
)
from traj_forecast_ros.model.ops import TorchOps

if TYPE_CHECKING:
    from traj_forecast_ros.sampling_plan import SamplingPlan

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, T, C, h, w], t [B]) -> velocity


def kernel_options(plan: "SamplingPlan", device: torch.device, dtype: torch.dtype) -> Optional[KernelOptions]:
    """The kernels' options for ``plan``, or None where the reference modules run (GPU, compile,
    ``fast_cpu_kernels=False``, a dtype the kernels do not serve)."""
    if not (plan.fast_cpu_kernels and not plan.use_compile and kernels_available(device, dtype)):
        return None
    return KernelOptions(dtype=dtype, fold_modulation=plan.fold_modulation, attention=plan.attention)


def fast_ops(options: KernelOptions) -> FastCPUOps:
    """The fast CPU ops of one plan, shared by its denoiser and VAE (each layer's weights are prepared once)."""
    return FastCPUOps(options)


def fast_denoiser(denoiser: torch.nn.Module, ops: FastCPUOps) -> Callable[..., torch.Tensor]:
    """The denoiser's own forward run with the fast ops (``(x, t, features, text)``, with ``bind``)."""
    return denoiser.with_ops(ops)


class VAEWithOps:
    """The VAE's inference forward (``embed_tracks``, ``encode_tokens``, ``decode``) run with given ops."""

    def __init__(self, vae: torch.nn.Module, ops: TorchOps) -> None:
        self.vae, self.ops = vae, ops

    def embed_tracks(self, tracks_norm: torch.Tensor) -> torch.Tensor:
        """Normalised tracks ``[B, T, 2, H, W]`` -> tokens ``[B, T, L, C]``."""
        return self.vae.embed_tracks(tracks_norm, self.ops)

    def encode_tokens(self, tokens: torch.Tensor, frame_features: torch.Tensor):
        """Tokens ``[B, T, L, C]`` and image tokens -> posterior (mean, std) ``[B, T, L, Z]`` each."""
        return self.vae.encode_tokens(tokens, frame_features, self.ops)

    def decode(self, z: torch.Tensor, frame_features: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, T, L, Z]`` and image tokens -> normalised tracks ``[B, T, 2, H, W]``."""
        return self.vae.decode(z, frame_features, self.ops)


def fast_vae(vae: torch.nn.Module, ops: FastCPUOps) -> VAEWithOps:
    """The VAE's inference forward run with the fast ops."""
    return VAEWithOps(vae, ops)


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
    return fast_denoiser(denoiser, fast_ops(options)).bind(features, text)
