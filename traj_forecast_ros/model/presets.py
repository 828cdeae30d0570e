"""Every named model architecture in one table: :data:`PRESETS` maps a preset name to a ``ModelConfig`` factory.

- ``libero-atm`` / ``libero-tramoe``: the paper's LIBERO models (128 px, 64 x 64 query grid, T = 16, Latte-B latent
  denoiser, DINOv2-L and CLIP-L/14 encoders); they differ only in the latent scale of their training split.
- ``demo-blocks``: the small model shipped in ``models/demo-blocks``, sized to train on two CPU cores in well under
  an hour on the synthetic block scenes (128 px, 32 x 32 grid with stride 4, T = 12). Its DINOv2 is a tiny randomly
  initialised, frozen ``Dinov2Model`` (patch 16 -> 8 x 8 tokens) saved with the model: no pretrained DINOv2 weights
  are reachable offline, so this deviates from the paper's pretrained encoder on purpose.
- ``tiny-blocks``: the same family at test size (8 x 8 grid, T = 4).
- ``tiny``: a tiny random text-conditioned model for tests (:func:`tiny_config` takes its sizes as arguments).
- ``sim-manipulation``: the model trained on the simulated LIBERO-like clips (``traj-forecast data
  sim-manipulation``; 128 px, the generator's 32 x 32 grid with stride 4, T = 16 at 0.1 s). Its small DINOv2-shaped
  ViT is pretrained on the sim frames with depth and segmentation heads (``traj-forecast train encoder``) and then
  frozen, and a small word-level text encoder (``text_encoder.kind: words``) is trained with the denoiser on the
  dataset's closed instruction set. Sized for about 4 hours of a 2-core CPU (docs/sim-manipulation.md).
- ``tiny-sim``: the same family at test size (8 x 8 grid, T = 4).

:func:`denoiser_config` builds the denoiser sizes of the official ``get_model`` ("XS", "S", "B", "L").
:func:`resolve_config` turns a ``--config`` argument (a preset name, a ``config.yaml`` or a model directory) into a
``ModelConfig``; the registry (``models/registry.yaml``) names its hub models' architectures by preset.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from traj_forecast_ros.model.config import (
    CONFIG_FILE,
    DenoiserConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextEncoderConfig,
    VAEConfig,
)

# Per-channel std of the VAE latents of the official LIBERO checkpoints (ModelConfig.latent_scale).
LIBERO_ATM_LATENT_SCALE = [1.213627, 2.053186, 1.9926697, 1.3819386, 2.1739495, 1.0036867, 0.41319662, 0.67743313]
LIBERO_TRAMOE_LATENT_SCALE = [1.2902071, 1.9394214, 1.9453552, 1.562121, 2.2335691, 1.0033306, 0.8569633, 0.73737895]
LIBERO_LATENT_SCALES: Dict[str, List[float]] = {"atm": LIBERO_ATM_LATENT_SCALE, "tramoe": LIBERO_TRAMOE_LATENT_SCALE}

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

# Denoiser sizes of the official get_model(): name -> (depth, hidden, heads)
DENOISER_SIZES: Dict[str, Tuple[int, int, int]] = {"XS": (8, 192, 3), "S": (12, 384, 6), "B": (12, 384, 6),
                                                   "L": (16, 768, 12)}


def denoiser_config(size: str, **overrides: Any) -> DenoiserConfig:
    """A ``DenoiserConfig`` of a named size ("XS", "S", "B", "L": depth / width / heads of the official
    ``get_model``), with any other field overridden by keyword."""
    if size not in DENOISER_SIZES:
        raise ValueError(f"unknown denoiser size {size!r}; choose one of {sorted(DENOISER_SIZES)}")
    depth, hidden, heads = DENOISER_SIZES[size]
    return dataclasses.replace(DenoiserConfig(depth=depth, hidden_size=hidden, num_heads=heads), **overrides)


def libero_config(split: str = "atm") -> ModelConfig:
    """The official LIBERO model (ATM or Tra-MoE split): 128 px, 64x64 grid, T=16, Latte-B latent denoiser."""
    if split not in LIBERO_LATENT_SCALES:
        raise ValueError(f"unknown LIBERO split {split!r}; choose one of {sorted(LIBERO_LATENT_SCALES)}")
    return ModelConfig(
        name=f"libero-{split}",
        latent_scale=list(LIBERO_LATENT_SCALES[split]),
        vae=VAEConfig(),
        denoiser=denoiser_config("B"),
        image_encoder=ImageEncoderConfig(),
        text_encoder=TextEncoderConfig(),
        frame_interval_s=FRAME_INTERVALS[f"libero-{split}"][0],
    )


def untrained_config(config: ModelConfig) -> ModelConfig:
    """A copy of ``config`` completed with what training would measure or build, for random weights: a unit
    latent scale when none was measured, and a words text encoder's vocabulary from the default instruction."""
    if config.vae is not None and config.latent_scale is None:
        config = dataclasses.replace(config, latent_scale=[1.0] * config.vae.latent_channels)
    text = config.text_encoder
    if text is not None and text.kind == "words" and not (text.config or {}).get("vocab"):
        from traj_forecast_ros.model.word_encoder import build_vocabulary

        vocab = build_vocabulary([config.default_instruction or ""])
        config = dataclasses.replace(config, text_encoder=dataclasses.replace(
            text, config={**(text.config or {}), "vocab": vocab}))
    return config


