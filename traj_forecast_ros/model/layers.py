"""Building blocks shared by the trajectory VAE and the Latte denoiser.

Parameter names and shapes follow the official code (spec sections 3-4, 6) so that the released state dicts load
with ``strict=True``: ``Attention`` (``q``, ``kv``, ``proj``, ``q_norm``, ``k_norm``), ``Mlp`` (``fc1``, ``fc2``),
``PatchEmbed`` (``proj``), ``TimestepEmbedder`` (``mlp.0``, ``mlp.2``) and ``TrackPosEncoder`` (``lff.w``,
``lff.mlp.0``, ``lff.mlp.3``, raw models also ``lff.scale``). The fixed sin-cos tables use the MAE convention.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

Size2 = Tuple[int, int]

QK_NORM_EPS = 1e-5


def pair(value: Union[int, Size2]) -> Size2:
    """``(rows, cols)`` from an int (square) or a 2-sequence."""
    if isinstance(value, int):
        return (value, value)
    rows, cols = value
    return (int(rows), int(cols))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sequence ``shift``/``scale`` [N, C] over x [N, L, C]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- attention / MLP
class Attention(nn.Module):
    """Multi-head (cross-)attention with QK-RMSNorm over the full width; self-attention when ``context`` is None."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # outputs [k (first dim) | v (last dim)]
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim, eps=QK_NORM_EPS)
        self.k_norm = nn.RMSNorm(dim, eps=QK_NORM_EPS)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, L, C] attends to context [N, M, C] (default: x itself); returns [N, L, C].

        The context may also be shared by groups of consecutive sequences: context [B, M, C] with N = B * G
        (batch-major, sequence n uses context n // G). Keys and values are then projected once per context instead
        of once per sequence; the result is the same as repeating the context G times.
        """
        context = x if context is None else context
        groups, remainder = divmod(x.shape[0], context.shape[0])
        if remainder:
            raise ValueError(f"{x.shape[0]} query sequences cannot share {context.shape[0]} contexts evenly")
        q = self.q_norm(self.q(x))  # (N, L, C), normalised over the full width before the head split
        k, v = self.kv(context).chunk(2, dim=-1)  # (B, M, C) each: k = first C outputs, v = last C
        k = self.k_norm(k)  # (B, M, C)
        q = rearrange(q, "n l (h d) -> n h l d", h=self.num_heads)  # (N, H, L, C/H)
        k = rearrange(k, "b m (h d) -> b h m d", h=self.num_heads)  # (B, H, M, C/H)
        v = rearrange(v, "b m (h d) -> b h m d", h=self.num_heads)  # (B, H, M, C/H)
        if groups > 1:
            k = repeat(k, "b h m d -> (b g) h m d", g=groups)  # (N, H, M, C/H)
            v = repeat(v, "b h m d -> (b g) h m d", g=groups)  # (N, H, M, C/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, C/H), scale 1/sqrt(C/H)
        out = rearrange(out, "n h l d -> n l (h d)")  # (N, L, C)
        return self.proj(out)  # (N, L, C)


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(GELU_tanh(fc1(x)))`` (the timm ``Mlp`` keys)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: Conv2d(kernel = stride = patch), flattened row-major."""

    def __init__(self, input_size: Union[int, Size2], patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.input_size = pair(input_size)
        rows, cols = self.input_size
        if rows % patch_size or cols % patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {patch_size}")
        self.patch_size = patch_size
        self.grid_size: Size2 = (rows // patch_size, cols // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, rows, cols] -> tokens [N, rows/p * cols/p, D]."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"patch embedding expects a {self.input_size} grid, got {tuple(x.shape[-2:])}")
        x = self.proj(x)  # (N, D, rows/p, cols/p)
        return rearrange(x, "n d h w -> n (h w) d")  # (N, L, D), row-major tokens


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t w), sin(t w)]`` (cos first) of t [N] as given (no x1000); returns [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, dim/2)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> hidden vector: 256-d sinusoid, Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, hidden]."""
        freq = timestep_frequencies(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, hidden)


class LearnableFourierFeatures(nn.Module):
    """Fourier features of 2-D points: ``mlp(1/sqrt(F) * [cos(p W^T), sin(p W^T)])`` with W [F/2, 2].

    ``raw=False`` (trajectory VAE): W is fixed (``requires_grad=False``, still in the state dict), GELU(tanh) MLP and
    a constant scale. ``raw=True`` (raw denoiser): W is trainable, SiLU MLP, and the scale is a persistent buffer
    ``scale`` of shape ().
    """

    def __init__(self, feature_dim: int, mlp_dim: int, pos_dim: int = 2, raw: bool = False) -> None:
        super().__init__()
        if feature_dim % 2:
            raise ValueError(f"Fourier feature size must be even, got {feature_dim}")
        self.w = nn.Parameter(torch.randn(feature_dim // 2, pos_dim), requires_grad=raw)
        activation = nn.SiLU() if raw else nn.GELU(approximate="tanh")
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, mlp_dim),
            activation,
            nn.Dropout(0.0),
            nn.Linear(mlp_dim, feature_dim),
            nn.Dropout(0.0),
        )
        self.raw = raw
        scale = 1.0 / math.sqrt(feature_dim)
        if raw:
            self.register_buffer("scale", torch.tensor(scale))
        else:
            self.scale = scale

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points [..., 2] -> features [..., F]."""
        u = points @ self.w.T  # (..., F/2)
        features = self.scale * torch.cat([torch.cos(u), torch.sin(u)], dim=-1)  # (..., F), cos first
        return self.mlp(features)  # (..., F)


