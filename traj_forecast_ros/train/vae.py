"""Stage 1: train the trajectory VAE (beta-VAE, Huber reconstruction; spec section 3.5) and measure the latent scale.

The run directory ends up holding ``config.yaml`` (the full model config with ``latent_scale`` = per-channel std of
the VAE latents on the training set), ``vae.safetensors`` (EMA weights when EMA is on), ``image_encoder/`` (the
frozen encoder the features came from), ``checkpoints/last.pt`` and ``metrics.csv``. Stage 2 (:mod:`.flow`) reads it
with ``--vae``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from traj_forecast_ros.errors import CheckpointError
from traj_forecast_ros.metrics import MOVING_THRESHOLD_PX
from traj_forecast_ros.model.checkpoint import (
    CONFIG_FILE,
    IMAGE_ENCODER_DIR,
    VAE_FILE,
    load_model_config,
    load_state_dict_into,
    read_safetensors,
    read_torch_checkpoint,
    save_tensors,
)
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.encoders import image_encoder_mismatch
from traj_forecast_ros.model.vae import TrajectoryVAE
from traj_forecast_ros.train.common import TrainSettings, distributed
from traj_forecast_ros.train.data import TrackExamples, build_image_encoder, prepare_examples
from traj_forecast_ros.train.trainer import Trainer

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


class VAEObjective(nn.Module):
    """``forward(tracks_norm, features, generator) -> dict(loss, recon, kl, mse, recon_rmse_px)`` of a TrajectoryVAE.

    ``recon_delta``, ``latent_noise`` [C], ``moving_weight`` and ``noise_still_tokens_only`` go to
    :meth:`TrajectoryVAE.loss`; a point counts as moving past :data:`~traj_forecast_ros.metrics.MOVING_THRESHOLD_PX`,
    the evaluation's threshold.
    """

    def __init__(self, vae: TrajectoryVAE, beta: float, image_size, recon_delta: float = 1.0,
                 latent_noise: Optional[torch.Tensor] = None, moving_weight: float = 0.0,
                 noise_still_tokens_only: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.beta = float(beta)
        self.half_size = float(max(image_size)) / 2.0
        self.recon_delta = float(recon_delta)
        self.moving_weight = float(moving_weight)
        self.noise_still_tokens_only = bool(noise_still_tokens_only)
        self.moving_threshold = MOVING_THRESHOLD_PX / self.half_size  # normalised units
        self.register_buffer("latent_noise", latent_noise, persistent=False)

    def forward(self, tracks_norm: torch.Tensor, features: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """tracks_norm [B, T, 2, Hq, Wq], features [B, N, D]."""
        losses = self.vae.loss(tracks_norm, features, beta=self.beta, generator=generator,
                               recon_delta=self.recon_delta, latent_noise=self.latent_noise,
                               moving_weight=self.moving_weight, moving_threshold=self.moving_threshold,
                               noise_still_tokens_only=self.noise_still_tokens_only)
        losses["recon_rmse_px"] = torch.sqrt(losses["mse"].float()) * self.half_size
        return losses


def load_vae_weights(vae: TrajectoryVAE, source: PathLike) -> None:
    """Load VAE weights from a model/run directory (``vae.safetensors``), a ``.safetensors`` or an official ``.pth``."""
    path = Path(source)
    if path.is_dir():
        path = path / VAE_FILE
    if not path.is_file():
        raise CheckpointError(f"no VAE weights at {path}")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = read_torch_checkpoint(path)
    load_state_dict_into(vae, state, path, "trajectory VAE")


@torch.no_grad()
def measure_latent_scale(vae: TrajectoryVAE, examples: TrackExamples, max_examples: int = 512, batch: int = 16,
                         device: torch.device = torch.device("cpu"), seed: int = 0) -> List[float]:
    """Per-channel std of posterior samples ``mean + std * eps`` over up to ``max_examples`` training examples."""
    vae = vae.to(device).eval()
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(examples))[:max_examples])
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros(vae.latent_channels, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for start in range(0, len(chosen), batch):
        part = chosen[start:start + batch]
        mean, std = vae.encode(examples.tracks_norm(part).to(device), examples.features(part).to(device))
        z = TrajectoryVAE.sample_posterior(mean, std, generator).double().cpu()  # [b, T, L, C]
        flat = z.reshape(-1, z.shape[-1])
        total += flat.sum(0)
        total_sq += (flat**2).sum(0)
        count += flat.shape[0]
    variance = total_sq / count - (total / count) ** 2
    return [float(math.sqrt(max(v, 1e-12))) for v in variance.tolist()]


def write_vae_dir(out_dir: PathLike, config: ModelConfig, vae: TrajectoryVAE, image_encoder=None) -> Path:
    """Write ``config.yaml``, ``vae.safetensors`` (atomically) and, when given, ``image_encoder/`` into ``out_dir``
    (:func:`train_vae` saves the frozen encoder before training and passes none here)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_yaml(out_dir / CONFIG_FILE)
    save_tensors(vae, out_dir / VAE_FILE)
    if image_encoder is not None:
        image_encoder.save_pretrained(out_dir / IMAGE_ENCODER_DIR)
    return out_dir


