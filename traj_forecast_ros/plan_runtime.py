"""How a :class:`~traj_forecast_ros.sampling_plan.SamplingPlan` runs on its device for one forecaster's modules.

:class:`PlanRuntime` holds what a plan builds: the denoiser callable the sampler evaluates (the fast CPU kernels of
:mod:`traj_forecast_ros.fast_cpu_path`, ``torch.compile``, or replayed CUDA graphs), the VAE's forward, the
encoders' linear mode, the compute dtype (autocast; float32 while a non-finite half-precision forecast is rerun),
and on CUDA the forecaster's own stream, so every forecast runs on this device from whichever thread calls. It
also times stages. :class:`CudaGraphDenoiser`, :func:`compiled_denoiser` and :func:`bound_to_device` are the pieces
a GPU plan uses. No ROS imports here.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Hashable, Iterator, Optional, Union

import torch

from traj_forecast_ros.fast_cpu_path import (
    encoder_mode,
    encoder_weight_cache,
    fast_denoiser,
    fast_ops,
    fast_vae,
    kernel_options,
)
from traj_forecast_ros.sampling_plan import LRUCache, SamplingPlan, dtype_name, resolve_device, resolve_dtype


class PlanRuntime:
    """Runs one :class:`SamplingPlan` (replaceable with :meth:`apply`) for a denoiser and an optional VAE.

    Attributes:
        device, dtype: where and in which compute dtype the plan runs (fixed for the runtime's life).
        compute_dtype: the dtype of the running forecast (``dtype``; float32 inside :meth:`precision`).
        stream: the forecaster's own CUDA stream (None on CPU).
        denoise_fn: the callable the sampler evaluates under the plan's dtype (see :meth:`sampling_denoiser`).
        encoder_weights: the encoders' weights cast for the CPU kernels (created on first use; None otherwise).
    """

    def __init__(self, plan: SamplingPlan, denoiser: torch.nn.Module, vae: Optional[torch.nn.Module]):
        self.device = resolve_device(plan.device)
        self.dtype = resolve_dtype(plan.dtype, self.device)
        self.compute_dtype = self.dtype
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._denoiser, self._vae = denoiser, vae
        self.encoder_weights = None
        self.plan_changes = 0  # counts apply(): caches of plan-dependent results compare it
        self.apply(plan)

    def apply(self, plan: SamplingPlan) -> None:
        """Run ``plan`` from now on (same device and dtype): rebuilds the denoiser callable and the VAE forward."""
        if resolve_device(plan.device) != self.device or plan.dtype != self.dtype:
            raise ValueError(f"a plan for {plan.device} {dtype_name(plan.dtype)} does not fit this forecaster "
                             f"({self.device} {dtype_name(self.dtype)}); build a new Forecaster instead")
        self.plan = plan
        self.plan_changes += 1
        if self.encoder_weights is not None:
            self.encoder_weights.clear()  # the cast encoder weights belong to the previous plan's kernels
        options = kernel_options(plan, self.device, self.dtype)
        ops = fast_ops(options) if options is not None else None  # one per plan: weights prepared once
        self.vae_kernels = fast_vae(self._vae, ops) if ops is not None and self._vae is not None else None
        self.denoise_fn: Optional[Callable[..., torch.Tensor]] = self._build_denoise_fn(plan, ops)

    def _build_denoise_fn(self, plan: SamplingPlan, ops) -> Callable[..., torch.Tensor]:
        """The denoiser itself, its fast CPU forward, compiled, and/or replayed from CUDA graphs (bounded LRU of
        ``plan.graph_cache_size`` graphs, bound to this device)."""
        if ops is not None:
            return fast_denoiser(self._denoiser, ops)
        denoise = compiled_denoiser(self._denoiser) if plan.use_compile else self._denoiser
        if plan.use_cuda_graph:
            return CudaGraphDenoiser(denoise, None if self.dtype == torch.float32 else self.dtype, self.device,
                                     plan.graph_cache_size)
        return denoise

    def sampling_denoiser(self) -> Callable[..., torch.Tensor]:
        """What the sampler evaluates: the plan's callable, or the reference module during a float32 rerun."""
        return self.denoise_fn if self.compute_dtype == self.dtype else self._denoiser

    def vae_forward(self):
        """The VAE's inference forward for the current compute dtype: the CPU kernels, or the module."""
        return self.vae_kernels if self.vae_kernels is not None and self.compute_dtype == self.dtype else self._vae

    def track_embedder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The VAE's track embedding (``[B, T, 2, H, W]`` -> tokens ``[B, T, L, C]``) of the plan."""
        return self.vae_kernels.embed_tracks if self.vae_kernels is not None else self._vae.embed_tracks

    def autocast(self) -> ContextManager:
        """Autocast to the compute dtype (nothing in float32)."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    @contextmanager
    def precision(self, dtype: torch.dtype) -> Iterator[None]:
        """Compute in ``dtype`` for the block (the float32 rerun); the caller holds the forecast lock."""
        previous, self.compute_dtype = self.compute_dtype, dtype
        try:
            yield
        finally:
            self.compute_dtype = previous

    def encoder_mode(self) -> ContextManager:
        """The encoders' linear layers through oneDNN on CPU when the plan uses the fast CPU kernels."""
        if self.encoder_weights is None and self.plan.fast_cpu_kernels and self.device.type == "cpu":
            self.encoder_weights = encoder_weight_cache()
        return encoder_mode(self.plan, self.device, self.encoder_weights)

    def sync(self) -> None:
        """Wait for this runtime's own stream only: other forecasters on the GPU keep running."""
        if self.stream is not None:
            self.stream.synchronize()

    @contextmanager
    def timed(self, timings: Dict[str, float], stage: str) -> Iterator[None]:
        """Add the block's seconds (device work included) to ``timings[stage]``."""
        start = time.perf_counter()
        yield
        self.sync()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

    def release(self) -> None:
        """Drop the plan's callables and cast weights (the kernels hold weight copies)."""
        self.denoise_fn = self.vae_kernels = self._denoiser = self._vae = None
        if self.encoder_weights is not None:
            self.encoder_weights.clear()
        self.encoder_weights = None


# ---------------------------------------------------------------------------------------------- GPU pieces
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