def libero_random_config() -> ModelConfig:
    """The LIBERO-ATM architecture with random-weight DINOv2-L and CLIP-L text encoders of the real sizes
    (benchmarks and GPU checks without the weights)."""
    from traj_forecast_ros.model.encoders import CLIP_L14_TEXT, DINOV2_LARGE

    config = libero_config("atm")
    config.name = "libero-atm (random weights)"
    config.image_encoder = ImageEncoderConfig(model_id=None, config=dict(DINOV2_LARGE))
    config.text_encoder = TextEncoderConfig(model_id=None, config=dict(CLIP_L14_TEXT))
    return config


def tiny_config(text: bool = True, image_size: int = 32, grid: int = 8, num_frames: int = 4,
                width: int = 64) -> ModelConfig:
    """A tiny random model for tests: same code paths as LIBERO at a fraction of the cost."""
    patch = 2
    dino_patch = 8
    tokens = (image_size // dino_patch) ** 2
    dino_dim = 32
    return ModelConfig(
        name="tiny",
        image_size=(image_size, image_size),
        query_grid=(grid, grid),
        query_stride=image_size / grid,
        query_offset=image_size / grid / 2 - 0.5,
        num_frames=num_frames,
        latent_scale=[1.0] * 4,
        vae=VAEConfig(
            input_size=grid, patch_size=patch, hidden_size=width, encoder_depth=2, decoder_depth=2, num_heads=2,
            latent_channels=4, num_frames=num_frames, num_frame_tokens=tokens, frame_features_dim=dino_dim,
            pos_embed_dim=16,
        ),
        denoiser=DenoiserConfig(
            input_size=grid // patch, patch_size=1, in_channels=4, hidden_size=width, depth=2, num_heads=2,
            num_frames=num_frames, num_frame_tokens=tokens, frame_features_dim=dino_dim,
            text_embed_dim=32 if text else None,
        ),
        image_encoder=ImageEncoderConfig(
            model_id=None,
            config=dict(hidden_size=dino_dim, num_hidden_layers=1, num_attention_heads=2, patch_size=dino_patch,
                        image_size=image_size),
        ),
        text_encoder=TextEncoderConfig(
            model_id=None,
            config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, projection_dim=32, max_position_embeddings=77),
        ) if text else None,
        frame_interval_s=FRAME_INTERVALS["tiny"][0],
    )


@dataclass(frozen=True)
class BlocksSizes:
    """Sizes of a synthetic-blocks model: query grid side, T, and its tiny DINOv2, VAE and denoiser."""

    grid: int
    frames: int
    dino_width: int
    dino_layers: int
    dino_heads: int
    dino_patch: int
    vae_patch: int
    vae_width: int
    vae_depth: int  # encoder and decoder each
    vae_heads: int
    latent_channels: int
    pos_embed_dim: int
    denoiser_patch: int
    denoiser_width: int
    denoiser_depth: int
    denoiser_heads: int


BLOCKS_SIZES: Dict[str, BlocksSizes] = {
    # 8 x 8 latent tokens x 8 channels, 4 x 4 denoiser tokens per frame, 64 DINO tokens.
    "demo-blocks": BlocksSizes(grid=32, frames=12, dino_width=192, dino_layers=2, dino_heads=3, dino_patch=16,
                               vae_patch=4, vae_width=96, vae_depth=4, vae_heads=2, latent_channels=8,
                               pos_embed_dim=16, denoiser_patch=2, denoiser_width=128, denoiser_depth=6,
                               denoiser_heads=2),
    # Test size: 8 x 8 grid (stride 16), T = 4, 16 DINO tokens, 32-wide modules.
    "tiny-blocks": BlocksSizes(grid=8, frames=4, dino_width=32, dino_layers=1, dino_heads=2, dino_patch=32, vae_patch=2,
                               vae_width=32, vae_depth=2, vae_heads=1, latent_channels=4, pos_embed_dim=8,
                               denoiser_patch=1, denoiser_width=32, denoiser_depth=2, denoiser_heads=1),
}


def blocks_config(name: str) -> ModelConfig:
    """A model of the synthetic-blocks family (:data:`BLOCKS_SIZES`): 128 px images, no text tower, a tiny random
    frozen DINOv2 (MLP ratio 2), VAE KL weight 1e-4."""
    return blocks_config_from(name, BLOCKS_SIZES[name])


