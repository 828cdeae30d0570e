"""``traj-forecast bag run``: forecast every image of a bag offline into a new bag (the regression-test mode).

No ROS graph is involved: images are read from the bag, decoded by the node's input table, forecast one by one with
a fixed seed, and the outputs of the node's output table (``TrajectoryForecast``, ``MarkerArray``, overlay
``Image``, built by the node's own :class:`~traj_forecast_ros.ros.outputs.OutputBuilder` with the node's default
parameters) are written with the source image's header and bag timestamp. For an image topic ``<ns>/<name>`` the
outputs go to ``<ns>/forecast_node/<output>``: the topics the node publishes when it runs in the camera's namespace.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo
from tqdm import tqdm

from traj_forecast_ros.bag.io import BagWriter, PathLike, bag_topics, read_messages, remove_bag
from traj_forecast_ros.bag.model_choice import best_offline_model
from traj_forecast_ros.errors import BagError, InvalidImageError, TrajForecastError
from traj_forecast_ros.forecast import noise_seed, whole_number
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.ros.batching import CallOptions, forecast_requests, request_for
from traj_forecast_ros.ros.conversions import ImageMessageError, decode_image
from traj_forecast_ros.ros.io_tables import CAMERA_INFO_MSGTYPE, INPUT_BY_MSGTYPE, OUTPUTS, output_topic
from traj_forecast_ros.ros.outputs import OutputBuilder, OutputJob
from traj_forecast_ros.ros.params import default_settings
from traj_forecast_ros.ros.qos import message_class
from traj_forecast_ros.ros.stats import classify_error, reason_category

log = logging.getLogger(__name__)

NODE_NAME = "forecast_node"
IMAGE_TYPES = tuple(INPUT_BY_MSGTYPE)  # what the node's input table decodes


def camera_namespace(image_topic: str) -> str:
    """``/arm/cam/image_raw`` -> ``/arm/cam``; ``/cam/image_raw/compressed`` -> ``/cam``; ``/image`` -> ``""``."""
    topic = image_topic.rstrip("/")
    if topic.endswith("/compressed"):
        topic = topic[: -len("/compressed")]
    return topic.rsplit("/", 1)[0]


def output_topics(image_topic: str, camera: str = "") -> Dict[str, str]:
    """The node's output topics for a camera, one per row of the output table (``{"forecast": ..., ...}``): the
    node in the image topic's namespace, with ``camera`` its name among several (``""``: the single camera)."""
    prefix = f"{camera_namespace(image_topic)}/{NODE_NAME}"
    return {spec.name: output_topic(camera, spec.name, node_prefix=prefix) for spec in OUTPUTS}


def as_cdr(message: Any) -> bytes:
    """An output as the bag stores it: builders return a message object or, for the markers, its CDR already."""
    return message if isinstance(message, bytes) else serialize_message(message)


def frame_period_s(stamps_ns: Sequence[int]) -> Optional[float]:
    """Median time between consecutive stamps, in seconds (None with fewer than two)."""
    if len(stamps_ns) < 2:
        return None
    return float(np.median(np.diff(np.asarray(stamps_ns, dtype=np.int64)))) / 1e9


def _deserialize(data: bytes, message_class: Any) -> Any:
    """CDR bytes -> rclpy message; bytes the installed definition cannot read (a bag recorded with another
    definition of the type, or damaged data) raise ``ImageMessageError`` with reason ``undecodable``."""
    try:
        return deserialize_message(data, message_class)
    except Exception as exc:  # noqa: BLE001 - rclpy raises RMWError, RuntimeError, ... for bytes it cannot read
        raise ImageMessageError("undecodable", f"not a readable {message_class.__name__} for the installed message "
                                               f"definition (recorded with another one?): {exc}") from exc


def _decode_image(msgtype: str, data: bytes, max_pixels: int) -> tuple:
    """CDR bytes -> (rclpy message, uint8 RGB) by the node's input table, with its limits (``max_pixels``)."""
    spec = INPUT_BY_MSGTYPE[msgtype]
    message = _deserialize(data, message_class(spec.msgtype))
    return message, decode_image(spec.transport, message, max_pixels)


