"""Reading forecast bags back: stamps, forecasts as arrays, latency statistics and the animated overlay."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from traj_forecast_ros.bag.io import PathLike, deserialize, read_messages
from traj_forecast_ros.bag.offline import camera_namespace
from traj_forecast_ros.bag.typestore import FORECAST_TYPE, make_typestore
from traj_forecast_ros.errors import BagError
from traj_forecast_ros.metrics import MovingRegionTally, forecast_errors
from traj_forecast_ros.ros.conversions import image_msg_to_rgb
from traj_forecast_ros.ros.conversions import msg_to_arrays  # the README's example reads forecasts the same way
from traj_forecast_ros.viz import enlarged, forecast_frames, readable_stride, time_colors, write_gif

CDR_LITTLE_ENDIAN = b"\x00\x01"


def header_stamp_ns(cdr: bytes) -> int:
    """Stamp (ns) of a CDR message whose first field is a ``std_msgs/Header`` (Image, TrajectoryForecast, ...).

    The header's ``builtin_interfaces/Time`` (int32 sec, uint32 nanosec) directly follows the 4-byte
    encapsulation header, so it is read without decoding the (possibly large) rest of the message.
    """
    if len(cdr) < 12 or cdr[:2] not in (CDR_LITTLE_ENDIAN, b"\x00\x00"):
        raise BagError("not a CDR-encoded message with a header")
    order = "<" if cdr[:2] == CDR_LITTLE_ENDIAN else ">"
    sec, nanosec = struct.unpack(order + "iI", cdr[4:12])
    return sec * 10**9 + nanosec


def stamp_ns(header: object) -> int:
    """Nanoseconds of a (rosbags or rclpy) message header's stamp."""
    return int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)


def percentiles_ms(values_s: Sequence[float]) -> Dict[str, Optional[float]]:
    """p50 / p95 / max of durations given in seconds, in milliseconds (None when empty)."""
    if not values_s:
        return {"p50": None, "p95": None, "max": None, "count": 0}
    values = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"p50": round(float(np.percentile(values, 50)), 2), "p95": round(float(np.percentile(values, 95)), 2),
            "max": round(float(values.max()), 2), "count": int(values.size)}


def read_forecasts(bag: PathLike, topic: str) -> List[Tuple[int, object]]:
    """``(stamp_ns, decoded TrajectoryForecast)`` for every forecast on ``topic``, in bag order."""
    store = make_typestore()
    decoded = []
    for message in read_messages(bag, [topic]):
        forecast = deserialize(message, store)
        decoded.append((stamp_ns(forecast.header), forecast))
    return decoded


def read_images(bag: PathLike, topic: str, stamps: Optional[Iterable[int]] = None) -> Dict[int, np.ndarray]:
    """``stamp_ns -> [H, W, 3]`` uint8 RGB of the ``sensor_msgs/Image`` messages of ``topic`` (only ``stamps``
    when given), decoded like the node does (every encoding it accepts)."""
    store = make_typestore()
    wanted = set(stamps) if stamps is not None else None
    images = {}
    for message in read_messages(bag, [topic]):
        stamp = header_stamp_ns(message.data)
        if wanted is None or stamp in wanted:  # decode only the frames asked for
            images[stamp] = image_msg_to_rgb(deserialize(message, store))
    return images


def _labelled(frame: np.ndarray, text: str) -> np.ndarray:
    """``frame`` with ``text`` written in its top-left corner (white on a black box)."""
    image = PILImage.fromarray(frame)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((4, 2), text)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    return np.asarray(image)


