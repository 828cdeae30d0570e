"""Building blocks shared by the trajectory VAE and the Latte denoiser.

Parameter names and shapes follow the official code (spec sections 3-4, 6) so that the released state dicts load
with ``strict=True``: ``Attention`` (``q``, ``kv``, ``proj``, ``q_norm``, ``k_norm``), ``Mlp`` (``fc1``, ``fc2``),
``PatchEmbed`` (``proj``), ``TimestepEmbedder`` (``mlp.0``, ``mlp.2``) and ``TrackPosEncoder`` (``lff.w``,
``lff.mlp.0``, ``lff.mlp.3``, raw models also ``lff.scale``). The fixed sin-cos tables use the MAE convention.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from traj_forecast_ros.model.config import Size2, as_pair
from traj_forecast_ros.model.ops import KV, TORCH_OPS, TorchOps

QK_NORM_EPS = 1e-5


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter) whose weight follows the input dtype under autocast (no dtype-mismatch
    fallback to the unfused composite)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]."""
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, tuple(self.normalized_shape), weight, self.eps)


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
        self.q_norm = RMSNorm(dim, eps=QK_NORM_EPS)
        self.k_norm = RMSNorm(dim, eps=QK_NORM_EPS)

    def forward(self, x: torch.Tensor, context: Union[torch.Tensor, KV, None] = None) -> torch.Tensor:
        """x [N, L, C] attends to context [N, M, C] (default: x itself); returns [N, L, C].

        The context may also be shared by groups of consecutive sequences: context [B, M, C] with N = B * G
        (batch-major, sequence n uses context n // G). Keys and values are then projected once per context and the
        G query sequences attend as one long query; the result is the same as repeating the context G times.
        """
        return self.proj(self.heads(x, context))  # (N, L, C)

    def heads(self, x: torch.Tensor, context: Union[torch.Tensor, KV, None] = None, ops: TorchOps = TORCH_OPS,
              norm: Optional[nn.Module] = None, shift: Optional[torch.Tensor] = None,
              scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Merged heads [N, L, C] before the output projection. Self-attention (``context`` None) of
        ``modulate(norm(x), shift, scale)``, or cross-attention of ``norm(x)`` to a context [B, M, C] or to its
        prepared :meth:`context_kv`."""
        if context is None:
            q, k, v = ops.qkv(self, x, norm, shift, scale)  # (N, L, C) each
        else:
            k, v = context if isinstance(context, tuple) else self.context_kv(context, ops)  # (B, M, C) each
            q = ops.query(self, x, norm)  # (N, L, C)
        return ops.attend(q, k, v, self.num_heads)  # (N, L, C)

    def context_kv(self, context: torch.Tensor, ops: TorchOps = TORCH_OPS) -> KV:
        """Keys (normed) and values of a cross-attention context [B, M, C], each [B, M, C]: computed once per image
        and reused by every call with the same context."""
        return ops.context_kv(self, context)


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(GELU_tanh(fc1(x)))`` (the timm ``Mlp`` keys)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return ops.linear(ops.linear(x, self.fc1, gelu=True), self.fc2)  # act: tanh-GELU, as self.act


# ---------------------------------------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: Conv2d(kernel = stride = patch), flattened row-major."""

    def __init__(self, input_size: Union[int, Size2], patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.input_size = as_pair(input_size)
        rows, cols = self.input_size
        if rows % patch_size or cols % patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {patch_size}")
        self.patch_size = patch_size
        self.grid_size: Size2 = (rows // patch_size, cols // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """x [N, C_in, rows, cols] -> tokens [N, rows/p * cols/p, D]."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"patch embedding expects a {self.input_size} grid, got {tuple(x.shape[-2:])}")
        x = ops.conv_patches(self.proj, x)  # (N, D, rows/p, cols/p)
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

    def forward(self, t: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """t [N] -> [N, hidden]."""
        freq = timestep_frequencies(t, self.frequency_embedding_size)  # (N, 256)
        hidden = F.silu(ops.linear(freq.to(self.mlp[0].weight.dtype), self.mlp[0]))  # (N, hidden)
        return ops.linear(hidden, self.mlp[2])  # (N, hidden)


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

    def forward(self, points: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """points [..., 2] -> features [..., F] (the MLP row-wise, in chunks where ``ops`` say so)."""
        features = self.fourier(points)  # (..., F)
        rows = features.reshape(-1, features.shape[-1])  # (P, F)
        out = ops.by_rows(lambda part: self._mlp(part, ops), rows)  # (P, F)
        return out.reshape(features.shape[:-1] + out.shape[-1:])  # (..., F)

    def _mlp(self, rows: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        """``self.mlp`` on rows [P, F] (its dropouts have p = 0)."""
        hidden = ops.linear(rows, self.mlp[0], gelu=not self.raw)  # (P, 12F)
        return ops.linear(F.silu(hidden) if self.raw else hidden, self.mlp[3])  # (P, F)

    def fourier(self, points: torch.Tensor) -> torch.Tensor:
        """The fixed part: points [..., 2] -> ``scale * [cos(p W^T), sin(p W^T)]`` [..., F]."""
        u = points @ self.w.T  # (..., F/2)
        return self.scale * torch.cat([torch.cos(u), torch.sin(u)], dim=-1)  # (..., F), cos first


class TrackPosEncoder(nn.Module):
    """Appends learned Fourier features to every track point: [x, y] -> [x, y, lff_0 .. lff_{F-1}]."""

    def __init__(self, hidden_size: int, pos_embed_dim: int, raw: bool = False) -> None:
        super().__init__()
        self.lff = LearnableFourierFeatures(pos_embed_dim, 4 * hidden_size, raw=raw)
        self.out_channels = 2 + pos_embed_dim

    def forward(self, tracks: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """tracks [B, T, 2, H, W] -> [B, T, 2 + F, H, W]."""
        points = rearrange(tracks, "b t c h w -> b t h w c")  # (B, T, H, W, 2)
        lff = self.lff(points, ops)  # (B, T, H, W, F)
        features = torch.cat([points.to(lff.dtype), lff], dim=-1)  # (B, T, H, W, 2 + F)
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
    rows, cols = as_pair(grid_size)
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
    return as_pair(num_tokens)


def latte_sincos_tables(
    hidden: int, token_grid_size: Size2, num_frames: int, frame_token_grid: Size2
) -> "dict[str, torch.Tensor]":
    """The fixed tables of a Latte-style model by state-dict name, each ``[1, n, hidden]``.

    ``pos_embed`` over the (rows, cols) token grid of one frame, ``temp_embed`` over the frames, ``frame_embed`` over
    the DINO token grid.
    """
    return {
        "pos_embed": sincos_2d_table(hidden, token_grid_size).unsqueeze(0),
        "temp_embed": sincos_1d_table(hidden, num_frames).unsqueeze(0),
        "frame_embed": sincos_2d_table(hidden, frame_token_grid).unsqueeze(0),
    }


def run_factorised_blocks(x: torch.Tensor, num_blocks: int, num_frames: int, num_tokens: int,
                          run_block: Callable[[int, torch.Tensor], torch.Tensor],
                          temp_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latte's factorised transformer over x [(B T), L, C]: pairs of a spatial block (even: the L tokens of one
    frame) and a temporal block (odd: the T frames of one token), block i run as ``run_block(i, x)``.

    ``temp_embed`` [1, T, C], when given, is added after the first spatial block. Returns [(B T), L, C].
    """
    for i in range(0, num_blocks, 2):
        x = run_block(i, x)  # (B*T, L, C), spatial
        x = rearrange(x, "(b f) l d -> (b l) f d", f=num_frames)  # (B*L, T, C)
        if i == 0 and temp_embed is not None:
            x = x + temp_embed  # (B*L, T, C)
        x = run_block(i + 1, x)  # (B*L, T, C), temporal
        x = rearrange(x, "(b l) f d -> (b f) l d", l=num_tokens)  # (B*T, L, C)
    return x


def unpatchify(x: torch.Tensor, batch: int, token_grid_size: Size2, patch_size: int) -> torch.Tensor:
    """Per-token outputs [(B T), rows * cols, p*p*c] ordered (p_row, p_col, c) -> [B, T, c, rows*p, cols*p]."""
    rows, cols = token_grid_size
    return rearrange(x, "(b f) (h w) (p q c) -> b f c (h p) (w q)", b=batch, h=rows, w=cols, p=patch_size,
                     q=patch_size)


def init_latte_weights(model: nn.Module, tables: "dict[str, torch.Tensor]", patch_embed: PatchEmbed) -> None:
    """Shared init of the denoiser and the VAE: Xavier linears and patch conv, zero biases, fixed sin-cos tables."""

    def xavier_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(xavier_linear)
    with torch.no_grad():
        for name, table in tables.items():
            getattr(model, name).copy_(table)
    conv_weight = patch_embed.proj.weight
    nn.init.xavier_uniform_(conv_weight.view(conv_weight.shape[0], -1))
    nn.init.zeros_(patch_embed.proj.bias)
