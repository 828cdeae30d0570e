"""Run forecasting models and baselines over a dataset and score them with :mod:`traj_forecast_ros.metrics`.

Methods: ``ours`` (a model directory or registry name, K samples per image through :class:`Forecaster`),
``zero_motion`` (every point stays at its query position) and ``regressor`` (the deterministic baseline of
:mod:`.regressor`; its single prediction counts as all K samples). Scene ``i`` is sampled with seed ``seed + i``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from traj_forecast_ros import metrics
from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES, DEFAULT_STEPS

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
TABLE_COLUMNS = (
    ("best_of_k_mse", "best-of-K MSE (px^2)"),
    ("mean_of_k_mse", "mean-of-K MSE (px^2)"),
    ("fvmd", "FVMD"),
    ("lrtl", "LRTL"),
    ("diversity", "diversity (px)"),
    ("static_mean_displacement", "resting-scene motion (px)"),
    ("static_moving_share", "resting-scene points moving > 2 px (share)"),
)


def zero_motion_predictions(dataset: TrajectoryDataset, indices: Sequence[int], num_samples: int) -> np.ndarray:
    """``[N, K, T, Hq, Wq, 2]``: the query grid at every frame."""
    grid = dataset.meta.query_points()  # [Hq, Wq, 2]
    shape = (len(indices), num_samples, dataset.meta.num_frames, *grid.shape)
    return np.broadcast_to(grid, shape).astype(np.float32)


@torch.no_grad()
def regressor_predictions(directory: PathLike, dataset: TrajectoryDataset, indices: Sequence[int],
                          num_samples: int, batch: int = 16) -> np.ndarray:
    """``[N, K, T, Hq, Wq, 2]`` pixels: the regressor's one prediction per image, repeated K times."""
    from traj_forecast_ros.geometry import denormalise_points
    from traj_forecast_ros.train.regressor import load_regressor

    regressor, encoder = load_regressor(directory)
    dataset.meta.check_model_geometry(regressor.config)
    outputs = []
    for start in range(0, len(indices), batch):
        images = torch.from_numpy(dataset.gather("images", indices[start:start + batch]))
        tracks_norm = regressor(encoder(images).float())  # [b, T, 2, Hq, Wq]
        pixels = denormalise_points(tracks_norm.permute(0, 1, 3, 4, 2), tuple(regressor.config.image_size))
        outputs.append(pixels.numpy())
    single = np.concatenate(outputs)[:, None]  # [N, 1, T, Hq, Wq, 2]
    return np.repeat(single, num_samples, axis=1).astype(np.float32)


def forecaster_predictions(model: PathLike, dataset: TrajectoryDataset, indices: Sequence[int], num_samples: int,
                           seed: int = 0, steps: int = DEFAULT_STEPS, sample_batch_size: Optional[int] = None,
                           device: str = "auto", dtype: str = "auto", progress: bool = False) -> np.ndarray:
    """``[N, K, T, Hq, Wq, 2]`` pixels from :meth:`Forecaster.forecast` (scene ``i`` with seed ``seed + i``)."""
    from traj_forecast_ros.forecaster import Forecaster

    forecaster = Forecaster.from_pretrained(model, device=device, dtype=dtype)
    dataset.meta.check_model_geometry(forecaster.config)
    forecaster.sample_batch_size = sample_batch_size  # None: all K samples in one batch
    loop = range(len(indices))
    if progress:
        from tqdm import tqdm

        loop = tqdm(loop, desc="forecast", unit="scene")
    outputs = []
    for i in loop:
        image = dataset.gather("images", [indices[i]])[0]
        forecast = forecaster.forecast(image, num_samples=num_samples, steps=steps, seed=seed + int(indices[i]))
        outputs.append(forecast.tracks)
    return np.stack(outputs)


