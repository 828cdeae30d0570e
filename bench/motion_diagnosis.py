"""Where a model loses motion, stage by stage, and what the Euler steps and guidance buy (issue 18, items 3 and 6).

On the first ``--scenes`` samples of a held-out split (those ``traj-forecast evaluate`` scores) (points whose TRUE track moves more than 5 px; K samples):

* data: the share of moving points and their true peak displacement, per view;
* VAE: its posterior mean of each TRUE future, decoded (the bound the generator works through), on moving points;
* latents: the flow's sampled latents against the encoded truth, in the scaled units the flow generates (per-channel
  std of frames 1..T-1, and the per-position motion ``|z_t - z_0|``), so a latent scale or a flow that shrinks shows;
* sampling: for every ``--steps`` x ``--guidance`` setting, moving-point best-of-K / mean-of-K MSE, calibration of the
  best sample and of the sample mean, whole-grid best-of-K, static agent-view drift, and the median time per
  forecast; zero motion alongside.

    .venv/bin/python bench/motion_diagnosis.py --model models/sim-manipulation --data runs/sim2/test --scenes 96 \\
        --steps 2,4,6,10 --guidance 1,2,3 --out motion_diagnosis.json

Times are from this run on this machine (the ratios between settings are what carries over).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from traj_forecast_ros import metrics
from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.geometry import normalise_points
from traj_forecast_ros.model.flow import euler_sample, latents_to_grid
from traj_forecast_ros.train.data import usable_samples
from traj_forecast_ros.train.evaluate import vae_reconstruction_predictions


def data_statistics(truth: np.ndarray, views: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per view: share of moving points and the true peak displacement of the moving ones (px)."""
    stats = {}
    for view in sorted(set(views)):
        chosen = truth[[i for i, v in enumerate(views) if v == view]]  # [n, T, H, W, 2]
        peak = metrics.peak_displacement(chosen, leading_axes=1)  # [n, H, W]
        moving = peak > metrics.MOVING_THRESHOLD_PX
        stats[view] = {"samples": int(len(chosen)), "moving_share": float(moving.mean()),
                       "moving_peak_median_px": float(np.median(peak[moving])) if moving.any() else float("nan"),
                       "moving_peak_mean_px": float(peak[moving].mean()) if moving.any() else float("nan")}
    return stats


