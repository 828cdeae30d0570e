"""CPU inference forward of the denoiser and the trajectory VAE over the reference modules' own parameters.

The modules in ``layers.py`` / ``denoiser.py`` / ``vae.py`` are the reference (training, GPUs, tests). This module
runs the same maths for CPU inference with kernels picked explicitly by :class:`KernelOptions` (no global state, so
forecasters in different threads cannot affect each other):

* oneDNN ``_linear_pointwise`` GEMMs (tanh-GELU fused) instead of MKL's ``F.linear`` (about 2x on the project's
  AMD CPUs), on weights cast to the compute dtype once per model instead of once per call;
* q|k|v of self-attention as one GEMM, QK-RMSNorm as one pass, the 1/sqrt(d) score scale on the q-norm weight;
* the VAE's norm weights and gates folded into its weights once per model; the denoiser's adaLN modulation
  folded into the weights once per step when every sequence of the call shares one conditioning vector (the
  forecaster's K samples share the time, image and instruction), else applied per sequence;
* image-context keys/values of the cross-attentions computed once per image (:meth:`DenoiserKernels.bind`), not
  once per Euler step;
* attention through ``F.scaled_dot_product_attention`` or an explicit cache-blocked form (faster in bfloat16).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.overrides import TorchFunctionMode

from traj_forecast_ros.model.layers import (Attention, LearnableFourierFeatures, per_sequence, timestep_frequencies,
                                            unpatchify)

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
ATTENTION_KERNELS = ("sdpa", "explicit")
ATTENTION_SCORE_BYTES = 1 << 20  # explicit attention: score bytes per chunk (about one core's L2)
PER_HEAD_GEMM_MAX_PAIRS = 16  # explicit attention: up to this many (sequence, head) pairs run as GEMMs
LFF_ROWS_PER_CHUNK = 4096  # track points per chunk of the Fourier-feature MLP (its hidden layer is 12x wider)

Dense = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (weight [out, in], bias [out] or None) in the compute dtype


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Which CPU inference kernels run (chosen per model and device by the sampling plan).

    Attributes:
        dtype: compute dtype (float32 or bfloat16); weights are cast to it once.
        fold_modulation: fold the denoiser's shared adaLN modulation into the weights once per step (else it is
            applied to every token).
        attention: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"explicit"`` (cache-blocked GEMMs).
        onednn: oneDNN GEMMs (else ``F.linear``).
    """

    dtype: torch.dtype = torch.float32
    fold_modulation: bool = True
    attention: str = "sdpa"
    onednn: bool = ONEDNN_LINEAR

    def __post_init__(self) -> None:
        if self.dtype not in KERNEL_DTYPES:
            raise ValueError(f"CPU kernels compute in float32 or bfloat16, not {self.dtype}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.onednn and not ONEDNN_LINEAR:
            raise ValueError("this torch build has no oneDNN linear; use onednn=False")


def kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where this module's forward applies: CPU in float32 or bfloat16."""
    return device.type == "cpu" and dtype in KERNEL_DTYPES


# ---------------------------------------------------------------------------------------------- primitives
def linear(x: torch.Tensor, dense: Dense, options: KernelOptions, gelu: bool = False,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` [..., out], then tanh-GELU when ``gelu``, or ``residual + ...`` when given (x in the compute
    dtype, as the weights)."""
    weight, bias = dense
    if options.onednn:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                 "tanh" if gelu else "")  # (..., out)
    else:
        out = F.linear(x, weight, bias)  # (..., out)
        if gelu:
            out = F.gelu(out, approximate="tanh")
    return out if residual is None else out.add_(residual)


def rms_normalize(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim ``x / sqrt(mean(x^2) + eps) [* weight]``: one fused reduction (float32
    accumulation) and one multiply, about 3x faster than ``F.rms_norm`` on CPU. Works on strided views."""
    inverse = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
    inverse = inverse.square_().div_(x.shape[-1]).add_(eps).rsqrt_().to(x.dtype)
    out = x * inverse  # (..., C)
    return out if weight is None else out.mul_(weight)


def cast(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A detached copy in ``dtype`` (the tensor itself when it already is)."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def dense(layer: nn.Linear, dtype: torch.dtype) -> Dense:
    """A linear layer's (weight, bias) in ``dtype``."""
    return cast(layer.weight, dtype), cast(layer.bias, dtype)


def folded(layer: Tuple[torch.Tensor, Optional[torch.Tensor]], dtype: torch.dtype,
           input_scale: Optional[torch.Tensor] = None, input_shift: Optional[torch.Tensor] = None,
           output_gate: Optional[torch.Tensor] = None) -> Dense:
    """(weight, bias) of ``gate * layer(x * scale + shift)`` as one linear layer (vectors [C], float32 maths).

    ``W' = gate[:, None] * W * scale[None, :]``, ``b' = gate * (b + W shift)``: O(C_in C_out) instead of passes
    over every token. Written in ``dtype``.
    """
    weight, bias = layer[0].detach().float(), None if layer[1] is None else layer[1].detach().float()
    if input_shift is not None:
        shifted = torch.mv(weight, input_shift.float())  # (C_out,)
        bias = shifted if bias is None else bias + shifted
    factor = None
    if input_scale is not None:
        factor = input_scale.float()[None, :]  # (1, C_in)
    if output_gate is not None:
        gate = output_gate.float()
        factor = gate[:, None] if factor is None else factor * gate[:, None]  # (C_out, C_in)
        bias = bias * gate if bias is not None else None
    if factor is None:
        out = weight.to(dtype)
    else:
        out = torch.empty(weight.shape, dtype=dtype)
        torch.mul(weight, factor, out=out)  # one pass, rounded once to dtype
    return out, cast(bias, dtype)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for pre-scaled q [B, H, L, d], k, v [B, H, M, d] -> [B, L, H, d] (heads-last, contiguous).

    Few long query sequences (the shared-context cross-attention: B*H <= 16) run as two GEMMs per head; otherwise
    batched GEMMs over chunks whose score matrices fit in about a core's L2. The softmax runs in float32.
    """
    batch, heads, length, head_dim = q.shape
    out = q.new_empty(batch, length, heads, head_dim)  # (B, L, H, d)
    if batch * heads <= PER_HEAD_GEMM_MAX_PAIRS:
        for b in range(batch):
            for h in range(heads):
                scores = q[b, h] @ k[b, h].transpose(0, 1)  # (L, M)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (L, M)
                out[b, :, h] = probs @ v[b, h]  # (L, d)
        return out
    score_bytes = heads * length * k.shape[2] * q.element_size()
    per_chunk = max(1, ATTENTION_SCORE_BYTES // max(1, score_bytes))
    for start in range(0, batch, per_chunk):
        part = slice(start, start + per_chunk)
        scores = torch.matmul(q[part], k[part].transpose(-1, -2))  # (b, H, L, M)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (b, H, L, M)
        out[part] = torch.matmul(probs, v[part]).transpose(1, 2)  # (b, L, H, d)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, options: KernelOptions) -> torch.Tensor:
    """Pre-scaled, normed q [N, L, C] against k, v [B, M, C] (N = B * G sequences share a context; views with a
    contiguous last dim are fine) -> merged heads [N, L, C]."""
    sequences, length, width = q.shape
    contexts, context_length = k.shape[0], k.shape[1]
    groups, remainder = divmod(sequences, contexts)
    if remainder:
        raise ValueError(f"{sequences} query sequences cannot share {contexts} contexts evenly")
    head_dim = width // heads
    q = q.reshape(contexts, groups * length, heads, head_dim).transpose(1, 2)  # (B, H, G*L, d)
    k = k.reshape(contexts, context_length, heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    v = v.reshape(contexts, context_length, heads, head_dim).transpose(1, 2)  # (B, H, M, d)
    if options.attention == "explicit":
        return explicit_attention(q, k, v).reshape(sequences, length, width)  # (N, L, C)
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, G*L, d), q carries 1/sqrt(d)
    return out.transpose(1, 2).reshape(sequences, length, width)  # (N, L, C)


# ---------------------------------------------------------------------------------------------- prepared layers
@dataclasses.dataclass
class AttentionWeights:
    """One ``Attention``'s parameters in the compute dtype: q|k|v stacked for self-attention, the q and k norm
    weights stacked [2, C] with 1/sqrt(d) on the q half."""

    heads: int
    q: Dense
    kv: Dense
    qkv: Dense
    proj: Dense
    qk_norm: torch.Tensor  # (2, C)
    q_norm: torch.Tensor  # (C,)
    k_norm: torch.Tensor  # (C,)
    eps: float

    @classmethod
    def of(cls, attn: Attention, dtype: torch.dtype) -> "AttentionWeights":
        width = attn.q.weight.shape[0]
        q_weight = attn.q_norm.weight.detach().float() * (width // attn.num_heads) ** -0.5
        q, kv = dense(attn.q, dtype), dense(attn.kv, dtype)
        bias = None if q[1] is None else torch.cat([q[1], kv[1]])
        k_weight = attn.k_norm.weight.detach().float()
        return cls(heads=attn.num_heads, q=q, kv=kv, qkv=(torch.cat([q[0], kv[0]]), bias),
                   proj=dense(attn.proj, dtype), qk_norm=torch.stack([q_weight, k_weight]).to(dtype),
                   q_norm=q_weight.to(dtype), k_norm=k_weight.to(dtype), eps=attn.q_norm.eps)

    def self_attention(self, x: torch.Tensor, qkv: Dense, options: KernelOptions) -> torch.Tensor:
        """x [N, L, C] -> merged heads [N, L, C] before the output projection (``qkv`` maybe folded)."""
        sequences, length, width = x.shape
        projected = linear(x, qkv, options)  # (N, L, 3C) = [q | k | v]
        qk = rms_normalize(projected[..., :2 * width].view(sequences, length, 2, width), self.eps,
                           self.qk_norm)  # (N, L, 2, C), q pre-scaled
        return attend(qk[:, :, 0], qk[:, :, 1], projected[..., 2 * width:], self.heads, options)  # (N, L, C)

    def context_kv(self, context: torch.Tensor, options: KernelOptions) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys (normed) and values of a context [B, M, C]: each [B, M, C]."""
        k, v = linear(context, self.kv, options).chunk(2, dim=-1)  # (B, M, C) each
        return rms_normalize(k, self.eps, self.k_norm), v

    def cross_attention(self, x: torch.Tensor, q: Dense, kv: Tuple[torch.Tensor, torch.Tensor],
                        options: KernelOptions) -> torch.Tensor:
        """x [N, L, C] attends to prepared keys/values [B, M, C] -> merged heads [N, L, C] (``q`` maybe folded)."""
        query = rms_normalize(linear(x, q, options), self.eps, self.q_norm)  # (N, L, C), pre-scaled
        return attend(query, kv[0], kv[1], self.heads, options)


def chunked_fourier_features(lff: LearnableFourierFeatures, points: torch.Tensor,
                             options: KernelOptions) -> torch.Tensor:
    """``lff(points)`` for points [..., 2] in row chunks (a 64x64x16 grid would need a 400 MB hidden layer at
    once), GELU fused into the first GEMM; returns [..., F] in the compute dtype."""
    features = lff.fourier(points.float()).to(options.dtype)  # (..., F)
    fc1, fc2 = dense(lff.mlp[0], options.dtype), dense(lff.mlp[3], options.dtype)
    rows = features.reshape(-1, features.shape[-1])  # (P, F)
    outputs = []
    for start in range(0, rows.shape[0], LFF_ROWS_PER_CHUNK):
        hidden = linear(rows[start:start + LFF_ROWS_PER_CHUNK], fc1, options, gelu=not lff.raw)  # (p, 12F)
        if lff.raw:
            hidden = F.silu(hidden)
        outputs.append(linear(hidden, fc2, options))  # (p, F)
    return torch.cat(outputs).reshape(features.shape[:-1] + (fc2[0].shape[0],))  # (..., F)


def track_features(encoder: nn.Module, tracks: torch.Tensor, options: KernelOptions) -> torch.Tensor:
    """``TrackPosEncoder``: tracks [B, T, 2, H, W] -> [B, T, 2 + F, H, W] in the compute dtype."""
    points = rearrange(tracks, "b t c h w -> b t h w c")  # (B, T, H, W, 2)
    features = torch.cat([points.to(options.dtype), chunked_fourier_features(encoder.lff, points, options)], dim=-1)
    return rearrange(features, "b t h w c -> b t c h w")  # (B, T, 2 + F, H, W)


def patch_tokens(embedder: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``PatchEmbed``: x [N, C_in, rows, cols] -> tokens [N, L, D] in ``dtype``."""
    proj = embedder.proj
    out = F.conv2d(x.to(dtype), cast(proj.weight, dtype), cast(proj.bias, dtype), stride=proj.stride)  # (N, D, h, w)
    return rearrange(out, "n d h w -> n (h w) d")  # (N, L, D)


# ---------------------------------------------------------------------------------------------- denoiser
@dataclasses.dataclass
class DenoiserBlockWeights:
    """One ``DenoiserBlock`` in the compute dtype."""

    attn: AttentionWeights
    xattn: AttentionWeights
    fc1: Dense
    fc2: Dense
    adaln: Dense
    eps: float


class DenoiserKernels:
    """CPU inference forward of a ``LatteDenoiser`` (same signature: ``(x, t, frame_features, text_embeds)``).

    Weights are cast to the compute dtype (and q|k|v stacked) once, here: build a new one after changing the
    model's weights. :meth:`bind` does the per-image work (context keys/values of every cross-attention, the text
    projection) and returns the per-step function ``(x, t) -> velocity``.
    """

    def __init__(self, model: nn.Module, options: KernelOptions) -> None:
        self.model = model
        self.options = options
        dtype = options.dtype
        self.blocks: List[DenoiserBlockWeights] = [
            DenoiserBlockWeights(attn=AttentionWeights.of(block.attn, dtype),
                                 xattn=AttentionWeights.of(block.xattn, dtype), fc1=dense(block.mlp.fc1, dtype),
                                 fc2=dense(block.mlp.fc2, dtype), adaln=dense(block.adaLN_modulation[1], dtype),
                                 eps=block.norm1.eps)
            for block in model.blocks]
        final = model.final_layer
        self.final_linear = dense(final.linear, dtype)
        self.final_adaln = dense(final.adaLN_modulation[1], dtype)
        self.final_eps = final.norm_final.eps
        embedder = model.t_embedder.mlp
        self.t_mlp = (dense(embedder[0], dtype), dense(embedder[2], dtype))
        self.frame_proj = dense(model.frame_proj, dtype)
        self.pos_embed = cast(model.pos_embed, dtype)  # (1, L, C)
        self.temp_embed = cast(model.temp_embed, dtype)  # (1, T, C)
        self.frame_embed = cast(model.frame_embed, dtype)  # (1, M, C)
        self.text_mlp = None
        if model.text_embeds_proj is not None:
            self.text_mlp = (dense(model.text_embeds_proj.fc1, dtype), dense(model.text_embeds_proj.fc2, dtype))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, frame_features: torch.Tensor,
                 text_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity [B, T, C, h, w] (the compute dtype), as ``LatteDenoiser.forward``."""
        return self.bind(frame_features, text_embeds)(x, t)

    def bind(self, frame_features: torch.Tensor,
             text_embeds: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-image work for frame_features [B or 1, N, D] and text [B or 1, E] -> ``step(x, t)``.

        A single row (or a batch expanded from one, stride 0) is shared by every sample of the step's x.
        """
        options, model, dtype = self.options, self.model, self.options.dtype
        frame_features, text_embeds = _one_row_if_shared(frame_features), _one_row_if_shared(text_embeds)
        expected = (model.num_frame_tokens, model.frame_features_dim)
        if frame_features.dim() != 3 or tuple(frame_features.shape[1:]) != expected:
            raise ValueError(f"denoiser expects frame_features [B, {expected[0]}, {expected[1]}], got "
                             f"{tuple(frame_features.shape)}")
        if (text_embeds is None) != (self.text_mlp is None):
            raise ValueError("text_embeds must be given exactly for language-conditioned denoisers")
        context = linear(frame_features.to(dtype), self.frame_proj, options, residual=self.frame_embed)  # (B, M, C)
        context_kv = [block.xattn.context_kv(context, options) for block in self.blocks]
        text_cond = None
        if text_embeds is not None:
            hidden = linear(text_embeds.to(dtype), self.text_mlp[0], options, gelu=True)  # (B, hidden)
            text_cond = linear(hidden, self.text_mlp[1], options)  # (B, C)

        def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._velocity(x, t, context_kv, text_cond)

        return step

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, context_kv: List[Tuple[torch.Tensor, torch.Tensor]],
                  text_cond: Optional[torch.Tensor]) -> torch.Tensor:
        model, options, dtype = self.model, self.options, self.options.dtype
        batch = x.shape[0]
        expected = (model.num_frames, model.in_channels, *model.input_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"denoiser expects x [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)  # (B,) or (1,)
        contexts = context_kv[0][0].shape[0]
        if contexts not in (1, batch) or t.shape[0] not in (1, batch):
            raise ValueError(f"x has {batch} samples but t has {t.shape[0]} and the image context {contexts}")
        shared = contexts == 1 and (text_cond is None or text_cond.shape[0] == 1) and bool((t == t[0]).all())
        t = t[:1] if shared else t.expand(batch)  # (b,): one conditioning row for all samples when shared
        if model.x_encoder is not None:
            x = track_features(model.x_encoder, x, options)  # (B, T, 2+F, H, W)
        tokens = patch_tokens(model.x_embedder, rearrange(x, "b f c h w -> (b f) c h w"), dtype)  # (B*T, L, C)
        h = tokens.add_(self.pos_embed)  # (B*T, L, C)

        frequencies = timestep_frequencies(t, model.t_embedder.frequency_embedding_size).to(dtype)  # (b, 256)
        cond = linear(F.silu(linear(frequencies, self.t_mlp[0], options)), self.t_mlp[1], options)  # (b, C)
        if text_cond is not None:
            cond = cond + (text_cond if text_cond.shape[0] == cond.shape[0] else text_cond.expand_as(cond))
        cond_silu = F.silu(cond)  # (b, C)
        frames, tokens_per_frame = model.num_frames, model.num_tokens
        for index, block in enumerate(self.blocks):
            h = self._block(block, h, cond_silu, context_kv[index])  # (N, L or T, C)
            if index % 2 == 0:
                h = rearrange(h, "(b f) l d -> (b l) f d", f=frames)  # (B*L, T, C)
                if index == 0:
                    h = h + self.temp_embed
            else:
                h = rearrange(h, "(b l) f d -> (b f) l d", l=tokens_per_frame)  # (B*T, L, C)
        shift, scale = linear(cond_silu, self.final_adaln, options).chunk(2, dim=1)  # (b, C) each
        normed = rms_normalize(h, self.final_eps)  # (B*T, L, C)
        out = self._modulated_linear(normed, self.final_linear, scale, shift)  # (B*T, L, p*p*c)
        return unpatchify(out, batch, model.token_grid, model.patch_size)  # (B, T, c, h, w)

    def _fold(self, cond_rows: int) -> bool:
        return self.options.fold_modulation and cond_rows == 1

    def _modulated_linear(self, x: torch.Tensor, layer: Dense, scale: torch.Tensor, shift: torch.Tensor,
                          gelu: bool = False) -> torch.Tensor:
        """``layer(x * (1 + scale) + shift)`` with per-sample rows [b, C] over x [N, L, C]."""
        if self._fold(scale.shape[0]):
            return linear(x, folded(layer, self.options.dtype, 1 + scale[0], shift[0]), self.options, gelu=gelu)
        return linear(_modulated(x, scale, shift), layer, self.options, gelu=gelu)

    def _gated(self, x: torch.Tensor, layer: Dense, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + gate * layer(x)`` with per-sample gate rows [b, C]."""
        if self._fold(gate.shape[0]):
            return linear(x, folded(layer, self.options.dtype, output_gate=gate[0]), self.options, residual=residual)
        return residual + per_sequence(gate, x) * linear(x, layer, self.options)

    def _block(self, block: DenoiserBlockWeights, x: torch.Tensor, cond_silu: torch.Tensor,
               context_kv: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """adaLN-Zero block on x [N, L, C] with conditioning rows [b, C] (b = 1: shared by all sequences)."""
        options = self.options
        (shift_msa, scale_msa, gate_msa, gate_mxa,
         shift_mlp, scale_mlp, gate_mlp) = linear(cond_silu, block.adaln, options).chunk(7, dim=1)  # (b, C) each
        normed = rms_normalize(x, block.eps)  # (N, L, C)
        if self._fold(shift_msa.shape[0]):
            qkv = folded(block.attn.qkv, options.dtype, 1 + scale_msa[0], shift_msa[0])
            heads = block.attn.self_attention(normed, qkv, options)  # (N, L, C)
        else:
            heads = block.attn.self_attention(_modulated(normed, scale_msa, shift_msa), block.attn.qkv, options)
        x = self._gated(heads, block.attn.proj, gate_msa, x)  # (N, L, C)
        heads = block.xattn.cross_attention(x, block.xattn.q, context_kv, options)  # (N, L, C)
        x = self._gated(heads, block.xattn.proj, gate_mxa, x)  # (N, L, C)
        hidden = self._modulated_linear(rms_normalize(x, block.eps), block.fc1, scale_mlp, shift_mlp,
                                        gelu=True)  # (N, L, 4C)
        return self._gated(hidden, block.fc2, gate_mlp, x)  # (N, L, C)


def _one_row_if_shared(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A batch expanded from one row (stride 0 along the batch) -> that row [1, ...]; else unchanged."""
    if value is not None and value.shape[0] > 1 and value.stride(0) == 0:
        return value[:1]
    return value


def _modulated(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample rows [b, C] over x [N, L, C]."""
    return torch.addcmul(per_sequence(shift, x), x, 1 + per_sequence(scale, x))  # (N, L, C)


# ---------------------------------------------------------------------------------------------- VAE
@dataclasses.dataclass
class VAEBlockWeights:
    """One ``VAEBlock`` with its norm weights and gates folded into the weights (constants: done once)."""

    attn: AttentionWeights
    attn_qkv: Dense
    attn_proj: Dense
    xattn: AttentionWeights
    xattn_q: Dense
    xattn_proj: Dense
    fc1: Dense
    fc2: Dense
    eps: Tuple[float, float, float]

    @classmethod
    def of(cls, block: nn.Module, dtype: torch.dtype) -> "VAEBlockWeights":
        attn, xattn = AttentionWeights.of(block.attn, dtype), AttentionWeights.of(block.xattn, dtype)
        norm1, norm2, norm3 = block.norm1.weight.detach(), block.norm2.weight.detach(), block.norm3.weight.detach()
        return cls(attn=attn, attn_qkv=folded(_float(block.attn.q, block.attn.kv), dtype, norm1),
                   attn_proj=folded(dense(block.attn.proj, torch.float32), dtype,
                                    output_gate=block.gate_msa.detach().reshape(-1)),
                   xattn=xattn, xattn_q=folded(dense(block.xattn.q, torch.float32), dtype, norm2),
                   xattn_proj=folded(dense(block.xattn.proj, torch.float32), dtype,
                                     output_gate=block.gate_mxa.detach().reshape(-1)),
                   fc1=folded(dense(block.mlp.fc1, torch.float32), dtype, norm3),
                   fc2=folded(dense(block.mlp.fc2, torch.float32), dtype,
                              output_gate=block.gate_mlp.detach().reshape(-1)),
                   eps=(block.norm1.eps, block.norm2.eps, block.norm3.eps))

    def forward(self, x: torch.Tensor, context_kv: Tuple[torch.Tensor, torch.Tensor],
                options: KernelOptions) -> torch.Tensor:
        """x [N, L, C] -> [N, L, C]: x + gate * sublayer(norm(x)) three times, all folded."""
        heads = self.attn.self_attention(rms_normalize(x, self.eps[0]), self.attn_qkv, options)  # (N, L, C)
        x = linear(heads, self.attn_proj, options, residual=x)  # (N, L, C)
        heads = self.xattn.cross_attention(rms_normalize(x, self.eps[1]), self.xattn_q, context_kv, options)
        x = linear(heads, self.xattn_proj, options, residual=x)  # (N, L, C)
        hidden = linear(rms_normalize(x, self.eps[2]), self.fc1, options, gelu=True)  # (N, L, 4C)
        return linear(hidden, self.fc2, options, residual=x)  # (N, L, C)


def _float(q: nn.Linear, kv: nn.Linear) -> Dense:
    """q|kv stacked [3C, C] in float32."""
    bias = None if q.bias is None else torch.cat([q.bias.detach(), kv.bias.detach()]).float()
    return torch.cat([q.weight.detach(), kv.weight.detach()]).float(), bias


class VAEKernels:
    """CPU inference forward of a ``TrajectoryVAE``: ``embed_tracks``, ``encode_tokens`` and ``decode`` with the
    reference signatures; outputs in the compute dtype. Norm weights and gates are folded in once, here: build a
    new one after changing the model's weights."""

    def __init__(self, vae: nn.Module, options: KernelOptions) -> None:
        self.vae = vae
        self.options = options
        dtype = options.dtype
        self.encoder_blocks = [VAEBlockWeights.of(block, dtype) for block in vae.encoder_blocks]
        self.decoder_blocks = [VAEBlockWeights.of(block, dtype) for block in vae.decoder_blocks]
        self.frame_proj = dense(vae.frame_proj, dtype)
        self.to_latents = dense(vae.to_latents, dtype)
        self.from_latents = dense(vae.from_latents, dtype)
        self.final_linear = dense(vae.final_layer.linear, dtype)
        self.pos_embed, self.temp_embed = cast(vae.pos_embed, dtype), cast(vae.temp_embed, dtype)
        self.frame_embed = cast(vae.frame_embed, dtype)

    def embed_tracks(self, tracks_norm: torch.Tensor) -> torch.Tensor:
        """tracks [B, T, 2, H, W] -> tokens [B, T, L, C] (as ``TrajectoryVAE.embed_tracks``)."""
        vae = self.vae
        vae._check_tracks(tracks_norm)
        batch = tracks_norm.shape[0]
        x = track_features(vae.x_encoder, tracks_norm, self.options)  # (B, T, 2+F, H, W)
        tokens = patch_tokens(vae.x_embedder, rearrange(x, "b f c h w -> (b f) c h w"), self.options.dtype)
        return rearrange(tokens.add_(self.pos_embed), "(b f) l c -> b f l c", b=batch)  # (B, T, L, C)

    def _context_kv(self, blocks: List[VAEBlockWeights], frame_features: torch.Tensor):
        self.vae._check_frame_features(frame_features)
        frame_features = _one_row_if_shared(frame_features)
        context = linear(frame_features.to(self.options.dtype), self.frame_proj, self.options,
                         residual=self.frame_embed)  # (B, M, C)
        return [block.xattn.context_kv(context, self.options) for block in blocks]

    def _blocks(self, x: torch.Tensor, blocks: List[VAEBlockWeights], context_kv, temp_embed) -> torch.Tensor:
        frames, tokens = self.vae.num_frames, self.vae.num_latent_tokens
        for index, block in enumerate(blocks):
            x = block.forward(x, context_kv[index], self.options)
            if index % 2 == 0:
                x = rearrange(x, "(b f) l d -> (b l) f d", f=frames)  # (B*L, T, C)
                if index == 0 and temp_embed is not None:
                    x = x + temp_embed
            else:
                x = rearrange(x, "(b l) f d -> (b f) l d", l=tokens)  # (B*T, L, C)
        return x

    def encode_tokens(self, tokens: torch.Tensor, frame_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embedded tracks [B, T, L, C] -> (mean, std) each [B, T, L, Z] (as ``TrajectoryVAE.encode_tokens``)."""
        batch = tokens.shape[0]
        context_kv = self._context_kv(self.encoder_blocks, frame_features)
        x = rearrange(tokens.to(self.options.dtype), "b f l c -> (b f) l c")  # (B*T, L, C)
        x = self._blocks(x, self.encoder_blocks, context_kv, self.temp_embed)  # (B*T, L, C)
        mean, logvar = linear(x, self.to_latents, self.options).chunk(2, dim=-1)  # (B*T, L, Z) each
        std = F.softplus(0.5 * logvar)
        return (rearrange(mean, "(b f) l z -> b f l z", b=batch), rearrange(std, "(b f) l z -> b f l z", b=batch))

    def decode(self, z: torch.Tensor, frame_features: torch.Tensor) -> torch.Tensor:
        """Latents [B, T, L, Z] -> tracks [B, T, 2, H, W]; frame_features [B or 1, N, D] (one row: shared)."""
        vae = self.vae
        vae._check_latents(z)
        batch = z.shape[0]
        context_kv = self._context_kv(self.decoder_blocks, frame_features)
        x = linear(rearrange(z.to(self.options.dtype), "b f l c -> (b f) l c"), self.from_latents,
                   self.options)  # (B*T, L, C)
        x = self._blocks(x, self.decoder_blocks, context_kv, None)  # (B*T, L, C)
        return unpatchify(linear(x, self.final_linear, self.options), batch, vae.latent_grid, vae.patch_size)


# ---------------------------------------------------------------------------------------------- encoders
class EncoderWeightCache:
    """Encoder weights cast to a compute dtype, once per (tensor, dtype): owned by one forecaster, dropped with
    :meth:`clear` (plan change, release). A tensor changed in place (its version counter moved) is cast again.

    ``casts`` counts the casts made (tests, benchmarks).
    """

    def __init__(self) -> None:
        self._items: dict = {}  # (id(tensor), dtype) -> (tensor, version, cast copy); the tensor pins its id
        self.casts = 0

    def get(self, tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``tensor`` in ``dtype`` (the tensor itself when it already is; None for None)."""
        if tensor is None or tensor.dtype == dtype or tensor.is_inference():
            return cast(tensor, dtype)  # an inference tensor has no version counter to tell an in-place change
        key = (id(tensor), dtype)
        entry = self._items.get(key)
        if entry is not None and entry[0] is tensor and entry[1] == tensor._version:
            return entry[2]
        converted = cast(tensor, dtype)
        self.casts += 1
        self._items[key] = (tensor, tensor._version, converted)
        return converted

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class OneDNNLinearMode(TorchFunctionMode):
    """While active, routes every ``F.linear`` of third-party modules (the transformers image and text encoders)
    in CPU inference (float32 / bfloat16, autograd off) through oneDNN; unchanged elsewhere. The mode stack is
    per thread, so this affects only the thread that entered it. With ``weights`` (the forecaster's
    :class:`EncoderWeightCache`) each weight is cast to the compute dtype once, not on every call."""

    def __init__(self, weights: Optional[EncoderWeightCache] = None):
        super().__init__()
        self.weights = weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args and ONEDNN_LINEAR:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.device.type == "cpu" and not torch.is_grad_enabled() and weight.dim() == 2 and x.dim() >= 2
                    and not torch.compiler.is_compiling()):
                dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
                if dtype in KERNEL_DTYPES:
                    to_dtype = self.weights.get if self.weights is not None else cast
                    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), to_dtype(weight, dtype),
                                                              to_dtype(bias, dtype), "none", [], "")
        return func(*args, **kwargs)
