"""Run forecasting models and baselines over a dataset and score them with :mod:`traj_forecast_ros.metrics`.

Methods: ``ours`` (a model directory or registry name, K samples per image through :class:`Forecaster`),
``zero_motion`` (every point stays at its query position) and ``regressor`` (the deterministic baseline of
:mod:`.regressor`; its single prediction counts as all K samples). Scene ``i`` is sampled with seed ``seed + i``.
A language-conditioned model gets each sample's own instruction when the dataset stores them.

Besides the overall metrics, the report breaks every method down by task kind (``per_kind``) and by camera view
(``per_view``) with the same metrics (best-of-K and mean-of-K MSE, FVMD, LRTL when object ids are stored,
diversity) plus two figures of the points on static geometry (object id 0), which an ideal forecaster keeps at 0:
``background_mean_displacement``, their mean final displacement, and ``background_moving_share``, the share of them
that more than half of the samples move more than 2 px at some frame (what the example planner's maps would mark).

Every method is also scored where the motion is (:func:`traj_forecast_ros.metrics.moving_region_metrics`: the
points whose true track moves more than 5 px; best-of-K / mean-of-K MSE, ADE, FDE and motion calibration there).
On datasets with branch groups (samples with the same frame 0 but other instructions and futures) ``ours`` also
takes the paired-instruction test (:func:`paired_instruction_results`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from traj_forecast_ros import metrics, paired_metrics
from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.geometry import denormalise_points, normalise_points
from traj_forecast_ros.model.checkpoint import load_model_config
from traj_forecast_ros.registry import resolve
from traj_forecast_ros.summaries import DEFAULT_MOVING_THRESHOLD_PX, planner_summaries
from traj_forecast_ros.train.data import usable_samples
from traj_forecast_ros.train.figure import comparison_figure, pick_scenes
from traj_forecast_ros.train.regressor import load_regressor

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
TABLE_COLUMNS = (
    ("moving_best_of_k_mse", "moving best-of-K MSE (px^2)"),
    ("moving_best_of_k_ade_px", "moving ADE (px)"),
    ("moving_best_of_k_fde_px", "moving FDE (px)"),
    ("calibration_best_sample", "calibration, best sample"),
    ("calibration_sample_mean", "calibration, sample mean"),
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
                           seed: int = 0, steps: Optional[int] = None,
                           sample_batch_size: Union[int, None, str] = "auto",
                           device: str = "auto", dtype: str = "auto", progress: bool = False,
                           instructions: Optional[Sequence[Optional[str]]] = None,
                           guidance_scale: Optional[float] = None) -> np.ndarray:
    """``[N, K, T, Hq, Wq, 2]`` pixels from :meth:`Forecaster.forecast` (scene ``i`` with seed ``seed + i``).

    ``instructions``: one per index, given to language-conditioned models (None: the model's default).
    ``steps`` / ``guidance_scale``: None for the model's defaults.
    ``sample_batch_size``: "auto" keeps the sampling plan chosen at load; N: N samples per call; None / 0: all K."""
    forecaster = Forecaster.from_pretrained(model, device=device, dtype=dtype)
    dataset.meta.check_model_geometry(forecaster.config)
    if sample_batch_size != "auto":
        forecaster.sample_batch_size = sample_batch_size  # None / 0: all K samples in one batch
    loop = range(len(indices))
    if progress:
        loop = tqdm(loop, desc="forecast", unit="scene")
    outputs = []
    for i in loop:
        image = dataset.gather("images", [indices[i]])[0]
        instruction = None
        if instructions is not None and forecaster.text_encoder is not None:
            instruction = instructions[i]
        forecast = forecaster.forecast(image, instruction=instruction, num_samples=num_samples, steps=steps,
                                       seed=seed + int(indices[i]), guidance_scale=guidance_scale)
        outputs.append(forecast.tracks)
    return np.stack(outputs)


def paired_instruction_results(model: PathLike, dataset: TrajectoryDataset, indices: np.ndarray, matched: np.ndarray,
                               gt: np.ndarray, instructions: Sequence[Optional[str]],
                               num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0, steps: Optional[int] = None,
                               sample_batch_size: Union[int, None, str] = "auto", device: str = "auto",
                               progress: bool = False,
                               guidance_scale: Optional[float] = None) -> Optional[Dict[str, float]]:
    """The paired-instruction test (:func:`traj_forecast_ros.paired_metrics.paired_instruction_metrics`) of a model.

    ``matched [N, K, T, Hq, Wq, 2]``: the model's forecasts of the scenes ``indices`` under their own
    ``instructions`` (scene ``indices[i]`` with seed ``seed + indices[i]``). Every case (i, j) of
    :func:`~traj_forecast_ros.paired_metrics.branch_pairs` reuses forecast i and adds one K-sample forecast of scene i
    under j's instruction with i's seed (the same noise: only the instruction differs); both are scored against
    i's first true rollout over the points moving in i's or j's. None when these scenes hold no pair.
    """
    groups = dataset.gather("branch_groups", indices)
    pairs = paired_metrics.branch_pairs(groups, dataset.gather("instructions", indices))
    if not pairs:
        return None
    own, partner = (np.asarray(side) for side in zip(*pairs))
    crossed = forecaster_predictions(model, dataset, indices[own], num_samples, seed, steps, sample_batch_size,
                                     device=device, progress=progress, instructions=[instructions[j] for j in partner],
                                     guidance_scale=guidance_scale)
    result = paired_metrics.paired_instruction_metrics(matched[own], crossed, gt[own, 0], gt[partner, 0])
    result["paired_groups"] = float(len({int(groups[i]) for i in own}))
    return result


@torch.no_grad()
def vae_reconstruction_predictions(model: PathLike, dataset: TrajectoryDataset, indices: Sequence[int],
                                   num_samples: int, device: str = "auto") -> np.ndarray:
    """``[N, K, T, Hq, Wq, 2]`` pixels: the model's VAE decoding the posterior mean of each TRUE future (the same
    for all K). No sampling is involved, so this bounds what the generative stage can reach through this VAE."""
    forecaster = Forecaster.from_pretrained(model, device=device, dtype="float32")
    dataset.meta.check_model_geometry(forecaster.config)
    size = tuple(forecaster.config.image_size)
    vae = forecaster.vae
    parameter = next(vae.parameters())
    images = dataset.gather("images", indices)
    truths = dataset.gather("tracks", indices)[:, 0]  # [N, T, Hq, Wq, 2], the first rollout
    outputs = []
    for image, truth_px in zip(images, truths):
        features = forecaster.encode_image(image).to(parameter)
        truth = torch.from_numpy(truth_px).to(parameter)[None]  # [1, T, Hq, Wq, 2]
        mean, _std = vae.encode(normalise_points(truth, size).permute(0, 1, 4, 2, 3), features)
        decoded = vae.decode(mean, features).permute(0, 1, 3, 4, 2)  # [1, T, Hq, Wq, 2] normalised
        outputs.append(denormalise_points(decoded, size).float().cpu().numpy())
    single = np.concatenate(outputs)[:, None]
    return np.repeat(single, num_samples, axis=1).astype(np.float32)


def background_mean_displacement(pred: np.ndarray, object_ids: Optional[np.ndarray]) -> Optional[float]:
    """Mean final displacement ``|x_{T-1} - x_0|`` (pixels) of the points with object id 0 in ``pred [N, K, T, Hq,
    Wq, 2]`` (None without object ids or static points)."""
    if object_ids is None:
        return None
    static = np.asarray(object_ids) == 0  # [N, Hq, Wq]
    if not static.any():
        return None
    moved = np.linalg.norm(pred[:, :, -1] - pred[:, :, 0], axis=-1)  # [N, K, Hq, Wq]
    return float(moved.transpose(1, 0, 2, 3)[:, static].mean())


def background_moving_share(pred: np.ndarray, object_ids: Optional[np.ndarray],
                            threshold_px: float = DEFAULT_MOVING_THRESHOLD_PX) -> Optional[float]:
    """Share of the points with object id 0 in ``pred [N, K, T, Hq, Wq, 2]`` whose planner motion probability
    (:func:`~traj_forecast_ros.summaries.planner_summaries`: the share of samples that move the point more than
    ``threshold_px`` from frame 0 at some frame) exceeds one half (None without object ids or static points): the
    static scene the example planner's maps would mark as moving. Unlike the mean final displacement it also counts
    points that wander mid-horizon and come back."""
    if object_ids is None:
        return None
    static = np.asarray(object_ids) == 0  # [N, Hq, Wq]
    if not static.any():
        return None
    probability = np.stack([planner_summaries(scene, threshold_px).motion_probability for scene in pred])  # [N, Hq, Wq]
    return float((probability[static] > 0.5).mean())


def stillness_metrics(pred: np.ndarray, object_ids: Optional[np.ndarray]) -> Dict[str, Optional[float]]:
    """The two static-scene figures of ``pred``: mean final displacement and the share most samples move."""
    return {"background_mean_displacement": background_mean_displacement(pred, object_ids),
            "background_moving_share": background_moving_share(pred, object_ids)}


def group_metrics(predictions: Dict[str, np.ndarray], gt: np.ndarray, object_ids: Optional[np.ndarray],
                  kinds: Optional[List[Optional[str]]], labels: Sequence[Optional[str]]) -> Dict[str, Dict]:
    """``{label: {method: metrics}}`` for the scenes of each distinct label (None labels are left out)."""
    groups: Dict[str, Dict] = {}
    for label in sorted({label for label in labels if label is not None}):
        chosen = np.array([value == label for value in labels])
        ids = None if object_ids is None else object_ids[chosen]
        chosen_kinds = None if kinds is None else [k for k, c in zip(kinds, chosen) if c]
        groups[label] = {}
        for name, pred in predictions.items():
            values = metrics.evaluate_predictions(pred[chosen], gt[chosen], ids, chosen_kinds)
            values.update(stillness_metrics(pred[chosen], ids))
            groups[label][name] = values
    return groups


def sampling_defaults(model: PathLike, steps: Optional[int],
                      guidance_scale: Optional[float]) -> Tuple[int, float, bool]:
    """``(steps, guidance_scale, takes_instruction)``: the values given, or the model's ``default_steps`` /
    ``guidance_scale``, and whether the model has language input."""
    config = load_model_config(resolve(model))
    return (config.default_steps if steps is None else int(steps),
            config.guidance_scale if guidance_scale is None else float(guidance_scale),
            config.text_encoder is not None)


def evaluate(data_dir: PathLike, model: Optional[PathLike] = None, regressor: Optional[PathLike] = None,
             num_samples: int = DEFAULT_NUM_SAMPLES, max_scenes: Optional[int] = None, seed: int = 0,
             steps: Optional[int] = None, sample_batch_size: Union[int, None, str] = "auto", device: str = "auto",
             progress: bool = False, use_instructions: bool = True, figure: Optional[PathLike] = None,
             vae_bound: bool = False, guidance_scale: Optional[float] = None) -> Dict:
    """Score ``ours`` (when ``model`` is given), ``zero_motion`` and ``regressor`` (when given) on a dataset.

    Returns a JSON-friendly dict: settings, ``results[method] -> metrics`` (see
    :func:`traj_forecast_ros.metrics.evaluate_predictions`, plus ``background_mean_displacement``),
    ``per_kind[kind][method]`` and ``per_view[view][method]`` (the same metrics on those scenes; empty when the
    dataset has no kinds / views), ``paired_instructions`` (:func:`paired_instruction_results` of ``ours``; None
    without branch groups, instructions or a model) and ``seconds[method]`` (``ours_crossed_instructions``: the
    paired test's extra forecasts). ``use_instructions``: give a language-conditioned model each sample's
    instruction (else the model's default instruction). ``figure``: also write a PNG of the first
    scene of every kind x view, truth beside the predictions (:func:`.figure.comparison_figure`). ``vae_bound``: also
    score ``vae_reconstruction``, the model's VAE decoding each true future (:func:`vae_reconstruction_predictions`).
    ``steps`` / ``guidance_scale``: None for the model's defaults (the report records the values used). Samples
    whose truth leaves the image by more than an image size are not scored (:func:`~.data.usable_samples`;
    ``excluded_offscreen`` counts them).
    """
    takes_instruction = False
    if model is not None:
        steps, guidance_scale, takes_instruction = sampling_defaults(model, steps, guidance_scale)
    dataset = TrajectoryDataset(data_dir)
    count = len(dataset) if max_scenes is None else min(max_scenes, len(dataset))
    usable = usable_samples(dataset)
    indices = usable[usable < count]  # the first ``count`` samples, less those no forecast can be judged on
    gt = dataset.gather("tracks", indices)  # [N, R, T, Hq, Wq, 2]
    object_ids = dataset.gather("object_ids", indices) if dataset.has("object_ids") else None
    if dataset.has("kinds"):
        kind_names = dataset.kind_names()  # every sample's kind, read once
        kinds: Optional[List[Optional[str]]] = [kind_names[i] for i in indices]
    else:
        kinds = None
    views: Optional[List[Optional[str]]] = None
    if dataset.has("views") and dataset.meta.views:
        views = [dataset.meta.views[int(v)] for v in dataset.gather("views", indices)]
    instructions: Optional[List[Optional[str]]] = None
    if use_instructions and dataset.has("instructions") and dataset.meta.instructions:
        instructions = [dataset.meta.instructions[int(i)] for i in dataset.gather("instructions", indices)]

    predictions: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    if model is not None:
        start = time.perf_counter()
        predictions["ours"] = forecaster_predictions(model, dataset, indices, num_samples, seed, steps,
                                                     sample_batch_size, device=device, progress=progress,
                                                     instructions=instructions, guidance_scale=guidance_scale)
        seconds["ours"] = time.perf_counter() - start
    start = time.perf_counter()
    predictions["zero_motion"] = zero_motion_predictions(dataset, indices, num_samples)
    seconds["zero_motion"] = time.perf_counter() - start
    if regressor is not None:
        start = time.perf_counter()
        predictions["regressor"] = regressor_predictions(regressor, dataset, indices, num_samples)
        seconds["regressor"] = time.perf_counter() - start

    if vae_bound and model is not None:
        start = time.perf_counter()
        predictions["vae_reconstruction"] = vae_reconstruction_predictions(model, dataset, indices, num_samples,
                                                                           device=device)
        seconds["vae_reconstruction"] = time.perf_counter() - start

    results = {name: metrics.evaluate_predictions(pred, gt, object_ids, kinds) for name, pred in predictions.items()}
    for name, pred in predictions.items():
        results[name].update(stillness_metrics(pred, object_ids))
    per_kind = group_metrics(predictions, gt, object_ids, kinds, kinds) if kinds is not None else {}
    per_view = group_metrics(predictions, gt, object_ids, kinds, views) if views is not None else {}
    paired = None
    if "ours" in predictions and takes_instruction and instructions is not None and dataset.has("branch_groups"):
        start = time.perf_counter()
        paired = paired_instruction_results(model, dataset, indices, predictions["ours"], gt, instructions,
                                            num_samples, seed, steps, sample_batch_size, device, progress,
                                            guidance_scale)
        seconds["ours_crossed_instructions"] = time.perf_counter() - start
    if figure is not None:
        chosen = pick_scenes(kinds, views) or [0]
        labels = [", ".join(str(group[i]) for group in (kinds, views) if group is not None and group[i] is not None)
                  for i in chosen]
        shown = {name: pred[chosen] for name, pred in predictions.items() if name != "zero_motion"}
        figure = comparison_figure(dataset.gather("images", indices[chosen]), gt[chosen, 0], shown, labels, figure)
    return {
        "dataset": str(data_dir),
        "model": None if model is None else str(model),
        "regressor": None if regressor is None else str(regressor),
        "scenes": int(len(indices)),
        "excluded_offscreen": int(count - len(indices)),
        "rollouts": dataset.meta.num_rollouts,
        "samples": num_samples,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "results": results,
        "per_kind": per_kind,
        "per_view": per_view,
        "paired_instructions": paired,
        "instructions": instructions is not None,
        "seconds": seconds,
        "figure": None if figure is None else str(figure),
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


GROUP_COLUMNS = (("moving_best_of_k_mse", "moving best-of-K"), ("calibration_best_sample", "calibration"),
                 ("best_of_k_mse", "best-of-K"), ("fvmd", "FVMD"), ("lrtl", "LRTL"), ("diversity", "diversity"))


def format_paired(report: Dict) -> str:
    """One line on the paired-instruction test ("" when it did not run)."""
    paired = report.get("paired_instructions")
    if not paired:
        return ""
    if not paired["paired_cases"]:
        return "paired instructions: no pair of the branch groups has a moving point"
    lines = [f"paired instructions ({int(paired['paired_cases'])} cases in {int(paired['paired_groups'])} branch "
             f"groups): {_paired_figures(paired, 'paired')}"]
    if paired.get("paired_distinct_cases"):
        lines.append(f"  of which {int(paired['paired_distinct_cases'])} cases whose true futures part by > "
                     f"{metrics.MOVING_THRESHOLD_PX:g} px: "
                     f"{_paired_figures(paired, 'paired_distinct')}")
    return "\n".join(lines)


def _paired_figures(paired: Dict, prefix: str) -> str:
    return (f"matched / crossed moving-region error {_fmt(paired[prefix + '_matched_crossed_ratio'])} "
            f"({_fmt(paired[prefix + '_matched_moving_mse'])} / {_fmt(paired[prefix + '_crossed_moving_mse'])} "
            f"px^2), the right instruction wins {paired[prefix + '_right_instruction_wins']:.0%}, instruction "
            f"response {_fmt(paired.get(prefix + '_instruction_response'))} (the forecasts' means part by "
            f"{_fmt(paired.get(prefix + '_forecast_gap_px'))} px where the true futures part by "
            f"{_fmt(paired.get(prefix + '_truth_gap_px'))} px), alignment "
            f"{_fmt(paired.get(prefix + '_instruction_alignment'))} (the share of the true parting they reproduce "
            f"along it)")


def format_kind_table(report: Dict, group: str = "per_kind") -> str:
    """Moving-region best-of-K MSE and calibration, best-of-K MSE, FVMD, LRTL and diversity per task kind (``group="per_kind"``) or view (``"per_view"``) and
    method (markdown)."""
    groups = report.get(group) or {}
    if not groups:
        return ""
    methods = list(report["results"])
    title = "kind" if group == "per_kind" else "view"
    header = [title, "scenes"] + [f"{m} {name}" for _, name in GROUP_COLUMNS for m in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values in groups.items():
        scenes = int(next(iter(values.values()))["scenes"])
        cells = [_fmt(values[m].get(key)) for key, _ in GROUP_COLUMNS for m in methods]
        lines.append(f"| {label} | {scenes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
