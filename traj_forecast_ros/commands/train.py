"""``traj-forecast train encoder|vae|flow|regressor``: encoder pretraining, the two training stages and the
regression baseline.

Stage 1 then stage 2 (then the baseline, on the same frozen image encoder)::

    traj-forecast train vae --data runs/train --out runs/vae --config demo-blocks --steps 1500
    traj-forecast train flow --data runs/train --vae runs/vae --out runs/flow --steps 2000 --ema-decay 0.999
    traj-forecast train regressor --data runs/train --encoder runs/vae --out runs/regressor --steps 1000

With simulator data (dense depth + segmentation labels), pretrain the frozen image encoder first and hand it to
stage 1 (without ``--encoder`` the VAE freezes the config's random encoder: the baseline to compare against)::

    traj-forecast train encoder --data runs/sim/train --out runs/sim/encoder --config sim-manipulation \
        --eval-data runs/sim/test
    traj-forecast train vae --data runs/sim/train --encoder runs/sim/encoder --out runs/sim/vae \
        --config sim-manipulation

``--resume`` continues the run in ``--out`` from ``checkpoints/last.pt`` (identical to an uninterrupted run).
``--init`` fine-tunes from a model directory or a checkpoint file (flow: an official ``.pth`` denoiser together with
``--config`` and ``--vae`` pointing at the official VAE ``.pth``). Multi-GPU: ``torchrun --nproc_per_node N -m
traj_forecast_ros.cli train ...`` (the batch size is per GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from traj_forecast_ros.commands import command_help
from traj_forecast_ros.metrics import MOVING_THRESHOLD_PX
from traj_forecast_ros.model.presets import resolve_config
from traj_forecast_ros.train.common import TrainSettings
from traj_forecast_ros.train.encoder import evaluate_dense, train_encoder
from traj_forecast_ros.train.flow import CONTRAST_TEMPERATURE, train_flow
from traj_forecast_ros.train.regressor import train_regressor
from traj_forecast_ros.train.vae import train_vae


def _add_common(parser: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    parser.add_argument("--data", type=Path, required=True, help="training dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics.csv, weights)")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch, help=f"examples per step and GPU (default {batch})")
    parser.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr})")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then constant (default 100)")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="after warmup: constant LR (official recipe) or cosine decay to 0.1 x lr")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (e.g. 0.999); "
                                                                       "the EMA weights are the ones written")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast: bf16 (CPU with BF16 support, or CUDA), fp16 (CUDA only)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/last.pt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command and its stages."""
    parser = subparsers.add_parser("train", help=command_help("train"),
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True

    encoder = stages.add_parser("encoder", help="pretrain the image encoder on depth + segmentation labels")
    _add_common(encoder, steps=2000, lr=5e-4, batch=32)
    encoder.add_argument("--config", default="sim-manipulation",
                         help="preset or config.yaml whose image_encoder to pretrain (default sim-manipulation)")
    encoder.add_argument("--frozen-backbone", action="store_true",
                         help="train the heads only, on the frozen random encoder (the random baseline's probe)")
    encoder.add_argument("--depth-weight", type=float, default=1.0, help="weight of the depth L1 (metres)")
    encoder.add_argument("--eval-data", type=Path, default=None,
                         help="labelled held-out dataset: write depth L1, pixel accuracy and mIoU to "
                              "OUT/encoder_eval.json")
    encoder.set_defaults(func=_train_encoder)

    vae = stages.add_parser("vae", help="stage 1: trajectory VAE (beta-VAE, Huber reconstruction)")
    _add_common(vae, steps=1500, lr=1e-3, batch=8)
    vae.add_argument("--config", default=None,
                     help="preset (demo-blocks, tiny-blocks) or config.yaml (default: the --init directory's "
                          "config.yaml when it has one, else demo-blocks)")
    vae.add_argument("--init", type=Path, default=None, help="start from this model dir / VAE checkpoint")
    vae.add_argument("--beta", type=float, default=None, help="KL weight (default: the config's vae.beta)")
    vae.add_argument("--encoder", type=Path, default=None,
                     help="directory whose image_encoder/ to freeze (a `train encoder` run); default: the --init "
                          "directory's, else the config's (random) encoder")
    vae.add_argument("--decoder-only", action="store_true",
                     help="fine-tune only the decoder of --init: the latent space (and a flow trained on it) stays "
                          "as it is")
    vae.add_argument("--recon-delta", type=float, default=1.0,
                     help="Huber delta of the reconstruction in normalised units (default 1, the official recipe; "
                          "a small delta such as 0.002 is close to L1 and keeps still points still)")
    vae.add_argument("--latent-noise", type=float, default=0.0,
                     help="with --decoder-only: extra noise on the decoded latents, in units of each channel's "
                          "latent scale (robustness to the flow's errors)")
    vae.add_argument("--latent-noise-still-only", action="store_true",
                     help="with --latent-noise: add it only to the latent tokens whose patch holds no moving point "
                          "(still regions learn to stay still; moving ones keep their full motion)")
    vae.add_argument("--moving-weight", type=float, default=0.0,
                     help="extra weight w of the reconstruction of points whose true track moves more than 5 px "
                          "(each weighs 1 + w; default 0: every point the same)")
    vae.set_defaults(func=_train_vae)

    flow = stages.add_parser("flow", help="stage 2: latent denoiser with rectified flow")
    _add_common(flow, steps=2000, lr=5e-4, batch=16)
    flow.add_argument("--vae", type=Path, default=None, help="stage-1 run directory (or official VAE .pth with "
                                                              "--init FILE.pth)")
    flow.add_argument("--init", type=Path, default=None, help="fine-tune: a model directory or an official .pth")
    flow.add_argument("--config", default=None, help="config of an official .pth (preset name or YAML)")
    flow.add_argument("--latent-draw", choices=("sample", "mean"), default=None,
                      help="generate posterior draws mean + std * eps (official recipe) or posterior means (a "
                           "deterministic conditioning frame; for small VAEs with noisy posteriors); default: the "
                           "model config's (sample)")
    flow.add_argument("--moving-weight", type=float, default=0.0,
                      help=f"extra loss weight w of the latent tokens whose query points move more than "
                           f"{MOVING_THRESHOLD_PX:g} px (each weighs 1 + w; default 0: every token the same)")
    flow.add_argument("--text-context", action="store_true",
                      help="also give the denoiser the instruction as a cross-attention context token (a stronger "
                           "text path than the pooled embedding added to the timestep; --init models gain it)")
    flow.add_argument("--text-grounding", action="store_true",
                      help="also add to each latent token a map of where the instruction points in the image (image "
                           "tokens times the instruction, pooled onto the latent grid; --init models gain it)")
    flow.add_argument("--word-bag", action="store_true",
                      help="words text encoder: add the mean of the instruction's words (a bag of words) to its "
                           "pooled embedding, so one-word differences reach the denoiser (--init models gain it)")
    flow.add_argument("--time-mean", type=float, default=0.0, help="location of the logit-normal flow time (default "
                      "0, the official recipe; below 0 trains nearer the noise end, where only the instruction tells "
                      "sibling futures apart)")
    flow.add_argument("--instruction-contrast", type=float, default=0.0, help="weight of the instruction contrast: on "
                      "samples with sibling branches, the error with the own instruction must beat the error with a "
                      "sibling's (default 0: off)")
    flow.add_argument("--contrast-on-motion", action="store_true", help="compare the contrast's errors only on the "
                      "latent tokens that move in some branch of the sample's group (a wrong instruction cannot win by "
                      "moving the still background)")
    flow.add_argument("--crossed-still", type=float, default=0.0, help="with --contrast-on-motion: weight of the "
                      "crossed instruction's error on the tokens no branch moves (they stay still whatever the "
                      "instruction; default 0: off)")
    flow.add_argument("--contrast-temperature", type=float, default=CONTRAST_TEMPERATURE, help="the error gap "
                      "(normalised latent units) at which the contrast counts the own instruction as clearly better "
                      "and stops pushing; larger keeps pushing the two forecasts apart "
                      f"(default {CONTRAST_TEMPERATURE})")
    flow.set_defaults(func=_train_flow)

    regressor = stages.add_parser("regressor", help="deterministic baseline (same conditioning, MSE)")
    _add_common(regressor, steps=1000, lr=5e-4, batch=16)
    regressor.add_argument("--encoder", type=Path, default=None,
                           help="run/model directory whose image_encoder/ to use (the VAE run: same features)")
    regressor.add_argument("--config", default=None, help="preset or config.yaml (default: the --encoder dir's)")
    regressor.add_argument("--init", type=Path, default=None, help="start from this regressor directory")
    regressor.set_defaults(func=_train_regressor)


def _settings(args: argparse.Namespace) -> TrainSettings:
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        precision=args.precision, log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
        device=args.device, progress=not args.no_progress,
    )


