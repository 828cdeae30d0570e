"""Metrics of the paper (spec section 8.1) on dense point trajectories, in numpy.

Shapes: a *track grid* is ``[T, Hq, Wq, 2]`` (x, y) pixels (any point layout ``[T, *points, 2]`` works: points are
flattened); predictions carry ``K`` samples, datasets ``N`` scenes (``[N, K, T, ...]``), ground truth may carry
``R`` rollouts per scene (``[N, R, T, ...]``).

* **Per-sample MSE** (pixels^2): ``mse(x, y) = mean_{t, p, c} (x_{t,p,c} - y_{t,p,c})^2`` over all T frames
  (frame 0 included: it is the query grid in both), all points and both coordinates.
* **Best-of-K MSE**: ``mean_n min_k mse(pred_{n,k}, gt_n)``; **mean-of-K MSE**: ``mean_n mean_k mse(pred_{n,k}, gt_n)``.
  With R ground-truth rollouts, each rollout is scored against the same K samples and the R scores are averaged.
* **FVMD** (Frechet Video Motion Distance, Liu et al. 2024, applied to track grids as in the paper):
  velocity ``v_0 = 0, v_t = x_t - x_{t-1}``; acceleration ``a = diff(v)`` zero-padded (``a_0 = 0``,
  ``a_t = v_t - v_{t-1}``). Each field is cut into non-overlapping cubes of 5x5 grid points x 4 frames (leftover
  rows/columns/frames dropped). Per cube, an 8-bin histogram of the vector angle ``atan2(v_y, v_x)`` with bin
  ``floor((angle + pi) / (2 pi / 8))``, each vector weighted by its quantised magnitude
  ``min(ceil(log2(1 + min(|v|, 255))), 8) / 8``. A clip's feature is the concatenation of all velocity and
  acceleration histograms. Gaussians (mean, covariance) are fitted to the generated and reference feature sets and
  ``FVMD = |mu_1 - mu_2|^2 + Tr(S_1) + Tr(S_2) - 2 Tr(((S_1 + eps I)(S_2 + eps I))^(1/2))`` with ``eps = 1e-5``.
  The matrix square root is computed by eigen-decomposition in the subspace spanned by the centred features
  (exact: outside it both covariances vanish and the product is ``eps^2 I``), so no scipy is needed.
* **LRTL** (low-rank trajectory loss): for every object (points with the same frame-0 object id > 0; the static
  background id 0 is excluded by default) build the trajectory matrix ``M`` of shape ``[2T, P]`` (rows
  ``x_0 .. x_{T-1}, y_0 .. y_{T-1}``; columns the object's points; absolute pixels, no centring) and take the
  Frobenius norm of ``M - M_5`` where ``M_5`` is its rank-5 truncated SVD: ``sqrt(sum_{i > 5} sigma_i^2)``.
  A 2-D rigid motion gives rank <= 3 (columns are ``R_t p + c_t``), so rigid objects score 0. Scores are averaged
  over every (scene, sample, object). ``normalize=True`` divides each score by ``sqrt(P)`` (per-point RMS residual).
* **Diversity**: mean over sample pairs ``i < j`` of the mean Euclidean distance (pixels) between the two samples'
  positions over all frames and points, averaged over scenes (0 when all samples agree).
* **Mean displacement**: mean over samples and points of ``|x_{T-1} - x_0|`` (pixels); on scenes where nothing can
  move it should be near zero.
* **One forecast against its recorded truth** (:func:`forecast_errors`, the replay demo's score): best-of-K MSE
  and the best sample's mean point distance (ADE), final distance (FDE) and distance per forecast frame, pixels.
* **Moving region** (:func:`moving_region_metrics`, :class:`MovingRegionTally`): a point *moves* when its TRUE
  track's peak displacement from frame 0, ``max_t |g_t - g_0|`` over the whole horizon, exceeds
  ``MOVING_THRESHOLD_PX`` = 5 px (strictly; per ground-truth rollout). Per (scene, rollout) with moving points:
  each sample's MSE over the moving points only (all T frames, both coordinates), its minimum over samples
  (best-of-K) and mean (mean-of-K), and the best sample's ADE (mean distance over all T frames and the moving
  points) and FDE (at the last frame); each averaged over the (scene, rollout) pairs that have moving points.
* **Motion calibration**: for every moving point, ``|f_{t*} - f_0| / |g_{t*} - g_0|`` at the frame ``t*`` where
  its true displacement peaks (the last frame for motion that does not come back; the denominator is > 5 px by
  definition), for ``f`` = the best sample (the best-of-K sample above) and ``f`` = the mean of the K samples
  (their average track, used as one forecast); the median over all moving points of all scenes. 0 = the forecast
  stands still, 1 = it moves the points as far as they really go, 0.5 = half as far.

The paired-instruction test, built on the moving region, is in :mod:`traj_forecast_ros.paired_metrics`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FVMD_CELL = 5
FVMD_CUBE_FRAMES = 4
FVMD_ANGLE_BINS = 8
FVMD_MAGNITUDE_CAP = 255.0
FVMD_EPS = 1e-5
LRTL_RANK = 5
MOVING_THRESHOLD_PX = 5.0  # a point moves when its true track gets farther than this from frame 0


def flatten_points(tracks: np.ndarray, lead: int) -> np.ndarray:
    """``[*lead_dims, T, *points, 2]`` -> ``[*lead_dims, T, P, 2]`` float64 (``lead`` leading axes before T)."""
    tracks = np.asarray(tracks, dtype=np.float64)
    if tracks.ndim < lead + 3 or tracks.shape[-1] != 2:
        raise ValueError(f"expected [{'x' * lead}T, points..., 2] tracks, got shape {tracks.shape}")
    return tracks.reshape(*tracks.shape[: lead + 1], int(np.prod(tracks.shape[lead + 1:-1])), 2)  # N may be 0


# ------------------------------------------------------------------------------------------------ MSE
def sample_mse(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``[N, K]`` per-sample MSE (pixels^2) of ``pred [N, K, T, *points, 2]`` against ``gt [N, T, *points, 2]``."""
    pred = flatten_points(pred, 2)
    gt = flatten_points(gt, 1)
    if pred.shape[0] != gt.shape[0] or pred.shape[2:] != gt.shape[1:]:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} do not match")
    return ((pred - gt[:, None]) ** 2).mean(axis=(2, 3, 4))


