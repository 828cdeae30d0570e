"""The preset table: one line per model size (DiT style), the only place that states a named model's sizes.

:mod:`traj_forecast_ros.model.presets` builds a ``ModelConfig`` from a line; the dataclass defaults of
:mod:`traj_forecast_ros.model.config` are the ``libero-atm`` line (:data:`LIBERO`); ``models/registry.yaml`` names
its hub models' architectures by preset. This module is plain data (no imports from the package), so that the
config module can read it.

Families (how a line's encoders are built, in ``presets.py``):

- ``libero``: the paper's LIBERO models (official checkpoints): the hub DINOv2-L image encoder and CLIP-L/14 text
  tower named by ``hub_id``; ``libero-atm`` and ``libero-tramoe`` differ only in the latent scale of their split.
- ``blocks``: small models of the synthetic block scenes: a tiny randomly initialised, frozen DINOv2 (MLP ratio 2,
  saved with the model: no pretrained DINOv2 weights are reachable offline), no text tower, VAE KL weight 1e-4.
- ``sim``: the ``blocks`` architecture at the simulator's clip geometry plus a small word-level text encoder
  trained with the denoiser (its vocabulary is filled in from the training set).
- ``tiny``: random DINOv2 and CLIP text towers of test size (same code paths as LIBERO at a fraction of the cost).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

# Per-channel std of the VAE latents of the official LIBERO checkpoints (ModelConfig.latent_scale).
LIBERO_ATM_LATENT_SCALE = (1.213627, 2.053186, 1.9926697, 1.3819386, 2.1739495, 1.0036867, 0.41319662, 0.67743313)
LIBERO_TRAMOE_LATENT_SCALE = (1.2902071, 1.9394214, 1.9453552, 1.562121, 2.2335691, 1.0033306, 0.8569633,
                              0.73737895)

# Denoiser sizes of the official get_model(): name -> (depth, width, heads).
DENOISER_SIZES: Dict[str, Tuple[int, int, int]] = {"XS": (8, 192, 3), "S": (12, 384, 6), "B": (12, 384, 6),
                                                   "L": (16, 768, 12)}


class VAE(NamedTuple):
    """Trajectory VAE: patch side, width, depth (encoder and decoder each), heads, latent channels, Fourier
    features of the track position encoder."""

    patch: int
    width: int
    depth: int
    heads: int
    latents: int
    fourier: int


class Denoiser(NamedTuple):
    """Latent denoiser: depth, width, heads (the order of :data:`DENOISER_SIZES`), patch side."""

    depth: int
    width: int
    heads: int
    patch: int


class Encoder(NamedTuple):
    """Image encoder (DINOv2-shaped ViT) or text encoder: width, layers, heads, then the image patch side or the
    text embedding size, and the hub model it is (None: built from these sizes)."""

    width: int
    layers: int
    heads: int
    patch_or_embed: int
    hub_id: Optional[str] = None


class Preset(NamedTuple):
    """One model size. ``offset``: pixel coordinate of the first query point (None: the centre of the first grid
    cell); the query stride is ``image / grid``."""

    family: str
    image: int  # model image side (px)
    grid: int  # query grid side (points)
    frames: int  # T
    vae: VAE
    denoiser: Denoiser
    image_encoder: Encoder
    text_encoder: Optional[Encoder]  # None: no language conditioning
    latent_scale: Optional[Tuple[float, ...]] = None  # None: measured after VAE training
    offset: Optional[float] = None


DINOV2_L14 = Encoder(1024, 24, 16, 14, "facebook/dinov2-large")
CLIP_L14 = Encoder(768, 12, 12, 768, "openai/clip-vit-large-patch14")

PRESETS: Dict[str, Preset] = {
    # name: Preset(family, image, grid, T, VAE(patch, width, depth, heads, latents, fourier),
    #              Denoiser(depth, width, heads, patch), image encoder, text encoder, latent scale)
    "libero-atm": Preset("libero", 128, 64, 16, VAE(4, 384, 12, 6, 8, 128), Denoiser(*DENOISER_SIZES["B"], 1),
                         DINOV2_L14, CLIP_L14, LIBERO_ATM_LATENT_SCALE, offset=1.5),
    "libero-tramoe": Preset("libero", 128, 64, 16, VAE(4, 384, 12, 6, 8, 128), Denoiser(*DENOISER_SIZES["B"], 1),
                            DINOV2_L14, CLIP_L14, LIBERO_TRAMOE_LATENT_SCALE, offset=1.5),
    "demo-blocks": Preset("blocks", 128, 32, 12, VAE(4, 96, 4, 2, 8, 16), Denoiser(6, 128, 2, 2),
                          Encoder(192, 2, 3, 16), None),
    "tiny-blocks": Preset("blocks", 128, 8, 4, VAE(2, 32, 2, 1, 4, 8), Denoiser(2, 32, 1, 1),
                          Encoder(32, 1, 2, 32), None),
    "sim-manipulation": Preset("sim", 128, 32, 16, VAE(4, 96, 4, 2, 8, 16), Denoiser(6, 128, 2, 2),
                               Encoder(192, 4, 3, 16), Encoder(64, 1, 2, 64)),
    "tiny-sim": Preset("sim", 128, 8, 4, VAE(2, 32, 2, 1, 4, 8), Denoiser(2, 32, 1, 1),
                       Encoder(32, 1, 2, 32), Encoder(16, 1, 1, 16)),
    "tiny": Preset("tiny", 32, 8, 4, VAE(2, 64, 2, 2, 4, 16), Denoiser(2, 64, 2, 1),
                   Encoder(32, 1, 2, 8), Encoder(32, 1, 2, 32), (1.0,) * 4),
}

LIBERO = PRESETS["libero-atm"]  # the architecture of the ModelConfig dataclass defaults