def overlay_animation_frames(
    forecasts: Iterable[Tuple[int, object]],
    images: Dict[int, np.ndarray],
    scale: int = 3,
    stride: Optional[int] = None,
    sample: int = 0,
    steps: int = 6,
    truths: Optional[Dict[int, object]] = None,
) -> List[np.ndarray]:
    """Animation frames: for each forecast, its source image (enlarged ``scale`` x) with sample ``sample``'s
    tracks growing over the forecast horizon, shown at ``steps`` evenly spaced forecast frames (first to last).

    ``stride`` None draws about 16 x 16 tracks whatever the query grid. With ``truths`` (stamp -> recorded true
    future, a ``TrajectoryForecast``), a forecast that has a truth is shown beside it (left: forecast, right: truth,
    drawn the same way), so every frame of the GIF has the same width only if every forecast has its truth."""
    def animate(large: np.ndarray, message: object, label: str) -> List[np.ndarray]:
        tracks = msg_to_arrays(message)["tracks"]
        chosen = tracks[min(sample, tracks.shape[0] - 1)] * scale  # [T, H, W, 2] in enlarged pixels
        step = stride or readable_stride(chosen.shape[1:3])
        animated = forecast_frames(large, chosen, stride=step, thickness=max(1, scale - 1))
        shown = np.linspace(0, len(animated) - 1, max(2, steps)).round().astype(int)
        if truths is None:
            return [animated[i] for i in np.unique(shown)]
        return [_labelled(animated[i], label) for i in shown]  # steps frames a side, whatever each side's T

    frames: List[np.ndarray] = []
    for stamp, forecast in forecasts:
        if stamp not in images:
            raise BagError(f"no source image with stamp {stamp} for a forecast")
        large = enlarged(images[stamp], scale)
        shown = animate(large, forecast, "forecast")
        truth = None if truths is None else truths.get(stamp)
        if truth is not None:
            gap = np.full((large.shape[0], 4, 3), 255, dtype=np.uint8)
            shown = [np.concatenate([left, gap, right], axis=1)
                     for left, right in zip(shown, animate(large, truth, "truth"))]
        frames.extend(shown)
    return frames


def save_gif(frames: Sequence[np.ndarray], path: PathLike, durations_ms: Sequence[int],
             exact_colors: Optional[np.ndarray] = None) -> Path:
    """:func:`traj_forecast_ros.viz.write_gif` (one shared palette), with :class:`BagError` when there is nothing to
    animate."""
    if not frames:
        raise BagError("no frames to animate")
    return write_gif(frames, path, durations_ms, exact_colors=exact_colors)


def write_overlay_gif(
    forecast_bag: PathLike,
    forecast_topic: str,
    image_bag: PathLike,
    image_topic: str,
    out: PathLike,
    scale: int = 3,
    steps: int = 6,
    step_ms: int = 150,
    hold_ms: int = 700,
    truth_topic: Optional[str] = None,
) -> Path:
    """Animated GIF of every forecast in ``forecast_bag`` drawn over its source frame from ``image_bag``: each
    forecast grows over ``steps`` frames of ``step_ms``, and its full tracks stay ``hold_ms``. With
    ``truth_topic`` (recorded true futures in ``image_bag``), each forecast is shown beside its truth; forecasts
    without a truth of their stamp are left out then, so the frames keep one size."""
    forecasts = read_forecasts(forecast_bag, forecast_topic)
    if not forecasts:
        raise BagError(f"{forecast_bag} holds no forecast on {forecast_topic}: nothing to animate")
    truths = None
    if truth_topic is not None:
        recorded = dict(read_forecasts(image_bag, truth_topic))
        paired = [(stamp, forecast) for stamp, forecast in forecasts if stamp in recorded]
        if paired:  # else no forecast has its truth: plain overlay
            forecasts, truths = paired, recorded
    images = read_images(image_bag, image_topic, [stamp for stamp, _ in forecasts])
    frames = overlay_animation_frames(forecasts, images, scale=scale, steps=steps, truths=truths)
    per_forecast = len(frames) // len(forecasts)
    durations = [hold_ms if (i + 1) % per_forecast == 0 else step_ms for i in range(len(frames))]
    ramp = time_colors(int(forecasts[0][1].num_frames))
    return save_gif(frames, out, durations, exact_colors=ramp)


# ------------------------------------------------------------------------------------------------ accuracy
QUERY_MATCH_TOLERANCE_PX = 0.5  # forecast and truth must start from the same query points (source pixels)


def truth_topics(topics: Dict[str, object], exclude: Sequence[str] = ()) -> List[str]:
    """``TrajectoryForecast`` topics of a bag's topic table (:func:`~traj_forecast_ros.bag.io.bag_topics`), sorted:
    in an input bag these hold recorded ground-truth futures (not the node's own outputs, listed in ``exclude``)."""
    excluded = set(exclude)
    return sorted(t for t, info in topics.items()
                  if getattr(info, "msgtype", None) == FORECAST_TYPE and t not in excluded)


def choose_truth_topic(topics: Dict[str, object], image_topic: str, exclude: Sequence[str] = ()) -> Optional[str]:
    """The ground-truth topic for ``image_topic``: the bag's only ``TrajectoryForecast`` topic, or the one in the
    camera's namespace when there are several (None when the bag has none or the choice is ambiguous)."""
    candidates = truth_topics(topics, exclude)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    namespace = camera_namespace(image_topic) + "/"
    mine = [t for t in candidates if t.startswith(namespace)]
    return mine[0] if len(mine) == 1 else None


