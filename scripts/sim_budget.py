"""Seconds per training step of every stage of the sim-manipulation pipeline, and the 4-hour budget arithmetic.

Random inputs of the preset's shapes (no dataset, no robosuite); the first step of each stage is a warm-up and is
not counted. Stages: image-encoder pretraining (depth + segmentation heads), VAE, flow (with the words text encoder
trained alongside), regressor; and one K = 8 forecast (10 Euler steps). Then the budget of scripts/train_sim.sh's
step counts (pass them with --steps-*) is printed: a few minutes, meant to be rerun on the machine that trains.

    .venv/bin/python scripts/sim_budget.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict

import numpy as np
import torch


def _time_steps(objective: torch.nn.Module, trained: torch.nn.Module, batch: Dict[str, torch.Tensor],
                repeats: int) -> float:
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(repeats + 1):
        generator = torch.Generator().manual_seed(step)
        start = time.perf_counter()
        loss = objective(**batch, generator=generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(config_name: str, batches: Dict[str, int], repeats: int) -> Dict[str, float]:
    """Median seconds per step of each stage (``{stage}_s_per_step``) and per K=8 forecast."""
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.denoiser import LatteDenoiser
    from traj_forecast_ros.model.presets import preset_config
    from traj_forecast_ros.model.vae import TrajectoryVAE
    from traj_forecast_ros.model.word_encoder import WordTextEncoder, build_vocabulary
    from traj_forecast_ros.train.data import build_image_encoder
    from traj_forecast_ros.train.encoder import EncoderPretraining
    from traj_forecast_ros.train.flow import FlowObjective
    from traj_forecast_ros.train.regressor import RegressorObjective, TrackRegressor
    from traj_forecast_ros.train.vae import VAEObjective

    config = preset_config(config_name)
    vocab = build_vocabulary(["put the can in the back left of the right bin", "push the red cube to the left",
                              "pick up the green cube and lift it", "open the door"])
    config.text_encoder.config = {**config.text_encoder.config, "vocab": vocab}
    height, width = config.image_size
    rows, cols = config.query_grid
    frames = config.num_frames
    tokens, dim = config.denoiser.num_frame_tokens, config.denoiser.frame_features_dim
    results: Dict[str, float] = {}

    b = batches["encoder"]
    pretraining = EncoderPretraining(build_image_encoder(config), num_classes=8)
    results["encoder_s_per_step"] = _time_steps(pretraining, pretraining, {
        "images": torch.randint(0, 255, (b, height, width, 3), dtype=torch.uint8),
        "depth": torch.rand(b, height, width) * 3, "segmentation": torch.randint(0, 8, (b, height, width))}, repeats)

    b = batches["vae"]
    vae = TrajectoryVAE(config.vae)
    results["vae_s_per_step"] = _time_steps(VAEObjective(vae, 1e-4, config.image_size), vae, {
        "tracks_norm": torch.rand(b, frames, 2, rows, cols) * 2 - 1, "features": torch.randn(b, tokens, dim)},
        repeats)

    b = batches["flow"]
    denoiser = LatteDenoiser(config.denoiser)
    text = WordTextEncoder.from_config(config.text_encoder).requires_grad_(True)
    latent_tokens, channels = vae.num_latent_tokens, config.vae.latent_channels
    objective = FlowObjective(denoiser, [1.0] * channels, vae.latent_grid, "mean", text_encoder=text)
    results["flow_s_per_step"] = _time_steps(objective, torch.nn.ModuleDict({"d": denoiser, "t": text}), {
        "latent_mean": torch.randn(b, frames, latent_tokens, channels),
        "latent_std": torch.rand(b, frames, latent_tokens, channels),
        "cond_mean": torch.randn(b, 1, latent_tokens, channels), "cond_std": torch.rand(b, 1, latent_tokens, channels),
        "features": torch.randn(b, tokens, dim), "text_ids": text.tokenize(["push the red cube to the left"] * b)},
        repeats)

    b = batches["regressor"]
    regressor = TrackRegressor(config)
    results["regressor_s_per_step"] = _time_steps(RegressorObjective(regressor), regressor.net, {
        "tracks_norm": torch.rand(b, frames, 2, rows, cols) * 2 - 1, "features": torch.randn(b, tokens, dim)},
        repeats)

    config.latent_scale = [1.0] * config.vae.latent_channels  # measured after stage 1 in a real run
    forecaster = Forecaster.from_config(config, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    forecaster.forecast(image, instruction="push the red cube to the left", num_samples=8, seed=0)  # warm-up
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        forecaster.forecast(image, instruction="push the red cube to the left", num_samples=8, seed=seed)
        times.append(time.perf_counter() - start)
    results["forecast_k8_s"] = float(np.median(times))
    return results


def budget(times: Dict[str, float], steps: Dict[str, int], clips_per_min: float, train_clips: int,
           test_scenes: int) -> Dict[str, float]:
    """Minutes per stage of the pipeline for the given step counts and data rate."""
    minutes = {
        "data": (train_clips * 1.1) / clips_per_min,  # + the test split (about a tenth of train)
        "encoder": steps["encoder"] * times["encoder_s_per_step"] / 60,
        "vae": steps["vae"] * times["vae_s_per_step"] / 60,
        "flow": steps["flow"] * times["flow_s_per_step"] / 60,
        "regressor": steps["regressor"] * times["regressor_s_per_step"] / 60,
        "evaluate": test_scenes * times["forecast_k8_s"] / 60,
    }
    minutes["total"] = sum(minutes.values())
    return {k: round(v, 1) for k, v in minutes.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sim-manipulation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-encoder", type=int, default=32)
    parser.add_argument("--batch-vae", type=int, default=8)
    parser.add_argument("--batch-flow", type=int, default=16)
    parser.add_argument("--batch-regressor", type=int, default=16)
    parser.add_argument("--steps-encoder", type=int, default=1500)
    parser.add_argument("--steps-vae", type=int, default=2000)
    parser.add_argument("--steps-flow", type=int, default=6000)
    parser.add_argument("--steps-regressor", type=int, default=800)
    parser.add_argument("--clips-per-min", type=float, default=22.8, help="measured generation rate (docs)")
    parser.add_argument("--train-clips", type=int, default=1300, help="clips in the training split")
    parser.add_argument("--test-scenes", type=int, default=200, help="evaluated test samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = {"encoder": args.batch_encoder, "vae": args.batch_vae, "flow": args.batch_flow,
               "regressor": args.batch_regressor}
    times = measure(args.config, batches, args.repeats)
    steps = {"encoder": args.steps_encoder, "vae": args.steps_vae, "flow": args.steps_flow,
             "regressor": args.steps_regressor}
    report = {"config": args.config, "threads": args.threads, "batches": batches, "seconds": times,
              "steps": steps, "minutes": budget(times, steps, args.clips_per_min, args.train_clips,
                                                args.test_scenes)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
