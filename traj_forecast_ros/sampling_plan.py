"""How a forecast runs on a device: device and dtype policy, :class:`SamplingPlan`, CUDA graphs, small caches.

:func:`resolve_device` is the project's one device resolver (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and
:func:`resolve_dtype` its dtype policy. :func:`choose_sampling_plan` picks the plan that
:class:`traj_forecast_ros.forecaster.Forecaster` runs per device, and :func:`plan_for_model` its CPU fields per
model (size rule, or a timed probe cached as JSON). No ROS imports here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Hashable, Iterator, Mapping, Optional, Union

import torch

from traj_forecast_ros.errors import DeviceError
from traj_forecast_ros.model.kernels import FastCPUOps, KernelOptions

log = logging.getLogger(__name__)

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


def cuda_supports_bf16(device: torch.device) -> bool:
    """True when ``device`` computes bfloat16 natively (NVIDIA compute capability 8.0+, Ampere and later; ROCm: as
    PyTorch reports). Older GPUs only emulate it, slower than float16, so the dtype policy does not pick it there."""
    if torch.version.hip:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported())
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """Compute dtype for ``device`` (the dtype policy; parameters stay float32, lower precision is autocast).

    ``"auto"``: bfloat16 on GPUs that compute it natively (:func:`cuda_supports_bf16`: its float32 exponent range
    does not overflow where float16's 65504 limit does), float16 on older GPUs, float32 on the CPU. bfloat16 is
    selectable on the CPU too. A non-finite half-precision forecast is rerun in float32 by the forecaster
    (counted as ``fp32_fallbacks``).

    float16 on CPU raises :class:`DeviceError` (it runs 4-5x slower than float32 there); so does bfloat16 on a
    GPU without native bfloat16.
    """
    if isinstance(dtype, str):
        key = dtype.strip().lower().replace("torch.", "")
        if key == "auto":
            if device.type != "cuda":
                return torch.float32
            return torch.bfloat16 if cuda_supports_bf16(device) else torch.float16
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
    if resolved == torch.bfloat16 and device.type == "cuda" and not cuda_supports_bf16(device):
        raise DeviceError(f"bfloat16 is not supported natively on {torch.cuda.get_device_name(device)}; "
                          "use float16 (or dtype='auto')")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------- sampling plan
# Samples per denoiser/decoder call per device type, before the per-model choice (plan_for_model). CPU: one sample
# per call suits LIBERO size (measured on the 2-core project machine, one thread: batch 1 1.37 s/sample fp32 and
# 0.71 s bf16, batch 4 1.65 s and 1.04 s); smaller models batch (see ROWS_PER_CALL). CUDA: not measured here (no GPU
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
        fast_cpu_kernels: CPU inference forward of :mod:`traj_forecast_ros.model.kernels` (oneDNN GEMMs with fused
            GELU for the denoiser, the VAE and the encoders' linear layers, weights cast and constant factors folded
            once, image context projected once per image). Off: the reference PyTorch modules.
        fold_modulation: (CPU kernels) fold the denoiser's adaLN modulation, shared by the K samples of a step,
            into the weights once per step instead of applying it to every token.
        attention: (CPU kernels) ``"sdpa"`` (PyTorch's fused kernel) or ``"explicit"`` (cache-blocked GEMMs).
        threads: torch intra-op threads the plan was chosen for (None: not chosen for a thread count).
        chosen_by: how the CPU fields were picked: ``"device default"``, ``"size rule"``, ``"probe"`` (timed at
            load), ``"cache"`` (an earlier probe's decision) or ``"given"``.
        use_compile: run the denoiser through ``torch.compile`` (about 30 s for the first call per shape on the
            project CPU; inside it inductor picks the kernels; off by default).
        use_cuda_graph: replay one captured denoiser evaluation per batch shape from static, pre-allocated input and
            output buffers (CUDA only; off by default until ``bench/gpu_check.py`` passes on a real GPU).
        cache_query_tokens: embed the static query grid once per forecaster instead of once per image.
        graph_cache_size: captured CUDA graphs kept (least recently used evicted first, with its memory pool);
            one per distinct batch shape, i.e. per K when all samples go in one call.
    """

    device: torch.device
    dtype: torch.dtype
    sample_batch_size: Optional[int]
    fast_cpu_kernels: bool = True
    use_compile: bool = False
    use_cuda_graph: bool = False
    cache_query_tokens: bool = True
    graph_cache_size: int = 4
    fold_modulation: bool = True
    attention: str = "sdpa"
    threads: Optional[int] = None
    chosen_by: str = "device default"

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
        if self.attention not in ("sdpa", "explicit"):
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {self.attention!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if (isinstance(self.graph_cache_size, bool) or not isinstance(self.graph_cache_size, int)
                or self.graph_cache_size < 1):
            raise ValueError(f"graph_cache_size must be a positive int, got {self.graph_cache_size!r}")

    def summary(self) -> str:
        """One line for logs and benchmark reports."""
        flags = [name for name in ("fast_cpu_kernels", "use_compile", "use_cuda_graph", "cache_query_tokens")
                 if getattr(self, name)]
        if self.fast_cpu_kernels and self.device.type == "cpu":
            flags += [f"fold_modulation={'on' if self.fold_modulation else 'off'}", f"attention={self.attention}"]
        if self.threads is not None:
            flags.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return (f"{self.device} {dtype_name(self.dtype)}, sample batch {self.sample_batch_size or 'all'}"
                f"{', ' + ', '.join(flags) if flags else ''} ({self.chosen_by})")


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


# ---------------------------------------------------------------------------------------------- per-model CPU plan
# Size rule, validated with bench/forecast_bench.py on the 2-core project machine: oneDNN GEMMs reach the matmul
# rate from about 1,500 token rows on (demo-blocks shapes: 82-93 GFLOP/s per core at 1,536 rows, 89 at 4,096).
# A model with fewer tokens per sample (demo-blocks: 192) batches samples up to ROWS_PER_CALL rows per call (all K:
# 0.63-0.71 s per K=8 forecast against 1.16-1.5 s one sample at a time, 2 threads); a LIBERO-size sample (4,096
# tokens) already fills a call, and batching it only adds cache pressure (batch 4 measured 20-45% slower per sample).
# The K samples of a step share one time and image, so the adaLN modulation is folded into the weights once per
# step (O(C^2)) rather than applied per token (O(rows C)) once a call has at least C rows. bfloat16 attention runs the
# explicit kernel (the fused CPU kernel is 2-3x slower in bfloat16).
ROWS_PER_CALL = 4096
PROBE_MAX_GFLOP = 8.0  # time the candidates at load only when one candidate evaluation is at most this much work
PROBE_MARGIN = 0.9  # another candidate replaces the rule's choice only when at least 10% faster (the machine is noisy)
PLAN_CACHE_VERSION = 2  # 2: keyed by weights and device too


def cpu_size_rule(denoiser: torch.nn.Module, dtype: torch.dtype) -> Dict[str, Any]:
    """The CPU plan fields for a ``LatteDenoiser`` by the size rule above (no timing)."""
    tokens = denoiser.num_frames * denoiser.num_tokens
    batch = max(1, ROWS_PER_CALL // tokens)
    return {"sample_batch_size": batch, "fold_modulation": batch * tokens >= denoiser.cfg.hidden_size,
            "attention": "explicit" if dtype == torch.bfloat16 else "sdpa"}


def denoiser_gflop(denoiser: torch.nn.Module, samples: int) -> float:
    """Approximate GFLOP of one denoiser evaluation of ``samples`` samples (the linear layers)."""
    cfg = denoiser.cfg
    rows = samples * denoiser.num_frames * denoiser.num_tokens
    per_row = (6 + 2 * cfg.mlp_ratio) * cfg.hidden_size ** 2  # q|k|v, proj, cross q, cross proj, MLP
    return 2.0 * rows * per_row * cfg.depth / 1e9


def weights_identity(tensors: "Mapping[str, torch.Tensor]") -> Optional[str]:
    """A short content hash of a state dict (names, shapes, dtypes and values), or None when any tensor has no
    data (meta device). Keys the cached plan decision to the weights it was probed with."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_meta:
            return None
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def plan_for_model(plan: SamplingPlan, denoiser: torch.nn.Module, num_samples: int, probe: bool = False,
                   cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None, model_name: str = "model",
                   cache_only: bool = False, weights_id: Optional[str] = None) -> SamplingPlan:
    """``plan`` with its CPU fields (sample batch, folding, attention kernel, threads) chosen for ``denoiser``.

    Only CPU plans with the fast kernels change. Without ``probe`` the size rule decides. With it, a small model
    (one candidate evaluation at most :data:`PROBE_MAX_GFLOP`) times the candidates once and the decision is cached
    as JSON under ``cache_dir`` (default ``<cache home>/plans``), keyed by everything that affects it: the
    denoiser's architecture and weights (``weights_id``, default :func:`weights_identity` of its state dict),
    device, dtype, thread count (``plan.threads`` when set, else torch's), K, torch version and processor; later
    loads read it back (``chosen_by="cache"``). ``cache_only``: never time anything, use a cached decision when
    there is one, else the size rule (``traj-forecast info``; ``denoiser`` may then live on the meta device).
    The candidates compute the same function with different kernels, so the chosen plan may differ numerically
    (within the kernels' tolerance) from the size rule's.
    """
    if plan.device.type != "cpu" or not plan.fast_cpu_kernels or plan.use_compile:
        return plan
    threads = plan.threads or torch.get_num_threads()
    ruled = dataclasses.replace(plan, threads=threads, chosen_by="size rule",
                                **cpu_size_rule(denoiser, plan.dtype))
    too_big = denoiser_gflop(denoiser, min(num_samples, ruled.sample_batch_size)) > PROBE_MAX_GFLOP
    if not (probe or cache_only) or too_big:
        return ruled
    if weights_id is None:
        weights_id = weights_identity(denoiser.state_dict())
    path = _plan_cache_path(ruled, denoiser, num_samples, cache_dir, model_name, weights_id)
    cached = _read_plan(path)
    if cached is not None:
        return dataclasses.replace(ruled, chosen_by="cache", **cached)
    if cache_only:
        return ruled
    choice, timings = probe_cpu_plan(ruled, denoiser, num_samples)
    _write_plan(path, choice, timings)
    return dataclasses.replace(ruled, chosen_by="probe", **choice)


def probe_cpu_plan(plan: SamplingPlan, denoiser: torch.nn.Module, num_samples: int,
                   repeats: int = 3) -> "tuple[Dict[str, Any], Dict[str, float]]":
    """Time one denoiser evaluation per candidate on random inputs: the rule's plan (first), the other attention
    kernel, the other folding setting and, for a batched rule, one sample per call. Returns the choice (the rule's
    unless another is :data:`PROBE_MARGIN` faster per sample) and every candidate's ms per sample.

    Against a loaded machine: the candidates are timed round-robin ``repeats`` times (a burst of load hits every
    candidate, not one) and each keeps its fastest run (load only ever adds time).
    """
    batch = min(num_samples, plan.sample_batch_size or num_samples)
    other_attention = "sdpa" if plan.attention == "explicit" else "explicit"
    candidates = [(batch, plan.fold_modulation, plan.attention), (batch, plan.fold_modulation, other_attention),
                  (batch, not plan.fold_modulation, plan.attention)]
    if batch > 1:
        candidates.append((1, plan.fold_modulation, plan.attention))
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, denoiser.num_frame_tokens, denoiser.frame_features_dim, generator=generator)
    text = (torch.randn(1, denoiser.text_embed_dim, generator=generator)
            if denoiser.text_embed_dim is not None else None)
    runs = []  # (step function, x, t) per candidate
    with torch.inference_mode():
        for samples, fold, attention in candidates:
            kernels = denoiser.with_ops(FastCPUOps(KernelOptions(dtype=plan.dtype, fold_modulation=fold,
                                                                 attention=attention)))
            x = torch.randn(samples, denoiser.num_frames, denoiser.in_channels, *denoiser.input_size,
                            generator=generator)  # [b, T, C, h, w]
            step = kernels.bind(features, text)
            t = torch.full((samples,), 0.5)  # [b]
            step(x, t)  # warm-up: allocations, oneDNN primitive creation
            runs.append((step, x, t))
        fastest = [float("inf")] * len(candidates)
        for _ in range(max(1, repeats)):
            for index, (step, x, t) in enumerate(runs):
                started = time.perf_counter()
                step(x, t)
                fastest[index] = min(fastest[index], time.perf_counter() - started)
    timings: Dict[str, float] = {}
    best: Optional[tuple] = None
    for (samples, fold, attention), seconds in zip(candidates, fastest):
        per_sample = seconds / samples
        timings[f"batch {samples}, fold {'on' if fold else 'off'}, {attention}"] = round(per_sample * 1e3, 3)
        if best is None or per_sample < best[0] * PROBE_MARGIN:
            best = (per_sample, samples, fold, attention)
    _, samples, fold, attention = best
    sample_batch = plan.sample_batch_size if samples == batch else 1
    return {"sample_batch_size": sample_batch, "fold_modulation": fold, "attention": attention}, timings


def _plan_cache_path(plan: SamplingPlan, denoiser: torch.nn.Module, num_samples: int,
                     cache_dir: Optional[Union[str, "os.PathLike[str]"]], model_name: str,
                     weights_id: Optional[str]) -> Path:
    if cache_dir is None:
        from traj_forecast_ros.registry import cache_home

        cache_dir = cache_home() / "plans"
    identity = {"version": PLAN_CACHE_VERSION, "denoiser": dataclasses.asdict(denoiser.cfg), "weights": weights_id,
                "device": str(plan.device), "dtype": dtype_name(plan.dtype), "threads": plan.threads,
                "samples": num_samples, "torch": torch.__version__, "processor": _processor_name()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[:60] or "model"
    return Path(cache_dir).expanduser() / f"{safe_name}-{digest}.json"


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_plan(path: Path) -> Optional[Dict[str, Any]]:
    """The cached choice at ``path``, or None when missing or unusable (then the probe runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        choice = {"sample_batch_size": data["sample_batch_size"], "fold_modulation": data["fold_modulation"],
                  "attention": data["attention"]}
        SamplingPlan(device=torch.device("cpu"), dtype=torch.float32, **choice)  # validates the fields
        return choice
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_plan(path: Path, choice: Dict[str, Any], timings: Dict[str, float]) -> None:
    """Write the probe's decision atomically; a read-only cache only costs a probe per load (logged)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({**choice, "probe_ms_per_sample": timings}, indent=2), encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:
        log.info("sampling plan not cached (%s): %s", path, exc)


class LRUCache:
    """A small least-recently-used map with hit/miss/eviction counters (instruction -> embedding, shape -> graph).

    ``on_evict(key, value)`` runs for every entry pushed out by :meth:`put` (not for :meth:`clear`).
    """

    def __init__(self, capacity: int, on_evict: Optional[Callable[[Hashable, Any], None]] = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        self.capacity = capacity
        self.on_evict = on_evict
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> Optional[Any]:
        """The value for ``key`` (now the most recently used), or None (counted as a miss)."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` as the most recently used entry, evicting the least recently used beyond capacity."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            old_key, old_value = self._items.popitem(last=False)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)

    def keys(self) -> list:
        """Keys from least to most recently used."""
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


@dataclasses.dataclass
class CapturedGraph:
    """One captured denoiser evaluation: the graph and the static buffers it reads and writes."""

    graph: Any  # torch.cuda.CUDAGraph
    static_inputs: list  # [x, t, features, text | None], replay reads these
    static_output: torch.Tensor  # replay writes this


class CudaGraphDenoiser:
    """Replays a captured denoiser evaluation per (batch shape, dtype) from static input and output buffers.

    Bound to one CUDA device: capture, warm-up and replay run under ``torch.cuda.device(device)`` on a capture
    stream created for that device, so a caller on any thread, whatever its current device, gets the graph of
    this forecaster's GPU; replay runs on the caller's current stream of ``device`` (the forecaster's own stream).
    The graphs live in a bounded LRU cache (``cache_size`` entries; an evicted graph frees its memory pool).
    The inputs of every call are copied into the captured buffers and the output buffer is cloned, so callers see
    ordinary tensors. Only for a fixed model (weights must not change after capture). One call at a time.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], autocast_dtype: Optional[torch.dtype],
                 device: Union[str, torch.device], cache_size: int = 4):
        self.denoiser = denoiser
        self.autocast_dtype = autocast_dtype
        self.device = torch.device(device)
        self.cache = LRUCache(cache_size, on_evict=self._release)
        self.captures = 0
        self._capture_stream: Optional[Any] = None
        self._lock = threading.Lock()

    # Seams: the CPU tests replace these three to check the bookkeeping without CUDA.
    def _bound(self) -> ContextManager:
        """Make this device current for the calling thread (stream left to the caller)."""
        return torch.cuda.device(self.device)

    def _capture(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                 text: Optional[torch.Tensor]) -> CapturedGraph:
        if self._capture_stream is None:  # torch.cuda.graph's shared default stream belongs to whichever device
            self._capture_stream = torch.cuda.Stream(device=self.device)  # was current first: never use it
        side = self._capture_stream
        static_inputs = [x.clone(), t.clone(), features.clone(), None if text is None else text.clone()]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._autocast():
            for _ in range(2):  # warm-up outside the graph (allocator, kernel selection, lazy init)
                self.denoiser(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (another forecaster on another GPU) neither breaks this capture
        # nor is broken by it.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"), self._autocast():
            static_output = self.denoiser(*static_inputs)
        return CapturedGraph(graph, static_inputs, static_output)

    @staticmethod
    def _replay(entry: CapturedGraph) -> None:
        entry.graph.replay()

    @staticmethod
    def _release(key: Hashable, entry: CapturedGraph) -> None:
        entry.graph = entry.static_inputs = entry.static_output = None  # the graph's private pool goes with them

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    @staticmethod
    def key(x: torch.Tensor, features: torch.Tensor, text: Optional[torch.Tensor],
            autocast_dtype: Optional[torch.dtype]) -> tuple:
        """Cache key: everything a captured graph is specialised on."""
        return (tuple(x.shape), x.dtype, tuple(features.shape), None if text is None else tuple(text.shape),
                autocast_dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                 text: Optional[torch.Tensor]) -> torch.Tensor:
        key = self.key(x, features, text, self.autocast_dtype)
        with self._lock, self._bound():
            entry = self.cache.get(key)
            if entry is None:
                entry = self._capture(x, t, features, text)
                self.captures += 1
                self.cache.put(key, entry)
            for buffer, value in zip(entry.static_inputs, (x, t, features, text)):
                if buffer is not None:
                    buffer.copy_(value)
            self._replay(entry)
            return entry.static_output.clone()

    def clear(self) -> None:
        """Drop every captured graph."""
        with self._lock:
            self.cache.clear()


def compiled_denoiser(denoiser: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the denoiser whose compiled variants stay bounded whatever the K.

    With ``dynamic=None`` (torch's automatic dynamic shapes) the first batch shape compiles static and the first
    different one recompiles with a symbolic batch size that serves later K, where ``dynamic=False`` would compile
    one more variant per distinct K. Measured on CPU (tiny model, K = 1, 2, 3, 5, 8 in turn): 3 variants, the last
    two K compiled nothing. torch itself caps the variants per function (``torch._dynamo.config.recompile_limit``)
    and runs eagerly beyond it.
    """
    return torch.compile(denoiser, dynamic=None)


@contextmanager
def bound_to_device(device: torch.device, stream: Optional[Any] = None) -> Iterator[None]:
    """``torch.cuda.device(device)`` (+ ``torch.cuda.stream(stream)``) for CUDA devices; a no-op elsewhere.

    Both are per-thread settings in PyTorch, so this binds the calling thread, whichever it is, for the block.
    """
    if device.type != "cuda":
        yield
        return
    bind_device = torch.cuda.device(device) if device.index is not None else nullcontext()  # "cuda": current
    with bind_device, (torch.cuda.stream(stream) if stream is not None else nullcontext()):
        yield
