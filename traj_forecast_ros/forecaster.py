"""The forecasting API: one camera image (+ instruction) in, K sampled futures of a dense point grid out.

``Forecaster`` owns the frozen encoders, the trajectory VAE and the denoiser, and runs a :class:`SamplingPlan`
(chosen per device and dtype by :func:`choose_sampling_plan`, inspectable as ``forecaster.plan``):

* once per forecaster: the VAE tokens of the static query grid (Fourier features + patch embedding, image-free);
* once per image: validation, colour conversion and centre-crop/resize (:mod:`traj_forecast_ros.geometry`),
  the DINOv2 patch tokens, and the VAE posterior of the static query grid (the conditioning frame);
* once per distinct instruction: the CLIP pooled embedding (bounded LRU cache);
* per sample: a conditioning latent drawn from that posterior (``mean + std * eps``; the mean itself for models
  trained with ``latent_draw: mean``), ``steps - 1`` Euler
  evaluations of the denoiser and one VAE decode, run in chunks of ``plan.sample_batch_size`` samples (all K on
  GPU; on CPU per model: all K for small models, one for LIBERO size).

Random numbers come from a CPU ``torch.Generator`` seeded with ``seed`` (drawn fresh and reported when not given),
so a seed gives the same noise on every device. Parameters stay float32; lower precision is autocast
(``dtype="auto"``: bfloat16 on GPUs with native bfloat16, float16 on older GPUs, float32 on CPU; bfloat16
selectable on the CPU). A half-precision forecast with NaN/Inf tracks is rerun in float32 (``fp32_fallbacks``,
warned once). On CUDA every forecast runs under the forecaster's own device and stream, from any thread.
No ROS imports here.
"""

from __future__ import annotations

import logging
import os
import dataclasses
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from einops import rearrange

from traj_forecast_ros.errors import TrajForecastError, WeightsNotFoundError
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES, Forecast, anchor_to_query_points, noise_seed, whole_number
from traj_forecast_ros.geometry import DEFAULT_MAX_PIXELS, denormalise_points
from traj_forecast_ros.geometry import prepare_image, query_grid, static_tracks_norm
from traj_forecast_ros.model.compatibility import check_modules_compatible
from traj_forecast_ros.model.config import ModelConfig, check_guidance_scale
from traj_forecast_ros.model.kernels import (EncoderWeightCache, FastCPUOps, KernelOptions, OneDNNLinearMode,
                                             kernels_available)
from traj_forecast_ros.model.ops import TORCH_OPS, TorchOps
from traj_forecast_ros.sampling_plan import (
    CudaGraphDenoiser,
    LRUCache,
    SamplingPlan,
    bound_to_device,
    choose_sampling_plan,
    compiled_denoiser,
    dtype_name,
    plan_for_model,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)
TEXT_CACHE_SIZE = 64


class _NonFiniteTracks(TrajForecastError):
    """A forecast came out with NaN/Inf; ``seed`` is the seed its noise was drawn from (None: noise was given)."""

    def __init__(self, message: str, seed: Optional[int]):
        super().__init__(message)
        self.seed = seed


