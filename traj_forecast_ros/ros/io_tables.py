"""The node's one input table and one output table, shared by the live node, ``bag run``, the recorder and the
launch file.

- :data:`INPUTS`: image transport -> message type, topic suffix and decoder (the
  :mod:`~traj_forecast_ros.ros.conversions` function of that name: (message, max_pixels, min_side) -> uint8 RGB;
  :func:`~traj_forecast_ros.ros.conversions.decode_image` applies it).
- :data:`OUTPUTS`: per-camera output name -> message type, QoS and builder (the :class:`OutputBuilder` method of
  that name).

Adding an input transport touches ``conversions.py`` (its decoder) and this table; adding an output touches
``outputs.py`` (its builder method) and this table. Everything else (subscriptions, publishers, the ``transport``
parameter's choices, ``bag run``'s topics and writer, the recorder's default topics, the launch file's help) reads
the tables. Light on purpose (no decoder, builder or model import): the recorder and the launch file read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Tuple

from rclpy.qos import QoSProfile

from traj_forecast_ros.ros.qos import qos_from_name

if TYPE_CHECKING:
    from traj_forecast_ros.ros.outputs import OutputBuilder, OutputJob


@dataclass(frozen=True)
class InputSpec:
    """One image transport: what is subscribed (``<image_topic><topic_suffix>``, ``msgtype``) and how it decodes."""

    transport: str
    msgtype: str  # package/msg/Name, as bags and ``ros2 topic`` write it
    topic_suffix: str
    decoder: str  # the conversions function: (message, max_pixels=, min_side=) -> [H, W, 3] uint8 RGB


@dataclass(frozen=True)
class OutputSpec:
    """One per-camera output: ``~/<name>`` (single camera) or ``~/<camera>/<name>``."""

    name: str  # also the OutputBuilder method that builds it: (job) -> message object, or its CDR bytes
    msgtype: str
    qos: QoSProfile
    on_demand: bool  # built only while someone subscribes (off the forecast worker's thread)

    def build(self, builder: "OutputBuilder", job: "OutputJob") -> Any:
        """This output of ``job``, built by ``builder``."""
        return getattr(builder, self.name)(job)


INPUTS: Dict[str, InputSpec] = {spec.transport: spec for spec in (
    InputSpec("raw", "sensor_msgs/msg/Image", "", "image_msg_to_rgb"),
    InputSpec("compressed", "sensor_msgs/msg/CompressedImage", "/compressed", "compressed_msg_to_rgb"),
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


def output_topic(camera: str, output: str, node_prefix: str = "~") -> str:
    """``~/<output>`` for the single (unnamed) camera, ``~/<camera>/<output>`` for a named one; ``node_prefix``
    replaces ``~`` (``bag run`` writes ``<namespace>/forecast_node``)."""
    return f"{node_prefix}/{camera}/{output}" if camera else f"{node_prefix}/{output}"
