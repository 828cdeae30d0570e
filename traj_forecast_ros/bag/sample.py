"""The bundled sample bag: real LIBERO frames from two cameras as ``sensor_msgs/Image`` + ``CameraInfo``.

Intrinsics: LIBERO renders with MuJoCo through robosuite. The ``agentview`` camera (robosuite ``table_arena.xml``)
sets no ``fovy``, so MuJoCo's default vertical field of view of 45 degrees applies; the wrist camera
``robot0_eye_in_hand`` (robosuite Panda ``robot.xml``) sets ``fovy="75"``. A MuJoCo camera is an ideal pinhole with
square pixels and the optical axis through the image centre, so for a 128x128 render
``fx = fy = (128 / 2) / tan(fovy / 2)`` and ``cx = cy = 63.5`` (ROS convention: integer pixel coordinates at
pixel centres), with no distortion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image as PILImage

from traj_forecast_ros.bag.io import BagWriter, PathLike
from traj_forecast_ros.bag.typestore import make_typestore
from traj_forecast_ros.errors import BagError

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_BAG = REPO_ROOT / "data" / "sample_bag" / "libero_two_views"
SHARED_IMAGES = REPO_ROOT.parent / "shared" / "data" / "images"
SAMPLE_START_NS = 1_700_000_000 * 10**9  # fixed first stamp (2023-11-14T22:13:20Z) keeps the bag reproducible


@dataclass(frozen=True)
class CameraSpec:
    """One camera of the sample: topic namespace, optical frame, vertical field of view, source file prefix."""

    namespace: str
    frame_id: str
    fovy_deg: float
    file_prefix: str


SAMPLE_CAMERAS = (
    CameraSpec("/agentview", "agentview_camera_optical_frame", 45.0, "libero_agent_"),
    CameraSpec("/eye_in_hand", "eye_in_hand_camera_optical_frame", 75.0, "libero_gripper_"),
)


def pinhole_intrinsics(width: int, height: int, fovy_deg: float) -> Dict[str, float]:
    """Focal lengths and principal point (pixels) of an ideal pinhole with vertical field of view ``fovy_deg``."""
    focal = (height / 2.0) / math.tan(math.radians(fovy_deg) / 2.0)
    return {"fx": focal, "fy": focal, "cx": (width - 1) / 2.0, "cy": (height - 1) / 2.0}


def sample_frame_paths(images_dir: Path, camera: CameraSpec) -> List[Path]:
    """The camera's frames ``<prefix>0.jpg, <prefix>1.jpg, ...`` in numeric order."""
    paths = sorted(images_dir.glob(f"{camera.file_prefix}*.jpg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not paths:
        raise BagError(f"no {camera.file_prefix}*.jpg frames in {images_dir}")
    return paths


def make_sample_bag(
    out: PathLike = SAMPLE_BAG,
    images_dir: PathLike = SHARED_IMAGES,
    rate_hz: float = 10.0,
    storage: str = "mcap",
    cameras: Sequence[CameraSpec] = SAMPLE_CAMERAS,
    num_frames: Optional[int] = None,
    overwrite: bool = True,
) -> Path:
    """Write the sample bag: per camera ``<ns>/image_raw`` (rgb8) and ``<ns>/camera_info`` at ``rate_hz``.

    Both cameras share each frame's stamp (LIBERO renders them in the same simulation step); the bag's receive
    time equals the stamp. MCAP bags are written with zstd chunk compression.
    """
    images_dir = Path(images_dir)
    if rate_hz <= 0:
        raise BagError(f"rate must be positive, got {rate_hz}")
    store = make_typestore()
    types = store.types
    frames = {camera: sample_frame_paths(images_dir, camera) for camera in cameras}
    count = min(len(paths) for paths in frames.values())
    if num_frames is not None:
        count = min(count, num_frames)
    period_ns = int(round(1e9 / rate_hz))
    with BagWriter(out, storage, store, overwrite=overwrite, compress=(storage == "mcap")) as writer:
        for index in range(count):
            stamp_ns = SAMPLE_START_NS + index * period_ns
            for camera in cameras:
                pixels = np.asarray(PILImage.open(frames[camera][index]).convert("RGB"), dtype=np.uint8)
                height, width = pixels.shape[:2]
                header = rosbags_header(store, stamp_ns, camera.frame_id)
                image = types["sensor_msgs/msg/Image"](
                    header=header, height=height, width=width, encoding="rgb8", is_bigendian=0,
                    step=width * 3, data=np.ascontiguousarray(pixels).reshape(-1),
                )
                writer.write_message(f"{camera.namespace}/image_raw", "sensor_msgs/msg/Image", stamp_ns, image)
                info = camera_info_message(store, header, width, height, camera.fovy_deg)
                writer.write_message(f"{camera.namespace}/camera_info", "sensor_msgs/msg/CameraInfo", stamp_ns, info)
    return Path(out)


def rosbags_header(store, stamp_ns: int, frame_id: str) -> object:
    """A ``std_msgs/Header`` (rosbags object) stamped ``stamp_ns`` nanoseconds."""
    types = store.types
    stamp = types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)


def camera_info_message(store, header, width: int, height: int, fovy_deg: float) -> object:
    """A ``sensor_msgs/CameraInfo`` (rosbags object) for an undistorted pinhole with vertical field of view
    ``fovy_deg``."""
    k = pinhole_intrinsics(width, height, fovy_deg)
    return pinhole_camera_info(store, header, width, height, k["fx"], k["fy"], k["cx"], k["cy"])


def pinhole_camera_info(store, header, width: int, height: int, fx: float, fy: float, cx: float, cy: float
                        ) -> object:
    """A ``sensor_msgs/CameraInfo`` (rosbags object) for an undistorted pinhole; ``cx, cy`` in the ROS convention
    (pixel centres at integer coordinates)."""
    types = store.types
    return types["sensor_msgs/msg/CameraInfo"](
        header=header,
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=np.zeros(5, dtype=np.float64),
        k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], dtype=np.float64),
        r=np.eye(3, dtype=np.float64).reshape(-1),
        p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], dtype=np.float64),
        binning_x=0,
        binning_y=0,
        roi=types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )
