"""Fixtures of the model tests: tiny configs and parameter randomisation (zero-init gates hide bugs)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.presets import tiny_config

FIXED_TABLES = ("pos_embed", "temp_embed", "frame_embed")


def randomize_parameters(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Overwrite every trainable-looking parameter (not the fixed sin-cos tables) with N(0, std) noise.

    Fresh modules are adaLN-Zero / zero-gate initialised and therefore act as the identity (VAE) or output zeros
    (denoiser); behaviour tests need every path active.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.split(".")[-1] in FIXED_TABLES:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


@pytest.fixture
def tiny() -> ModelConfig:
    """Tiny text-conditioned latent model: 8x8 grid, 4 frames, 4x4x4 latents, 16 image tokens of width 32."""
    return tiny_config()


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    """The :func:`randomize_parameters` helper."""
    return randomize_parameters
