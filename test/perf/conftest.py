"""Performance-path tests: the official-style reference forward from the module benchmark; nothing is timed."""

import importlib.util
from pathlib import Path

import pytest
import torch

MODULE_BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_model_modules.py"


@pytest.fixture(scope="package")
def reference():
    """``bench/bench_model_modules.py``: the official-style reference forward written from the parameters."""
    spec = importlib.util.spec_from_file_location("bench_model_modules", MODULE_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_denoiser_inputs(model, batch: int, seed: int = 0):
    """Random ``(x [B, T, C, h, w], t [B], features [B, N, D], text [B, E] or None)`` for a ``LatteDenoiser``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.num_frames, model.in_channels, *model.input_size, generator=generator)
    t = torch.rand(batch, generator=generator)
    features = torch.randn(batch, model.num_frame_tokens, model.frame_features_dim, generator=generator)
    text = torch.randn(batch, model.text_embed_dim, generator=generator) if model.text_embed_dim else None
    return x, t, features, text


@pytest.fixture(scope="package")
def denoiser_inputs():
    """:func:`make_denoiser_inputs`, for the tests of this folder."""
    return make_denoiser_inputs