def _rollout_scores(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``[N, R, K]`` per-sample MSE against each of R ground-truth rollouts (``gt [N, R, T, ...]``)."""
    gt = np.asarray(gt)
    return np.stack([sample_mse(pred, gt[:, r]) for r in range(gt.shape[1])], axis=1)


def _k_scores(pred: np.ndarray, gt: np.ndarray, rollouts: bool) -> np.ndarray:
    """``[N, R, K]`` per-sample MSE (``R = 1`` without rollouts)."""
    return _rollout_scores(pred, gt) if rollouts else sample_mse(pred, gt)[:, None]


def best_of_k_mse(pred: np.ndarray, gt: np.ndarray, rollouts: bool = False) -> float:
    """``mean_n min_k mse(pred_{n,k}, gt_n)`` in pixels^2. ``rollouts=True``: ``gt`` is ``[N, R, T, ...]``."""
    return float(_k_scores(pred, gt, rollouts).min(axis=-1).mean())


def mean_of_k_mse(pred: np.ndarray, gt: np.ndarray, rollouts: bool = False) -> float:
    """``mean_n mean_k mse(pred_{n,k}, gt_n)`` in pixels^2. ``rollouts=True``: ``gt`` is ``[N, R, T, ...]``."""
    return float(_k_scores(pred, gt, rollouts).mean())


def best_and_mean_of_k_mse(pred: np.ndarray, gt: np.ndarray, rollouts: bool = False) -> Tuple[float, float]:
    """``(best_of_k_mse, mean_of_k_mse)`` from one pass over the per-sample scores (identical values)."""
    scores = _k_scores(pred, gt, rollouts)
    return float(scores.min(axis=-1).mean()), float(scores.mean())


# ------------------------------------------------------------------------------------------------ FVMD
def velocity_acceleration(tracks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Velocity and acceleration fields of ``tracks [..., T, Hq, Wq, 2]``, each the same shape.

    ``v_0 = 0, v_t = x_t - x_{t-1}``; ``a_0 = 0, a_t = v_t - v_{t-1}``.
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    time_axis = tracks.ndim - 4
    velocity = np.diff(tracks, axis=time_axis, prepend=np.take(tracks, [0], axis=time_axis))
    acceleration = np.diff(velocity, axis=time_axis, prepend=np.take(velocity, [0], axis=time_axis))
    return velocity, acceleration


def motion_histograms(field: np.ndarray, cell: int = FVMD_CELL, cube_frames: int = FVMD_CUBE_FRAMES,
                      angle_bins: int = FVMD_ANGLE_BINS) -> np.ndarray:
    """``[M, cubes * angle_bins]`` magnitude-weighted angle histograms of a vector field ``[M, T, Hq, Wq, 2]``."""
    field = np.asarray(field, dtype=np.float64)
    clips, frames, rows, cols, _ = field.shape
    cubes_t, cubes_y, cubes_x = frames // cube_frames, rows // cell, cols // cell
    if min(cubes_t, cubes_y, cubes_x) == 0:
        raise ValueError(f"FVMD needs at least {cube_frames} frames and a {cell}x{cell} grid, got {field.shape[1:4]}")
    field = field[:, : cubes_t * cube_frames, : cubes_y * cell, : cubes_x * cell]
    angle = np.arctan2(field[..., 1], field[..., 0])  # [M, T, H, W] in [-pi, pi]
    bins = np.clip(np.floor((angle + np.pi) / (2 * np.pi / angle_bins)), 0, angle_bins - 1).astype(np.int64)
    magnitude = np.minimum(np.linalg.norm(field, axis=-1), FVMD_MAGNITUDE_CAP)
    max_level = np.log2(FVMD_MAGNITUDE_CAP + 1.0)  # 8 for the 255 cap
    weight = np.minimum(np.ceil(np.log2(1.0 + magnitude)), max_level) / max_level  # [M, T, H, W]
    # Cube index of every vector, then one bincount per clip over (cube, bin).
    cube = ((np.arange(cubes_t * cube_frames) // cube_frames)[:, None, None] * cubes_y * cubes_x
            + (np.arange(cubes_y * cell) // cell)[None, :, None] * cubes_x
            + (np.arange(cubes_x * cell) // cell)[None, None, :])  # [T', H', W']
    slot = cube[None] * angle_bins + bins  # [M, T', H', W']
    num_slots = cubes_t * cubes_y * cubes_x * angle_bins
    offsets = (np.arange(clips) * num_slots)[:, None, None, None]
    counts = np.bincount((slot + offsets).ravel(), weights=weight.ravel(), minlength=clips * num_slots)
    return counts.reshape(clips, num_slots)


def motion_features(tracks: np.ndarray) -> np.ndarray:
    """``[M, D]`` FVMD features of clips ``[M, T, Hq, Wq, 2]``: velocity histograms then acceleration histograms."""
    velocity, acceleration = velocity_acceleration(tracks)
    return np.concatenate([motion_histograms(velocity), motion_histograms(acceleration)], axis=1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = FVMD_EPS) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[M1, D]`` and ``[M2, D]``.

    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr(((S_a + eps I)(S_b + eps I))^(1/2))`` with unbiased covariances
    (a set of one vector has zero covariance).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 1:
        raise ValueError(f"need two non-empty [M, D] feature sets of equal D, got {a.shape} and {b.shape}")
    dim = a.shape[1]
    mean_a, mean_b = a.mean(0), b.mean(0)
    # Covariance factors: S = F F^T with F = centred^T / sqrt(M - 1)  ([D, M]).
    factor_a = (a - mean_a).T / np.sqrt(max(len(a) - 1, 1))
    factor_b = (b - mean_b).T / np.sqrt(max(len(b) - 1, 1))
    trace_a, trace_b = float((factor_a**2).sum()), float((factor_b**2).sum())
    span = np.concatenate([factor_a, factor_b], axis=1)  # [D, Ma + Mb]
    if span.shape[1] < dim:
        basis, _ = np.linalg.qr(span)  # [D, r] orthonormal basis of both covariances' ranges
    else:
        basis = np.eye(dim)
    rank = basis.shape[1]
    small_a = basis.T @ factor_a  # [r, Ma]
    small_b = basis.T @ factor_b
    cov_a = small_a @ small_a.T + eps * np.eye(rank)  # [r, r]
    cov_b = small_b @ small_b.T + eps * np.eye(rank)
    values_a, vectors_a = np.linalg.eigh(cov_a)
    sqrt_a = (vectors_a * np.sqrt(np.clip(values_a, 0, None))) @ vectors_a.T  # (S_a + eps I)^(1/2)
    product = sqrt_a @ cov_b @ sqrt_a  # symmetric, similar to (S_a + eps)(S_b + eps)
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(product), 0, None)).sum()) + (dim - rank) * eps
    return float(((mean_a - mean_b) ** 2).sum() + trace_a + trace_b - 2.0 * trace_sqrt)


def fvmd(generated: np.ndarray, reference: np.ndarray) -> float:
    """FVMD between two sets of clips ``[M1, T, Hq, Wq, 2]`` and ``[M2, T, Hq, Wq, 2]`` (lower is better)."""
    return frechet_distance(motion_features(generated), motion_features(reference))


# ------------------------------------------------------------------------------------------------ LRTL
def low_rank_residual(matrix: np.ndarray, rank: int = LRTL_RANK) -> float:
    """Frobenius norm of ``matrix`` minus its rank-``rank`` truncated SVD: ``sqrt(sum_{i > rank} sigma_i^2)``."""
    singular = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    return float(np.sqrt((singular[rank:] ** 2).sum()))


def trajectory_matrix(tracks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[2T, P]`` matrix (rows x_0..x_{T-1}, y_0..y_{T-1}) of the points selected by ``mask [Hq, Wq]``."""
    points = np.asarray(tracks, dtype=np.float64)[:, mask]  # [T, P, 2]
    return np.concatenate([points[..., 0], points[..., 1]], axis=0)


def lrtl_scores(tracks: np.ndarray, object_ids: np.ndarray, rank: int = LRTL_RANK,
                include_background: bool = False, normalize: bool = False) -> np.ndarray:
    """Per-object LRTL of one track grid ``[T, Hq, Wq, 2]`` with frame-0 ``object_ids [Hq, Wq]`` -> ``[objects]``."""
    tracks = np.asarray(tracks)
    object_ids = np.asarray(object_ids)
    if tracks.shape[1:3] != object_ids.shape:
        raise ValueError(f"object_ids {object_ids.shape} do not match the track grid {tracks.shape[1:3]}")
    scores = []
    for object_id in np.unique(object_ids):
        if object_id == 0 and not include_background:
            continue
        mask = object_ids == object_id
        score = low_rank_residual(trajectory_matrix(tracks, mask), rank)
        scores.append(score / np.sqrt(mask.sum()) if normalize else score)
    return np.asarray(scores, dtype=np.float64)


def lrtl(pred: np.ndarray, object_ids: np.ndarray, rank: int = LRTL_RANK, include_background: bool = False,
         normalize: bool = False) -> float:
    """Mean LRTL over every (scene, sample, object) of ``pred [N, K, T, Hq, Wq, 2]`` with ``object_ids [N, Hq, Wq]``.

    Returns NaN when no scene has an object.
    """
    pred = np.asarray(pred)
    scores = [
        lrtl_scores(pred[n, k], object_ids[n], rank, include_background, normalize)
        for n in range(pred.shape[0]) for k in range(pred.shape[1])
    ]
    flat = np.concatenate(scores) if scores else np.zeros(0)
    return float(flat.mean()) if flat.size else float("nan")


# ------------------------------------------------------------------------------------------------ diversity
def diversity(pred: np.ndarray) -> float:
    """Mean pairwise distance (pixels) between the K samples of ``pred [N, K, T, *points, 2]``, over scenes."""
    pred = flatten_points(pred, 2)  # [N, K, T, P, 2]
    num_samples = pred.shape[1]
    if num_samples < 2:
        return 0.0
    total = np.zeros(pred.shape[0])
    pairs = 0
    for i in range(num_samples):
        for j in range(i + 1, num_samples):
            total += np.linalg.norm(pred[:, i] - pred[:, j], axis=-1).mean(axis=(1, 2))
            pairs += 1
    return float((total / pairs).mean())


def mean_displacement(pred: np.ndarray) -> float:
    """Mean over scenes, samples and points of ``|x_{T-1} - x_0|`` (pixels) for ``pred [N, K, T, *points, 2]``."""
    pred = flatten_points(pred, 2)
    return float(np.linalg.norm(pred[:, :, -1] - pred[:, :, 0], axis=-1).mean())


# ------------------------------------------------------------------------------------------------ summary
STATIC_MOVING_THRESHOLD_PX = 2.0  # a point of a resting scene "moves" when its final displacement exceeds this


def evaluate_predictions(pred: np.ndarray, gt: np.ndarray, object_ids: Optional[np.ndarray] = None,
                         kinds: Optional[Sequence[Optional[str]]] = None,
                         static_kinds: Sequence[str] = ("rest",),
                         moving_threshold_px: float = STATIC_MOVING_THRESHOLD_PX) -> Dict[str, float]:
    """Every metric for ``pred [N, K, T, Hq, Wq, 2]`` against ``gt [N, R, T, Hq, Wq, 2]``.

    Keys: ``best_of_k_mse``, ``mean_of_k_mse``, ``fvmd`` (all N*K samples vs all N*R rollouts), ``lrtl`` (needs
    ``object_ids``), ``diversity``, ``mean_displacement``, ``gt_mean_displacement``, the moving-region and
    calibration keys of :func:`moving_region_metrics` and, when ``kinds`` marks
    scenes of a kind in ``static_kinds``, on them: ``static_mean_displacement``, ``static_median_displacement``,
    ``static_max_displacement`` (final displacement ``|x_{T-1} - x_0|`` of every point of every sample, pixels) and
    ``static_moving_share`` (share of those points that move more than ``moving_threshold_px``).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim != 6 or gt.ndim != 6 or pred.shape[0] != gt.shape[0] or pred.shape[2:] != gt.shape[2:]:
        raise ValueError(f"need pred [N, K, T, Hq, Wq, 2] and gt [N, R, T, Hq, Wq, 2], got {pred.shape}, {gt.shape}")
    n, k = pred.shape[:2]
    best, mean = best_and_mean_of_k_mse(pred, gt, rollouts=True)
    results: Dict[str, float] = {
        "scenes": float(n),
        "samples": float(k),
        "best_of_k_mse": best,
        "mean_of_k_mse": mean,
        "fvmd": fvmd(pred.reshape(-1, *pred.shape[2:]), gt.reshape(-1, *gt.shape[2:])),
        "diversity": diversity(pred),
        "mean_displacement": mean_displacement(pred),
        "gt_mean_displacement": mean_displacement(gt),
    }
    results.update(moving_region_metrics(pred, gt, rollouts=True))
    if object_ids is not None:
        results["lrtl"] = lrtl(pred, object_ids)
        results["gt_lrtl"] = lrtl(gt, object_ids)
    if kinds is not None:
        static = np.array([kind in static_kinds for kind in kinds])
        if static.any():
            moved = np.linalg.norm(pred[static][:, :, -1] - pred[static][:, :, 0], axis=-1)  # [S, K, Hq, Wq]
            results["static_mean_displacement"] = float(moved.mean())
            results["static_median_displacement"] = float(np.median(moved))
            results["static_max_displacement"] = float(moved.max())
            results["static_moving_share"] = float((moved > moving_threshold_px).mean())
    return results


# ------------------------------------------------------------------------------------------------ one forecast
def forecast_errors(pred: np.ndarray, truth: np.ndarray) -> Dict[str, object]:
    """Accuracy of one forecast against its recorded true future(s) (the replay demo's score).

    ``pred [K, T, *points, 2]`` (K samples) and ``truth [R, T, *points, 2]`` (R recorded futures, usually 1) or
    ``[T, *points, 2]``, both in the same pixels. Returns ``best_of_k_mse`` (pixels^2; per true future the best
    sample's MSE, averaged over the R futures: the dataset metric of :func:`best_of_k_mse` for one scene),
    ``mean_of_k_mse``, ``best_of_k_ade_px`` / ``best_of_k_fde_px`` (mean point distance over all frames / at the
    last frame of the sample closest in MSE) and ``best_of_k_error_px_by_frame`` (that sample's mean point distance
    at every forecast frame, a list of T floats).
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if truth.ndim == pred.ndim - 1:
        truth = truth[None]  # one true future
    if truth.ndim != pred.ndim:
        raise ValueError(f"need truth [R, T, *points, 2] or [T, *points, 2] for a forecast {pred.shape}, "
                         f"got {truth.shape}")
    pred = flatten_points(pred, 1)  # [K, T, P, 2]
    truth = flatten_points(truth, 1)  # [R, T, P, 2]
    if pred.shape[1:] != truth.shape[1:]:
        raise ValueError(f"forecast {pred.shape[1:]} and truth {truth.shape[1:]} differ in frames or points")
    if not (np.isfinite(pred).all() and np.isfinite(truth).all()):
        raise ValueError("forecast or truth contains NaN/Inf")
    scores = _rollout_scores(pred[None], truth[None])[0]  # [R, K]
    best = scores.argmin(axis=1)  # [R] closest sample to each true future
    distance = np.linalg.norm(pred[best] - truth, axis=-1)  # [R, T, P]
    return {
        "best_of_k_mse": float(scores.min(axis=1).mean()),
        "mean_of_k_mse": float(scores.mean()),
        "best_of_k_ade_px": float(distance.mean()),
        "best_of_k_fde_px": float(distance[:, -1].mean()),
        "best_of_k_error_px_by_frame": [float(v) for v in distance.mean(axis=(0, 2))],
    }


# ------------------------------------------------------------------------------------------------ moving region
def peak_displacement(tracks: np.ndarray, leading_axes: int = 0) -> np.ndarray:
    """``max_t |x_t - x_0|`` (pixels) of ``tracks [*lead, T, *points, 2]`` -> ``[*lead, *points]``."""
    tracks = np.asarray(tracks, dtype=np.float64)
    offsets = tracks - np.take(tracks, [0], axis=leading_axes)
    return np.sqrt((offsets**2).sum(axis=-1)).max(axis=leading_axes)


def moving_mask(truth: np.ndarray, threshold_px: float = MOVING_THRESHOLD_PX, leading_axes: int = 0) -> np.ndarray:
    """``[*lead, *points]`` bool: the points of ``truth [*lead, T, *points, 2]`` whose peak displacement from
    frame 0 exceeds ``threshold_px`` (the moving region)."""
    return peak_displacement(truth, leading_axes) > threshold_px


class MovingRegionTally:
    """Moving-region errors and motion calibration, accumulated forecast by forecast (see the module docstring).

    >>> tally = MovingRegionTally()
    >>> for pred, truth in scenes:  # pred [K, T, *points, 2], truth [R, T, *points, 2] or [T, *points, 2]
    ...     tally.add(pred, truth)
    >>> tally.result()["calibration_best_sample"]
    """

    def __init__(self, threshold_px: float = MOVING_THRESHOLD_PX) -> None:
        self.threshold_px = float(threshold_px)
        self._points = 0
        self._scores: List[Tuple[float, float, float, float]] = []  # per (scene, rollout): best, mean, ADE, FDE
        self._true: List[np.ndarray] = []  # per (scene, rollout): true peak displacement of each moving point
        self._best: List[np.ndarray] = []  # the best sample's displacement at the true peak frame
        self._average: List[np.ndarray] = []  # the sample mean's displacement there

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Score one forecast ``pred [K, T, *points, 2]`` against ``truth [R, T, *points, 2]`` or
        ``[T, *points, 2]`` (each of the R true futures with its own moving region)."""
        pred, truth = np.asarray(pred), np.asarray(truth, dtype=np.float64)
        truth = flatten_points(truth[None] if truth.ndim == pred.ndim - 1 else truth, 1)  # [R, T, P, 2]
        pred = flatten_points(pred, 1)  # [K, T, P, 2]
        if pred.shape[1:] != truth.shape[1:]:
            raise ValueError(f"forecast {pred.shape[1:]} and truth {truth.shape[1:]} differ in frames or points")
        for future in truth:
            self._points += future.shape[1]
            offsets = np.linalg.norm(future - future[:1], axis=-1)  # [T, P]
            moving = offsets.max(axis=0) > self.threshold_px  # [P]
            if not moving.any():
                continue
            guess, target = pred[:, :, moving], future[:, moving]  # [K, T, M, 2], [T, M, 2]
            errors = ((guess - target) ** 2).mean(axis=(1, 2, 3))  # [K]
            best = int(errors.argmin())
            distance = np.linalg.norm(guess[best] - target, axis=-1)  # [T, M]
            self._scores.append((float(errors[best]), float(errors.mean()), float(distance.mean()),
                                 float(distance[-1].mean())))
            peak = offsets[:, moving].argmax(axis=0)  # [M] frame of each point's largest true displacement
            columns = np.arange(peak.size)
            self._true.append(offsets[:, moving][peak, columns])
            self._best.append(np.linalg.norm(guess[best][peak, columns] - guess[best, 0], axis=-1))
            average = guess.mean(axis=0)  # [T, M, 2]
            self._average.append(np.linalg.norm(average[peak, columns] - average[0], axis=-1))

    def result(self) -> Dict[str, float]:
        """``moving_threshold_px``, ``moving_points`` (moving points over all scenes and rollouts),
        ``moving_share`` (of all points), ``moving_best_of_k_mse`` / ``moving_mean_of_k_mse`` (px^2),
        ``moving_best_of_k_ade_px`` / ``moving_best_of_k_fde_px``, ``moving_true_displacement_px`` /
        ``moving_best_sample_displacement_px`` / ``moving_sample_mean_displacement_px`` (means over the moving
        points at their true peak frame), ``calibration_best_sample`` and ``calibration_sample_mean`` (medians of
        the ratios). NaN where no point moves."""
        nan = float("nan")
        moving = int(sum(values.size for values in self._true))
        result = {"moving_threshold_px": self.threshold_px, "moving_points": float(moving),
                  "moving_share": moving / self._points if self._points else nan}
        scores = np.asarray(self._scores, dtype=np.float64).reshape(-1, 4)
        names = ("moving_best_of_k_mse", "moving_mean_of_k_mse", "moving_best_of_k_ade_px", "moving_best_of_k_fde_px")
        for column, name in enumerate(names):
            result[name] = float(scores[:, column].mean()) if moving else nan
        true = np.concatenate(self._true) if moving else np.zeros(0)
        for name, parts in (("best_sample", self._best), ("sample_mean", self._average)):
            shifted = np.concatenate(parts) if moving else np.zeros(0)
            result[f"moving_{name}_displacement_px"] = float(shifted.mean()) if moving else nan
            result[f"calibration_{name}"] = float(np.median(shifted / true)) if moving else nan
        result["moving_true_displacement_px"] = float(true.mean()) if moving else nan
        return result


def moving_region_metrics(pred: np.ndarray, gt: np.ndarray, rollouts: bool = False,
                          threshold_px: float = MOVING_THRESHOLD_PX) -> Dict[str, float]:
    """:meth:`MovingRegionTally.result` of ``pred [N, K, T, *points, 2]`` against ``gt [N, T, *points, 2]``
    (``rollouts=True``: ``[N, R, T, *points, 2]``)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape[0] != gt.shape[0]:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} hold different numbers of scenes")
    tally = MovingRegionTally(threshold_px)
    for scene_pred, scene_gt in zip(pred, gt):
        tally.add(scene_pred, scene_gt if rollouts else scene_gt[None])
    return tally.result()