class TrackPosEncoder(nn.Module):
    """Appends learned Fourier features to every track point: [x, y] -> [x, y, lff_0 .. lff_{F-1}]."""

    def __init__(self, hidden_size: int, pos_embed_dim: int, raw: bool = False) -> None:
        super().__init__()
        self.lff = LearnableFourierFeatures(pos_embed_dim, 4 * hidden_size, raw=raw)
        self.out_channels = 2 + pos_embed_dim

    def forward(self, tracks: torch.Tensor) -> torch.Tensor:
        """tracks [B, T, 2, H, W] -> [B, T, 2 + F, H, W]."""
        points = rearrange(tracks, "b t c h w -> b t h w c")  # (B, T, H, W, 2)
        features = torch.cat([points, self.lff(points)], dim=-1)  # (B, T, H, W, 2 + F)
        return rearrange(features, "b t h w c -> b t c h w")  # (B, T, 2 + F, H, W)


# ---------------------------------------------------------------------------------------------- sin-cos tables
def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE 1-D table: positions [M] -> [M, embed_dim] laid out ``[sin(p w), cos(p w)]``, w_i = 1e4^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding size must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10_000.0**omega  # (D/2,)
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # (M, D)


def sincos_1d_table(embed_dim: int, length: int) -> torch.Tensor:
    """Fixed temporal table [length, embed_dim] for positions 0..length-1."""
    return sincos_1d(embed_dim, torch.arange(length))


def sincos_2d_table(embed_dim: int, grid_size: Union[int, Size2]) -> torch.Tensor:
    """Fixed 2-D table [rows * cols, embed_dim] over a row-major token grid.

    MAE convention: the first ``embed_dim/2`` channels encode the column index, the last ``embed_dim/2`` the row
    index. ``grid_size`` is an int (square) or ``(rows, cols)``.
    """
    if embed_dim % 2:
        raise ValueError(f"2-D sin-cos embedding size must be even, got {embed_dim}")
    rows, cols = pair(grid_size)
    row_index, col_index = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (rows, cols)
    col_part = sincos_1d(embed_dim // 2, col_index.reshape(-1))  # (rows*cols, D/2)
    row_part = sincos_1d(embed_dim // 2, row_index.reshape(-1))  # (rows*cols, D/2)
    return torch.cat([col_part, row_part], dim=1)  # (rows*cols, D)


def token_grid(num_tokens: Union[int, Size2]) -> Size2:
    """``(rows, cols)`` of a token grid given as ``(rows, cols)`` or as a perfect-square token count."""
    if isinstance(num_tokens, int):
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"num_frame_tokens={num_tokens} is not a square number; give the token grid as (rows, cols)"
            )
        return (side, side)
    return pair(num_tokens)
