"""Named model architectures: :func:`preset_config` builds a ``ModelConfig`` from a line of the one preset table,
:data:`traj_forecast_ros.model.sizes.PRESETS` (one line per model size: ``libero-atm``, ``libero-tramoe``,
``demo-blocks``, ``tiny-blocks``, ``sim-manipulation``, ``tiny-sim``, ``tiny``; see that module for the families).

:func:`denoiser_config` builds the denoiser sizes of the official ``get_model`` ("XS", "S", "B", "L").
:func:`resolve_config` turns a ``--config`` argument (a preset name, a ``config.yaml`` or a model directory) into a
``ModelConfig``; the registry (``models/registry.yaml``) names its hub models' architectures by preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from traj_forecast_ros.model.config import (
    CONFIG_FILE,
    DenoiserConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextEncoderConfig,
    VAEConfig,
)
from traj_forecast_ros.model.encoders import CLIP_L14_TEXT, DINOV2_LARGE
from traj_forecast_ros.model.sizes import (
    DENOISER_SIZES,
    LIBERO_ATM_LATENT_SCALE,
    LIBERO_TRAMOE_LATENT_SCALE,
    PRESETS,
    Encoder,
    Preset,
)
from traj_forecast_ros.model.word_encoder import build_vocabulary

__all__ = ["DENOISER_SIZES", "FRAME_INTERVALS", "LIBERO_ATM_LATENT_SCALE", "LIBERO_TRAMOE_LATENT_SCALE", "PRESETS",
           "denoiser_config", "libero_config", "libero_random_config", "preset_config", "resolve_config",
           "tiny_blocks_config", "tiny_config", "untrained_config"]

LIBERO_SPLITS = ("atm", "tramoe")
BLOCKS_VAE_BETA = 1e-4  # KL weight of the small families (blocks, sim)
WORDS_MAX = 24  # words per instruction of the sim family's word encoder

# Seconds between forecast frames (ModelConfig.frame_interval_s) of every preset, with where the value comes from;
# None = unknown, with the reason. The node writes it into TrajectoryForecast.frame_interval (0 = unknown).
LIBERO_FRAME_INTERVAL_UNKNOWN = (
    "unknown: LIBERO's demonstrations are recorded once per control step at 20 Hz (robosuite's control_freq) and "
    "ATM's preprocessing (scripts/preprocess_libero.py of Large-Trajectory-Model/ATM) tracks every recorded frame, "
    "but neither the paper nor the official checkpoints state the frame stride of the 16-frame training clips, so "
    "the interval is 0.05 s times an unknown stride; set the node's frame_interval parameter if you know it")
FRAME_INTERVALS: Dict[str, Tuple[Optional[float], str]] = {
    "libero-atm": (None, LIBERO_FRAME_INTERVAL_UNKNOWN),
    "libero-tramoe": (None, LIBERO_FRAME_INTERVAL_UNKNOWN),
    "demo-blocks": (0.06, "the synthetic generator's simulated seconds between frames (data/scenes.py, "
                          "SceneConfig.frame_interval_s)"),
    "tiny-blocks": (0.06, "the synthetic generator's, as demo-blocks"),
    "tiny": (None, "unknown: a random-weight test model trained on no data"),
    "sim-manipulation": (0.1, "the simulated clips: frame_stride / control_freq (data/sim_manipulation.py, "
                              "SimConfig.frame_interval_s)"),
    "tiny-sim": (0.1, "the simulated clips', as sim-manipulation"),
}



def denoiser_config(size: str, **overrides: Any) -> DenoiserConfig:
    """A ``DenoiserConfig`` of a named size ("XS", "S", "B", "L": depth / width / heads of the official
    ``get_model``), with any other field overridden by keyword."""
    if size not in DENOISER_SIZES:
        raise ValueError(f"unknown denoiser size {size!r}; choose one of {sorted(DENOISER_SIZES)}")
    depth, hidden, heads = DENOISER_SIZES[size]
    return dataclasses.replace(DenoiserConfig(depth=depth, hidden_size=hidden, num_heads=heads), **overrides)


def preset_config(name: str) -> ModelConfig:
    """A fresh ``ModelConfig`` of the preset ``name`` (``ValueError`` listing the presets otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}' (presets: {', '.join(sorted(PRESETS))})")
    return config_of(name, PRESETS[name])


