"""Fast CPU inference ops for the model's layers (:class:`FastCPUOps`, chosen per model and device by the sampling
plan) and the oneDNN routing of the third-party encoders' linears (:class:`OneDNNLinearMode`).

The model's forward exists once, in ``layers.py`` / ``denoiser.py`` / ``vae.py``, written in the ops of
:class:`traj_forecast_ros.model.ops.TorchOps`. Passing ``ops=FastCPUOps(options)`` to a forward (``denoiser(x, t,
features, text, ops=ops)``, ``denoiser.with_ops(ops).bind(...)``, ``vae.decode(z, features, ops)``) runs each
layer's op with kernels picked explicitly by :class:`KernelOptions` (no global state, so forecasters in different
threads cannot affect each other):

* oneDNN ``_linear_pointwise`` GEMMs (tanh-GELU fused) instead of MKL's ``F.linear`` (about 2x on the project's
  AMD CPUs), on weights cast to the compute dtype once per ops object instead of once per call;
* q|k|v of self-attention as one GEMM, QK-RMSNorm as one pass, the 1/sqrt(d) score scale on the q-norm weight;
* constant norm weights and gates (the VAE's) folded into the weights once; the denoiser's adaLN modulation and
  gates folded once per call when every sequence shares one conditioning row (the forecaster's K samples share
  the time, image and instruction), else applied per sequence;
* attention through ``F.scaled_dot_product_attention`` or an explicit cache-blocked form (faster in bfloat16);
* the Fourier-feature MLP in row chunks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from traj_forecast_ros.model.layers import Attention
from traj_forecast_ros.model.ops import KV, TorchOps, attend_grouped, gate_of, modulate

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bfloat16 GEMMs need CPU support (AVX512-BF16 / AMX); elsewhere bfloat16 runs through F.linear.
ONEDNN_BFLOAT16 = ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
ATTENTION_KERNELS = ("sdpa", "explicit")
ATTENTION_SCORE_BYTES = 1 << 20  # explicit attention: score bytes per chunk (about one core's L2)
PER_HEAD_GEMM_MAX_PAIRS = 16  # explicit attention: up to this many (sequence, head) pairs run as GEMMs
LFF_ROWS_PER_CHUNK = 4096  # track points per chunk of the Fourier-feature MLP (its hidden layer is 12x wider)

Dense = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (weight [out, in], bias [out] or None)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Which CPU inference kernels run (chosen per model and device by the sampling plan).

    Attributes:
        dtype: compute dtype (float32 or bfloat16); weights are cast to it once.
        fold_modulation: fold the denoiser's shared adaLN modulation into the weights once per step (else it is
            applied to every token).
        attention: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"explicit"`` (cache-blocked GEMMs).
        onednn: oneDNN GEMMs (else ``F.linear``; also ``F.linear`` for bfloat16 on CPUs without oneDNN bfloat16).
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


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN GEMMs run in ``dtype`` on this CPU."""
    return ONEDNN_BFLOAT16 if dtype == torch.bfloat16 else ONEDNN_LINEAR and dtype == torch.float32


def kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where :class:`FastCPUOps` apply: CPU in float32 or bfloat16."""
    return device.type == "cpu" and dtype in KERNEL_DTYPES


# ---------------------------------------------------------------------------------------------- primitives
def gemm(x: torch.Tensor, dense: Dense, onednn: bool, gelu: bool = False) -> torch.Tensor:
    """``x W^T + b`` [..., out], then tanh-GELU when ``gelu`` (x in the dtype of the weights)."""
    weight, bias = dense
    if onednn:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                 "tanh" if gelu else "")  # (..., out)
    else:
        out = F.linear(x, weight, bias)  # (..., out)
        if gelu:
            out = F.gelu(out, approximate="tanh")
    return out


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


def folded(layer: Tuple[torch.Tensor, Optional[torch.Tensor]], dtype: torch.dtype,
           input_scale: Optional[torch.Tensor] = None, input_shift: Optional[torch.Tensor] = None,
           output_gate: Optional[torch.Tensor] = None) -> Dense:
    """(weight, bias) of ``gate * layer(x * scale + shift)`` as one linear layer (vectors [C], float32 maths).

    ``W' = gate[:, None] * W * scale[None, :]``, ``b' = gate * (b + W shift)``: O(C_in C_out) instead of passes
    over every token. Written in ``dtype``.
    """
    weight, bias = layer[0].detach().float(), None if layer[1] is None else layer[1].detach().float()
    if input_shift is not None:
        shifted = torch.mv(weight, input_shift.detach().float())  # (C_out,)
        bias = shifted if bias is None else bias + shifted
    factor = None
    if input_scale is not None:
        factor = input_scale.detach().float()[None, :]  # (1, C_in)
    if output_gate is not None:
        gate = output_gate.detach().float()
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


def _float_of(layers: Sequence[nn.Linear]) -> Dense:
    """The layers' weights and biases stacked along the outputs, in float32 (the folding's precision; a single
    float32 layer's own tensors, not copies)."""
    if len(layers) == 1:
        weight, bias = layers[0].weight.detach().float(), layers[0].bias
        return weight, None if bias is None else bias.detach().float()
    weight = torch.cat([layer.weight.detach() for layer in layers]).float()  # (sum out, in)
    biases = [layer.bias for layer in layers]
    bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases]).float()
    return weight, bias


