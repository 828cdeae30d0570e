"""RViz markers for a forecast: trajectories drawn on an image plane in front of the camera.

Pixels are lifted onto a plane at a fixed depth in the camera's optical frame (REP-103 optical: x right, y down,
z forward), either with a pinhole model from ``sensor_msgs/CameraInfo`` or with a plain metres-per-pixel scale.
The result is a ``MarkerArray``: one ``DELETEALL`` marker (clears the previous forecast), then one ``LINE_LIST``
per sample whose vertex colours ramp over forecast time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from traj_forecast_ros.viz import time_colors

MARKER_NAMESPACE = "trajectory_forecast"


@dataclass(frozen=True)
class ImagePlane:
    """Pinhole lifting of pixels (x right, y down) to points on the plane ``z = depth`` (metres, optical frame)."""

    fx: float
    fy: float
    cx: float
    cy: float
    depth: float

    @classmethod
    def from_pixel_size(cls, image_size: Tuple[int, int], pixel_size: float, depth: float) -> "ImagePlane":
        """A plane where one pixel measures ``pixel_size`` metres, centred on the image (``image_size`` = (h, w))."""
        if pixel_size <= 0 or depth <= 0:
            raise ValueError(f"pixel_size and depth must be > 0, got {pixel_size}, {depth}")
        focal = depth / pixel_size
        return cls(fx=focal, fy=focal, cx=image_size[1] / 2.0, cy=image_size[0] / 2.0, depth=depth)

    @classmethod
    def from_camera_info(cls, camera_info: Any, image_size: Tuple[int, int], depth: float) -> "ImagePlane":
        """A plane from a ``CameraInfo`` K matrix, rescaled when the calibration size differs from ``image_size``."""
        k = [float(v) for v in camera_info.k]
        if k[0] <= 0 or k[4] <= 0:
            raise ValueError("CameraInfo has no focal length (k[0] or k[4] <= 0)")
        scale_x = image_size[1] / camera_info.width if camera_info.width else 1.0
        scale_y = image_size[0] / camera_info.height if camera_info.height else 1.0
        return cls(fx=k[0] * scale_x, fy=k[4] * scale_y, cx=k[2] * scale_x, cy=k[5] * scale_y, depth=depth)

    def lift(self, pixels: np.ndarray) -> np.ndarray:
        """``[..., 2]`` pixel (x, y) -> ``[..., 3]`` metres (x, y, z) on the plane."""
        x = (pixels[..., 0] - self.cx) / self.fx * self.depth
        y = (pixels[..., 1] - self.cy) / self.fy * self.depth
        return np.stack([x, y, np.full_like(x, self.depth)], axis=-1)


def time_ramp(num_frames: int, alpha: float = 0.9) -> np.ndarray:
    """``[T, 4]`` RGBA colours in 0..1: the overlay's time ramp (blue = now ... yellow = last forecast frame)."""
    rgb = time_colors(num_frames).astype(np.float64) / 255.0
    return np.concatenate([rgb, np.full((num_frames, 1), alpha)], axis=1)


def subsample_grid(tracks: np.ndarray, stride: int) -> np.ndarray:
    """Keep every ``stride``-th query point in both grid directions: ``[K, T, H, W, 2] -> [K, T, H', W', 2]``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    offset = stride // 2
    return tracks[:, :, offset::stride, offset::stride]


def line_list_vertices(tracks_one_sample: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Segment endpoints of every point's polyline: ``[T, N, 3] -> ([(T-1)*N*2, 3] positions, [(T-1)*N*2] frame
    index of each vertex)``, ordered segment by segment as a ``LINE_LIST`` wants them."""
    num_frames, num_points, _ = tracks_one_sample.shape
    starts, ends = tracks_one_sample[:-1], tracks_one_sample[1:]  # [T-1, N, 3]
    pairs = np.stack([starts, ends], axis=2)  # [T-1, N, 2, 3]
    frames = np.broadcast_to(np.arange(num_frames - 1)[:, None, None] + np.array([0, 1]), (num_frames - 1, num_points, 2))
    return pairs.reshape(-1, 3), frames.reshape(-1)


def forecast_markers(tracks: np.ndarray, header: Any, plane: ImagePlane, stride: int = 8,
                     lifetime_s: float = 1.0, line_width: float = 0.004, max_samples: int = 0,
                     namespace: str = MARKER_NAMESPACE) -> Any:
    """Build the ``MarkerArray`` of a forecast.

    Args:
        tracks: ``[K, T, H, W, 2]`` pixel positions (x, y) in the source image.
        header: source image header (stamp and camera frame) put on every marker.
        plane: how pixels become 3D points (see :class:`ImagePlane`).
        stride: keep every ``stride``-th grid point in each direction.
        lifetime_s: marker lifetime (0 = forever); a few forecast periods so stale forecasts vanish.
        line_width: line width in metres.
        max_samples: draw at most this many samples (0 = all K).
    """
    from builtin_interfaces.msg import Duration
    from geometry_msgs.msg import Point
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker, MarkerArray

    tracks = np.asarray(tracks, dtype=np.float64)
    if tracks.ndim != 5 or tracks.shape[-1] != 2:
        raise ValueError(f"tracks must be [K, T, H, W, 2], got {tracks.shape}")
    kept = subsample_grid(tracks, stride)
    num_samples = kept.shape[0] if max_samples <= 0 else min(max_samples, kept.shape[0])
    num_frames = kept.shape[1]
    points_3d = plane.lift(kept[:num_samples].reshape(num_samples, num_frames, -1, 2))  # [K, T, N, 3]
    palette = [ColorRGBA(r=float(r), g=float(g), b=float(b), a=float(a)) for r, g, b, a in time_ramp(num_frames)]
    seconds = max(float(lifetime_s), 0.0)
    lifetime_sec, lifetime_nanosec = divmod(int(round(seconds * 1e9)), 10**9)  # 0.9999999998 s -> (1, 0), not (0, 0)
    lifetime = Duration(sec=lifetime_sec, nanosec=lifetime_nanosec)

    clear = Marker()
    clear.header = header
    clear.ns = namespace
    clear.action = Marker.DELETEALL
    markers: List[Any] = [clear]
    for sample in range(num_samples):
        vertices, frames = line_list_vertices(points_3d[sample])
        marker = Marker()
        marker.header = header
        marker.ns = namespace
        marker.id = sample
        marker.type = Marker.LINE_LIST
        marker.action = Marker.ADD
        marker.pose.orientation.w = 1.0
        marker.scale.x = float(line_width)
        marker.color = palette[-1]
        marker.lifetime = lifetime
        marker.frame_locked = False
        marker.points = [Point(x=x, y=y, z=z) for x, y, z in vertices.tolist()]
        marker.colors = [palette[f] for f in frames.tolist()]
        markers.append(marker)
    return MarkerArray(markers=markers)


def lifetime_from_period(period_s: Optional[float], periods: float, fallback_s: float = 1.0) -> float:
    """Marker lifetime = ``periods`` forecast periods (``fallback_s`` periods' worth when the period is unknown)."""
    if periods <= 0:
        return 0.0
    return periods * (period_s if period_s and period_s > 0 else fallback_s)
