"""Building blocks shared by the trajectory VAE and the Latte denoiser.

Parameter names and shapes follow the official code (spec sections 3-4, 6) so that the released state dicts load
with ``strict=True``: ``Attention`` (``q``, ``kv``, ``proj``, ``q_norm``, ``k_norm``), ``Mlp`` (``fc1``, ``fc2``),
``PatchEmbed`` (``proj``), ``TimestepEmbedder`` (``mlp.0``, ``mlp.2``) and ``TrackPosEncoder`` (``lff.w``,
``lff.mlp.0``, ``lff.mlp.3``, raw models also ``lff.scale``). The fixed sin-cos tables use the MAE convention.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.overrides import TorchFunctionMode

from traj_forecast_ros.model.config import Size2, as_pair

QK_NORM_EPS = 1e-5
ATTENTION_SCORE_BYTES = 1 << 20  # explicit attention: score bytes per chunk (about one core's L2)
PER_HEAD_GEMM_MAX_PAIRS = 16  # explicit attention: up to this many (sequence, head) pairs run as GEMMs
LFF_ROWS_PER_CHUNK = 4096  # track points per chunk of the Fourier-feature MLP on CPU inference


def shared_rows(rows: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Repeat per-sample rows [B, K] batch-major to [N, K] for N = B * G sequences (G sequences per sample)."""
    groups, remainder = divmod(num_sequences, rows.shape[0])
    if remainder:
        raise ValueError(f"{num_sequences} sequences cannot share {rows.shape[0]} conditioning rows evenly")
    return rows if groups == 1 else repeat(rows, "b k -> (b g) k", g=groups)


# ---------------------------------------------------------------------------------------------- fast kernels
# On CPU, PyTorch runs float32 ``F.linear`` through MKL, which uses its AVX2 kernels on AMD processors (about 100
# GFLOP/s per core on the project machines), while oneDNN's ``_linear_pointwise`` reaches about 240 GFLOP/s on the
# same shapes and can fuse the tanh-GELU into the GEMM. It has no autograd formula, so it is used only for
# inference (grad mode off) on CPU; training and GPUs keep ``F.linear``. The other inference kernels here: per-sample
# adaLN modulation, norm weights and gates folded into the weights (O(C^2) per call instead of passes over every
# token), a single-reduction RMSNorm, and for bfloat16 an explicit, cache-blocked attention (the fused CPU kernel is
# 2-3x slower in bfloat16).
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
FAST_DTYPES = (torch.float32, torch.bfloat16)
_fast_kernels_enabled = True


def set_fast_kernels(enabled: bool) -> bool:
    """Switch the CPU inference kernels (oneDNN linear, weight folding) on or off; returns the previous setting.

    Off gives the plain reference forward (the one the tests compare against).
    """
    global _fast_kernels_enabled
    previous, _fast_kernels_enabled = _fast_kernels_enabled, bool(enabled)
    return previous


