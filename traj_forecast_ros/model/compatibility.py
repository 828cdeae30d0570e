"""Whether a model's modules belong together: the check a :class:`~traj_forecast_ros.forecaster.Forecaster`
runs on the modules it is given."""

from __future__ import annotations

from typing import Optional

from torch import nn

from traj_forecast_ros.errors import CheckpointError
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.encoders import image_encoder_mismatch


def check_modules_compatible(config: ModelConfig, denoiser: nn.Module, vae: Optional[nn.Module],
                             image_encoder: nn.Module, text_encoder: Optional[nn.Module]) -> None:
    """Encoders and config must produce the shapes the denoiser and VAE were built for (else CheckpointError)."""
    mismatch = image_encoder_mismatch(image_encoder, config.image_size, denoiser.num_frame_tokens,
                                      denoiser.frame_features_dim)
    if mismatch is not None:
        raise CheckpointError(f"model '{config.name}': {mismatch}: the image encoder does not belong to this model")
    if (text_encoder is None) != (denoiser.text_embed_dim is None):
        raise CheckpointError(f"model '{config.name}': denoiser text_embed_dim={denoiser.text_embed_dim} but the "
                              f"text encoder is {'missing' if text_encoder is None else 'present'}")
    if text_encoder is not None and text_encoder.embed_dim != denoiser.text_embed_dim:
        raise CheckpointError(f"text encoder gives {text_encoder.embed_dim}-d embeddings, the denoiser expects "
                              f"{denoiser.text_embed_dim}")
    if vae is None and config.denoiser.latent:
        raise CheckpointError(f"model '{config.name}' is a latent model but has no VAE")
    if vae is not None and config.latent_scale is None:  # (from_config gives random weights a unit scale)
        raise CheckpointError(f"model '{config.name}' has a VAE but no latent_scale in its config (measured by "
                              "`traj-forecast train flow`): its latents cannot be scaled for the denoiser")