def moving_summary(pred: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    """The moving-point figures of ``pred [N, K, T, H, W, 2]`` against ``truth [N, T, H, W, 2]``."""
    found = metrics.moving_region_metrics(pred, truth)
    keys = ("moving_best_of_k_mse", "moving_mean_of_k_mse", "calibration_best_sample", "calibration_sample_mean",
            "moving_true_displacement_px", "moving_best_sample_displacement_px", "moving_sample_mean_displacement_px")
    return {key: float(found[key]) for key in keys}


def static_drift(pred: np.ndarray, object_ids: np.ndarray, views: Sequence[str]) -> float:
    """Mean final displacement (px) of static points (object id 0) in the agent view, over samples."""
    chosen = [i for i, v in enumerate(views) if v == "agentview"]
    chosen_pred = pred[chosen]  # [n, K, T, H, W, 2]
    motion = np.linalg.norm(chosen_pred[:, :, -1] - chosen_pred[:, :, 0], axis=-1)  # [n, K, H, W]
    static = object_ids[chosen] == 0  # [n, H, W]
    return float(motion.transpose(1, 0, 2, 3)[:, static].mean())


@torch.no_grad()
def latent_comparison(forecaster: Forecaster, images: np.ndarray, truth: np.ndarray, instructions: List[str],
                      num_samples: int, steps: int, seed: int) -> Dict[str, float]:
    """Sampled latents against the encoded truth, both in the flow's scaled units ``[.., C, h, w]``."""
    config, vae = forecaster.config, forecaster.vae
    scale = torch.tensor(config.latent_scale, dtype=torch.float32).view(1, 1, -1, 1, 1)
    size = tuple(config.image_size)
    true_std, sampled_std, true_motion, sampled_motion = [], [], [], []
    generator = torch.Generator().manual_seed(seed)
    for image, track, instruction in zip(images, truth, instructions):
        features = forecaster.encode_image(image).float()
        points = normalise_points(torch.from_numpy(track).float()[None], size).permute(0, 1, 4, 2, 3)
        mean, _ = vae.encode(points, features)  # [1, T, L, C]
        z_true = latents_to_grid(mean, vae.latent_grid) / scale  # [1, T, C, h, w]
        cond_mean, _ = forecaster.condition_posterior(features)  # [1, 1, C, h, w]
        noise = torch.randn((num_samples, *z_true.shape[1:]), generator=generator)[:, 1:]
        text = forecaster.embed_instruction(instruction) if forecaster.text_encoder is not None else None
        z_sampled = euler_sample(forecaster.denoiser, cond_mean.expand(num_samples, -1, -1, -1, -1).float(), noise,
                                 features, text, steps=steps)  # [K, T, C, h, w]
        true_std.append(z_true[:, 1:].std(dim=(0, 1, 3, 4)))
        sampled_std.append(z_sampled[:, 1:].std(dim=(0, 1, 3, 4)))
        true_motion.append((z_true[:, 1:] - z_true[:, :1]).norm(dim=2).mean())
        sampled_motion.append((z_sampled[:, 1:] - z_sampled[:, :1]).norm(dim=2).mean())
    return {"true_channel_std": float(torch.stack(true_std).mean()),
            "sampled_channel_std": float(torch.stack(sampled_std).mean()),
            "true_position_motion": float(torch.stack(true_motion).mean()),
            "sampled_position_motion": float(torch.stack(sampled_motion).mean())}


def sampling_curve(forecaster: Forecaster, images: np.ndarray, truth: np.ndarray, object_ids: np.ndarray,
                   views: Sequence[str], instructions: List[str], num_samples: int, steps_list: Sequence[int],
                   guidance_list: Sequence[float], seed: int) -> List[Dict[str, float]]:
    """One row per (steps, guidance): moving-point and whole-grid figures and the median time per forecast."""
    rows = []
    for steps in steps_list:
        for guidance in guidance_list:
            if guidance != 1.0 and not forecaster.config.supports_guidance:
                continue
            tracks, seconds = [], []
            for index, (image, instruction) in enumerate(zip(images, instructions)):
                result = forecaster.forecast(image, instruction, num_samples=num_samples, steps=steps,
                                             seed=seed + index, guidance_scale=guidance)
                tracks.append(result.tracks)
                seconds.append(result.timings["total"])
            pred = np.stack(tracks)
            rows.append({"steps": steps, "guidance_scale": guidance, **moving_summary(pred, truth),
                         "best_of_k_mse": metrics.best_of_k_mse(pred, truth),
                         "static_agentview_drift_px": static_drift(pred, object_ids, views),
                         "seconds_per_forecast_median": float(np.median(seconds))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="held-out split with views and instructions")
    parser.add_argument("--scenes", type=int, default=96, help="the first N samples")
    parser.add_argument("--samples", type=int, default=8, metavar="K")
    parser.add_argument("--steps", default="2,4,6,10", help="comma-separated Euler time points")
    parser.add_argument("--guidance", default="1", help="comma-separated guidance scales (1 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = TrajectoryDataset(args.data)
    usable = usable_samples(dataset)  # the samples evaluate scores (truth within an image size of the image)
    indices = usable[usable < args.scenes]
    truth = dataset.gather("tracks", indices)[:, 0]  # [N, T, H, W, 2]
    images, object_ids = dataset.gather("images", indices), dataset.gather("object_ids", indices)
    views = [dataset.meta.views[int(v)] for v in dataset.gather("views", indices)]
    instructions = [dataset.meta.instructions[int(i)] for i in dataset.gather("instructions", indices)]
    forecaster = Forecaster.from_pretrained(args.model, device="cpu", dtype="float32")

    start = time.perf_counter()
    report = {"model": str(args.model), "data": str(args.data), "scenes": int(len(indices)), "samples": args.samples,
              "data_statistics": data_statistics(truth, views)}
    bound = vae_reconstruction_predictions(args.model, dataset, indices, 1, device="cpu")
    report["vae_bound"] = moving_summary(bound, truth)
    report["vae_bound"]["static_agentview_drift_px"] = static_drift(bound, object_ids, views)
    report["latents"] = latent_comparison(forecaster, images, truth, instructions, args.samples,
                                          forecaster.config.default_steps, args.seed)
    print(json.dumps({key: report[key] for key in ("data_statistics", "vae_bound", "latents")}), flush=True)
    zero = np.repeat(truth[:, None, :1], truth.shape[1], axis=2)  # [N, 1, T, H, W, 2]: standing still
    report["zero_motion"] = {**moving_summary(zero, truth), "best_of_k_mse": metrics.best_of_k_mse(zero, truth)}
    report["sampling"] = sampling_curve(forecaster, images, truth, object_ids, views, instructions, args.samples,
                                        [int(s) for s in args.steps.split(",")],
                                        [float(g) for g in args.guidance.split(",")], args.seed)
    report["seconds"] = time.perf_counter() - start
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