class FastCPUOps(TorchOps):
    """The ops of :class:`TorchOps` with fused CPU inference kernels (inference only; no autograd).

    Weights are prepared (cast, stacked, constant norms and gates folded in) on first use and kept for the life of
    this object: build a new one after changing the model's weights (the forecaster builds one per plan).
    """

    def __init__(self, options: KernelOptions = KernelOptions()) -> None:
        self.options = options
        self.dtype = options.dtype
        self._onednn = options.onednn and onednn_supports(options.dtype)  # else F.linear (no bf16 oneDNN here)
        self._prepared: Dict[Hashable, object] = {}  # key (tag, modules/tensors...) -> prepared weights

    def _cached(self, key: Tuple[Hashable, ...], build: Callable[[], object]):
        """``build()`` once per key (the key holds the modules and tensors it names, so their ids stay theirs)."""
        value = self._prepared.get(key)
        if value is None:
            value = self._prepared[key] = build()
        return value

    @property
    def prepared(self) -> int:
        """Number of weight sets prepared so far."""
        return len(self._prepared)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.dtype else x.to(self.dtype)

    # ------------------------------------------------------------------------------------------ TorchOps
    def param(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._cached(("param", tensor), lambda: cast(tensor, self.dtype))

    def shared_time(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > 1 and t.stride(0) != 0 and bool((t == t[0]).all()):
            return t[:1]  # equal values, not only an expanded scalar: fold once for all samples
        return super().shared_time(t)

    def linear(self, x: torch.Tensor, layer: nn.Linear, norm: Optional[nn.Module] = None,
               shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
               gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
               gelu: bool = False) -> torch.Tensor:
        return self._linear(x, (layer,), norm, shift, scale, gate, residual, gelu)

    def qkv(self, attn: Attention, x: torch.Tensor, norm: Optional[nn.Module] = None,
            shift: Optional[torch.Tensor] = None,
            scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q|k|v as one GEMM and the q and k norms as one pass; q carries the 1/sqrt(d) score scale."""
        sequences, length, width = x.shape
        projected = self._linear(x, (attn.q, attn.kv), norm, shift, scale)  # (N, L, 3C) = [q | k | v]
        qk = rms_normalize(projected[..., :2 * width].view(sequences, length, 2, width), attn.q_norm.eps,
                           self._qk_norm(attn))  # (N, L, 2, C)
        return qk[:, :, 0], qk[:, :, 1], projected[..., 2 * width:]

    def query(self, attn: Attention, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        query = self._linear(x, (attn.q,), norm)  # (N, L, C)
        return rms_normalize(query, attn.q_norm.eps, self._qk_norm(attn)[0])  # pre-scaled by 1/sqrt(d)

    def context_kv(self, attn: Attention, context: torch.Tensor) -> KV:
        k, v = self.linear(context, attn.kv).chunk(2, dim=-1)  # (B, M, C) each
        return rms_normalize(k, attn.k_norm.eps, self._qk_norm(attn)[1]), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        if self.options.attention == "explicit":
            return attend_grouped(q, k, v, heads, lambda *qkv: explicit_attention(*qkv).transpose(1, 2))
        return attend_grouped(q, k, v, heads, lambda *qkv: F.scaled_dot_product_attention(*qkv, scale=1.0))

    def conv_patches(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._cached(("conv", conv), lambda: (cast(conv.weight, self.dtype),
                                                             cast(conv.bias, self.dtype)))
        return F.conv2d(self._input(x), weight, bias, stride=conv.stride)  # (N, D, rows/p, cols/p)

    def by_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """In chunks of :data:`LFF_ROWS_PER_CHUNK` rows (a 64x64x16 grid's Fourier MLP would need 400 MB)."""
        return torch.cat([fn(rows[start:start + LFF_ROWS_PER_CHUNK])
                          for start in range(0, rows.shape[0], LFF_ROWS_PER_CHUNK)])

    # ------------------------------------------------------------------------------------------ internals
    def _float(self, layers: Tuple[nn.Linear, ...]) -> Dense:
        return self._cached(("float", layers), lambda: _float_of(layers))

    def _qk_norm(self, attn: Attention) -> torch.Tensor:
        """The q and k norm weights stacked [2, C] in the compute dtype, 1/sqrt(d) on the q half."""
        def build() -> torch.Tensor:
            width = attn.q.weight.shape[0]
            q_weight = attn.q_norm.weight.detach().float() * (width // attn.num_heads) ** -0.5
            return torch.stack([q_weight, attn.k_norm.weight.detach().float()]).to(self.dtype)

        return self._cached(("qk_norm", attn), build)

    def _linear(self, x: torch.Tensor, layers: Tuple[nn.Linear, ...], norm: Optional[nn.Module] = None,
                shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                gelu: bool = False) -> torch.Tensor:
        """:meth:`TorchOps.linear` of the layers stacked along the outputs, folding what can be folded."""
        if gelu and gate is not None:
            raise ValueError("a gate after the GELU cannot be folded into the weights")
        hidden = self._input(x)
        norm_weight = None
        if norm is not None:
            hidden = rms_normalize(hidden, norm.eps)  # (N, L, C); the affine weight is folded below
            norm_weight = norm.weight
        gate_rows = gate if gate is not None and gate.dim() == 2 else None  # adaLN: per sample
        gate_param = gate if gate is not None and gate.dim() != 2 else None  # a parameter [1, 1, C]: constant
        rows = [r for r in (shift, scale, gate_rows) if r is not None]
        if rows and self.options.fold_modulation and all(r.shape[0] == 1 for r in rows):
            dense = self._folded_rows(layers, norm_weight, shift, scale, gate_rows, gate_param)
            out = gemm(hidden, dense, self._onednn, gelu)  # (N, L, out)
        else:
            if norm_weight is not None and (shift is not None or scale is not None):
                hidden = hidden * self.param(norm_weight)  # the norm comes before the modulation
                norm_weight = None
            dense = self._cached(("dense", layers, norm_weight, gate_param), lambda: folded(
                self._float(layers), self.dtype, input_scale=norm_weight,
                output_gate=None if gate_param is None else gate_param.reshape(-1)))
            if shift is not None or scale is not None:
                hidden = modulate(hidden, shift, scale)  # (N, L, C)
            out = gemm(hidden, dense, self._onednn, gelu)  # (N, L, out)
            if gate_rows is not None:
                out = out.mul_(gate_of(gate_rows, out))
        return out if residual is None else out.add_(self._input(residual))

    def _folded_rows(self, layers: Tuple[nn.Linear, ...], norm_weight: Optional[torch.Tensor],
                     shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], gate_rows: Optional[torch.Tensor],
                     gate_param: Optional[torch.Tensor]) -> Dense:
        """The layers with one shared conditioning row (and any constant norm weight / gate) folded in: O(C_in
        C_out) once per call instead of passes over every token."""
        input_scale = None if scale is None else 1 + scale[0].float()  # (C_in,)
        if norm_weight is not None:
            input_scale = norm_weight.float() if input_scale is None else input_scale * norm_weight.float()
        output_gate = None if gate_rows is None else gate_rows[0].float()  # (C_out,)
        if gate_param is not None:
            constant = gate_param.reshape(-1).float()
            output_gate = constant if output_gate is None else output_gate * constant
        return folded(self._float(layers), self.dtype, input_scale, None if shift is None else shift[0], output_gate)


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
                if dtype in KERNEL_DTYPES and onednn_supports(dtype):
                    to_dtype = self.weights.get if self.weights is not None else cast
                    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), to_dtype(weight, dtype),
                                                              to_dtype(bias, dtype), "none", [], "")
        return func(*args, **kwargs)
