"""The node's one input table and one output table, shared by the live node, ``bag run``, the recorder and the
launch file.

- :data:`INPUTS`: image transport -> message type, topic suffix and decoder (message, max_pixels) -> uint8 RGB.
- :data:`OUTPUTS`: per-camera output name -> message type, QoS and builder (the :class:`OutputBuilder` method of
  that name).

Adding an input transport touches ``conversions.py`` (its decoder) and this table; adding an output touches
``outputs.py`` (its builder method) and this table. Everything else (subscriptions, publishers, the ``transport``
parameter's choices, ``bag run``'s topics and writer, the recorder's default topics, the launch file's help) reads
the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numpy as np
from rclpy.qos import QoSProfile

from traj_forecast_ros.geometry import MIN_IMAGE_SIDE
from traj_forecast_ros.ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb
from traj_forecast_ros.ros.outputs import OutputBuilder, OutputJob
from traj_forecast_ros.ros.qos import qos_from_name

Decoder = Callable[[Any, int], np.ndarray]  # (message, max_pixels) -> [H, W, 3] uint8 RGB; raises InvalidImageError


@dataclass(frozen=True)
class InputSpec:
    """One image transport: what is subscribed (``<image_topic><topic_suffix>``, ``msgtype``) and how it decodes."""

    transport: str
    msgtype: str  # package/msg/Name, as bags and ``ros2 topic`` write it
    topic_suffix: str
    decode: Decoder


@dataclass(frozen=True)
class OutputSpec:
    """One per-camera output: ``~/<name>`` (single camera) or ``~/<camera>/<name>``."""

    name: str  # also the OutputBuilder method that builds it: (job) -> message object, or its CDR bytes
    msgtype: str
    qos: QoSProfile
    on_demand: bool  # built only while someone subscribes (off the forecast worker's thread)

    def build(self, builder: OutputBuilder, job: OutputJob) -> Any:
        """This output of ``job``, built by ``builder``."""
        return getattr(builder, self.name)(job)


def _decode_raw(message: Any, max_pixels: int) -> np.ndarray:
    return image_msg_to_rgb(message, max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE)


def _decode_compressed(message: Any, max_pixels: int) -> np.ndarray:
    return compressed_msg_to_rgb(message, max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE)


INPUTS: Dict[str, InputSpec] = {spec.transport: spec for spec in (
    InputSpec("raw", "sensor_msgs/msg/Image", "", _decode_raw),
    InputSpec("compressed", "sensor_msgs/msg/CompressedImage", "/compressed", _decode_compressed),
)}
TRANSPORTS: Tuple[str, ...] = tuple(INPUTS)
INPUT_BY_MSGTYPE: Dict[str, InputSpec] = {spec.msgtype: spec for spec in INPUTS.values()}

OUTPUT_QOS = qos_from_name("reliable", depth=2)
OUTPUTS: Tuple[OutputSpec, ...] = (
    OutputSpec("forecast", "traj_forecast_msgs/msg/TrajectoryForecast", OUTPUT_QOS, on_demand=False),
    OutputSpec("markers", "visualization_msgs/msg/MarkerArray", OUTPUT_QOS, on_demand=True),
    OutputSpec("overlay", "sensor_msgs/msg/Image", OUTPUT_QOS, on_demand=True),
)
CAMERA_INFO_MSGTYPE = "sensor_msgs/msg/CameraInfo"
INSTRUCTION_MSGTYPE = "std_msgs/msg/String"


def output_topic(camera: str, output: str, node_prefix: str = "~") -> str:
    """``~/<output>`` for the single (unnamed) camera, ``~/<camera>/<output>`` for a named one; ``node_prefix``
    replaces ``~`` (``bag run`` writes ``<namespace>/forecast_node``)."""
    return f"{node_prefix}/{camera}/{output}" if camera else f"{node_prefix}/{output}"