def config_of(name: str, preset: Preset, text: bool = True) -> ModelConfig:
    """The ``ModelConfig`` of a table line (``text=False``: without its text encoder)."""
    stride = preset.image / preset.grid
    tokens = (preset.image // preset.image_encoder.patch_or_embed) ** 2
    features = preset.image_encoder.width
    text_encoder = preset.text_encoder if text else None
    vae, denoiser = preset.vae, preset.denoiser
    small = preset.family in ("blocks", "sim")
    return ModelConfig(
        name=name,
        image_size=(preset.image, preset.image),
        query_grid=(preset.grid, preset.grid),
        query_stride=stride,
        query_offset=stride / 2 - 0.5 if preset.offset is None else preset.offset,  # default: the cell centre
        num_frames=preset.frames,
        latent_scale=None if preset.latent_scale is None else list(preset.latent_scale),
        vae=VAEConfig(input_size=preset.grid, patch_size=vae.patch, hidden_size=vae.width, encoder_depth=vae.depth,
                      decoder_depth=vae.depth, num_heads=vae.heads, in_channels=2, latent_channels=vae.latents,
                      num_frames=preset.frames, num_frame_tokens=tokens, frame_features_dim=features,
                      pos_embed_dim=vae.fourier, beta=BLOCKS_VAE_BETA if small else VAEConfig.beta),
        denoiser=DenoiserConfig(input_size=preset.grid // vae.patch, patch_size=denoiser.patch,
                                in_channels=vae.latents, hidden_size=denoiser.width, depth=denoiser.depth,
                                num_heads=denoiser.heads, num_frames=preset.frames, num_frame_tokens=tokens,
                                frame_features_dim=features,
                                text_embed_dim=None if text_encoder is None else text_encoder.patch_or_embed),
        image_encoder=_image_encoder(preset),
        text_encoder=None if text_encoder is None else _text_encoder(preset.family, text_encoder),
        frame_interval_s=FRAME_INTERVALS[name][0] if name in FRAME_INTERVALS else None,
    )


def _image_encoder(preset: Preset) -> ImageEncoderConfig:
    """The hub encoder (libero), or a random DINOv2 of the line's sizes (blocks, sim: MLP ratio 2)."""
    encoder = preset.image_encoder
    if encoder.hub_id is not None:
        return ImageEncoderConfig(model_id=encoder.hub_id)
    config = dict(image_size=preset.image, hidden_size=encoder.width, num_hidden_layers=encoder.layers,
                  num_attention_heads=encoder.heads, patch_size=encoder.patch_or_embed)
    if preset.family != "tiny":
        config["mlp_ratio"] = 2
    return ImageEncoderConfig(model_id=None, resize=False, config=config)


def _text_encoder(family: str, encoder: Encoder) -> TextEncoderConfig:
    """The hub CLIP tower (libero), a words encoder (sim) or a random CLIP text tower (tiny: MLP ratio 2)."""
    if encoder.hub_id is not None:
        return TextEncoderConfig(model_id=encoder.hub_id)
    if family == "sim":
        return TextEncoderConfig(model_id=None, kind="words", config=dict(
            embed_dim=encoder.patch_or_embed, width=encoder.width, layers=encoder.layers, heads=encoder.heads,
            max_words=WORDS_MAX))
    return TextEncoderConfig(model_id=None, config=dict(
        vocab_size=CLIP_L14_TEXT["vocab_size"], hidden_size=encoder.width, intermediate_size=2 * encoder.width,
        num_hidden_layers=encoder.layers, num_attention_heads=encoder.heads, projection_dim=encoder.patch_or_embed,
        max_position_embeddings=CLIP_L14_TEXT["max_position_embeddings"]))


def libero_config(split: str = "atm") -> ModelConfig:
    """The official LIBERO model (ATM or Tra-MoE split): 128 px, 64x64 grid, T=16, Latte-B latent denoiser."""
    if split not in LIBERO_SPLITS:
        raise ValueError(f"unknown LIBERO split {split!r}; choose one of {sorted(LIBERO_SPLITS)}")
    return preset_config(f"libero-{split}")


def libero_random_config() -> ModelConfig:
    """The LIBERO-ATM architecture with random-weight DINOv2-L and CLIP-L text encoders of the real sizes
    (benchmarks and GPU checks without the weights)."""
    config = libero_config("atm")
    config.name = "libero-atm (random weights)"
    config.image_encoder = ImageEncoderConfig(model_id=None, config=dict(DINOV2_LARGE))
    config.text_encoder = TextEncoderConfig(model_id=None, config=dict(CLIP_L14_TEXT))
    return config


def tiny_blocks_config() -> ModelConfig:
    """``preset_config("tiny-blocks")`` (the training tests' model)."""
    return preset_config("tiny-blocks")


def tiny_config(text: bool = True, image_size: Optional[int] = None, grid: Optional[int] = None,
                num_frames: Optional[int] = None, width: Optional[int] = None) -> ModelConfig:
    """The ``tiny`` preset (a random model for tests: same code paths as LIBERO at a fraction of the cost), with
    its sizes optionally changed: image side, query grid side, T and module width (``text=False``: no text)."""
    preset = PRESETS["tiny"]
    changes: Dict[str, Any] = {key: value for key, value in (("image", image_size), ("grid", grid),
                                                             ("frames", num_frames)) if value is not None}
    if width is not None:
        changes.update(vae=preset.vae._replace(width=width), denoiser=preset.denoiser._replace(width=width))
    return config_of("tiny", preset._replace(**changes), text=text)


def untrained_config(config: ModelConfig) -> ModelConfig:
    """A copy of ``config`` completed with what training would measure or build, for random weights: a unit
    latent scale when none was measured, and a words text encoder's vocabulary from the default instruction."""
    if config.vae is not None and config.latent_scale is None:
        config = dataclasses.replace(config, latent_scale=[1.0] * config.vae.latent_channels)
    text = config.text_encoder
    if text is not None and text.kind == "words" and not (text.config or {}).get("vocab"):
        vocab = build_vocabulary([config.default_instruction or ""])
        config = dataclasses.replace(config, text_encoder=dataclasses.replace(
            text, config={**(text.config or {}), "vocab": vocab}))
    return config


def resolve_config(name_or_path: Union[str, Path]) -> ModelConfig:
    """A preset name (see :data:`PRESETS`), a ``config.yaml`` or a model directory holding one."""
    if str(name_or_path) in PRESETS:
        return preset_config(str(name_or_path))
    path = Path(name_or_path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"--config '{name_or_path}' is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                         "config file")
    return ModelConfig.load_yaml(path)