def train_vae(data_dir: PathLike, out_dir: PathLike, config: ModelConfig, settings: TrainSettings,
              init: Optional[PathLike] = None, resume: bool = False, beta: Optional[float] = None,
              scale_examples: int = 512, encoder_dir: Optional[PathLike] = None, decoder_only: bool = False,
              recon_delta: float = 1.0, latent_noise: float = 0.0, moving_weight: float = 0.0,
              noise_still_tokens_only: bool = False) -> Dict[str, float]:
    """Train the VAE of ``config`` on a dataset and write the stage-1 run directory; returns the last logged values.

    ``init``: fine-tune from a model/run directory or a VAE checkpoint file (its image encoder is reused when the
    directory ships one). ``resume``: continue ``out_dir``'s own checkpoint (same encoder, same features).
    ``encoder_dir``: a directory whose ``image_encoder/`` to freeze and use (e.g. a ``train encoder`` run; it takes
    precedence over ``init``'s); without it and ``init`` the encoder is the config's (random unless it names weights).

    ``decoder_only``: fine-tune only the decoder of ``init`` (:meth:`TrajectoryVAE.freeze_all_but_decoder`); the
    posteriors, hence the latent scale and any flow trained on them, stay exactly as they were. ``recon_delta``: the
    Huber delta of the reconstruction (normalised units; 1 is the official recipe). ``latent_noise``: extra noise
    added to the posterior draws before decoding, in units of each latent channel's scale (decoder-only runs);
    ``noise_still_tokens_only``: only on the latent tokens whose patch holds no moving point.
    ``moving_weight``: extra weight of the reconstruction of points whose true track moves (:class:`VAEObjective`).
    """
    if config.vae is None:
        raise ValueError(f"model '{config.name}' has no VAE (raw model): nothing to train in stage 1")
    if decoder_only and init is None:
        raise ValueError("a decoder-only fine-tune needs --init (the VAE whose latent space to keep)")
    if latent_noise and not decoder_only:
        raise ValueError("latent noise is for decoder-only fine-tunes (it would also shape the encoder's latents)")
    if noise_still_tokens_only and not latent_noise:
        raise ValueError("noise on still tokens only needs latent noise (--latent-noise > 0)")
    if recon_delta <= 0 or latent_noise < 0 or moving_weight < 0:
        raise ValueError(f"need recon_delta > 0, latent_noise >= 0 and moving_weight >= 0, got {recon_delta}, "
                         f"{latent_noise} and {moving_weight}")
    out_dir = Path(out_dir)
    with distributed(settings.device) as info:
        # the encoder (from out_dir on resume, else init's) is saved into out_dir before training
        encoder, examples = prepare_examples(data_dir, config, out_dir, info, settings,
                                             encoder_dir=encoder_dir if encoder_dir is not None else init,
                                             resume=resume)
        check_encoder_fits(encoder, config)

        torch.manual_seed(settings.seed)
        vae = TrajectoryVAE(config.vae)
        if init is not None:
            load_vae_weights(vae, init)
        noise_std = None
        scale: Optional[List[float]] = None  # a decoder-only run cannot change it: measured once, before training
        if decoder_only:
            vae.freeze_all_but_decoder()
            scale = measure_latent_scale(vae, examples, scale_examples, device=info.device, seed=settings.seed)
            if latent_noise:
                noise_std = latent_noise * torch.tensor(scale, dtype=torch.float32)
        beta = config.vae.beta if beta is None else beta
        objective = VAEObjective(vae, beta, config.image_size, recon_delta, noise_std, moving_weight,
                                 noise_still_tokens_only)

        trainer = Trainer(objective, vae, examples.batch, len(examples), settings, out_dir, info, stage="vae")
        last = trainer.fit(resume=resume)

        vae.load_state_dict(trainer.averaged_model_state())
        if info.is_main:
            if scale is None:
                scale = measure_latent_scale(vae, examples, scale_examples, device=info.device, seed=settings.seed)
            final = dataclasses.replace(config, latent_scale=scale, vae=dataclasses.replace(config.vae, beta=beta))
            write_vae_dir(out_dir, final, vae.cpu())
            last["latent_scale_mean"] = float(np.mean(scale))
            log.info("VAE written to %s (latent scale %s)", out_dir, [round(s, 4) for s in scale])
        return last


def check_encoder_fits(encoder, config: ModelConfig) -> None:
    """``ValueError`` when the frozen image encoder's tokens do not match what the model's VAE and denoiser read."""
    mismatch = image_encoder_mismatch(encoder, config.image_size, config.vae.num_frame_tokens,
                                      config.vae.frame_features_dim)
    if mismatch is not None:
        raise ValueError(f"{mismatch}: pretrain the encoder with the same --config")


def load_vae_dir(directory: PathLike):
    """``(config, vae, image_encoder)`` of a stage-1 run directory (or any model directory with a VAE)."""
    directory = Path(directory)
    config = load_model_config(directory)
    if config.vae is None:
        raise CheckpointError(f"{directory}: the config has no VAE")
    vae = TrajectoryVAE(config.vae)
    load_vae_weights(vae, directory)
    encoder = build_image_encoder(config, model_dir=directory)
    return config, vae.eval(), encoder
