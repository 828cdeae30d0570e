"""How a forecast runs on a device: device and dtype policy, :class:`SamplingPlan`, CUDA graphs, small caches.

:func:`resolve_device` is the project's one device resolver (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and
:func:`resolve_dtype` its dtype policy. :func:`choose_sampling_plan` picks the plan that
:class:`traj_forecast_ros.forecaster.Forecaster` runs. No ROS imports here.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from contextlib import nullcontext
from typing import Dict, Optional, Union

import torch

from traj_forecast_ros.errors import DeviceError

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# ---------------------------------------------------------------------------------------------- device / dtype
def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an unavailable device raises :class:`DeviceError`."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{device}' requested but CUDA is not available (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda}); use device='cpu' or 'auto'")
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    if resolved.type == "cpu":
        return resolved
    raise DeviceError(f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """Compute dtype for ``device``: ``"auto"`` = float16 on CUDA, float32 on CPU; bfloat16 selectable on both.

    float16 on CPU raises :class:`DeviceError` (it runs 4-5x slower than float32 there); so does bfloat16 on a
    GPU without bfloat16 support.
    """
    if isinstance(dtype, str):
        key = dtype.strip().lower().replace("torch.", "")
        if key == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        if key not in DTYPE_NAMES:
            raise DeviceError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
        resolved = DTYPE_NAMES[key]
    elif dtype in (torch.float32, torch.bfloat16, torch.float16):
        resolved = dtype
    else:
        raise DeviceError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
    if resolved == torch.float16 and device.type == "cpu":
        raise DeviceError("float16 on the CPU runs 4-5x slower than float32; use dtype='float32' (default) or "
                          "'bfloat16' on CPU, float16 on CUDA")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}; use float16")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------- sampling plan
# Samples per denoiser/decoder call per device type. CPU: measured on the 2-core project machine (LIBERO-size
# denoiser, one thread): batch 1 1.37 s/sample fp32 and 0.71 s bf16, batch 4 1.65 s and 1.04 s (batching adds
# cache pressure and prevents folding the per-sample modulation into the weights). CUDA: not measured here (no GPU
# on the project machines); a GPU is only filled by batching, so all K go at once. Re-measure with
# ``bench/forecast_bench.py --sample-batch-size N``.
DEFAULT_SAMPLE_BATCH_SIZE: Dict[str, Optional[int]] = {"cpu": 1, "cuda": None}


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """How a forecast runs on one device and compute dtype (see the module docstring for what runs how often).

    Attributes:
        device: where everything runs.
        dtype: compute dtype (autocast; parameters stay float32).
        sample_batch_size: samples per denoiser / VAE-decoder call; None = all K in one call.
        fast_cpu_kernels: CPU inference kernels of :mod:`traj_forecast_ros.model.layers`: oneDNN GEMMs (fused
            GELU) for the denoiser, the VAE and the encoders' linear layers, per-sample modulation folded into the
            weights, explicit cache-blocked bfloat16 attention. Off: the plain PyTorch forward.
        use_compile: run the denoiser through ``torch.compile`` (about 30 s for the first call per shape on the
            project CPU; inside it inductor picks the kernels; off by default).
        use_cuda_graph: replay one captured denoiser evaluation per batch shape from static, pre-allocated input and
            output buffers (CUDA only; off by default: not exercised on the CPU-only project machines).
        cache_query_tokens: embed the static query grid once per forecaster instead of once per image.
    """

    device: torch.device
    dtype: torch.dtype
    sample_batch_size: Optional[int]
    fast_cpu_kernels: bool = True
    use_compile: bool = False
    use_cuda_graph: bool = False
    cache_query_tokens: bool = True

    PER_FORECASTER = ("query_tokens",)
    PER_IMAGE = ("image_encoder", "vae_encode")
    PER_INSTRUCTION = ("text_encoder",)
    PER_SAMPLE = ("denoise", "vae_decode")

    def __post_init__(self) -> None:
        if self.sample_batch_size is not None and (
                isinstance(self.sample_batch_size, bool) or not isinstance(self.sample_batch_size, int)
                or self.sample_batch_size < 1):
            raise ValueError(f"sample_batch_size must be a positive int or None (all samples), "
                             f"got {self.sample_batch_size!r}")
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the plan is for {self.device}")

    def summary(self) -> str:
        """One line for logs and benchmark reports."""
        flags = [name for name in ("fast_cpu_kernels", "use_compile", "use_cuda_graph", "cache_query_tokens")
                 if getattr(self, name)]
        return (f"{self.device} {dtype_name(self.dtype)}, sample batch {self.sample_batch_size or 'all'}"
                f"{', ' + ', '.join(flags) if flags else ''}")


def choose_sampling_plan(device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
                         sample_batch_size: Union[int, None, str] = "auto", use_compile: bool = False,
                         use_cuda_graph: bool = False, fast_cpu_kernels: bool = True) -> SamplingPlan:
    """The sampling plan for ``device`` and ``dtype`` with the measured defaults (:data:`DEFAULT_SAMPLE_BATCH_SIZE`).

    ``sample_batch_size``: "auto" (the per-device default), a positive int, or None / 0 (all K at once).
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if isinstance(sample_batch_size, bool):  # an int subclass: False would otherwise read as 0 (all samples)
        raise ValueError(f"sample_batch_size must be a positive int, None / 0 (all samples) or 'auto', "
                         f"got {sample_batch_size!r}")
    if sample_batch_size == "auto":
        sample_batch_size = DEFAULT_SAMPLE_BATCH_SIZE.get(resolved_device.type, None)
    elif isinstance(sample_batch_size, int) and sample_batch_size == 0:
        sample_batch_size = None
    return SamplingPlan(device=resolved_device, dtype=resolved_dtype, sample_batch_size=sample_batch_size,
                        fast_cpu_kernels=fast_cpu_kernels, use_compile=use_compile, use_cuda_graph=use_cuda_graph)


class CudaGraphDenoiser:
    """Replays a captured denoiser evaluation per (batch shape, dtype) from static input and output buffers.

    The inputs of every call are copied into the captured buffers and the output buffer is cloned, so callers see
    ordinary tensors. Only for CUDA devices with a fixed model (weights must not change after capture).
    """

    def __init__(self, denoiser: torch.nn.Module, autocast_dtype: Optional[torch.dtype]):
        self.denoiser = denoiser
        self.autocast_dtype = autocast_dtype
        self._graphs: Dict[tuple, tuple] = {}

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                 text: Optional[torch.Tensor]) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, tuple(features.shape), None if text is None else tuple(text.shape))
        entry = self._graphs.get(key)
        if entry is None:
            static_inputs = [x.clone(), t.clone(), features.clone(), None if text is None else text.clone()]
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side), self._autocast():
                for _ in range(2):  # warm-up outside the graph (allocator, kernels)
                    self.denoiser(*static_inputs)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._autocast():
                static_output = self.denoiser(*static_inputs)
            entry = self._graphs[key] = (graph, static_inputs, static_output)
        graph, static_inputs, static_output = entry
        for buffer, value in zip(static_inputs, (x, t, features, text)):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return static_output.clone()


class LRUCache:
    """A small least-recently-used map with hit/miss counters (instruction -> embedding)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items
