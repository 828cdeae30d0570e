"""The operations the model's layers are written in, as plain PyTorch: :class:`TorchOps`.

The layers of ``layers.py`` / ``denoiser.py`` / ``vae.py`` hold the model's one forward and call these ops for the
work that has a faster CPU form: a linear layer with its input norm, adaLN modulation, output gate and residual
(``residual + gate * act(layer(modulate(norm(x), shift, scale)))``), the q|k|v projections with their QK norms,
attention, the patch convolution and row-chunked MLPs. :class:`TorchOps` computes them literally (training, GPUs,
CUDA graphs, ``torch.compile``, the reference of every test); ``model.kernels.FastCPUOps`` computes the same maths
with fused CPU inference kernels. A forward takes its ops as an argument (``ops=``), so nothing global switches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

if TYPE_CHECKING:
    from traj_forecast_ros.model.layers import Attention

KV = Tuple[torch.Tensor, torch.Tensor]  # cross-attention keys (normed) and values, each [B, M, C]


def shared_rows(rows: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Repeat per-sample rows [B, K] batch-major to [N, K] for N = B * G sequences (G sequences per sample)."""
    groups, remainder = num_sequences // rows.shape[0], num_sequences % rows.shape[0]  # not divmod: torch.compile
    if remainder:
        raise ValueError(f"{num_sequences} sequences cannot share {rows.shape[0]} conditioning rows evenly")
    return rows if groups == 1 else repeat(rows, "b k -> (b g) k", g=groups)


def per_sequence(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample vectors [B, C] as [N, 1, C] for x [N, L, C] holding N = B * G sequences (batch-major)."""
    return shared_rows(rows, x.shape[0]).unsqueeze(1)  # (N, 1, C)


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> torch.Tensor:
    """DiT's adaLN modulation ``x * (1 + scale) + shift`` with per-sample vectors [B, C] over x [N, L, C]."""
    if scale is not None:
        x = x * (1 + per_sequence(scale, x))
    return x if shift is None else x + per_sequence(shift, x)


def gate_of(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A gate over x [N, L, C]: per-sample rows [B, C] (adaLN) as [N, 1, C], a parameter [1, 1, C] as it is."""
    return per_sequence(gate, x) if gate.dim() == 2 else gate


def one_row_if_shared(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A batch expanded from one row (stride 0 along the batch) -> that row [1, ...]; else unchanged."""
    if value is not None and value.dim() > 0 and value.shape[0] > 1 and value.stride(0) == 0:
        return value[:1]
    return value


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """q [N, L, C] against k, v [B, M, C] where N = B * G sequences share a context (batch-major): the G queries of
    a context attend as one long query, the same as repeating the context G times. ``attention`` maps
    q [B, H, G*L, d], k, v [B, H, M, d] to [B, H, G*L, d]. Returns merged heads [N, L, C]."""
    sequences, length, width = q.shape
    contexts, context_length = k.shape[0], k.shape[1]
    groups, remainder = sequences // contexts, sequences % contexts  # divmod breaks compile on symbolic sizes
    if remainder:
        raise ValueError(f"{sequences} query sequences cannot share {contexts} contexts evenly")
    head_dim = width // heads
    q = q.reshape(contexts, groups * length, heads, head_dim).transpose(1, 2)  # (B, H, G*L, d)
    k = k.reshape(contexts, context_length, heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    v = v.reshape(contexts, context_length, heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    out = attention(q, k, v)  # (B, H, G*L, d)
    return out.transpose(1, 2).reshape(sequences, length, width)  # (N, L, C)


class TorchOps:
    """The reference ops: plain PyTorch on the modules' own parameters (autograd, autocast and compile work)."""

    def param(self, tensor: torch.Tensor) -> torch.Tensor:
        """A fixed parameter or buffer (a sin-cos table) in the compute dtype: here the tensor itself."""
        return tensor

    def shared_time(self, t: torch.Tensor) -> torch.Tensor:
        """Flow times [B] as one row [1] when they are an expanded scalar (one conditioning vector for all)."""
        return one_row_if_shared(t)

    def linear(self, x: torch.Tensor, layer: nn.Linear, norm: Optional[nn.Module] = None,
               shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
               gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
               gelu: bool = False) -> torch.Tensor:
        """``residual + gate * act(layer(modulate(norm(x), shift, scale)))`` over x [N, L, C] (or [B, C]); each part
        optional. shift, scale: per-sample rows [B, C]; gate: rows [B, C] or a parameter [1, 1, C]; act: tanh-GELU
        when ``gelu``."""
        hidden = x if norm is None else norm(x)
        if shift is not None or scale is not None:
            hidden = modulate(hidden, shift, scale)  # (N, L, C)
        out = layer(hidden)  # (N, L, out)
        if gelu:
            out = F.gelu(out, approximate="tanh")
        if gate is not None:
            out = gate_of(gate, out) * out
        return out if residual is None else residual + out

    def qkv(self, attn: "Attention", x: torch.Tensor, norm: Optional[nn.Module] = None,
            shift: Optional[torch.Tensor] = None,
            scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's normed q, k and v [N, L, C] each, from ``modulate(norm(x), shift, scale)``."""
        hidden = x if norm is None else norm(x)
        if shift is not None or scale is not None:
            hidden = modulate(hidden, shift, scale)  # (N, L, C)
        k, v = attn.kv(hidden).chunk(2, dim=-1)  # (N, L, C) each
        return attn.q_norm(attn.q(hidden)), attn.k_norm(k), v

    def query(self, attn: "Attention", x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """Cross-attention's normed query [N, L, C] of ``norm(x)``."""
        return attn.q_norm(attn.q(x if norm is None else norm(x)))

    def context_kv(self, attn: "Attention", context: torch.Tensor) -> KV:
        """Cross-attention keys (normed) and values of a context [B, M, C]: each [B, M, C]."""
        k, v = attn.kv(context).chunk(2, dim=-1)  # (B, M, C) each
        return attn.k_norm(k), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """Merged heads [N, L, C] of q (from :meth:`qkv` / :meth:`query`) against k, v [B, M, C] (N = B * G)."""
        return attend_grouped(q, k, v, heads, F.scaled_dot_product_attention)  # scale 1/sqrt(d)

    def conv_patches(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """The patch convolution: x [N, C_in, rows, cols] -> [N, D, rows/p, cols/p]."""
        return conv(x)

    def by_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """``fn`` over rows [P, F] (a row-wise map; the fast ops run it in chunks)."""
        return fn(rows)


TORCH_OPS = TorchOps()  # stateless: the default ``ops`` of every forward
