"""Sampling a batch of forecasts: noise, Euler steps, guidance, VAE decode, input-pixel tracks and anchoring.

:class:`Sampler` turns requests (:class:`~traj_forecast_ros.forecast.ForecastRequest`) into forecasts. Per request:
validation, colour conversion and centre-crop/resize (:mod:`traj_forecast_ros.geometry`) against the caller's
``max_pixels``, and its noise from a CPU ``torch.Generator`` seeded with its seed (drawn fresh and reported when
not given), so a seed gives the same noise on every device. Per sample: a conditioning latent drawn from the
image's posterior (``mean + std * eps``; the mean itself for ``latent_draw: mean`` models). Then all requests'
``R * K`` samples run together: ``steps - 1`` Euler evaluations of the denoiser and one VAE decode per chunk of
``plan.sample_batch_size`` rows, each row with its own image tokens, conditioning frame and instruction. A
half-precision request whose tracks come out NaN/Inf is rerun in float32 (``fp32_fallbacks``, warned once).
No ROS imports here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from einops import rearrange

from traj_forecast_ros.conditioning import Conditioner
from traj_forecast_ros.errors import TrajForecastError
from traj_forecast_ros.forecast import Forecast, ForecastRequest, anchor_to_query_points, noise_seed
from traj_forecast_ros.geometry import ImageTransform, denormalise_points, prepare_image
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.flow import euler_sample, grid_to_latents
from traj_forecast_ros.plan_runtime import PlanRuntime
from traj_forecast_ros.sampling_plan import dtype_name

log = logging.getLogger(__name__)
LatentShape = Tuple[int, int, int, int]  # (T, C, h, w) of one sample's sampler state


@dataclasses.dataclass
class PreparedRequest:
    """One request after validation: the model-size image, its transform, instruction, seed and noise."""

    model_image: np.ndarray  # [h, w, 3] uint8
    transform: ImageTransform
    instruction: Optional[str]
    seed: Optional[int]  # None: the noise was given
    noise: torch.Tensor  # [K, T or T-1, C, h, w] float32


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The settings shared by every request of one batch (validated by the caller)."""

    num_samples: int
    steps: int
    guidance_scale: float
    anchor: bool = True
    should_stop: Optional[Callable[[], bool]] = None


def rows_of(per_request: List[Optional[torch.Tensor]], rows: range, num_samples: int) -> Optional[torch.Tensor]:
    """The ``[1 or b, ...]`` per-row tensor of sample ``rows`` (request ``i`` owns rows ``i*K .. i*K+K-1``): the
    request's own ``[1, ...]`` row where the rows belong to one request (shared, as in a single forecast), else each
    row's request's row stacked ``[b, ...]``. None for a model without that input."""
    first, last = rows.start // num_samples, (rows.stop - 1) // num_samples
    if per_request[first] is None:
        return None
    if first == last:
        return per_request[first]
    parts = []
    for index in range(first, last + 1):
        count = min(rows.stop, (index + 1) * num_samples) - max(rows.start, index * num_samples)
        parts.append(per_request[index].expand(count, *per_request[index].shape[1:]))
    return torch.cat(parts)  # [b, ...]