def evaluate(data_dir: PathLike, model: Optional[PathLike] = None, regressor: Optional[PathLike] = None,
             num_samples: int = DEFAULT_NUM_SAMPLES, max_scenes: Optional[int] = None, seed: int = 0,
             steps: int = DEFAULT_STEPS, sample_batch_size: Optional[int] = None, device: str = "auto",
             progress: bool = False) -> Dict:
    """Score ``ours`` (when ``model`` is given), ``zero_motion`` and ``regressor`` (when given) on a dataset.

    Returns a JSON-friendly dict: settings, ``results[method] -> metrics`` (see
    :func:`traj_forecast_ros.metrics.evaluate_predictions`), ``per_kind[kind][method] -> best_of_k_mse, ...`` and
    ``seconds[method]``.
    """
    dataset = TrajectoryDataset(data_dir)
    count = len(dataset) if max_scenes is None else min(max_scenes, len(dataset))
    indices = np.arange(count)
    gt = dataset.gather("tracks", indices)  # [N, R, T, Hq, Wq, 2]
    object_ids = dataset.gather("object_ids", indices) if dataset.has("object_ids") else None
    if dataset.has("kinds"):
        kind_names = dataset.kind_names()  # every sample's kind, read once
        kinds: Optional[List[Optional[str]]] = [kind_names[i] for i in indices]
    else:
        kinds = None

    predictions: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    if model is not None:
        start = time.perf_counter()
        predictions["ours"] = forecaster_predictions(model, dataset, indices, num_samples, seed, steps,
                                                     sample_batch_size, device=device, progress=progress)
        seconds["ours"] = time.perf_counter() - start
    start = time.perf_counter()
    predictions["zero_motion"] = zero_motion_predictions(dataset, indices, num_samples)
    seconds["zero_motion"] = time.perf_counter() - start
    if regressor is not None:
        start = time.perf_counter()
        predictions["regressor"] = regressor_predictions(regressor, dataset, indices, num_samples)
        seconds["regressor"] = time.perf_counter() - start

    results = {name: metrics.evaluate_predictions(pred, gt, object_ids, kinds) for name, pred in predictions.items()}
    per_kind: Dict[str, Dict[str, Dict[str, float]]] = {}
    if kinds is not None:
        for kind in sorted(set(kinds)):
            chosen = np.array([k == kind for k in kinds])
            per_kind[kind] = {}
            for name, pred in predictions.items():
                best, mean = metrics.best_and_mean_of_k_mse(pred[chosen], gt[chosen], rollouts=True)
                per_kind[kind][name] = {
                    "scenes": int(chosen.sum()),
                    "best_of_k_mse": best,
                    "mean_of_k_mse": mean,
                    "diversity": metrics.diversity(pred[chosen]),
                    "mean_displacement": metrics.mean_displacement(pred[chosen]),
                }
    return {
        "dataset": str(data_dir),
        "model": None if model is None else str(model),
        "regressor": None if regressor is None else str(regressor),
        "scenes": count,
        "rollouts": dataset.meta.num_rollouts,
        "samples": num_samples,
        "steps": steps,
        "seed": seed,
        "results": results,
        "per_kind": per_kind,
        "seconds": seconds,
    }


def format_table(report: Dict, markdown: bool = True) -> str:
    """The main results as a table (one row per method)."""
    methods: List[str] = list(report["results"])
    header = ["method"] + [title for _, title in TABLE_COLUMNS]
    rows = []
    for method in methods:
        values = report["results"][method]
        rows.append([method] + [_fmt(values.get(key)) for key, _ in TABLE_COLUMNS])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows)


def format_kind_table(report: Dict) -> str:
    """Best-of-K MSE per scene kind and method (markdown)."""
    per_kind = report.get("per_kind") or {}
    if not per_kind:
        return ""
    methods = list(report["results"])
    lines = ["| kind | scenes | " + " | ".join(f"{m} best-of-K" for m in methods) + " |",
             "|" + "---|" * (len(methods) + 2)]
    for kind, values in per_kind.items():
        scenes = next(iter(values.values()))["scenes"]
        lines.append(f"| {kind} | {scenes} | " + " | ".join(_fmt(values[m]["best_of_k_mse"]) for m in methods) + " |")
    return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