def _discard(writer: BagWriter) -> None:
    """Close and delete the bag of a run that did not finish."""
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - the bag is deleted anyway
        pass
    if writer.path.exists():
        remove_bag(writer.path)


def _check_arguments(out_bag: PathLike, overwrite: bool, num_samples: Optional[int], steps: Optional[int],
                     seed: int) -> None:
    """Refuse bad arguments before anything is loaded (``BagError``)."""
    try:
        if num_samples is not None:
            whole_number(num_samples, "the number of samples (--samples)", 1)
        if steps is not None and steps != 0:  # 0: the model's default_steps, as the node's parameter
            whole_number(steps, "the number of Euler time points (--steps)", 2)
        if noise_seed(seed) is None:
            raise ValueError(f"bag run uses one fixed seed for every image: give --seed >= 0, got {seed}")
    except ValueError as exc:
        raise BagError(str(exc)) from exc
    if Path(out_bag).exists() and not overwrite:
        raise BagError(f"{out_bag} exists already (pass overwrite / --overwrite to replace it)")


def camera_info_topic(image_topic: str, available: Dict[str, Any]) -> Optional[str]:
    """The ``sensor_msgs/CameraInfo`` topic beside ``image_topic`` (``<namespace>/camera_info``) when the bag's
    topic table ``available`` (:func:`~traj_forecast_ros.bag.io.bag_topics`) has it with that type, else None."""
    topic = f"{camera_namespace(image_topic)}/camera_info"
    info = available.get(topic)
    return topic if info is not None and info.msgtype == CAMERA_INFO_MSGTYPE else None


def image_topics(path: PathLike) -> List[str]:
    """The bag's topics of an image type the node decodes (its input table), sorted."""
    return sorted(name for name, info in bag_topics(path).items() if info.msgtype in IMAGE_TYPES)


def select_image_topics(in_bag: PathLike, topics: Optional[Iterable[str]],
                        available: Optional[Dict[str, Any]] = None) -> List[str]:
    """The image topics to forecast: ``topics`` (each must be an image topic) or every image topic of the bag.

    ``available``: the bag's topic table when already read (else it is read here).
    """
    available = bag_topics(in_bag) if available is None else available
    if topics:
        chosen = list(topics)
        for topic in chosen:
            if topic not in available:
                raise BagError(f"bag {in_bag} has no topic {topic}; it has {sorted(available)}")
            if available[topic].msgtype not in IMAGE_TYPES:
                raise BagError(f"{topic} carries {available[topic].msgtype}, not an image type {IMAGE_TYPES}")
        return chosen
    chosen = sorted(t for t, info in available.items() if info.msgtype in IMAGE_TYPES)
    if not chosen:
        raise BagError(f"bag {in_bag} has no sensor_msgs/Image or CompressedImage topic: {sorted(available)}")
    return chosen