class Sampler:
    """Draws the K futures of every request of a batch (see the module docstring)."""

    def __init__(self, config: ModelConfig, model_id: str, latent_shape: LatentShape, conditioner: Conditioner,
                 runtime: PlanRuntime):
        self._config, self._model_id = config, model_id
        self.latent_shape = latent_shape
        self._conditioner, self._runtime = conditioner, runtime
        self.fp32_fallbacks = 0

    # ------------------------------------------------------------------------------------------ noise
    def draw_noise(self, num_samples: int, seed: int) -> torch.Tensor:
        """``[K, T, C, h, w]`` standard normal from a CPU generator seeded with ``seed``.

        Frames 1..T-1 (the flow's initial state) are drawn first, in the official sampler's order and shape, then
        frame 0 (the eps of the conditioning-latent draw).
        """
        generator = torch.Generator().manual_seed(int(seed))
        frames, channels, rows, cols = self.latent_shape
        flow = torch.randn((num_samples, frames - 1, channels, rows, cols), generator=generator)
        cond_eps = torch.randn((num_samples, 1, channels, rows, cols), generator=generator)
        return torch.cat([cond_eps, flow], dim=1)

    def check_initial_noise(self, initial_noise, num_samples: int) -> torch.Tensor:
        """A caller's noise ``[K, T-1, C, h, w]`` or ``[K, T, C, h, w]`` as float32, or ValueError."""
        noise = torch.as_tensor(initial_noise)
        full = (num_samples, *self.latent_shape)
        flow_only = (num_samples, full[1] - 1, *full[2:])
        if tuple(noise.shape) not in (full, flow_only):
            raise ValueError(f"initial_noise must be {list(flow_only)} (frames 1..T-1) or {list(full)} (frame 0 = eps "
                             f"of the conditioning draw) for num_samples={num_samples}; got {list(noise.shape)}")
        if not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
            raise ValueError("initial_noise must be a finite floating-point tensor")
        return noise.float()

    def prepare(self, request: ForecastRequest, num_samples: int, max_pixels: int,
                initial_noise=None) -> PreparedRequest:
        """Validate and resize one request's image, resolve its instruction and draw (or check) its noise."""
        model_image, transform = prepare_image(request.image, tuple(self._config.image_size), request.color_order,
                                               max_pixels)
        instruction = self._conditioner.resolve_instruction(request.instruction)
        if initial_noise is not None:
            return PreparedRequest(model_image, transform, instruction, None,
                                   self.check_initial_noise(initial_noise, num_samples))
        seed = noise_seed(request.seed)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        return PreparedRequest(model_image, transform, instruction, seed, self.draw_noise(num_samples, seed))

    # ------------------------------------------------------------------------------------------ sampling
    def run(self, prepared: List[PreparedRequest], options: SamplingOptions,
            timings: Dict[str, float], started: float) -> List[Forecast]:
        """Sample every request; requests with non-finite tracks in half precision are rerun in float32."""
        results = self.sample(prepared, options, timings, started)
        failed = [index for index, result in enumerate(results) if result is None]
        if not failed:
            return results
        runtime = self._runtime
        message = (f"model '{self._model_id}' produced NaN/Inf tracks (dtype {dtype_name(runtime.compute_dtype)})"
                   f"{'' if len(prepared) == 1 else f' for requests {failed} of the batch'}")
        if runtime.dtype == torch.float32:
            raise TrajForecastError(f"{message}; even in float32: the weights may be corrupt")
        for _ in failed:
            self._count_fp32_fallback(f"{message}; rerunning in float32")
        with runtime.precision(torch.float32):
            rerun = self.sample([prepared[index] for index in failed], options, {}, time.perf_counter())
        if any(result is None for result in rerun):
            raise TrajForecastError(f"{message}; even in float32: the weights may be corrupt")
        for index, result in zip(failed, rerun):
            result.timings["fp32_rerun"] = result.timings["total"]
            result.timings["total"] = time.perf_counter() - started  # both runs: what the caller waited
            results[index] = result
        return results

    def sample(self, prepared: List[PreparedRequest], options: SamplingOptions, timings: Dict[str, float],
               started: float) -> List[Optional[Forecast]]:
        """Encode every request, sample all ``R * K`` rows in chunks of the plan's sample batch and decode them;
        one Forecast per request (None where its tracks came out non-finite)."""
        conditioner, runtime, num_samples = self._conditioner, self._runtime, options.num_samples
        with runtime.timed(timings, "image_encoder"):
            features = [conditioner.encode_image(request.model_image) for request in prepared]  # [1, N, D] each
        with runtime.timed(timings, "text_encoder"):
            texts = [conditioner.embed_instruction(request.instruction) if request.instruction is not None else None
                     for request in prepared]  # [1, E] each, or None
            null_text = (conditioner.embed_instruction(self._config.null_instruction)  # [1, E]
                         if options.guidance_scale != 1.0 else None)
        with runtime.timed(timings, "vae_encode"):
            pairs = [self._initial_state(request.noise, *conditioner.condition_posterior(feature), num_samples)
                     for request, feature in zip(prepared, features)]
            cond = torch.cat([pair[0] for pair in pairs])  # [R*K, 1, C, h, w]
            flow_noise = torch.cat([pair[1] for pair in pairs])  # [R*K, T-1, C, h, w]
        rows = cond.shape[0]
        chunk = runtime.plan.sample_batch_size or rows
        tracks_norm = []
        for first in range(0, rows, chunk):
            part = range(first, min(first + chunk, rows))
            part_features = rows_of(features, part, num_samples)  # [1 or b, N, D]
            with runtime.timed(timings, "denoise"), runtime.autocast():
                final_state = euler_sample(
                    runtime.sampling_denoiser(), cond[first:part.stop], flow_noise[first:part.stop], part_features,
                    rows_of(texts, part, num_samples), steps=options.steps, cancel=options.should_stop,
                    guidance_scale=options.guidance_scale, null_text_embeds=null_text,
                )  # [b, T, C, h, w]
            with runtime.timed(timings, "vae_decode"):
                tracks_norm.append(self.decode(final_state.float(), part_features))  # [b, T, 2, Hq, Wq]
        tracks_norm = torch.cat(tracks_norm)  # [R*K, T, 2, Hq, Wq]
        tracks_model = denormalise_points(rearrange(tracks_norm, "k t c h w -> k t h w c"),
                                          tuple(self._config.image_size)).cpu().numpy()  # [R*K, T, Hq, Wq, 2]
        timings["total"] = time.perf_counter() - started
        return [self._to_forecast(request, tracks_model[index * num_samples:(index + 1) * num_samples], options,
                                  dict(timings))
                for index, request in enumerate(prepared)]

    def _initial_state(self, noise: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                       num_samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One request's (conditioning frame ``[K, 1, C, h, w]``, flow noise ``[K, T-1, C, h, w]``)."""
        noise = noise.to(self._runtime.device)
        full_frames = noise.shape[1] == self.latent_shape[0]
        if full_frames and self._config.latent_draw == "sample":  # frame 0: the eps of the conditioning draw
            return mean + std * noise[:, :1], noise[:, 1:]
        # no conditioning eps given, or a model trained on posterior means
        return mean.expand(num_samples, -1, -1, -1, -1), noise[:, 1:] if full_frames else noise

    def decode(self, final_state: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Sampler output ``[B, T, C, h, w]`` -> normalised tracks ``[B, T, 2, Hq, Wq]``."""
        if not self._conditioner.uses_latents:
            return final_state
        latents = grid_to_latents(final_state / self._conditioner.latent_scale)  # [B, T, L, C]
        with self._runtime.autocast():
            decoded = self._runtime.vae_forward().decode(latents, features.expand(latents.shape[0], -1, -1))
        return decoded.float()  # [B, T, 2, Hq, Wq]

    def _to_forecast(self, request: PreparedRequest, tracks_model: np.ndarray, options: SamplingOptions,
                     timings: Dict[str, float]) -> Optional[Forecast]:
        """One request's ``[K, T, Hq, Wq, 2]`` model-pixel tracks -> its Forecast (None when non-finite)."""
        if not np.isfinite(tracks_model).all():
            return None
        transform = request.transform
        tracks = transform.to_input(tracks_model.astype(np.float64)).astype(np.float32)
        query_points = transform.to_input(self._conditioner.query_grid_model.astype(np.float64)).astype(np.float32)
        return Forecast(
            tracks=anchor_to_query_points(tracks, query_points) if options.anchor else tracks,
            query_points=query_points,
            image_size=tuple(int(v) for v in transform.input_size), crop_box=transform.crop_box,
            model_id=self._model_id, frame_interval=float(self._config.frame_interval_s or 0.0),
            instruction=request.instruction,
            device=str(self._runtime.device),
            dtype=dtype_name(self._runtime.compute_dtype),
            timings=timings,
            seed=request.seed,
            guidance_scale=options.guidance_scale,
        )

    def _count_fp32_fallback(self, message: str) -> None:
        """Count a float32 rerun; warn on the first one (later ones only at debug level)."""
        self.fp32_fallbacks += 1
        if self.fp32_fallbacks == 1:
            log.warning("%s. Rerunning this and any later non-finite forecast in float32 (counted as "
                        "fp32_fallbacks; warned once). Frequent fallbacks cost a second forecast each: set "
                        "dtype='float32', or 'bfloat16' where the GPU supports it.", message)
        else:
            log.debug("%s (fp32 fallback %d)", message, self.fp32_fallbacks)
