"""The deterministic baseline: one forward pass from the image to the tracks, trained with MSE (spec 8: the paper's
regression comparison).

:class:`TrackRegressor` is the raw (``latent=False``) Latte backbone of the same width, depth and DINOv2
conditioning as the model's denoiser, with as many tokens per frame (its patch covers the query-grid cells of one
denoiser token). Its input is the motionless query grid at flow time 1; it outputs a displacement per point and
frame (frame 0 is held at the grid), so an untrained regressor predicts zero motion. Under MSE it learns the
conditional mean of the future: one blurred average where the future is uncertain.

Run directory: ``regressor.safetensors``, ``regressor.yaml`` (model config + backbone config), ``image_encoder/``,
``checkpoints/``, ``metrics.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from traj_forecast_ros.errors import CheckpointError
from traj_forecast_ros.model.checkpoint import IMAGE_ENCODER_DIR, load_state_dict_into, read_safetensors, save_tensors
from traj_forecast_ros.model.config import DenoiserConfig, ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.train.common import TrainSettings, distributed
from traj_forecast_ros.geometry import static_tracks_norm
from traj_forecast_ros.train.data import build_image_encoder, prepare_examples
from traj_forecast_ros.train.trainer import Trainer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "regressor.safetensors"
CONFIG_FILE = "regressor.yaml"  # the regressor's own description (not a model directory's config.yaml)
PathLike = Union[str, Path]


def regressor_backbone_config(config: ModelConfig, pos_embed_dim: int = 16) -> DenoiserConfig:
    """Raw Latte config with the denoiser's width/depth/heads and the same number of tokens per frame."""
    den = config.denoiser
    rows, cols = config.query_grid
    latent_rows = den.input_size if isinstance(den.input_size, int) else den.input_size[0]
    tokens_per_side = max(1, latent_rows // den.patch_size)
    patch = max(1, rows // tokens_per_side)
    if rows % patch or cols % patch:
        raise ValueError(f"query grid {config.query_grid} is not divisible into {tokens_per_side} tokens per side")
    return DenoiserConfig(
        input_size=tuple(config.query_grid), patch_size=patch, in_channels=2, hidden_size=den.hidden_size,
        depth=den.depth, num_heads=den.num_heads, num_frames=config.num_frames,
        num_frame_tokens=den.num_frame_tokens, frame_features_dim=den.frame_features_dim, text_embed_dim=None,
        mlp_ratio=den.mlp_ratio, latent=False, pos_embed_dim=pos_embed_dim,
    )


class TrackRegressor(nn.Module):
    """Image features ``[B, N, D]`` -> normalised tracks ``[B, T, 2, Hq, Wq]`` in one pass."""

    def __init__(self, config: ModelConfig, backbone: Optional[DenoiserConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.backbone_config = backbone or regressor_backbone_config(config)
        self.net = LatteDenoiser(self.backbone_config)
        static = torch.from_numpy(static_tracks_norm(config, 1))  # [1, T, 2, Hq, Wq]
        self.register_buffer("static", static, persistent=False)
        mask = torch.ones(1, config.num_frames, 1, 1, 1)
        mask[:, 0] = 0.0
        self.register_buffer("frame_mask", mask, persistent=False)  # 0 on frame 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, N, D] -> tracks_norm [B, T, 2, Hq, Wq] (frame 0 = the query grid)."""
        batch = features.shape[0]
        grid = self.static.expand(batch, -1, -1, -1, -1)  # (B, T, 2, Hq, Wq)
        t = torch.ones(batch, device=features.device, dtype=grid.dtype)  # (B,) "data" end of the flow
        displacement = self.net(grid, t, features)  # (B, T, 2, Hq, Wq)
        return grid + displacement * self.frame_mask  # (B, T, 2, Hq, Wq)


class RegressorObjective(nn.Module):
    """``forward(tracks_norm, features, generator) -> dict(loss = MSE, rmse_px)``."""

    def __init__(self, regressor: TrackRegressor) -> None:
        super().__init__()
        self.regressor = regressor
        self.half_size = float(max(regressor.config.image_size)) / 2.0

    def forward(self, tracks_norm: torch.Tensor, features: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        prediction = self.regressor(features)  # (B, T, 2, Hq, Wq)
        loss = F.mse_loss(prediction.float(), tracks_norm.float())
        return {"loss": loss, "rmse_px": torch.sqrt(loss.detach()) * self.half_size}


def save_regressor(out_dir: PathLike, regressor: TrackRegressor, image_encoder=None) -> Path:
    """Write weights (atomically), config and, when given, the encoder into ``out_dir`` (:func:`train_regressor`
    saves the frozen encoder before training and passes none here)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(regressor.net, out_dir / WEIGHTS_FILE)
    description = {"model": regressor.config.to_dict(), "backbone": dataclasses.asdict(regressor.backbone_config)}
    if isinstance(description["backbone"]["input_size"], tuple):
        description["backbone"]["input_size"] = list(description["backbone"]["input_size"])
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(description, sort_keys=False))
    if image_encoder is not None:
        image_encoder.save_pretrained(out_dir / IMAGE_ENCODER_DIR)
    return out_dir


def load_regressor(directory: PathLike) -> Tuple[TrackRegressor, object]:
    """``(regressor, image_encoder)`` from a directory written by :func:`save_regressor` (eval mode, CPU)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{directory}: not a regressor directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    description = yaml.safe_load(config_path.read_text())
    config = ModelConfig.from_dict(description["model"])
    backbone = dict(description["backbone"])
    if isinstance(backbone.get("input_size"), list):
        backbone["input_size"] = tuple(backbone["input_size"])
    regressor = TrackRegressor(config, DenoiserConfig(**backbone))
    load_state_dict_into(regressor.net, read_safetensors(weights_path), weights_path, "denoiser")
    encoder = build_image_encoder(config, model_dir=directory)
    return regressor.eval(), encoder


def train_regressor(data_dir: PathLike, out_dir: PathLike, config: ModelConfig, settings: TrainSettings,
                    encoder_dir: Optional[PathLike] = None, init: Optional[PathLike] = None,
                    resume: bool = False) -> Dict[str, float]:
    """Train the regressor baseline; ``encoder_dir`` (e.g. the VAE run) supplies the same frozen image encoder."""
    out_dir = Path(out_dir)
    with distributed(settings.device) as info:
        # the encoder (from out_dir on resume, else encoder_dir's) is saved into out_dir before training
        _, examples = prepare_examples(data_dir, config, out_dir, info, settings, encoder_dir=encoder_dir,
                                       resume=resume)
        torch.manual_seed(settings.seed)
        regressor = TrackRegressor(config)
        if init is not None:
            initial, _ = load_regressor(init)
            regressor.net.load_state_dict(initial.net.state_dict())

        trainer = Trainer(RegressorObjective(regressor), regressor.net, examples.batch, len(examples), settings,
                          out_dir, info, stage="regressor")
        last = trainer.fit(resume=resume)
        regressor.net.load_state_dict(trainer.averaged_model_state())
        if info.is_main:
            save_regressor(out_dir, regressor.cpu())
        return last