def blocks_config_from(name: str, sizes: BlocksSizes) -> ModelConfig:
    """:func:`blocks_config` for explicit sizes."""
    image, grid, frames = 128, sizes.grid, sizes.frames
    stride = image / grid
    tokens = (image // sizes.dino_patch) ** 2
    features = sizes.dino_width
    return ModelConfig(
        name=name,
        image_size=(image, image),
        query_grid=(grid, grid),
        query_stride=stride,
        query_offset=stride / 2 - 0.5,  # pixel centre nearest the middle of each cell (1.5 for stride 4)
        num_frames=frames,
        latent_scale=None,  # measured on the training set after VAE training
        vae=VAEConfig(input_size=grid, patch_size=sizes.vae_patch, hidden_size=sizes.vae_width,
                      encoder_depth=sizes.vae_depth, decoder_depth=sizes.vae_depth, num_heads=sizes.vae_heads,
                      in_channels=2, latent_channels=sizes.latent_channels, num_frames=frames,
                      num_frame_tokens=tokens, frame_features_dim=features, pos_embed_dim=sizes.pos_embed_dim,
                      beta=1e-4),
        denoiser=DenoiserConfig(input_size=grid // sizes.vae_patch, patch_size=sizes.denoiser_patch,
                                in_channels=sizes.latent_channels, hidden_size=sizes.denoiser_width,
                                depth=sizes.denoiser_depth, num_heads=sizes.denoiser_heads, num_frames=frames,
                                num_frame_tokens=tokens, frame_features_dim=features, text_embed_dim=None,
                                latent=True),
        image_encoder=ImageEncoderConfig(model_id=None, resize=False, config=dict(
            image_size=image, hidden_size=features, num_hidden_layers=sizes.dino_layers,
            num_attention_heads=sizes.dino_heads, mlp_ratio=2, patch_size=sizes.dino_patch)),
        text_encoder=None,
        frame_interval_s=FRAME_INTERVALS["demo-blocks"][0],  # the synthetic generator's, for the whole family
    )


@dataclass(frozen=True)
class SimSizes:
    """What a sim-manipulation model adds to its :class:`BlocksSizes`: clip geometry and the words text encoder."""

    blocks: BlocksSizes
    frame_interval_s: float
    text_embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int


SIM_SIZES: Dict[str, SimSizes] = {
    # 64 encoder tokens (patch 16) of width 192 from a 4-layer ViT; VAE 8 x 8 latent tokens x 8 channels per frame;
    # denoiser 4 x 4 tokens per frame over 16 frames, width 128, depth 6. Timings: docs/sim-manipulation.md.
    "sim-manipulation": SimSizes(
        blocks=BlocksSizes(grid=32, frames=16, dino_width=192, dino_layers=4, dino_heads=3, dino_patch=16,
                           vae_patch=4, vae_width=96, vae_depth=4, vae_heads=2, latent_channels=8, pos_embed_dim=16,
                           denoiser_patch=2, denoiser_width=128, denoiser_depth=6, denoiser_heads=2),
        frame_interval_s=0.1, text_embed_dim=64, text_width=64, text_layers=1, text_heads=2),
    "tiny-sim": SimSizes(blocks=BLOCKS_SIZES["tiny-blocks"], frame_interval_s=0.1, text_embed_dim=16, text_width=16,
                         text_layers=1, text_heads=1),
}


def sim_config(name: str) -> ModelConfig:
    """A model of the sim-manipulation family (:data:`SIM_SIZES`): the blocks architecture at the simulator's clip
    geometry, conditioned on the instruction through a words text encoder whose vocabulary the flow stage fills in
    from the training set (``text_encoder.config.vocab``)."""
    sizes = SIM_SIZES[name]
    config = blocks_config_from(name, sizes.blocks)
    config.frame_interval_s = sizes.frame_interval_s
    config.denoiser.text_embed_dim = sizes.text_embed_dim
    config.text_encoder = TextEncoderConfig(model_id=None, kind="words", config=dict(
        embed_dim=sizes.text_embed_dim, width=sizes.text_width, layers=sizes.text_layers, heads=sizes.text_heads,
        max_words=24))
    return config


def demo_blocks_config() -> ModelConfig:
    """The ``demo-blocks`` model shipped in ``models/demo-blocks``."""
    return blocks_config("demo-blocks")


def tiny_blocks_config() -> ModelConfig:
    """The test-size member of the blocks family."""
    return blocks_config("tiny-blocks")


PRESETS: Dict[str, Callable[[], ModelConfig]] = {
    "libero-atm": functools.partial(libero_config, "atm"),
    "libero-tramoe": functools.partial(libero_config, "tramoe"),
    "demo-blocks": demo_blocks_config,
    "tiny-blocks": tiny_blocks_config,
    "tiny": tiny_config,
    "sim-manipulation": functools.partial(sim_config, "sim-manipulation"),
    "tiny-sim": functools.partial(sim_config, "tiny-sim"),
}


def preset_config(name: str) -> ModelConfig:
    """A fresh ``ModelConfig`` of the preset ``name`` (``ValueError`` listing the presets otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}' (presets: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]()


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
