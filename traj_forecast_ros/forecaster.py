"""The forecasting API: camera images (+ instructions) in, K sampled futures of a dense point grid each out.

``Forecaster`` is the public face over four parts, one job each:

* loading (:mod:`traj_forecast_ros.loading`): registry models, model directories, random weights;
* the execution plan: :class:`~traj_forecast_ros.sampling_plan.SamplingPlan` chosen per device, dtype and model
  (:mod:`traj_forecast_ros.sampling_plan`, inspectable as ``forecaster.plan``) and run by a
  :class:`~traj_forecast_ros.plan_runtime.PlanRuntime` (kernels, CUDA graphs, compile, autocast, stream);
* the conditioning (:class:`~traj_forecast_ros.conditioning.Conditioner`): image tokens once per image, the
  instruction embedding once per distinct instruction (bounded LRU cache), the conditioning frame's posterior;
* the sampler (:class:`~traj_forecast_ros.sampler.Sampler`): noise, Euler steps, guidance, decode, anchoring,
  for all requests of a batch at once.

Parameters stay float32; lower precision is autocast (``dtype="auto"``: bfloat16 on GPUs with native bfloat16,
float16 on older GPUs, float32 on CPU; bfloat16 selectable on the CPU). A half-precision forecast with NaN/Inf
tracks is rerun in float32 (``fp32_fallbacks``, warned once). On CUDA every forecast runs under the forecaster's own
device and stream, from any thread. No ROS imports here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from traj_forecast_ros.conditioning import TEXT_CACHE_SIZE, Conditioner
from traj_forecast_ros.errors import TrajForecastError
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES, Forecast, ForecastRequest, whole_number
from traj_forecast_ros.geometry import DEFAULT_MAX_PIXELS
from traj_forecast_ros.loading import build_random, load_pretrained
from traj_forecast_ros.model.compatibility import check_modules_compatible
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.plan_runtime import PlanRuntime, bound_to_device
from traj_forecast_ros.sampler import Sampler, SamplingOptions
from traj_forecast_ros.sampling_plan import (
    LRUCache,
    SamplingPlan,
    choose_sampling_plan,
    plan_for_model,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)
Cancel = Optional[Union[threading.Event, Callable[[], bool]]]  # an Event, or () -> bool; None: never cancelled


class Forecaster:
    """Dense point-trajectory forecasting from images (see the module docstring for its parts).

    Build with :meth:`from_pretrained` (a registry name or a model directory) or :meth:`from_config` (random
    weights, for tests and benchmarks), then call :meth:`forecast` (one image) or :meth:`forecast_batch`.

    Attributes:
        denoiser, vae, image_encoder, text_encoder: the modules (None after :meth:`release`).
        runtime: the :class:`PlanRuntime` running :attr:`plan`; conditioner: the :class:`Conditioner`;
            sampler: the :class:`Sampler`.

    ``sample_batch_size``: samples per denoiser/decoder call (``None`` or 0 = all rows at once); ``"auto"``: all K
    on GPU; on CPU chosen per model (:func:`~traj_forecast_ros.sampling_plan.plan_for_model`: small models batch,
    LIBERO size one sample per call), by a timed probe for ``num_samples`` (the K the forecasts will use) cached per
    machine when ``plan_probe`` (``from_pretrained``). ``plan`` given at construction overrides ``device``,
    ``dtype``, ``sample_batch_size``, ``use_compile`` and ``use_cuda_graph``.
    """

    def __init__(self, config: ModelConfig, denoiser: torch.nn.Module, vae: Optional[torch.nn.Module],
                 image_encoder: torch.nn.Module, text_encoder: Optional[torch.nn.Module], model_id: str,
                 device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
                 sample_batch_size: Union[int, None, str] = "auto", text_cache_size: int = TEXT_CACHE_SIZE,
                 plan: Optional[SamplingPlan] = None, use_compile: bool = False, use_cuda_graph: bool = False,
                 graph_cache_size: int = SamplingPlan.graph_cache_size, plan_probe: bool = False,
                 plan_cache_dir: Optional[Union[str, Path]] = None, num_samples: int = DEFAULT_NUM_SAMPLES):
        self._plan_cache_dir = plan_cache_dir
        if plan is None:
            plan = dataclasses.replace(choose_sampling_plan(device, dtype, sample_batch_size, use_compile=use_compile,
                                                            use_cuda_graph=use_cuda_graph),
                                       graph_cache_size=graph_cache_size)
            if sample_batch_size == "auto":  # CPU: per model and K, by the size rule or a cached timed probe
                plan = plan_for_model(plan, denoiser, whole_number(num_samples, "num_samples", 1), probe=plan_probe,
                                      cache_dir=plan_cache_dir, model_name=model_id)
        self._config, self._model_id = config, model_id
        self._lock = threading.Lock()
        check_modules_compatible(config, denoiser, vae, image_encoder, text_encoder)
        device = resolve_device(plan.device)
        self.denoiser = denoiser.to(device).eval().requires_grad_(False)
        self.vae = vae.to(device).eval().requires_grad_(False) if vae is not None else None
        self.image_encoder = image_encoder.to(device).eval()
        self.text_encoder = text_encoder.to(device).eval() if text_encoder is not None else None
        self.runtime = PlanRuntime(plan, self.denoiser, self.vae)  # validates the plan
        self.conditioner = Conditioner(config, model_id, self.image_encoder, self.text_encoder, self.vae,
                                       self.runtime, text_cache_size)
        cfg, (rows, cols) = denoiser.cfg, denoiser.input_size
        self.sampler = Sampler(config, model_id, (cfg.num_frames, cfg.in_channels, rows, cols), self.conditioner,
                               self.runtime)
        log.info("forecaster '%s': sampling plan %s", model_id, plan.summary())

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_dir: Union[str, Path], device: Union[str, torch.device] = "auto",
                        dtype: Union[str, torch.dtype] = "auto", cache_dir: Optional[Union[str, Path]] = None,
                        download: bool = True, num_samples: int = DEFAULT_NUM_SAMPLES, **kwargs) -> "Forecaster":
        """Load a registry model (downloading it on first use when ``download`` and online) or a model directory.

        ``num_samples``: the K the forecasts will use, which the CPU plan is probed (and cached) for."""
        resolve_dtype(dtype, resolve_device(device))  # fail on a bad device/dtype before loading anything
        modules = load_pretrained(name_or_dir, cache_dir, download)
        kwargs.setdefault("plan_probe", True)  # a real model: time the CPU plan candidates once (cached)
        if cache_dir is not None:  # probe decisions live beside the models of that cache
            kwargs.setdefault("plan_cache_dir", Path(cache_dir).expanduser() / "plans")
        return cls(modules.config, modules.denoiser, modules.vae, modules.image_encoder, modules.text_encoder,
                   modules.model_id, device=device, dtype=dtype, num_samples=num_samples, **kwargs)

    @classmethod
    def from_config(cls, config: ModelConfig, device: Union[str, torch.device] = "cpu",
                    dtype: Union[str, torch.dtype] = "auto", seed: int = 0, **kwargs) -> "Forecaster":
        """A forecaster with random weights (deterministic in ``seed``), for tests, demos and benchmarks
        (see :func:`traj_forecast_ros.loading.build_random`)."""
        resolve_dtype(dtype, resolve_device(device))
        modules = build_random(config, seed)
        return cls(modules.config, modules.denoiser, modules.vae, modules.image_encoder, modules.text_encoder,
                   modules.model_id, device=device, dtype=dtype, **kwargs)

    def sibling(self, model_id: Optional[str] = None, **settings) -> "Forecaster":
        """A new forecaster over this one's modules with other constructor settings (``device``, ``dtype``,
        ``sample_batch_size``, ``plan``, ``use_cuda_graph``, ...; device defaults to this one's)."""
        settings.setdefault("device", self.device)
        settings.setdefault("plan_cache_dir", self._plan_cache_dir)
        return Forecaster(self._config, self.denoiser, self.vae, self.image_encoder, self.text_encoder,
                          model_id or self._model_id, **settings)

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
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (autocast); parameters stay float32."""
        return self.runtime.dtype

    @property
    def plan(self) -> SamplingPlan:
        """The sampling plan (device, dtype, sample batch size, kernel/compile/graph flags)."""
        return self.runtime.plan

    @plan.setter
    def plan(self, plan: SamplingPlan) -> None:
        """Replace the plan (recorded as ``chosen_by="given"``); waits for a running forecast."""
        with self._lock:
            self.runtime.apply(dataclasses.replace(plan, chosen_by="given"))

    @property
    def sample_batch_size(self) -> Optional[int]:
        """Samples per denoiser/decoder call (None = all rows); setting it (None or 0 = all) replaces :attr:`plan`."""
        return self.runtime.plan.sample_batch_size

    @sample_batch_size.setter
    def sample_batch_size(self, value: Optional[int]) -> None:
        with self._lock:
            self.runtime.apply(dataclasses.replace(self.runtime.plan, sample_batch_size=value or None,
                                                   chosen_by="given"))

    @property
    def fp32_fallbacks(self) -> int:
        """Forecasts whose half-precision result was non-finite and that were rerun in float32."""
        return self.sampler.fp32_fallbacks

    @property
    def text_cache(self) -> LRUCache:
        """The instruction-embedding cache (``hits``, ``misses``, ``len``)."""
        return self.conditioner.text_cache

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        """``(T, C, h, w)`` of one sample's state in the sampler (latent grid, or the raw track grid)."""
        return self.sampler.latent_shape

    # ------------------------------------------------------------------------------------------ stages
    def encode_image(self, model_image: np.ndarray) -> torch.Tensor:
        """``[h, w, 3]`` uint8 model-size image -> ``[1, N, D]`` float32 DINOv2 patch tokens."""
        return self.conditioner.encode_image(model_image)

    def embed_instruction(self, instruction: str) -> torch.Tensor:
        """``[1, E]`` float32 pooled text embedding, cached per distinct instruction."""
        return self.conditioner.embed_instruction(instruction)

    def condition_posterior(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) ``[1, 1, C, h, w]`` of the conditioning frame's scaled latent for image tokens ``features``."""
        return self.conditioner.condition_posterior(features)

    def query_tokens(self) -> torch.Tensor:
        """``[1, T, L, C]`` VAE tokens of the static query grid (cached per plan)."""
        return self.conditioner.query_tokens()

    # ------------------------------------------------------------------------------------------ forecasting
    def forecast(self, image, instruction: Optional[str] = None, num_samples: int = DEFAULT_NUM_SAMPLES,
                 steps: Optional[int] = None, seed: Optional[int] = None, initial_noise=None,
                 color_order: Optional[str] = None, cancel: Cancel = None, anchor: bool = True,
                 guidance_scale: Optional[float] = None, max_pixels: Optional[int] = None) -> Forecast:
        """Sample ``num_samples`` futures of the query grid for one image (``forecast_batch`` of one request).

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
            max_pixels: images with more pixels are refused (None: ``geometry.DEFAULT_MAX_PIXELS``).

        Returns:
            :class:`Forecast` with ``tracks [K, T, Hq, Wq, 2]`` float32 in input-image pixels.

        Raises:
            InvalidImageError: unusable image. ValueError: bad arguments. TrajForecastError: non-finite output.
            ForecastCancelled: ``cancel`` was set.
            torch.cuda.OutOfMemoryError: out of GPU memory (the CUDA caching allocator is emptied before it
            propagates).
        """
        request = ForecastRequest(image, instruction=instruction, seed=seed, color_order=color_order)
        return self._forecast([request], num_samples, steps, cancel, anchor, guidance_scale, max_pixels,
                              initial_noise)[0]

    def forecast_batch(self, requests: Sequence[ForecastRequest], num_samples: int = DEFAULT_NUM_SAMPLES,
                       steps: Optional[int] = None, cancel: Cancel = None, anchor: bool = True,
                       guidance_scale: Optional[float] = None, max_pixels: Optional[int] = None) -> List[Forecast]:
        """Forecast several images at once: all requests' K samples go through one denoiser call per Euler step
        and one VAE decode (chunked only by ``plan.sample_batch_size``), each row with its own image tokens,
        conditioning frame and instruction. ``forecast_batch([a, b])`` equals ``[forecast(a), forecast(b)]`` with
        the same seeds, to within the fast plan's tolerance (exactly where no chunk mixes requests).

        Every request is validated before anything runs: one unusable image refuses the whole batch
        (InvalidImageError). Each result carries the batch's ``timings``; only a request whose half-precision
        tracks are non-finite is rerun in float32. Arguments and errors as :meth:`forecast`.
        """
        return self._forecast(list(requests), num_samples, steps, cancel, anchor, guidance_scale, max_pixels)

    def _forecast(self, requests: List[ForecastRequest], num_samples: int, steps: Optional[int], cancel: Cancel,
                  anchor: bool, guidance_scale: Optional[float], max_pixels: Optional[int],
                  initial_noise=None) -> List[Forecast]:
        """Validate the arguments, then prepare and sample every request under the forecast lock."""
        if not requests:
            return []
        if not all(isinstance(request, ForecastRequest) for request in requests):
            raise TypeError("forecast_batch takes a sequence of ForecastRequest")
        options = SamplingOptions(
            num_samples=whole_number(num_samples, "num_samples", 1),
            steps=whole_number(self._config.default_steps if steps is None else steps,
                               "steps (Euler time points including t=0 and t=1)", 2),
            guidance_scale=self.conditioner.resolve_guidance(guidance_scale), anchor=anchor,
            should_stop=getattr(cancel, "is_set", cancel))  # an Event or a callable (None: never)
        max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else whole_number(max_pixels, "max_pixels", 1)
        runtime = self.runtime
        with self._lock, torch.inference_mode(), bound_to_device(runtime.device, runtime.stream):
            if self.denoiser is None:
                raise TrajForecastError("this forecaster was released; create a new one")
            try:
                started = time.perf_counter()
                timings: Dict[str, float] = {}
                with runtime.timed(timings, "preprocess"):
                    prepared = [self.sampler.prepare(request, options.num_samples, max_pixels, initial_noise)
                                for request in requests]
                return self.sampler.run(prepared, options, timings, started)
            except torch.cuda.OutOfMemoryError:
                if runtime.device.type == "cuda":
                    torch.cuda.empty_cache()  # return the cached blocks to the driver; the caller may retry smaller
                raise

    def warmup(self) -> Dict[str, float]:
        """Run one tiny forecast (1 sample, 2 time points) to initialise kernels and caches; returns its timings."""
        height, width = self._config.image_size
        blank = np.zeros((height, width, 3), np.uint8)
        return self.forecast(blank, num_samples=1, steps=2, seed=0).timings

    def release(self) -> None:
        """Drop the modules and caches and free accelerator memory; the forecaster cannot be used afterwards."""
        with self._lock:
            self.denoiser = self.vae = self.image_encoder = self.text_encoder = None
            self.runtime.release()
            self.conditioner.release()
            if self.runtime.device.type == "cuda":
                torch.cuda.empty_cache()
