"""Fixtures of the model tests: tiny configs, parameter randomisation (zero-init gates hide bugs) and the inputs of
the instruction-path tests."""

from __future__ import annotations

from typing import Callable, Tuple

import pytest
import torch
from torch import nn

from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
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


def denoiser_inputs(model: LatteDenoiser, texts: int = 2) -> Tuple[torch.Tensor, ...]:
    """``x [texts, T, C, h, w]``, ``t [texts]`` (all 0.4), one image's tokens ``[1, N, D]`` and ``texts`` random
    instruction embeddings ``[texts, E]`` for ``model`` (seeded)."""
    gen = torch.Generator().manual_seed(0)
    d = model.cfg
    x = torch.randn(texts, d.num_frames, d.in_channels, *model.input_size, generator=gen)
    features = torch.randn(1, model.num_frame_tokens, d.frame_features_dim, generator=gen)
    text = torch.randn(texts, d.text_embed_dim, generator=gen)
    return x, torch.full((texts,), 0.4), features, text


def without_pooled_text(model: LatteDenoiser) -> LatteDenoiser:
    """``model`` with the timestep path of the instruction silenced, so only the other instruction paths carry it."""
    with torch.no_grad():
        for param in model.text_embeds_proj.parameters():
            param.zero_()
    return model


@pytest.fixture
def text_inputs() -> Callable[..., Tuple[torch.Tensor, ...]]:
    """The :func:`denoiser_inputs` helper."""
    return denoiser_inputs


@pytest.fixture
def silence_pooled_text() -> Callable[[LatteDenoiser], LatteDenoiser]:
    """The :func:`without_pooled_text` helper."""
    return without_pooled_text
