"""Shared layers: attention layout, MLP, patch embedding, timestep embedding, Fourier track features, sin-cos tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traj_forecast_ros.model.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    TrackPosEncoder,
    sincos_1d_table,
    sincos_2d_table,
    timestep_frequencies,
    token_grid,
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor, swap_kv: bool = False,
                        per_head_norm: bool = False) -> torch.Tensor:
    """Spec 4.3 written out with explicit loops over heads."""
    dim = x.shape[-1]
    heads = attn.num_heads
    head_dim = dim // heads
    q = attn.q(x)
    kv = attn.kv(context)
    k, v = kv[..., :dim], kv[..., dim:]
    if swap_kv:
        k, v = v, k
    if not per_head_norm:
        q = rms_norm(q, attn.q_norm.weight, 1e-5)
        k = rms_norm(k, attn.k_norm.weight, 1e-5)
    outputs = []
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        if per_head_norm:
            qh = rms_norm(qh, attn.q_norm.weight[sl], 1e-5)
            kh = rms_norm(kh, attn.k_norm.weight[sl], 1e-5)
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        outputs.append(weights @ vh)
    return attn.proj(torch.cat(outputs, dim=-1))


@pytest.fixture
def attention() -> Attention:
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    return attn


def test_attention_keys_and_shapes(attention: Attention) -> None:
    shapes = {k: tuple(v.shape) for k, v in attention.state_dict().items()}
    assert shapes == {
        "q.weight": (16, 16), "q.bias": (16,), "kv.weight": (32, 16), "kv.bias": (32,),
        "proj.weight": (16, 16), "proj.bias": (16,), "q_norm.weight": (16,), "k_norm.weight": (16,),
    }
    assert attention.q_norm.eps == 1e-5 and attention.k_norm.eps == 1e-5


def test_cross_attention_matches_spec_layout(attention: Attention) -> None:
    x, context = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    with torch.no_grad():
        out = attention(x, context)
        expected = reference_attention(attention, x, context)
        swapped = reference_attention(attention, x, context, swap_kv=True)
        per_head = reference_attention(attention, x, context, per_head_norm=True)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the reference distinguishes the alternatives: k/v order and norm-before-split both matter
    assert not torch.allclose(out, swapped, atol=1e-3)
    assert not torch.allclose(out, per_head, atol=1e-3)


def test_self_attention_is_cross_attention_to_itself(attention: Attention) -> None:
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), attention(x, x))


def test_mlp_uses_tanh_gelu() -> None:
    torch.manual_seed(1)
    mlp = Mlp(4, 12, 3)
    x = torch.randn(5, 4) * 3
    with torch.no_grad():
        expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
        exact_gelu = mlp.fc2(F.gelu(mlp.fc1(x)))
        out = mlp(x)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, exact_gelu)


def test_patch_embed_flattens_row_major_and_checks_size() -> None:
    embed = PatchEmbed((4, 6), patch_size=2, in_channels=1, embed_dim=4)
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
        for i in range(2):
            for j in range(2):
                embed.proj.weight[i * 2 + j, 0, i, j] = 1.0  # channel (i*2+j) copies patch pixel (i, j)
    image = torch.arange(24.0).reshape(1, 1, 4, 6)
    with torch.no_grad():
        tokens = embed(image)
    assert embed.grid_size == (2, 3) and embed.num_patches == 6
    assert tokens.shape == (1, 6, 4)
    for k in range(6):
        row, col = divmod(k, 3)
        patch = image[0, 0, 2 * row:2 * row + 2, 2 * col:2 * col + 2].reshape(-1)
        torch.testing.assert_close(tokens[0, k], patch)
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        embed(torch.zeros(1, 1, 6, 4))


def test_timestep_embedding_is_cos_first_and_unscaled() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_frequencies(t, 256)
    assert emb.shape == (3, 256)
    torch.testing.assert_close(emb[0, :128], torch.ones(128))
    torch.testing.assert_close(emb[0, 128:], torch.zeros(128))
    freqs = torch.exp(-math.log(1e4) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[1, :128], torch.cos(0.5 * freqs))
    torch.testing.assert_close(emb[1, 128:], torch.sin(0.5 * freqs))
    assert emb[2, 0].item() == pytest.approx(math.cos(1.0))  # t is used as is, not x1000

    embedder = TimestepEmbedder(32)
    assert [k for k in embedder.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    assert isinstance(embedder.mlp[1], torch.nn.SiLU)
    assert embedder(t).shape == (3, 32)


def test_track_pos_encoder_latent_variant() -> None:
    torch.manual_seed(2)
    encoder = TrackPosEncoder(hidden_size=8, pos_embed_dim=6)
    lff = encoder.lff
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {
        "lff.w": (3, 2), "lff.mlp.0.weight": (32, 6), "lff.mlp.0.bias": (32,),
        "lff.mlp.3.weight": (6, 32), "lff.mlp.3.bias": (6,),
    }
    assert not lff.w.requires_grad
    assert isinstance(lff.mlp[1], torch.nn.GELU) and lff.mlp[1].approximate == "tanh"

    tracks = torch.rand(2, 3, 2, 4, 5) * 2 - 1
    with torch.no_grad():
        out = encoder(tracks)
    assert out.shape == (2, 3, 8, 4, 5)
    torch.testing.assert_close(out[:, :, :2], tracks)  # channels 0, 1 are (x, y) unchanged
    point = tracks[1, 2, :, 3, 4]  # one point (x, y)
    u = point @ lff.w.T
    fourier = torch.cat([torch.cos(u), torch.sin(u)]) / math.sqrt(6)
    with torch.no_grad():
        expected = lff.mlp[3](F.gelu(lff.mlp[0](fourier), approximate="tanh"))
    torch.testing.assert_close(out[1, 2, 2:, 3, 4], expected, atol=1e-6, rtol=1e-5)


def test_track_pos_encoder_raw_variant() -> None:
    encoder = TrackPosEncoder(hidden_size=8, pos_embed_dim=6, raw=True)
    state = encoder.state_dict()
    assert "lff.scale" in state and state["lff.scale"].shape == ()
    assert state["lff.scale"].item() == pytest.approx(1 / math.sqrt(6))
    assert encoder.lff.w.requires_grad
    assert isinstance(encoder.lff.mlp[1], torch.nn.SiLU)
    assert encoder(torch.zeros(1, 2, 2, 3, 3)).shape == (1, 2, 8, 3, 3)


def mae_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE reference formula, written from its definition."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def test_sincos_1d_is_sin_then_cos() -> None:
    table = sincos_1d_table(8, 5)
    assert table.shape == (5, 8) and table.dtype == torch.float32
    torch.testing.assert_close(table[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float32))
    np.testing.assert_allclose(table.numpy(), mae_1d(8, np.arange(5)), atol=1e-7)
    assert table[3, 0].item() == pytest.approx(math.sin(3.0))


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_sincos_2d_first_half_columns_second_half_rows(grid) -> None:
    rows, cols = grid
    table = sincos_2d_table(16, grid)
    assert table.shape == (rows * cols, 16)
    row_index, col_index = np.divmod(np.arange(rows * cols), cols)  # row-major tokens
    np.testing.assert_allclose(table[:, :8].numpy(), mae_1d(8, col_index), atol=1e-7)
    np.testing.assert_allclose(table[:, 8:].numpy(), mae_1d(8, row_index), atol=1e-7)
    if rows == cols:
        torch.testing.assert_close(table, sincos_2d_table(16, rows))


def test_token_grid() -> None:
    assert token_grid(81) == (9, 9)
    assert token_grid((18, 33)) == (18, 33)
    with pytest.raises(ValueError, match="not a square"):
        token_grid(594)


def test_factorised_blocks_and_unpatchify_layouts():
    from traj_forecast_ros.model.layers import run_factorised_blocks, unpatchify

    batch, frames, rows, cols, width = 2, 3, 2, 3, 4
    x = torch.randn(batch * frames, rows * cols, width)
    temp_embed = torch.randn(1, frames, width)
    seen = []

    def record(index, tokens):
        seen.append((index, tuple(tokens.shape)))
        return tokens

    out = run_factorised_blocks(x, 4, frames, rows * cols, record, temp_embed=temp_embed)
    spatial, temporal = (batch * frames, rows * cols, width), (batch * rows * cols, frames, width)
    assert seen == [(0, spatial), (1, temporal), (2, spatial), (3, temporal)]  # block i gets its own index
    expected = x.view(batch, frames, rows * cols, width) + temp_embed.view(1, frames, 1, width)  # added once
    torch.testing.assert_close(out, expected.reshape(batch * frames, rows * cols, width), rtol=0, atol=0)
    torch.testing.assert_close(run_factorised_blocks(x, 2, frames, rows * cols, record), x, rtol=0, atol=0)

    patch, channels = 2, 3
    tokens = torch.randn(batch * frames, rows * cols, patch * patch * channels)
    video = unpatchify(tokens, batch, (rows, cols), patch)  # (B, T, c, rows*p, cols*p)
    assert video.shape == (batch, frames, channels, rows * patch, cols * patch)
    per_token = tokens.view(batch, frames, rows, cols, patch, patch, channels)
    torch.testing.assert_close(video[1, 2, :, 1 * patch + 1, 2 * patch + 0], per_token[1, 2, 1, 2, 1, 0], rtol=0,
                               atol=0)