# ---------------------------------------------------------------------------------------------- forecaster
class Forecaster:
    """Dense point-trajectory forecasting from one image (see the module docstring for the sampling plan).

    Build with :meth:`from_pretrained` (a registry name or a model directory) or :meth:`from_config` (random
    weights, for tests and benchmarks), then call :meth:`forecast`.

    Attributes:
        plan: the :class:`SamplingPlan` (device, dtype, sample batch size, kernel/compile/graph flags).
        sample_batch_size: samples per denoiser/decoder call (``None`` or 0 = all K at once); a shortcut that
            replaces ``plan``. ``"auto"`` at construction: all K on GPU; on CPU chosen per model
            (:func:`~traj_forecast_ros.sampling_plan.plan_for_model`: small models batch all K, LIBERO size one
            sample per call), by a timed probe cached per machine when ``plan_probe`` (``from_pretrained``).
        max_pixels: input images with more pixels are refused.

    ``plan`` given at construction overrides ``device``, ``dtype``, ``sample_batch_size``, ``use_compile`` and
    ``use_cuda_graph``.
    """

    def __init__(self, config: ModelConfig, denoiser: torch.nn.Module, vae: Optional[torch.nn.Module],
                 image_encoder: torch.nn.Module, text_encoder: Optional[torch.nn.Module], model_id: str,
                 device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
                 sample_batch_size: Union[int, None, str] = "auto", text_cache_size: int = TEXT_CACHE_SIZE,
                 plan: Optional[SamplingPlan] = None, use_compile: bool = False, use_cuda_graph: bool = False,
                 graph_cache_size: int = SamplingPlan.graph_cache_size, plan_probe: bool = False,
                 plan_cache_dir: Optional[Union[str, Path]] = None):
        self._plan_cache_dir = plan_cache_dir
        if plan is None:
            plan = dataclasses.replace(choose_sampling_plan(device, dtype, sample_batch_size, use_compile=use_compile,
                                                            use_cuda_graph=use_cuda_graph),
                                       graph_cache_size=graph_cache_size)
            if sample_batch_size == "auto":  # CPU: per model, by the size rule or a cached timed probe
                plan = plan_for_model(plan, denoiser, DEFAULT_NUM_SAMPLES, probe=plan_probe, cache_dir=plan_cache_dir,
                                      model_name=model_id)
        self._device = resolve_device(plan.device)
        self._dtype = resolve_dtype(plan.dtype, self._device)
        self._compute_dtype = self._dtype  # float32 while a non-finite half-precision forecast is rerun
        self._fp32_fallbacks = 0
        # Every forecast runs on this device and this stream, from whichever thread calls (see bound_to_device).
        self._stream = torch.cuda.Stream(device=self._device) if self._device.type == "cuda" else None
        self._config = config
        self._model_id = model_id
        self._lock = threading.Lock()
        check_modules_compatible(config, denoiser, vae, image_encoder, text_encoder)
        self.denoiser = denoiser.to(self._device).eval().requires_grad_(False)
        self.vae = vae.to(self._device).eval().requires_grad_(False) if vae is not None else None
        self.image_encoder = image_encoder.to(self._device).eval()
        self.text_encoder = text_encoder.to(self._device).eval() if text_encoder is not None else None
        self._encoder_weights = None  # model.kernels.EncoderWeightCache while the plan runs the CPU kernels
        self._apply_plan(plan)  # validates; sets _plan, _query_tokens and _denoise_fn
        self.max_pixels = DEFAULT_MAX_PIXELS
        self._text_cache = LRUCache(text_cache_size)
        self._warned_default_instruction = False
        self._query_grid_model = query_grid(config)  # [Hq, Wq, 2] model pixels
        self._static_tracks = static_tracks_norm(config).to(self._device)  # [1, T, 2, Hq, Wq]
        scale = config.vae_scale if vae is not None else None
        self._latent_scale = (torch.tensor(scale, dtype=torch.float32, device=self._device).view(1, 1, -1, 1, 1)
                              if scale is not None else None)  # [1, 1, C, 1, 1]
        log.info("forecaster '%s': sampling plan %s", model_id, self._plan.summary())

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_dir: Union[str, Path], device: Union[str, torch.device] = "auto",
                        dtype: Union[str, torch.dtype] = "auto", cache_dir: Optional[Union[str, Path]] = None,
                        download: bool = True, **kwargs) -> "Forecaster":
        """Load a registry model (downloading it on first use when ``download`` and online) or a model directory."""
        from traj_forecast_ros import registry
        from traj_forecast_ros.model.checkpoint import load_model_dir
        from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder

        resolve_dtype(dtype, resolve_device(device))  # fail on a bad device/dtype before loading anything
        try:
            model_dir = registry.resolve(name_or_dir, cache_dir)
        except WeightsNotFoundError:
            entries = registry.load_registry()
            entry = entries.get(str(name_or_dir))
            if not (download and entry is not None and entry.is_hub_model):
                raise
            model_dir = registry.download(str(name_or_dir), cache_dir)
        config, denoiser, vae = load_model_dir(model_dir)
        image_encoder = ImageEncoder.from_config(config.image_encoder, model_dir=model_dir)
        text_encoder = (TextEncoder.from_config(config.text_encoder, model_dir=model_dir)
                        if config.text_encoder is not None else None)
        is_name = not Path(str(name_or_dir)).expanduser().is_dir()
        model_id = str(name_or_dir) if is_name else config.name
        kwargs.setdefault("plan_probe", True)  # a real model: time the CPU plan candidates once (cached)
        if cache_dir is not None:  # probe decisions live beside the models of that cache
            kwargs.setdefault("plan_cache_dir", Path(cache_dir).expanduser() / "plans")
        return cls(config, denoiser, vae, image_encoder, text_encoder, model_id, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_config(cls, config: ModelConfig, device: Union[str, torch.device] = "cpu",
                    dtype: Union[str, torch.dtype] = "auto", seed: int = 0, **kwargs) -> "Forecaster":
        """A forecaster with random weights (deterministic in ``seed``), for tests, demos and benchmarks.

        Encoders are built from ``config.*_encoder.config`` when their ``model_id`` is None, else loaded. Zero-init
        output layers get small random values (``model.checkpoint.randomise_zero_parameters``: outputs depend on the
        inputs); what training would measure comes from ``model.presets.untrained_config``."""
        from traj_forecast_ros.model.checkpoint import build_modules, randomise_zero_parameters
        from traj_forecast_ros.model.presets import untrained_config
        from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder

        resolve_dtype(dtype, resolve_device(device))
        config = untrained_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            denoiser, vae = build_modules(config)
            image_encoder = ImageEncoder.from_config(config.image_encoder)
            text_encoder = TextEncoder.from_config(config.text_encoder) if config.text_encoder is not None else None
        generator = torch.Generator().manual_seed(seed + 1)
        randomise_zero_parameters(denoiser, generator)
        if vae is not None:
            randomise_zero_parameters(vae, generator)
        return cls(config, denoiser, vae, image_encoder, text_encoder, config.name, device=device, dtype=dtype,
                   **kwargs)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def config(self) -> ModelConfig:
        """The model's configuration."""
        return self._config

    @property
    def model_id(self) -> str:
        """Registry name (or config name) of the loaded model."""
        return self._model_id

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (autocast); parameters stay float32."""
        return self._dtype

    @property
    def plan(self) -> SamplingPlan:
        """The sampling plan (see :class:`SamplingPlan`)."""
        return self._plan

    @plan.setter
    def plan(self, plan: SamplingPlan) -> None:
        """Replace the plan (recorded as ``chosen_by="given"``); waits for a running forecast."""
        with self._lock:
            self._apply_plan(dataclasses.replace(plan, chosen_by="given"))

    def _apply_plan(self, plan: SamplingPlan) -> None:
        if resolve_device(plan.device) != self._device or plan.dtype != self._dtype:
            raise ValueError(f"a plan for {plan.device} {dtype_name(plan.dtype)} does not fit this forecaster "
                             f"({self._device} {dtype_name(self._dtype)}); build a new Forecaster instead")
        self._plan = plan
        self._query_tokens: Optional[torch.Tensor] = None  # VAE tokens of the static query grid (plan-cached)
        options = self._kernel_options(plan)
        # model.kernels.FastCPUOps (prepared weights of this plan's kernels) when the plan runs the CPU kernels
        self._fast_ops: Optional[FastCPUOps] = FastCPUOps(options) if options is not None else None
        if self._encoder_weights is not None:
            self._encoder_weights.clear()  # the cast encoder weights belong to the previous plan's kernels
        self._denoise_fn: Optional[Callable[..., torch.Tensor]] = self._build_denoise_fn(plan)

    def _kernel_options(self, plan: SamplingPlan):
        """``model.kernels.KernelOptions`` of the plan, or None where the reference modules run (GPU, compile,
        ``fast_cpu_kernels=False``)."""
        if not (plan.fast_cpu_kernels and not plan.use_compile and kernels_available(self._device, self._dtype)):
            return None
        return KernelOptions(dtype=self._dtype, fold_modulation=plan.fold_modulation, attention=plan.attention)

    def _ops(self) -> TorchOps:
        """The ops the model's forward runs with for the current compute dtype: the CPU kernels, or plain torch."""
        return self._fast_ops if self._fast_ops is not None and self._compute_dtype == self._dtype else TORCH_OPS

    @property
    def sample_batch_size(self) -> Optional[int]:
        """Samples per denoiser/decoder call (None = all K); setting it (None or 0 = all) replaces :attr:`plan`."""
        return self._plan.sample_batch_size

    @sample_batch_size.setter
    def sample_batch_size(self, value: Optional[int]) -> None:
        with self._lock:
            self._apply_plan(dataclasses.replace(self._plan, sample_batch_size=value or None, chosen_by="given"))

    def sibling(self, model_id: Optional[str] = None, **settings) -> "Forecaster":
        """A new forecaster over this one's modules with other constructor settings (``device``, ``dtype``,
        ``sample_batch_size``, ``plan``, ``use_cuda_graph``, ...; device defaults to this one's)."""
        settings.setdefault("device", self._device)
        settings.setdefault("plan_cache_dir", self._plan_cache_dir)
        return Forecaster(self._config, self.denoiser, self.vae, self.image_encoder, self.text_encoder,
                          model_id or self._model_id, **settings)

    def _build_denoise_fn(self, plan: SamplingPlan) -> Callable[..., torch.Tensor]:
        """The callable the sampler evaluates: the denoiser itself, compiled, and/or replayed from CUDA graphs
        (bounded LRU of ``plan.graph_cache_size`` graphs, bound to this forecaster's device)."""
        if self._fast_ops is not None:
            return self.denoiser.with_ops(self._fast_ops)
        denoise = compiled_denoiser(self.denoiser) if plan.use_compile else self.denoiser
        if plan.use_cuda_graph:
            return CudaGraphDenoiser(denoise, None if self._dtype == torch.float32 else self._dtype, self._device,
                                     plan.graph_cache_size)
        return denoise

    @property
    def fp32_fallbacks(self) -> int:
        """Forecasts whose half-precision result was non-finite and that were rerun in float32."""
        return self._fp32_fallbacks

    def _count_fp32_fallback(self, exc: _NonFiniteTracks) -> None:
        """Count a float32 rerun; warn on the first one (later ones only at debug level)."""
        self._fp32_fallbacks += 1
        if self._fp32_fallbacks == 1:
            log.warning("%s. Rerunning this and any later non-finite forecast in float32 (counted as "
                        "fp32_fallbacks; warned once). Frequent fallbacks cost a second forecast each: set "
                        "dtype='float32', or 'bfloat16' where the GPU supports it.", exc)
        else:
            log.debug("%s (fp32 fallback %d)", exc, self._fp32_fallbacks)

    @property
    def text_cache(self) -> LRUCache:
        """The instruction-embedding cache (``hits``, ``misses``, ``len``)."""
        return self._text_cache

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        """``(T, C, h, w)`` of one sample's state in the sampler (latent grid, or the raw track grid)."""
        cfg = self.denoiser.cfg
        rows, cols = self.denoiser.input_size
        return (cfg.num_frames, cfg.in_channels, rows, cols)

    # ------------------------------------------------------------------------------------------ stages
    def _autocast(self):
        if self._compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=self._compute_dtype)

    @contextmanager
    def _precision(self, dtype: torch.dtype) -> Iterator[None]:
        """Compute in ``dtype`` for the block (the float32 rerun); the caller holds the forecast lock."""
        previous, self._compute_dtype = self._compute_dtype, dtype
        try:
            yield
        finally:
            self._compute_dtype = previous

    def _encoder_kernels(self):
        """The encoders' linear layers through oneDNN on CPU when the plan uses the fast CPU kernels."""
        if not (self._plan.fast_cpu_kernels and self._device.type == "cpu"):
            return nullcontext()
        if self._encoder_weights is None:
            self._encoder_weights = EncoderWeightCache()
        return OneDNNLinearMode(self._encoder_weights)

    def _sync(self) -> None:  # this forecaster's own stream only: other forecasters on the GPU keep running
        if self._stream is not None:
            self._stream.synchronize()

    @contextmanager
    def _timed(self, timings: Dict[str, float], stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._sync()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

    def encode_image(self, model_image: np.ndarray) -> torch.Tensor:
        """``[h, w, 3]`` uint8 model-size image -> ``[1, N, D]`` float32 DINOv2 patch tokens."""
        if not model_image.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
            model_image = model_image.copy()
        pixels = torch.from_numpy(np.ascontiguousarray(model_image)).unsqueeze(0)  # [1, h, w, 3] uint8
        with torch.inference_mode(), self._autocast(), self._encoder_kernels():
            return self.image_encoder(pixels.to(self._device)).float()  # [1, N, D]

    def embed_instruction(self, instruction: str) -> torch.Tensor:
        """``[1, E]`` float32 pooled text embedding, cached per distinct instruction (computed in the plan's
        dtype; the float32 rerun of a non-finite forecast bypasses the cache)."""
        use_cache = self._compute_dtype == self._dtype
        cached = self._text_cache.get(instruction) if use_cache else None
        if cached is not None:
            return cached
        with torch.inference_mode(), self._autocast(), self._encoder_kernels():
            embedding = self.text_encoder([instruction]).float()  # [1, E]
        if use_cache:
            self._text_cache.put(instruction, embedding)
        return embedding

    def _resolve_guidance(self, scale: Optional[float]) -> float:
        """The guidance scale to use (None: the model's default); refused where the model has no null embedding."""
        scale = self._config.guidance_scale if scale is None else check_guidance_scale(scale)
        if scale != 1.0 and not self._config.supports_guidance:
            raise ValueError(f"model '{self._model_id}' was not trained with instruction dropout (no "
                             "null_instruction in its config): classifier-free guidance needs guidance_scale=1")
        return scale

    def _resolve_instruction(self, instruction: Optional[str]) -> Optional[str]:
        if self.text_encoder is None:
            if instruction:
                raise ValueError(f"model '{self._model_id}' has no language conditioning; got instruction "
                                 f"{instruction!r} (pass instruction=None)")
            return None
        if instruction is None:
            instruction = self._config.default_instruction
            if not self._warned_default_instruction:
                log.info("model '%s' is language-conditioned; no instruction given, using the default %r",
                         self._model_id, instruction)
                self._warned_default_instruction = True
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        return instruction

    def condition_posterior(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) ``[1, 1, C, h, w]`` of the scaled latent of the static query grid, frame 0 (latent models).

        Raw models condition on the normalised grid itself: mean = grid, std = 0.
        """
        if self.vae is None:
            grid = self._static_tracks[:, :1].float()  # [1, 1, 2, Hq, Wq]
            return grid, torch.zeros_like(grid)
        from traj_forecast_ros.model.flow import latents_to_grid

        with torch.inference_mode():
            tokens = self.query_tokens()  # [1, T, L, C]
            with self._autocast():
                mean, std = self.vae.encode_tokens(tokens, features, self._ops())  # [1, T, L, Z] each
        grid_size = self.vae.latent_grid
        mean = latents_to_grid(mean[:, :1].float(), grid_size) * self._latent_scale  # [1, 1, C, h, w]
        std = latents_to_grid(std[:, :1].float(), grid_size) * self._latent_scale  # [1, 1, C, h, w]
        return mean, std

    def query_tokens(self) -> torch.Tensor:
        """``[1, T, L, C]`` VAE tokens of the static query grid (image-independent; cached when the plan says so)."""
        if self._query_tokens is not None:
            return self._query_tokens
        with torch.inference_mode():
            ops = self._fast_ops if self._fast_ops is not None else TORCH_OPS
            tokens = self.vae.embed_tracks(self._static_tracks, ops).float()  # [1, T, L, C], float32
        if self._plan.cache_query_tokens:
            self._query_tokens = tokens
        return tokens

    def _draw_noise(self, num_samples: int, seed: int) -> torch.Tensor:
        """``[K, T, C, h, w]`` standard normal from a CPU generator seeded with ``seed``.

        Frames 1..T-1 (the flow's initial state) are drawn first, in the official sampler's order and shape, then
        frame 0 (the eps of the conditioning-latent draw).
        """
        generator = torch.Generator().manual_seed(int(seed))
        frames, channels, rows, cols = self.latent_shape
        flow = torch.randn((num_samples, frames - 1, channels, rows, cols), generator=generator)
        cond_eps = torch.randn((num_samples, 1, channels, rows, cols), generator=generator)
        return torch.cat([cond_eps, flow], dim=1)

    def _check_initial_noise(self, initial_noise, num_samples: int) -> torch.Tensor:
        noise = torch.as_tensor(initial_noise)
        full = (num_samples, *self.latent_shape)
        flow_only = (num_samples, full[1] - 1, *full[2:])
        if tuple(noise.shape) not in (full, flow_only):
            raise ValueError(f"initial_noise must be {list(flow_only)} (frames 1..T-1) or {list(full)} (frame 0 = eps "
                             f"of the conditioning draw) for num_samples={num_samples}; got {list(noise.shape)}")
        if not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
            raise ValueError("initial_noise must be a finite floating-point tensor")
        return noise.float()

    def _decode(self, final_state: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Sampler output ``[B, T, C, h, w]`` -> normalised tracks ``[B, T, 2, Hq, Wq]``."""
        if self.vae is None:
            return final_state
        from traj_forecast_ros.model.flow import grid_to_latents

        latents = grid_to_latents(final_state / self._latent_scale)  # [B, T, L, C]
        with self._autocast():
            return self.vae.decode(latents, features.expand(latents.shape[0], -1, -1), self._ops()).float()  # [B, T, 2, Hq, Wq]

    # ------------------------------------------------------------------------------------------ public API
    def forecast(self, image, instruction: Optional[str] = None, num_samples: int = DEFAULT_NUM_SAMPLES,
                 steps: Optional[int] = None, seed: Optional[int] = None, initial_noise=None,
                 color_order: Optional[str] = None,
                 cancel: Optional[Union[threading.Event, Callable[[], bool]]] = None, anchor: bool = True,
                 guidance_scale: Optional[float] = None) -> Forecast:
        """Sample ``num_samples`` futures of the query grid for one image.

        Args:
            image: uint8 ``HxW`` (mono), ``HxWx3`` (``color_order`` "rgb" default, or "bgr"), ``HxWx4``
                ("rgba"/"bgra"); any size (centre-cropped and resized, see :mod:`traj_forecast_ros.geometry`).
            instruction: task text for language-conditioned models (None: the config's default instruction).
            num_samples: K.
            steps: time points of the Euler grid (None: the model's ``default_steps``; 10 = 9 denoiser evaluations,
                the official setting).
            seed: seed of the noise, 0 .. 2**63-1 (None or -1: a fresh random seed, reported in the result).
            initial_noise: optional standard-normal tensor ``[K, T-1, C, h, w]`` (flow state of frames 1..T-1; the
                conditioning latent is then the posterior mean) or ``[K, T, C, h, w]`` (frame 0 = eps of the
                conditioning draw; ignored by ``latent_draw: mean`` models). When given nothing random is drawn
                and ``seed`` is ignored.
            color_order: channel order of ``image`` (see :func:`traj_forecast_ros.geometry.to_rgb`).
            cancel: optional ``threading.Event`` (or ``() -> bool``) checked between denoiser steps; once set the
                forecast stops with :class:`~traj_forecast_ros.errors.ForecastCancelled`. Unset, it changes nothing.
            anchor: re-anchor every sampled trajectory so frame 0 is exactly its query point, displacements kept
                (default); False: the raw decoder output (frame 0 = query grid up to VAE error), as the official code.
            guidance_scale: classifier-free guidance (None: the model's ``guidance_scale``; 1 = none). Other values
                need a model trained with instruction dropout (``config.null_instruction``).

        Returns:
            :class:`Forecast` with ``tracks [K, T, Hq, Wq, 2]`` float32 in input-image pixels.

        Raises:
            InvalidImageError: unusable image. ValueError: bad arguments. TrajForecastError: non-finite output.
            ForecastCancelled: ``cancel`` was set.
            torch.cuda.OutOfMemoryError: out of GPU memory (the CUDA caching allocator is emptied before it
            propagates).
        """
        num_samples, seed = whole_number(num_samples, "num_samples", 1), noise_seed(seed)
        steps = whole_number(self._config.default_steps if steps is None else steps,
                             "steps (Euler time points including t=0 and t=1)", 2)
        guidance_scale = self._resolve_guidance(guidance_scale)
        with self._lock, torch.inference_mode(), bound_to_device(self._device, self._stream):
            if self.denoiser is None:
                raise TrajForecastError("this forecaster was released; create a new one")
            try:
                should_stop = getattr(cancel, "is_set", cancel)  # an Event or a callable (None: never)
                started = time.perf_counter()
                try:
                    return self._forecast(image, instruction, num_samples, steps, seed, initial_noise, color_order,
                                          should_stop, anchor, guidance_scale)
                except _NonFiniteTracks as exc:
                    if self._dtype == torch.float32:
                        raise
                    self._count_fp32_fallback(exc)
                    with self._precision(torch.float32):
                        result = self._forecast(image, instruction, num_samples, steps, exc.seed, initial_noise,
                                                color_order, should_stop, anchor, guidance_scale)
                    result.timings["fp32_rerun"] = result.timings["total"]
                    result.timings["total"] = time.perf_counter() - started  # both runs: what the caller waited
                    return result
            except torch.cuda.OutOfMemoryError:
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()  # return the cached blocks to the driver; the caller may retry smaller
                raise

    def _forecast(self, image, instruction, num_samples, steps, seed, initial_noise, color_order,
                  should_stop=None, anchor: bool = True, guidance_scale: float = 1.0) -> Forecast:
        from traj_forecast_ros.model.flow import euler_sample

        timings: Dict[str, float] = {}
        start = time.perf_counter()
        with self._timed(timings, "preprocess"):
            model_image, transform = prepare_image(image, tuple(self._config.image_size), color_order,
                                                   self.max_pixels)
            instruction = self._resolve_instruction(instruction)
            if initial_noise is not None:
                noise = self._check_initial_noise(initial_noise, num_samples)
                seed = None
            else:
                seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
                noise = self._draw_noise(num_samples, seed)
        with self._timed(timings, "image_encoder"):
            features = self.encode_image(model_image)  # [1, N, D]
        with self._timed(timings, "text_encoder"):
            text = self.embed_instruction(instruction) if instruction is not None else None  # [1, E]
            null_text = (self.embed_instruction(self._config.null_instruction)  # [1, E]
                         if guidance_scale != 1.0 else None)
        with self._timed(timings, "vae_encode"):
            mean, std = self.condition_posterior(features)  # [1, 1, C, h, w] each
            noise = noise.to(self._device)
            if noise.shape[1] == self.latent_shape[0] and self._config.latent_draw == "sample":  # frame 0: cond eps
                cond_eps, flow_noise = noise[:, :1], noise[:, 1:]
                cond = mean + std * cond_eps  # [K, 1, C, h, w]
            else:  # no conditioning eps given, or a model trained on posterior means
                flow_noise = noise[:, 1:] if noise.shape[1] == self.latent_shape[0] else noise
                cond = mean.expand(num_samples, -1, -1, -1, -1)  # [K, 1, C, h, w]
        chunk = self.sample_batch_size or num_samples
        tracks_norm = []
        for first in range(0, num_samples, chunk):
            part = slice(first, min(first + chunk, num_samples))
            with self._timed(timings, "denoise"), self._autocast():
                final_state = euler_sample(
                    self._denoise_fn if self._compute_dtype == self._dtype else self.denoiser,  # fp32 rerun: eager
                    cond[part], flow_noise[part], features, text, steps=steps, cancel=should_stop,
                    guidance_scale=guidance_scale, null_text_embeds=null_text,
                )  # [b, T, C, h, w]
            with self._timed(timings, "vae_decode"):
                tracks_norm.append(self._decode(final_state.float(), features))  # [b, T, 2, Hq, Wq]
        tracks_norm = torch.cat(tracks_norm)  # [K, T, 2, Hq, Wq]
        if not bool(torch.isfinite(tracks_norm).all()):
            hint = ("even in float32: the weights may be corrupt" if self._compute_dtype == torch.float32 else
                    "rerunning in float32")
            raise _NonFiniteTracks(f"model '{self._model_id}' produced NaN/Inf tracks (dtype "
                                   f"{dtype_name(self._compute_dtype)}); {hint}", seed)
        tracks_model = denormalise_points(rearrange(tracks_norm, "k t c h w -> k t h w c"),
                                          tuple(self._config.image_size))  # [K, T, Hq, Wq, 2] model pixels
        tracks = transform.to_input(tracks_model.cpu().numpy().astype(np.float64)).astype(np.float32)
        query_points = transform.to_input(self._query_grid_model.astype(np.float64)).astype(np.float32)
        timings["total"] = time.perf_counter() - start
        return Forecast(
            tracks=anchor_to_query_points(tracks, query_points) if anchor else tracks,
            query_points=query_points,
            image_size=tuple(int(v) for v in transform.input_size), crop_box=transform.crop_box,
            model_id=self._model_id, frame_interval=float(self._config.frame_interval_s or 0.0),
            instruction=instruction,
            device=str(self._device),
            dtype=dtype_name(self._compute_dtype),
            timings=timings,
            seed=seed,
            guidance_scale=guidance_scale,
        )

    def warmup(self) -> Dict[str, float]:
        """Run one tiny forecast (1 sample, 2 time points) to initialise kernels and caches; returns its timings."""
        height, width = self._config.image_size
        blank = np.zeros((height, width, 3), np.uint8)
        return self.forecast(blank, num_samples=1, steps=2, seed=0).timings

    def release(self) -> None:
        """Drop the modules and caches and free accelerator memory; the forecaster cannot be used afterwards."""
        with self._lock:
            self.denoiser = self.vae = self.image_encoder = self.text_encoder = None
            self._denoise_fn = self._query_tokens = self._fast_ops = None  # the kernels hold weight copies
            if self._encoder_weights is not None:
                self._encoder_weights.clear()
            self._encoder_weights = None
            self._text_cache.clear()
            self._static_tracks = self._latent_scale = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
