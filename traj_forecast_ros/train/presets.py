"""Model configurations for training from scratch, and how a ``--config`` argument becomes a ``ModelConfig``.

``demo-blocks`` is the small model shipped in ``models/demo-blocks``: it is sized to train on two CPU cores in well
under an hour on the synthetic block scenes (128 px images, 32 x 32 query grid with stride 4, T = 12). Its DINOv2 is a
tiny randomly initialised, frozen ``Dinov2Model`` (patch 16 -> 8 x 8 tokens) saved with the model: no pretrained
DINOv2 weights are reachable offline, so this deviates from the paper's pretrained encoder on purpose.
``tiny-blocks`` is the same family at test size (8 x 8 grid, T = 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from traj_forecast_ros.model.config import DenoiserConfig, ImageEncoderConfig, ModelConfig, VAEConfig


def _blocks_config(name: str, grid: int, frames: int, dino: Dict, vae: Dict, denoiser: Dict) -> ModelConfig:
    image = 128
    stride = image / grid
    tokens = (image // dino["patch_size"]) ** 2
    features = dino["hidden_size"]
    latent_grid = grid // vae["patch_size"]
    return ModelConfig(
        name=name,
        image_size=(image, image),
        query_grid=(grid, grid),
        query_stride=stride,
        query_offset=stride / 2 - 0.5,  # pixel centre nearest the middle of each cell (1.5 for stride 4)
        num_frames=frames,
        latent_scale=None,  # measured on the training set after VAE training
        vae=VAEConfig(input_size=grid, num_frames=frames, num_frame_tokens=tokens, frame_features_dim=features,
                      in_channels=2, **vae),
        denoiser=DenoiserConfig(input_size=latent_grid, in_channels=vae["latent_channels"], num_frames=frames,
                                num_frame_tokens=tokens, frame_features_dim=features, text_embed_dim=None,
                                latent=True, **denoiser),
        image_encoder=ImageEncoderConfig(model_id=None, config=dict(image_size=image, **dino), resize=False),
        text_encoder=None,
        frame_interval_s=0.06,
    )


def demo_blocks_config() -> ModelConfig:
    """The ``demo-blocks`` model: VAE 96-wide, depth 4 + 4 (patch 4 -> 8 x 8 latent tokens x 8 channels, beta 1e-4),
    denoiser 128-wide, depth 6, patch 2 (4 x 4 tokens per frame), tiny random DINOv2 (192-d, 2 layers, 64 tokens)."""
    return _blocks_config(
        "demo-blocks", grid=32, frames=12,
        dino=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, patch_size=16),
        vae=dict(patch_size=4, hidden_size=96, encoder_depth=4, decoder_depth=4, num_heads=2, latent_channels=8,
                 pos_embed_dim=16, beta=1e-4),
        denoiser=dict(patch_size=2, hidden_size=128, depth=6, num_heads=2),
    )


def tiny_blocks_config() -> ModelConfig:
    """Test-size member of the same family: 8 x 8 grid (stride 16), T = 4, 16 DINO tokens, 32-wide modules."""
    return _blocks_config(
        "tiny-blocks", grid=8, frames=4,
        dino=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=32),
        vae=dict(patch_size=2, hidden_size=32, encoder_depth=2, decoder_depth=2, num_heads=1, latent_channels=4,
                 pos_embed_dim=8, beta=1e-4),
        denoiser=dict(patch_size=1, hidden_size=32, depth=2, num_heads=1),
    )


PRESETS: Dict[str, Callable[[], ModelConfig]] = {
    "demo-blocks": demo_blocks_config,
    "tiny-blocks": tiny_blocks_config,
}


def resolve_config(name_or_path: str) -> ModelConfig:
    """A preset name (``demo-blocks``, ``tiny-blocks``) or a path to a ``config.yaml`` (or a model directory)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--config '{name_or_path}' is neither a preset ({sorted(PRESETS)}) nor a config file")
    return ModelConfig.load_yaml(path)
