"""Seconds per optimisation step of each training stage (VAE, flow, regressor) for a model preset.

Random inputs of the right shapes (no dataset needed); the first step is a warm-up and is not counted.

    .venv/bin/python bench/train_step_bench.py --config demo-blocks --threads 1 --batch 8 16 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _objectives(config, batch: int):
    from traj_forecast_ros.model.denoiser import LatteDenoiser
    from traj_forecast_ros.model.vae import TrajectoryVAE
    from traj_forecast_ros.train.flow import FlowObjective
    from traj_forecast_ros.train.regressor import RegressorObjective, TrackRegressor
    from traj_forecast_ros.train.vae import VAEObjective

    rows, cols = config.query_grid
    frames = config.num_frames
    tokens, dim = config.denoiser.num_frame_tokens, config.denoiser.frame_features_dim
    features = torch.randn(batch, tokens, dim)
    tracks = torch.rand(batch, frames, 2, rows, cols) * 2 - 1
    vae = TrajectoryVAE(config.vae)
    latent_tokens, channels = vae.num_latent_tokens, config.vae.latent_channels
    yield "vae", VAEObjective(vae, 1e-5, config.image_size), vae, {"tracks_norm": tracks, "features": features}
    denoiser = LatteDenoiser(config.denoiser)
    flow_batch = {
        "latent_mean": torch.randn(batch, frames, latent_tokens, channels),
        "latent_std": torch.rand(batch, frames, latent_tokens, channels),
        "cond_mean": torch.randn(batch, 1, latent_tokens, channels),
        "cond_std": torch.rand(batch, 1, latent_tokens, channels),
        "features": features,
    }
    yield "flow", FlowObjective(denoiser, [1.0] * channels, vae.latent_grid), denoiser, flow_batch
    regressor = TrackRegressor(config)
    yield "regressor", RegressorObjective(regressor), regressor.net, {"tracks_norm": tracks, "features": features}


def main() -> None:
    from traj_forecast_ros.train.common import autocast_context
    from traj_forecast_ros.model.presets import resolve_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo-blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--stages", nargs="+", default=["vae", "flow", "regressor"],
                        choices=["vae", "flow", "regressor"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting (median reported)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = resolve_config(args.config)
    results = []
    for batch in args.batch:
        for name, objective, model, inputs in _objectives(config, batch):
            if name not in args.stages:
                continue
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for precision in args.precision:
                times = []
                for step in range(args.steps + 1):
                    start = time.perf_counter()
                    with autocast_context(torch.device("cpu"), precision):
                        loss = objective(**inputs, generator=torch.Generator().manual_seed(step))["loss"]
                    optimizer.zero_grad()
                    loss.float().backward()
                    optimizer.step()
                    if step:
                        times.append(time.perf_counter() - start)
                row = {"stage": name, "batch": batch, "precision": precision, "threads": args.threads,
                       "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                       "seconds_per_step": round(float(np.median(times)), 4),
                       "examples_per_second": round(batch / float(np.median(times)), 2)}
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
