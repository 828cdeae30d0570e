"""What a forecast is conditioned on: image tokens, instruction embeddings, and the conditioning frame's posterior.

:class:`Conditioner` runs the frozen encoders (DINOv2 patch tokens once per image, the CLIP pooled embedding once per
distinct instruction in a bounded LRU cache) and the VAE posterior of the static query grid (frame 0 of the
sampler's state; its tokens are image-free and cached per plan). No ROS imports here.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import torch

from traj_forecast_ros.geometry import query_grid, static_tracks_norm
from traj_forecast_ros.model.config import ModelConfig, check_guidance_scale
from traj_forecast_ros.model.flow import latents_to_grid
from traj_forecast_ros.plan_runtime import PlanRuntime
from traj_forecast_ros.sampling_plan import LRUCache

log = logging.getLogger(__name__)
TEXT_CACHE_SIZE = 64


class Conditioner:
    """Encoders, instruction cache and conditioning posterior of one forecaster (modules on ``runtime.device``).

    Attributes:
        static_tracks: ``[1, T, 2, Hq, Wq]`` the normalised static query grid (every frame at the query points).
        latent_scale: ``[1, 1, C, 1, 1]`` the VAE latent scale (None for raw models without a VAE).
        query_grid_model: ``[Hq, Wq, 2]`` the query points in model pixels.
        text_cache: instruction -> ``[1, E]`` embedding (``hits``, ``misses``, ``len``).
    """

    def __init__(self, config: ModelConfig, model_id: str, image_encoder: torch.nn.Module,
                 text_encoder: Optional[torch.nn.Module], vae: Optional[torch.nn.Module], runtime: PlanRuntime,
                 text_cache_size: int = TEXT_CACHE_SIZE):
        self._config, self._model_id, self._runtime = config, model_id, runtime
        self._image_encoder, self._text_encoder, self._vae = image_encoder, text_encoder, vae
        self.text_cache = LRUCache(text_cache_size)
        self._warned_default_instruction = False
        self.query_grid_model = query_grid(config)  # [Hq, Wq, 2] model pixels
        self.static_tracks = torch.from_numpy(static_tracks_norm(config)).to(runtime.device)  # [1, T, 2, Hq, Wq]
        scale = config.vae_scale if vae is not None else None
        self.latent_scale = (torch.tensor(scale, dtype=torch.float32, device=runtime.device).view(1, 1, -1, 1, 1)
                             if scale is not None else None)  # [1, 1, C, 1, 1]
        self._query_tokens: Optional[Tuple[int, torch.Tensor]] = None  # (runtime.plan_changes, [1, T, L, C])

    @property
    def uses_latents(self) -> bool:
        """True for latent models (a VAE between the sampler and the tracks), False for raw-track models."""
        return self._vae is not None

    # ------------------------------------------------------------------------------------------ arguments
    def resolve_instruction(self, instruction: Optional[str]) -> Optional[str]:
        """The instruction to condition on: None for models without language input (refusing a given one), the
        model's default instruction for None (logged once)."""
        if self._text_encoder is None:
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

    def resolve_guidance(self, scale: Optional[float]) -> float:
        """The guidance scale to use (None: the model's default); refused where the model has no null embedding."""
        scale = self._config.guidance_scale if scale is None else check_guidance_scale(scale)
        if scale != 1.0 and not self._config.supports_guidance:
            raise ValueError(f"model '{self._model_id}' was not trained with instruction dropout (no "
                             "null_instruction in its config): classifier-free guidance needs guidance_scale=1")
        return scale

    # ------------------------------------------------------------------------------------------ encoders
    def encode_image(self, model_image: np.ndarray) -> torch.Tensor:
        """``[h, w, 3]`` uint8 model-size image -> ``[1, N, D]`` float32 DINOv2 patch tokens."""
        if not model_image.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
            model_image = model_image.copy()
        pixels = torch.from_numpy(np.ascontiguousarray(model_image)).unsqueeze(0)  # [1, h, w, 3] uint8
        runtime = self._runtime
        with torch.inference_mode(), runtime.autocast(), runtime.encoder_mode():
            return self._image_encoder(pixels.to(runtime.device)).float()  # [1, N, D]

    def embed_instruction(self, instruction: str) -> torch.Tensor:
        """``[1, E]`` float32 pooled text embedding, cached per distinct instruction (computed in the plan's
        dtype; the float32 rerun of a non-finite forecast bypasses the cache)."""
        runtime = self._runtime
        use_cache = runtime.compute_dtype == runtime.dtype
        cached = self.text_cache.get(instruction) if use_cache else None
        if cached is not None:
            return cached
        with torch.inference_mode(), runtime.autocast(), runtime.encoder_mode():
            embedding = self._text_encoder([instruction]).float()  # [1, E]
        if use_cache:
            self.text_cache.put(instruction, embedding)
        return embedding

    # ------------------------------------------------------------------------------------------ posterior
    def query_tokens(self) -> torch.Tensor:
        """``[1, T, L, C]`` VAE tokens of the static query grid (image-independent; cached when the plan says so)."""
        runtime = self._runtime
        if self._query_tokens is not None and self._query_tokens[0] == runtime.plan_changes:
            return self._query_tokens[1]
        with torch.inference_mode():
            tokens = runtime.track_embedder()(self.static_tracks).float()  # [1, T, L, C], float32
        self._query_tokens = (runtime.plan_changes, tokens) if runtime.plan.cache_query_tokens else None
        return tokens

    def condition_posterior(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) ``[1, 1, C, h, w]`` of the scaled latent of the static query grid, frame 0 (latent models).

        Raw models condition on the normalised grid itself: mean = grid, std = 0.
        """
        if self._vae is None:
            grid = self.static_tracks[:, :1].float()  # [1, 1, 2, Hq, Wq]
            return grid, torch.zeros_like(grid)
        with torch.inference_mode():
            tokens = self.query_tokens()  # [1, T, L, C]
            with self._runtime.autocast():
                mean, std = self._runtime.vae_forward().encode_tokens(tokens, features)  # [1, T, L, Z] each
        grid_size = self._vae.latent_grid
        mean = latents_to_grid(mean[:, :1].float(), grid_size) * self.latent_scale  # [1, 1, C, h, w]
        std = latents_to_grid(std[:, :1].float(), grid_size) * self.latent_scale  # [1, 1, C, h, w]
        return mean, std

    def release(self) -> None:
        """Drop the modules and caches."""
        self._image_encoder = self._text_encoder = self._vae = None
        self._query_tokens = None
        self.text_cache.clear()
        self.static_tracks = self.latent_scale = None