def run_bag(
    in_bag: PathLike,
    out_bag: PathLike,
    model: Optional[str] = None,
    topics: Optional[Iterable[str]] = None,
    forecaster: Any = None,
    device: str = "auto",
    dtype: str = "auto",
    num_samples: Optional[int] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    instruction: Optional[str] = None,
    storage: str = "mcap",
    copy_input: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    params: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Forecast every image of ``in_bag`` into ``out_bag``; returns a summary (counts, drops, timings, topics).

    Deterministic: every image is forecast with the same ``seed``, so the output depends only on the image.
    Arguments are checked before the model is loaded; a run that fails (or is interrupted) removes its partial
    output, so it can simply be run again. An image the installed message definition cannot read is counted as
    rejected (``undecodable``).
    ``num_samples``, ``steps`` and the output settings default to the node's parameters (``params`` overrides). Images
    that cannot be forecast are counted by reason in the summary (and logged), never silently skipped. Pass a
    ready ``forecaster`` or a ``model`` (registry name or directory; default: the best model available offline).
    """
    _check_arguments(out_bag, overwrite, num_samples, steps, seed)
    available = bag_topics(in_bag)
    image_topics = select_image_topics(in_bag, topics, available)
    info_present = {t: info for t in image_topics if (info := camera_info_topic(t, available)) is not None}
    outputs_by_topic = {t: output_topics(t) for t in image_topics}
    model_note = None
    if forecaster is None:
        if model is None:
            model, model_note = best_offline_model()
        forecaster = Forecaster.from_pretrained(model, device=device, dtype=dtype, download=False)
    config = getattr(forecaster, "config", None)
    settings = default_settings().updated(params or {})
    steps = (int(settings["steps"]) if steps is None else int(steps)) or None  # None: the model's default_steps
    steps = steps or int(getattr(config, "default_steps", 0)) or None  # the summary records the number used
    settings = settings.updated({"seed": seed, "steps": steps or 0,
                                 "num_samples": int(settings["num_samples"]) if num_samples is None else num_samples})
    options = CallOptions.from_settings(settings)  # one limit: max_pixels decodes the frames and goes to the model
    builder = OutputBuilder()
    model_frame_interval = float(getattr(config, "frame_interval_s", None) or 0.0)

    stamps: Dict[str, List[int]] = {t: [] for t in image_topics}
    for message in read_messages(in_bag, image_topics):
        stamps[message.topic].append(message.timestamp)
    periods = {t: frame_period_s(s) for t, s in stamps.items()}
    total = sum(len(s) for s in stamps.values())

    wanted = None if copy_input else image_topics + sorted(set(info_present.values()))
    not_forecast = {"dropped": Counter(), "rejected": Counter()}  # frames_in = forecasts_out + dropped + rejected
    per_topic: Dict[str, int] = {t: 0 for t in image_topics}
    inference_s: List[float] = []
    latest_info: Dict[str, Any] = {}
    bar = tqdm(total=total, unit="img", desc="forecasting", disable=not progress or not sys.stderr.isatty())
    writer = BagWriter(out_bag, storage, overwrite=overwrite)
    try:
        writer.open()
        for message in read_messages(in_bag, wanted):
            if copy_input:
                writer.write(message.topic, message.msgtype, message.timestamp, message.data)
            if message.msgtype == CAMERA_INFO_MSGTYPE:
                try:
                    latest_info[message.topic] = _deserialize(message.data, CameraInfo)
                except InvalidImageError as exc:
                    log.warning("%s @ %d: CameraInfo ignored: %s", message.topic, message.timestamp, exc)
                continue
            if message.topic not in per_topic:
                continue
            bar.update(1)
            try:
                source, rgb = _decode_image(message.msgtype, message.data, options.max_pixels)
                [forecast] = forecast_requests(forecaster, [request_for(rgb, instruction, settings)], options)
            except (InvalidImageError, TrajForecastError) as exc:  # bad input or non-finite output; bugs propagate
                reason = classify_error(exc)
                not_forecast["rejected" if reason_category(reason) == "rejected" else "dropped"][reason] += 1
                log.warning("%s @ %d: image not forecast (%s): %s", message.topic, message.timestamp, reason, exc)
                continue
            inference_s.append(float(forecast.timings.get("total", 0.0)))
            job = OutputJob(forecast, rgb, source.header, settings,
                            camera_info=latest_info.get(info_present.get(message.topic, "")),
                            period_s=periods[message.topic], model_frame_interval=model_frame_interval)
            for spec in OUTPUTS:  # the node's output table, built by the node's builder
                writer.write(outputs_by_topic[message.topic][spec.name], spec.msgtype, message.timestamp,
                             as_cdr(spec.build(builder, job)))
            per_topic[message.topic] += 1
        writer.close()
    except BaseException:  # a failure or Ctrl-C leaves no partial bag (a rerun would refuse it as existing)
        _discard(writer)
        raise
    finally:
        bar.close()
    summary: Dict[str, Any] = {
        "in_bag": str(in_bag),
        "out_bag": str(out_bag),
        "model": str(getattr(forecaster, "model_id", model)),
        "seed": seed,
        "num_samples": options.num_samples,
        "steps": steps,
        "frames_in": total,
        "forecasts_out": sum(per_topic.values()),
        "forecasts_by_topic": per_topic,
        "dropped": dict(not_forecast["dropped"]),
        "rejected": dict(not_forecast["rejected"]),
        "inference_p50_s": float(np.median(inference_s)) if inference_s else None,
        "output_topics": outputs_by_topic,
    }
    if model_note:
        summary["model_choice"] = model_note
    return summary
