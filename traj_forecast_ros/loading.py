"""Getting a forecaster's modules: a registry model or model directory (checkpoints and encoders), or random weights.

:func:`load_pretrained` resolves a registry name (downloading a hub model on first use when allowed) or a model
directory; :func:`build_random` builds the architecture of a config with deterministic random weights for tests,
demos and benchmarks. Both return :class:`ModelModules`. No ROS imports here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from traj_forecast_ros import registry
from traj_forecast_ros.errors import WeightsNotFoundError
from traj_forecast_ros.model.checkpoint import build_modules, load_model_dir, randomise_zero_parameters
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder
from traj_forecast_ros.model.presets import untrained_config


@dataclass
class ModelModules:
    """What a forecaster runs: the config, the denoiser, the VAE (None: raw-track model) and the frozen encoders."""

    config: ModelConfig
    denoiser: torch.nn.Module
    vae: Optional[torch.nn.Module]
    image_encoder: torch.nn.Module
    text_encoder: Optional[torch.nn.Module]
    model_id: str  # registry name, or the config's name for a directory or random weights


def load_pretrained(name_or_dir: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None,
                    download: bool = True) -> ModelModules:
    """A registry model (downloaded on first use when ``download`` and it is a hub model) or a model directory."""
    try:
        model_dir = registry.resolve(name_or_dir, cache_dir)
    except WeightsNotFoundError:
        entry = registry.load_registry().get(str(name_or_dir))
        if not (download and entry is not None and entry.is_hub_model):
            raise
        model_dir = registry.download(str(name_or_dir), cache_dir)
    config, denoiser, vae = load_model_dir(model_dir)
    image_encoder = ImageEncoder.from_config(config.image_encoder, model_dir=model_dir)
    text_encoder = (TextEncoder.from_config(config.text_encoder, model_dir=model_dir)
                    if config.text_encoder is not None else None)
    is_name = not Path(str(name_or_dir)).expanduser().is_dir()
    return ModelModules(config, denoiser, vae, image_encoder, text_encoder,
                        str(name_or_dir) if is_name else config.name)


def build_random(config: ModelConfig, seed: int = 0) -> ModelModules:
    """Modules with random weights, deterministic in ``seed`` (torch's global RNG is left as it was).

    Encoders are built from ``config.*_encoder.config`` when their ``model_id`` is None, else loaded. Zero-init
    output layers get small random values (``randomise_zero_parameters``: outputs depend on the inputs); what
    training would measure comes from ``model.presets.untrained_config``."""
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
    return ModelModules(config, denoiser, vae, image_encoder, text_encoder, config.name)