def _report(last: dict) -> int:
    print(json.dumps({k: round(v, 6) for k, v in last.items()}, indent=1))
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    settings = _settings(args)
    init_config = args.init / "config.yaml" if args.init is not None and args.init.is_dir() else None
    source = args.config or (str(args.init) if init_config is not None and init_config.is_file() else None)
    config = resolve_config(source or "demo-blocks")
    return _report(train_vae(args.data, args.out, config, settings, init=args.init, resume=args.resume,
                             beta=args.beta, encoder_dir=args.encoder, decoder_only=args.decoder_only,
                             recon_delta=args.recon_delta, latent_noise=args.latent_noise,
                             moving_weight=args.moving_weight,
                             noise_still_tokens_only=args.latent_noise_still_only))


def _train_encoder(args: argparse.Namespace) -> int:
    settings = _settings(args)
    last = train_encoder(args.data, args.out, resolve_config(args.config), settings, resume=args.resume,
                         frozen_backbone=args.frozen_backbone, depth_weight=args.depth_weight)
    if args.eval_data is not None:
        scores = evaluate_dense(args.out, args.eval_data)
        (args.out / "encoder_eval.json").write_text(json.dumps(scores, indent=1))
        last.update({f"eval_{k}": v for k, v in scores.items()})
    return _report(last)


def _train_flow(args: argparse.Namespace) -> int:
    settings = _settings(args)
    official_config = resolve_config(args.config) if args.config else None
    official = args.init is not None and args.init.is_file()
    return _report(train_flow(args.data, args.out, settings,
                              vae_dir=None if official else args.vae, init=args.init,
                              official_config=official_config, official_vae=args.vae if official else None,
                              resume=args.resume, latent_draw=args.latent_draw,
                              moving_weight=args.moving_weight, text_context=args.text_context,
                              time_mean=args.time_mean, instruction_contrast=args.instruction_contrast,
                              contrast_on_motion=args.contrast_on_motion, crossed_still=args.crossed_still,
                              text_grounding=args.text_grounding, word_bag=args.word_bag,
                              contrast_temperature=args.contrast_temperature))


def _train_regressor(args: argparse.Namespace) -> int:
    settings = _settings(args)
    source = args.config or (str(args.encoder) if args.encoder else None)
    if source is None:
        raise SystemExit("error: give --encoder RUN_DIR (recommended: the VAE run) or --config")
    return _report(train_regressor(args.data, args.out, resolve_config(source), settings, encoder_dir=args.encoder,
                                   init=args.init, resume=args.resume))
