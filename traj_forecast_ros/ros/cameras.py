"""The node's cameras: the ``cameras`` parameter, each camera's parameters, and the checks made on them.

Scheme (ROS parameters cannot nest, and YAML nesting maps onto dotted names)::

    cameras: [agentview, robot0_eye_in_hand]        # names; unset or [] = the single-camera setup (image_topic)
    agentview:
      image_topic: agentview/image_raw              # default <camera>/image
      transport: raw                                # raw | compressed (the input table's transports)
      camera_info_topic: agentview/camera_info      # '' = none (markers use marker_pixel_size)
      instruction_topic: ''                         # '' = the node's instruction (parameter and topic)
      camera_frame: agentview_camera_optical_frame  # '' = the node's camera_frame

Each ``<camera>.<field>`` is declared when the camera is (at startup, or at configure for names set since), with the
value given on the command line or in the params file. A camera's outputs are ``~/<camera>/forecast``,
``~/<camera>/markers`` and ``~/<camera>/overlay``; the single-camera setup keeps ``~/forecast``, ... . No rclpy node
here (the name checks use rclpy's validators).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from traj_forecast_ros.ros.io_tables import INPUTS, TRANSPORTS
from traj_forecast_ros.ros.settings import ParamSpec, Settings

CAMERAS_PARAMETER = "cameras"
SINGLE_CAMERA = ""  # the name of the one implicit camera of the image_topic setup
CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*")  # one ROS name token, no '__', no trailing '_'

CAMERA_FIELDS: Tuple[ParamSpec, ...] = (
    ParamSpec("image_topic", "", "This camera's image topic ('' = <camera>/image; the compressed transport adds "
              "/compressed). Applies at activate."),
    ParamSpec("transport", "raw", "raw (sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage). Applies at "
              "activate.", choices=TRANSPORTS),
    ParamSpec("camera_info_topic", "", "This camera's sensor_msgs/CameraInfo topic ('' = none). Applies at "
              "activate."),
    ParamSpec("instruction_topic", "", "std_msgs/String topic with this camera's instruction ('' = the node's "
              "instruction). Applies at activate."),
    ParamSpec("camera_frame", "", "frame_id for this camera's images whose header has none ('' = the node's "
              "camera_frame)."),
)
CAMERA_FIELD_SPECS: Dict[str, ParamSpec] = {spec.name: spec for spec in CAMERA_FIELDS}
TOPIC_FIELDS = ("image_topic", "camera_info_topic", "instruction_topic")

# LIBERO's two views, as the bundled bag (data/sample_bag/libero_two_views) and a LIBERO bridge publish them.
LIBERO_CAMERAS: Dict[str, Dict[str, str]] = {
    "agentview": {"image_topic": "/agentview/image_raw", "camera_info_topic": "/agentview/camera_info",
                  "camera_frame": "agentview_camera_optical_frame"},
    "robot0_eye_in_hand": {"image_topic": "/eye_in_hand/image_raw", "camera_info_topic": "/eye_in_hand/camera_info",
                           "camera_frame": "eye_in_hand_camera_optical_frame"},
}


@dataclass(frozen=True)
class CameraConfig:
    """One camera's inputs, read from a parameter snapshot."""

    name: str  # SINGLE_CAMERA for the image_topic setup
    image_topic: str
    transport: str
    camera_info_topic: str
    instruction_topic: str  # '' = the node's instruction topic only

    @property
    def subscribed_topic(self) -> str:
        """The topic the image subscription uses: the image topic plus the transport's suffix."""
        return f"{self.image_topic.rstrip('/')}{INPUTS[self.transport].topic_suffix}"


def camera_parameter(camera: str, field: str) -> str:
    """The name of a camera's parameter: ``<camera>.<field>``."""
    return f"{camera}.{field}"


def camera_field_default(camera: str, field: str) -> Any:
    """The default of ``<camera>.<field>`` (the image topic's depends on the camera's name)."""
    return f"{camera}/image" if field == "image_topic" else CAMERA_FIELD_SPECS[field].default


def split_camera_parameter(name: str, cameras: Sequence[str]) -> Optional[Tuple[str, ParamSpec]]:
    """``(camera, field spec)`` when ``name`` is ``<camera>.<field>`` of one of ``cameras``, else None."""
    camera, _, field = name.rpartition(".")
    if camera in cameras and field in CAMERA_FIELD_SPECS:
        return camera, CAMERA_FIELD_SPECS[field]
    return None


def camera_names_problem(names: Sequence[str], name_problem: Callable[[str], Optional[str]]) -> Optional[str]:
    """Why ``names`` cannot be the ``cameras`` parameter (None when they can): each must be one ROS name token (it
    becomes a topic level and a parameter prefix), valid in this node's namespace (``name_problem``), and unique."""
    for name in names:
        if not CAMERA_NAME.fullmatch(name):
            return (f"'cameras': {name!r} is not a valid camera name (letters, digits and single underscores, "
                    "starting with a letter: it becomes a topic level and a parameter prefix)")
        problem = name_problem(name)
        if problem:
            return f"'cameras': {name!r} gives invalid output topics ({problem})"
    duplicates = sorted({name for name in names if list(names).count(name) > 1})
    if duplicates:
        return f"'cameras' names {', '.join(duplicates)} more than once"
    return None


def camera_configs(settings: Settings, cameras: Sequence[str]) -> List[CameraConfig]:
    """The cameras' inputs from a snapshot: the named ``cameras``, or the one camera of the image_topic setup."""
    if not cameras:
        return [CameraConfig(SINGLE_CAMERA, str(settings["image_topic"]), str(settings["image_transport"]),
                             str(settings["camera_info_topic"]), "")]
    configs = []
    for camera in cameras:
        value = {field: settings.get(camera_parameter(camera, field), camera_field_default(camera, field))
                 for field in CAMERA_FIELD_SPECS}
        configs.append(CameraConfig(camera, str(value["image_topic"]) or camera_field_default(camera, "image_topic"),
                                    str(value["transport"]), str(value["camera_info_topic"]),
                                    str(value["instruction_topic"])))  # camera_frame: publishing.output_header
    return configs


def duplicate_topics_problem(configs: Sequence[CameraConfig], resolve: Callable[[str], str]) -> Optional[str]:
    """Why the cameras' inputs clash (None when they do not): two cameras subscribing to the same image topic
    (``resolve``: a topic name -> its fully qualified name) would forecast every frame twice."""
    seen: Dict[str, str] = {}
    for config in configs:
        topic = resolve(config.subscribed_topic)
        if topic in seen:
            return f"cameras {seen[topic]} and {config.name} both subscribe to {topic}"
        seen[topic] = config.name
    return None


def camera_overrides(cameras: Mapping[str, Mapping[str, str]]) -> Dict[str, Any]:
    """Node parameter overrides for ``cameras`` (name -> fields): ``cameras`` plus each ``<camera>.<field>``
    (the launch file's two-view setup and ``bag replay`` of several views)."""
    overrides: Dict[str, Any] = {CAMERAS_PARAMETER: list(cameras)}
    for camera, fields in cameras.items():
        overrides.update({camera_parameter(camera, field): value for field, value in fields.items()})
    return overrides
