"""The forecasting API's value types: a request (`ForecastRequest`) and its result, K futures of a query grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from traj_forecast_ros.summaries import DEFAULT_MOVING_THRESHOLD_PX, PlannerSummaries, planner_summaries

DEFAULT_NUM_SAMPLES = 8  # K, sampled futures per image: the one default of the API, the CLI and the node
FRESH_SEED = -1  # seed meaning "fresh noise for every forecast" (same as None) in the API, the CLI and the node
MAX_SEED = 2**63 - 1


def whole_number(value: Any, name: str, minimum: int) -> int:
    """``value`` as a Python int (numpy integers accepted; bools, floats and strings refused with ValueError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def noise_seed(seed: Any) -> Optional[int]:
    """A forecast's seed: None or ``FRESH_SEED`` (-1) = fresh noise (None returned), else an int in
    ``[0, MAX_SEED]`` (the same noise every time)."""
    if seed is None:
        return None
    seed = whole_number(seed, "seed", FRESH_SEED)
    if seed > MAX_SEED:
        raise ValueError(f"seed must be <= {MAX_SEED}, got {seed}")
    return None if seed == FRESH_SEED else seed


def anchor_to_query_points(tracks: np.ndarray, query_points: np.ndarray) -> np.ndarray:
    """Move each sampled trajectory so that its frame 0 is exactly its query point, keeping its displacements.

    ``tracks [K, T, *points, 2]`` and ``query_points [*points, 2]`` -> ``tracks - tracks[:, :1] + query_points``,
    computed in float64 and returned in ``tracks``' dtype (frame 0 then equals ``query_points`` cast to it
    exactly; ``tracks[:, t] - tracks[:, 0]`` is kept up to that cast's rounding).
    """
    tracks = np.asarray(tracks)
    wide = tracks.astype(np.float64)
    anchored = wide - wide[:, :1] + np.asarray(query_points, dtype=np.float64)  # frame 0: 0 + q, exactly q
    return anchored.astype(tracks.dtype)


@dataclass(frozen=True)
class ForecastRequest:
    """One image to forecast in a batch (``Forecaster.forecast_batch``).

    Attributes:
        image: what ``Forecaster.forecast`` accepts: uint8 ``HxW``, ``HxWx3`` or ``HxWx4``.
        instruction: task text for language-conditioned models (None: the model's default instruction).
        seed: seed of this request's noise (None or -1: fresh, reported in the result).
        color_order: channel order of ``image`` (see :func:`traj_forecast_ros.geometry.to_rgb`).
    """

    image: Any
    instruction: Optional[str] = None
    seed: Optional[int] = None
    color_order: Optional[str] = None


@dataclass
class Forecast:
    """K sampled futures of a grid of query points.

    Attributes:
        tracks: ``[K, T, Hq, Wq, 2]`` float32, (x, y) positions in the pixel coordinates of the INPUT image
            (x = column, y = row, pixel centres at integer + 0.5 is NOT assumed: a pixel's centre is at
            ``index + 0.5``). Frame 0 is exactly the query grid: each sampled trajectory is re-anchored there
            with its decoded displacements kept (:func:`anchor_to_query_points`; ``Forecaster.forecast(...,
            anchor=False)`` returns the raw decoder output instead, whose frame 0 is the query grid up to VAE
            error). Values are not clamped to the image.
        query_points: ``[Hq, Wq, 2]`` float32, the query grid in input-image pixels (x, y).
        image_size: ``(height, width)`` of the input image.
        model_id: name of the model that produced the forecast.
        instruction: the task instruction used (``None`` for models without language conditioning).
        device: torch device the sampler ran on (``"cpu"``, ``"cuda:0"``).
        dtype: compute dtype actually used (``"float32"``, ``"bfloat16"``, ``"float16"``).
        timings: seconds per stage (``preprocess``, ``image_encoder``, ``text_encoder``, ``vae_encode``,
            ``denoise``, ``vae_decode``, ``total``).
        seed: the seed used for the noise, if any.
        guidance_scale: the classifier-free guidance the samples were drawn with (1 = none).
        frame_interval: seconds between forecast frames, from the model's config (0 = unknown).
        crop_box: ``(x_min, y_min, x_max, y_max)`` input pixels of the centre crop the model saw (the region the
            query grid covers); None = the whole image.
    """

    tracks: np.ndarray
    query_points: np.ndarray
    image_size: Tuple[int, int]
    model_id: str
    instruction: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    timings: Dict[str, float] = field(default_factory=dict)
    seed: Optional[int] = None
    guidance_scale: float = 1.0
    frame_interval: float = 0.0
    crop_box: Optional[Tuple[float, float, float, float]] = None

    @property
    def num_samples(self) -> int:
        """K, the number of sampled futures."""
        return int(self.tracks.shape[0])

    @property
    def num_frames(self) -> int:
        """T, the trajectory length including frame 0."""
        return int(self.tracks.shape[1])

    @property
    def grid_shape(self) -> Tuple[int, int]:
        """(Hq, Wq), rows and columns of the query grid."""
        return int(self.tracks.shape[2]), int(self.tracks.shape[3])

    def grid_region(self) -> Tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` input pixels the query grid covers: the crop box, else the whole image."""
        if self.crop_box is not None:
            return tuple(float(v) for v in self.crop_box)  # type: ignore[return-value]
        return (0.0, 0.0, float(self.image_size[1]), float(self.image_size[0]))

    def displacement(self) -> np.ndarray:
        """``[K, Hq, Wq]`` distance in pixels between each point's last and first position."""
        return np.linalg.norm(self.tracks[:, -1] - self.tracks[:, 0], axis=-1)

    def summaries(self, moving_threshold: float = DEFAULT_MOVING_THRESHOLD_PX) -> "PlannerSummaries":
        """The planner summaries (motion probability, first-move frame, per-frame spread, ...) of these tracks."""
        return planner_summaries(self.tracks, moving_threshold)

    def mean_displacement(self) -> np.ndarray:
        """``[Hq, Wq, 2]`` mean over samples of the (x, y) displacement from frame 0 to the last frame."""
        return self.summaries().mean_displacement

    def spread(self) -> np.ndarray:
        """``[Hq, Wq]`` spread across samples: RMS distance of the final positions from their mean, in pixels."""
        return self.summaries().spread

    def moving_fraction(self, threshold_px: float) -> np.ndarray:
        """``[Hq, Wq]`` fraction of samples whose point moves more than ``threshold_px`` at any frame."""
        return self.summaries(threshold_px).motion_probability