@contextmanager
def fast_kernels(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_fast_kernels` (restores the previous setting on exit)."""
    previous = set_fast_kernels(enabled)
    try:
        yield
    finally:
        set_fast_kernels(previous)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: the autocast dtype when autocast is on for x's device, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def use_fast_path(x: torch.Tensor) -> bool:
    """True for CPU inference (no autograd) in float32/bfloat16 with oneDNN available and fast kernels enabled.

    False while ``torch.compile`` traces (inductor makes its own kernel choices and cannot lower these ops).
    """
    return (_fast_kernels_enabled and ONEDNN_LINEAR and x.device.type == "cpu" and not torch.is_grad_enabled()
            and compute_dtype(x) in FAST_DTYPES and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool = False,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` [..., out], then tanh-GELU when ``gelu``, or ``residual + ...`` [..., out] when given.

    CPU inference goes through oneDNN (GELU fused into the GEMM; the residual added in one pass afterwards, which
    measured faster than oneDNN's fused add) and returns the compute dtype: in bfloat16 the residual stream is
    bfloat16, as in a model with bfloat16 weights (a float32 stream mixed with bfloat16 updates measured 40% slower
    on CPU). Elsewhere this is ``F.linear`` (autocast applies) followed by the same operations.
    """
    if gelu and residual is not None:
        raise ValueError("linear fuses either a GELU or a residual add, not both")
    if use_fast_path(x):
        dtype = compute_dtype(x)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                 "tanh" if gelu else "")
        return out if residual is None else out.add_(residual)  # (..., out) in the compute dtype
    out = F.linear(x, weight, bias)
    if gelu:
        out = F.gelu(out, approximate="tanh")
    if residual is not None:
        out = residual + out
    return out


class OneDNNLinearMode(TorchFunctionMode):
    """Routes every ``F.linear`` (so every ``nn.Linear``) of third-party modules, such as the transformers image
    and text encoders, through :func:`linear` while active: oneDNN on CPU inference, unchanged elsewhere."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args and use_fast_path(args[0]):
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight.dim() == 2 and x.dim() >= 2:
                return linear(x, weight, bias)
        return func(*args, **kwargs)


def rms_normalize(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) [* weight]``; the weight is cast to x's dtype.

    Inference uses one fused reduction (``vector_norm``, float32 accumulation) and one multiply: about 3x faster
    than the composite ``F.rms_norm`` on CPU; on the CPU fast path the result is written directly in the compute
    dtype (what the next linear layer would cast it to). With autograd on (or fast kernels off) it is
    ``F.rms_norm``.
    """
    if torch.is_grad_enabled() or not _fast_kernels_enabled:
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)  # autocast leaves the norm in the input dtype: keep the fused kernel usable
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    out_dtype = compute_dtype(x) if use_fast_path(x) else x.dtype
    inverse = torch.linalg.vector_norm(x, dim=-1, keepdim=True).float()  # (..., 1), accumulated in float32
    inverse = inverse.square_().div_(x.shape[-1]).add_(eps).rsqrt_().to(x.dtype)  # same-dtype multiply: vectorised
    if out_dtype == x.dtype:
        out = x * inverse  # (..., C)
    else:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        torch.mul(x, inverse, out=out)  # (..., C), written in the compute dtype in the same pass
    return out if weight is None else out.mul_(weight.to(out_dtype))


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter) whose weight follows the input dtype under autocast (no dtype-mismatch
    fallback) and whose inference path is :func:`rms_normalize`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]."""
        if tuple(self.normalized_shape) != (x.shape[-1],):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_normalize(x, eps, self.weight)


def per_sample_vector(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[C], [1, C] or [1, 1, C] -> [C] (one sample's vector); None when ``value`` holds several samples' rows."""
    if value is None:
        return None
    if value.dim() == 1:
        return value
    if all(size == 1 for size in value.shape[:-1]):
        return value.reshape(-1)
    return None


def foldable_vectors(x: torch.Tensor, *vectors: Optional[torch.Tensor]) -> bool:
    """True when per-sample vectors (each None or one sample's, see :func:`per_sample_vector`) applied around a
    linear layer on x should be folded into its weights: CPU inference (:func:`use_fast_path`) with one sample."""
    return use_fast_path(x) and all(v is None or per_sample_vector(v) is not None for v in vectors)


def folded_linear_params(layer: nn.Linear, input_scale: Optional[torch.Tensor] = None,
                         input_shift: Optional[torch.Tensor] = None, output_gate: Optional[torch.Tensor] = None,
                         dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of ``gate * layer(x * scale + shift)`` as one linear layer (vectors [C], float32 math).

    ``W' = gate[:, None] * W * scale[None, :]`` and ``b' = gate * (b + W shift)``: folding a per-sample modulation
    into the weights costs O(C_in C_out) instead of two passes over every token. The folded weight is written in
    ``dtype`` (default: the layer's) in the same pass.
    """
    weight, bias = layer.weight, layer.bias
    dtype = dtype or weight.dtype
    if bias is not None:
        bias = bias.float()
    if input_shift is not None:
        shifted = torch.mv(weight.float(), input_shift.float())  # (C_out,)
        bias = shifted if bias is None else bias + shifted
    factor = None
    if input_scale is not None:
        factor = input_scale.float()[None, :]  # (1, C_in)
    if output_gate is not None:
        gate = output_gate.float()
        factor = gate[:, None] if factor is None else factor * gate[:, None]  # (C_out, 1) or (C_out, C_in)
        bias = bias * gate if bias is not None else None
    if factor is None:
        folded = weight.to(dtype)
    elif torch.is_grad_enabled():
        folded = (weight * factor).to(dtype)
    else:
        folded = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        torch.mul(weight, factor, out=folded)  # one pass: float32 product rounded once to dtype
    return folded, bias.to(dtype) if bias is not None else None


def _rows_for(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample vectors [B, C] (or one [C] / [1, 1, C]) broadcastable over x [N, L, C] with N = B * G."""
    if value.dim() == 2:
        return shared_rows(value, x.shape[0]).unsqueeze(1)  # (N, 1, C)
    return value


def modulated_input(x: torch.Tensor, input_scale: Optional[torch.Tensor],
                    input_shift: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * scale + shift`` with per-sample vectors (the reference order of adaLN modulation)."""
    if input_scale is not None:
        x = x * _rows_for(input_scale, x)
    if input_shift is not None:
        x = x + _rows_for(input_shift, x)
    return x


def gated_residual(out: torch.Tensor, gate: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``residual + gate * out`` (either part optional)."""
    if gate is not None:
        out = _rows_for(gate, out) * out
    return out if residual is None else residual + out


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

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *,
                input_scale: Optional[torch.Tensor] = None, input_shift: Optional[torch.Tensor] = None,
                gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, L, C] attends to context [N, M, C] (default: x itself); returns [N, L, C].

        The context may also be shared by groups of consecutive sequences: context [B, M, C] with N = B * G
        (batch-major, sequence n uses context n // G). Keys and values are then projected once per context, and
        the G query sequences attend as one long query (no copies); the result is the same as repeating the
        context G times.

        Optional fused forms (per-sample vectors [B, C] or one [C]): the query input (and, for self-attention, the
        key/value input) is ``x * input_scale + input_shift``, and the result is ``residual + gate * attention``.
        On CPU inference with one sample the vectors are folded into the projection weights.
        """
        self_attention = context is None
        fold = foldable_vectors(x, input_scale, input_shift, gate)
        if fold:
            scale, shift, dtype = per_sample_vector(input_scale), per_sample_vector(input_shift), compute_dtype(x)
            q = linear(x, *folded_linear_params(self.q, scale, shift, dtype=dtype))  # (N, L, C)
            kv_params = (folded_linear_params(self.kv, scale, shift, dtype=dtype) if self_attention
                         else (self.kv.weight, self.kv.bias))
            kv = linear(x if self_attention else context, *kv_params)  # (B, M, 2C)
        else:
            x = modulated_input(x, input_scale, input_shift)  # (N, L, C)
            q = linear(x, self.q.weight, self.q.bias)  # (N, L, C)
            kv = linear(x if self_attention else context, self.kv.weight, self.kv.bias)  # (B, M, 2C)
        out = self.attend(q, kv)  # (N, L, C)
        if fold:
            return linear(out, *folded_linear_params(self.proj, output_gate=per_sample_vector(gate), dtype=dtype),
                          residual=residual)  # (N, L, C)
        return gated_residual(linear(out, self.proj.weight, self.proj.bias), gate, residual)  # (N, L, C)

    def attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Projected queries q [N, L, C] and keys|values kv [B, M, 2C] (N = B * G) -> merged heads [N, L, C]."""
        sequences, length, width = q.shape
        contexts, context_length = kv.shape[0], kv.shape[1]
        groups, remainder = divmod(sequences, contexts)
        if remainder:
            raise ValueError(f"{sequences} query sequences cannot share {contexts} contexts evenly")
        heads, head_dim = self.num_heads, width // self.num_heads
        # bfloat16 on CPU: explicit attention through oneDNN's batched GEMM (2-3x the fused kernel's speed there);
        # the 1/sqrt(d) score scale rides on the q-norm weight.
        explicit = use_fast_path(q) and q.dtype == torch.bfloat16
        q_weight = self.q_norm.weight * head_dim**-0.5 if explicit else self.q_norm.weight
        q = rms_normalize(q, self.q_norm.eps, q_weight)  # (N, L, C), normalised over the full width
        k, v = kv.chunk(2, dim=-1)  # (B, M, C) each: k = first C outputs, v = last C
        k = self.k_norm(k)  # (B, M, C)
        # Sequences sharing a context attend as one long query: (B, G*L, C) is a view of the batch-major (N, L, C).
        q = q.reshape(contexts, groups * length, heads, head_dim).transpose(1, 2)  # (B, H, G*L, C/H)
        k = k.view(contexts, context_length, heads, head_dim).transpose(1, 2)  # (B, H, M, C/H)
        v = v.view(contexts, context_length, heads, head_dim).transpose(1, 2)  # (B, H, M, C/H), strided view
        if explicit:
            return explicit_attention(q, k, v).reshape(sequences, length, width)  # (N, L, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, G*L, C/H), scale 1/sqrt(C/H)
        return out.transpose(1, 2).reshape(sequences, length, width)  # (N, L, C)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for pre-scaled q [B, H, L, d], k, v [B, H, M, d] -> [B, L, H, d] (heads-last, contiguous).

    Few long query sequences (the shared-context cross-attention: B*H <= 16) run as two oneDNN GEMMs per head with
    k and v as the weights; otherwise batched GEMMs over chunks of the batch whose score matrices fit in about a
    core's L2 cache (a softmax pass over scores that spill to L3/DRAM costs as much as the two GEMMs). The softmax
    runs in float32: more exact, and faster than the reduced-precision kernel on CPU (measured).
    """
    batch, heads, length, head_dim = q.shape
    out = q.new_empty(batch, length, heads, head_dim)  # (B, L, H, d)
    if batch * heads <= PER_HEAD_GEMM_MAX_PAIRS and ONEDNN_LINEAR:
        for b in range(batch):
            for h in range(heads):
                scores = torch.ops.mkldnn._linear_pointwise(q[b, h], k[b, h].contiguous(), None, "none", [], "")
                probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (L, M)
                out[b, :, h] = torch.ops.mkldnn._linear_pointwise(probs, v[b, h].t().contiguous(), None, "none",
                                                                  [], "")  # (L, d)
        return out
    score_bytes = heads * length * k.shape[2] * q.element_size()
    per_chunk = max(1, ATTENTION_SCORE_BYTES // max(1, score_bytes))
    for start in range(0, batch, per_chunk):
        part = slice(start, start + per_chunk)
        scores = torch.matmul(q[part], k[part].transpose(-1, -2))  # (b, H, L, M)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (b, H, L, M)
        out[part] = torch.matmul(probs, v[part]).transpose(1, 2)  # (b, L, H, d)
    return out


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(GELU_tanh(fc1(x)))`` (the timm ``Mlp`` keys)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor, *, input_scale: Optional[torch.Tensor] = None,
                input_shift: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., in] -> [..., out]; optional fused forms as in :meth:`Attention.forward`:
        ``residual + gate * mlp(x * input_scale + input_shift)`` (x [N, L, in] with per-sample vectors)."""
        fold = foldable_vectors(x, input_scale, input_shift, gate)
        if fold:
            dtype = compute_dtype(x)
            hidden = linear(x, *folded_linear_params(self.fc1, per_sample_vector(input_scale),
                                                     per_sample_vector(input_shift), dtype=dtype),
                            gelu=True)  # (..., hidden)
            return linear(hidden, *folded_linear_params(self.fc2, output_gate=per_sample_vector(gate), dtype=dtype),
                          residual=residual)  # (..., out)
        x = modulated_input(x, input_scale, input_shift)
        hidden = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)  # (..., hidden)
        return gated_residual(linear(hidden, self.fc2.weight, self.fc2.bias), gate, residual)  # (..., out)


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
        if not use_fast_path(features):
            return self.mlp(features)  # (..., F)
        # Inference: the MLP in row chunks (its hidden layer is 12x wider than the features: a 64x64x16 grid would
        # need a 400 MB intermediate) with the GELU fused into the first GEMM.
        fc1, fc2 = self.mlp[0], self.mlp[3]
        rows = features.reshape(-1, features.shape[-1])  # (P, F)
        outputs = []
        for start in range(0, rows.shape[0], LFF_ROWS_PER_CHUNK):
            chunk = rows[start:start + LFF_ROWS_PER_CHUNK]  # (p, F)
            hidden = linear(chunk, fc1.weight, fc1.bias, gelu=not self.raw)  # (p, 4 hidden)
            if self.raw:
                hidden = F.silu(hidden)
            outputs.append(linear(hidden, fc2.weight, fc2.bias))  # (p, F)
        return torch.cat(outputs).reshape(features.shape[:-1] + (fc2.out_features,))  # (..., F)


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


def run_factorised_blocks(x: torch.Tensor, blocks: Sequence[nn.Module], num_frames: int, num_tokens: int,
                          *block_args: torch.Tensor, temp_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latte's factorised transformer over x [(B T), L, C]: pairs of a spatial block (even: the L tokens of one
    frame) and a temporal block (odd: the T frames of one token), each called as ``block(x, *block_args)``.

    ``temp_embed`` [1, T, C], when given, is added after the first spatial block. Returns [(B T), L, C].
    """
    for i in range(0, len(blocks), 2):
        x = blocks[i](x, *block_args)  # (B*T, L, C), spatial
        x = rearrange(x, "(b f) l d -> (b l) f d", f=num_frames)  # (B*L, T, C)
        if i == 0 and temp_embed is not None:
            x = x + temp_embed  # (B*L, T, C)
        x = blocks[i + 1](x, *block_args)  # (B*L, T, C), temporal
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