def score_forecasts(forecast_bag: PathLike, forecast_topic: str, truth_bag: PathLike, truth_topic: str
                    ) -> Dict[str, object]:
    """Best-of-K accuracy of every recorded forecast against the ground truth with the same stamp.

    The truth topic carries ``TrajectoryForecast`` messages whose ``tracks`` are the true futures (``num_samples``
    = R recorded futures, usually 1) of the frame with that stamp, in source-image pixels. A forecast is scored
    when a truth with its stamp exists and both start from the same query points and have the same number of
    frames; otherwise it is counted under ``unscored`` by reason. Returns the means over scored forecasts
    (:func:`traj_forecast_ros.metrics.forecast_errors`: ``best_of_k_mse``, ``best_of_k_ade_px``,
    ``best_of_k_fde_px``, ``best_of_k_error_px_by_frame``), the moving-region figures over all scored forecasts
    (:class:`traj_forecast_ros.metrics.MovingRegionTally`: ``moving_best_of_k_ade_px``, ``calibration_best_sample``,
    ... over the points whose true track moves more than 5 px) and ``per_forecast`` (stamp and errors of each).
    """
    truths = {stamp: msg_to_arrays(message) for stamp, message in read_forecasts(truth_bag, truth_topic)}
    per_forecast: List[Dict[str, object]] = []
    moving = MovingRegionTally()
    unscored: Dict[str, int] = {}
    for stamp, message in read_forecasts(forecast_bag, forecast_topic):
        truth = truths.get(stamp)
        arrays = msg_to_arrays(message)
        reason = None
        if truth is None:
            reason = "no_truth_for_stamp"
        elif arrays["tracks"].shape[1:] != truth["tracks"].shape[1:]:
            reason = "different_frames_or_grid"
        elif np.abs(arrays["query_points"] - truth["query_points"]).max() > QUERY_MATCH_TOLERANCE_PX:
            reason = "different_query_points"
        if reason is not None:
            unscored[reason] = unscored.get(reason, 0) + 1
            continue
        per_forecast.append({"stamp_ns": stamp, **forecast_errors(arrays["tracks"], truth["tracks"])})
        moving.add(arrays["tracks"], truth["tracks"])
    result: Dict[str, object] = {"truth_topic": truth_topic, "truths": len(truths), "scored": len(per_forecast),
                                 "unscored": unscored}
    if per_forecast:
        for key in ("best_of_k_mse", "mean_of_k_mse", "best_of_k_ade_px", "best_of_k_fde_px"):
            result[key] = float(np.mean([entry[key] for entry in per_forecast]))
        result["best_of_k_error_px_by_frame"] = [
            float(v) for v in np.mean([entry["best_of_k_error_px_by_frame"] for entry in per_forecast], axis=0)]
        result.update(moving.result())
    result["per_forecast"] = per_forecast
    return result


def format_accuracy(accuracy: Dict[str, object]) -> str:
    """One line for the printed summary."""
    unscored = ", ".join(f"{reason} {count}" for reason, count in sorted(accuracy.get("unscored", {}).items()))
    if not accuracy.get("scored"):
        return f"no forecast scored against {accuracy['truth_topic']}" + (f" ({unscored})" if unscored else "")
    text = (f"whole grid: best-of-K MSE {accuracy['best_of_k_mse']:.2f} px^2, ADE {accuracy['best_of_k_ade_px']:.2f} "
            f"px, FDE {accuracy['best_of_k_fde_px']:.2f} px over {accuracy['scored']} forecasts "
            f"(truth: {accuracy['truth_topic']})")
    if accuracy.get("moving_points"):
        text = (f"moving points ({int(accuracy['moving_points'])}, {accuracy['moving_share']:.0%} of all, true "
                f"motion > {accuracy['moving_threshold_px']:g} px): they travel "
                f"{accuracy['moving_true_displacement_px']:.1f} px, the best sample moves them "
                f"{accuracy['moving_best_sample_displacement_px']:.1f} px and the mean of the samples "
                f"{accuracy['moving_sample_mean_displacement_px']:.1f} px; calibration best sample "
                f"{accuracy['calibration_best_sample']:.2f}, sample mean {accuracy['calibration_sample_mean']:.2f}; "
                f"best-of-K ADE {accuracy['moving_best_of_k_ade_px']:.2f} px, FDE "
                f"{accuracy['moving_best_of_k_fde_px']:.2f} px, MSE {accuracy['moving_best_of_k_mse']:.1f} px^2. "
                + text)
    elif "moving_points" in accuracy:
        text = f"no point of the true futures moves more than {accuracy['moving_threshold_px']:g} px. " + text
    return text + (f"; unscored: {unscored}" if unscored else "")
