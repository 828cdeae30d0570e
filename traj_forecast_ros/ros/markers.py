"""RViz markers for a forecast: trajectories drawn on an image plane in front of the camera.

Pixels are lifted onto a plane at a fixed depth in the camera's optical frame (REP-103 optical: x right, y down,
z forward), either with a pinhole model from ``sensor_msgs/CameraInfo`` or with a plain metres-per-pixel scale.
The result is a ``MarkerArray``: one ``DELETEALL`` marker (clears the previous forecast), then one ``LINE_LIST``
per sample whose vertex colours ramp over forecast time. :func:`forecast_markers` builds it as message objects (a
Python ``Point`` and ``ColorRGBA`` per vertex: about 25 ms to build and serialise at K=8, 64 tracks, 16 frames);
:func:`serialized_forecast_markers` writes the same message's CDR bytes with numpy (about 1 ms) for
``Publisher.publish(bytes)``, and :class:`MarkerSerializer` picks it after checking it reads back as the message.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

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
        """A plane from a ``CameraInfo`` K matrix, rescaled when the calibration size differs from ``image_size``.

        ROS puts pixel centres at integer coordinates; forecasts put them at index + 0.5, so the principal point
        moves by half a pixel before it is scaled."""
        k = [float(v) for v in camera_info.k]
        if not all(math.isfinite(k[i]) for i in (0, 2, 4, 5)):
            raise ValueError(f"CameraInfo intrinsics are not finite (fx {k[0]}, fy {k[4]}, cx {k[2]}, cy {k[5]})")
        if k[0] <= 0 or k[4] <= 0:
            raise ValueError("CameraInfo has no focal length (k[0] or k[4] <= 0)")
        scale_x = image_size[1] / camera_info.width if camera_info.width else 1.0
        scale_y = image_size[0] / camera_info.height if camera_info.height else 1.0
        return cls(fx=k[0] * scale_x, fy=k[4] * scale_y, cx=(k[2] + 0.5) * scale_x, cy=(k[5] + 0.5) * scale_y,
                   depth=depth)

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


def frames_drawn(num_frames: int, max_frames: int = 0) -> np.ndarray:
    """Indices of the forecast frames a marker draws: all ``num_frames`` when ``max_frames`` is 0 or enough, else
    ``max(max_frames, 2)`` of them evenly spaced, the first and the last always among them."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 (0 = all), got {max_frames}")
    if max_frames == 0 or max_frames >= num_frames:
        return np.arange(num_frames)
    return np.round(np.linspace(0, num_frames - 1, max(max_frames, 2))).astype(np.int64)


def line_list_indices(num_frames: int, num_points: int) -> np.ndarray:
    """``[(T-1)*N*2]`` indices into a ``[T*N]`` (frame-major) vertex table: the segment endpoints of every point's
    polyline, ordered segment by segment (frame 0->1 of every point, then 1->2, ...) as a ``LINE_LIST`` wants them."""
    table = np.arange(num_frames * num_points).reshape(num_frames, num_points)
    return np.stack([table[:-1], table[1:]], axis=2).reshape(-1)  # [T-1, N, 2] -> flat


def line_list_vertices(tracks_one_sample: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Segment endpoints of every point's polyline: ``[T, N, 3] -> ([(T-1)*N*2, 3] positions, [(T-1)*N*2] frame
    index of each vertex)``, ordered segment by segment as a ``LINE_LIST`` wants them."""
    num_frames, num_points, _ = tracks_one_sample.shape
    indices = line_list_indices(num_frames, num_points)
    return tracks_one_sample.reshape(-1, tracks_one_sample.shape[-1])[indices], indices // num_points


@dataclass(frozen=True)
class MarkerGeometry:
    """What the markers of one forecast draw: vertex positions on the plane and the colour of each vertex."""

    positions: np.ndarray  # [K', T'*N, 3] metres: every drawn position of every drawn sample, frame-major
    vertex_index: np.ndarray  # [V] LINE_LIST vertices as indices into positions' second axis, V = (T'-1)*N*2
    frame_colors: np.ndarray  # [T', 4] RGBA 0..1 of the frames drawn
    vertex_frame: np.ndarray  # [V] index into frame_colors of each vertex

    @property
    def num_samples(self) -> int:
        return self.positions.shape[0]


def marker_geometry(tracks: np.ndarray, plane: ImagePlane, stride: int = 8, max_samples: int = 0,
                    max_frames: int = 0) -> MarkerGeometry:
    """Subsample ``[K, T, H, W, 2]`` pixel tracks (grid ``stride``, ``max_samples``, ``max_frames``) and lift them
    onto ``plane``; see :func:`forecast_markers` for the arguments."""
    tracks = np.asarray(tracks, dtype=np.float64)
    if tracks.ndim != 5 or tracks.shape[-1] != 2:
        raise ValueError(f"tracks must be [K, T, H, W, 2], got {tracks.shape}")
    frames = frames_drawn(tracks.shape[1], max_frames)  # [T'] indices of the frames drawn
    kept = subsample_grid(tracks, stride)
    num_samples = kept.shape[0] if max_samples <= 0 else min(max_samples, kept.shape[0])
    kept = kept[:num_samples, frames]  # [K', T', H', W', 2]
    num_frames, num_points = len(frames), kept.shape[2] * kept.shape[3]
    positions = plane.lift(kept.reshape(num_samples, num_frames * num_points, 2))  # [K', T'*N, 3]
    vertex_index = line_list_indices(num_frames, num_points)  # [V]
    return MarkerGeometry(positions=positions, vertex_index=vertex_index,
                          frame_colors=time_ramp(tracks.shape[1])[frames], vertex_frame=vertex_index // num_points)


def _point_table(points_xyz: np.ndarray) -> List[Any]:
    """One ``geometry_msgs/Point`` per row of ``[M, 3]`` metres.

    ``Point()`` and three attribute sets: the cheapest construction of the public message API on Humble, Jazzy
    and Kilted (measured on Jazzy: 0.74 against 0.78 us for ``Point(x=.., y=.., z=..)``). Still about 1.5 us per
    vertex with rclpy's conversion at publish; :func:`serialized_forecast_markers` avoids both.
    """

    table = []
    append = table.append
    for x, y, z in points_xyz.tolist():
        point = Point()
        point.x = x
        point.y = y
        point.z = z
        append(point)
    return table


def _marker_array(geometry: MarkerGeometry, header: Any, lifetime_s: float, line_width: float, namespace: str,
                  fill: Callable[[int, Any], None]) -> Any:
    """``MarkerArray``: ``DELETEALL``, then one ``LINE_LIST`` per sample whose points and colours ``fill(sample,
    marker)`` sets."""

    seconds = max(float(lifetime_s), 0.0)
    lifetime_sec, lifetime_nanosec = divmod(int(round(seconds * 1e9)), 10**9)  # 0.9999999998 s -> (1, 0), not (0, 0)
    r, g, b, a = (float(v) for v in geometry.frame_colors[-1])
    clear = Marker()
    clear.header = header
    clear.ns = namespace
    clear.action = Marker.DELETEALL
    markers: List[Any] = [clear]
    for sample in range(geometry.num_samples):
        marker = Marker()
        marker.header = header
        marker.ns = namespace
        marker.id = sample
        marker.type = Marker.LINE_LIST
        marker.action = Marker.ADD
        marker.pose.orientation.w = 1.0
        marker.scale.x = float(line_width)
        marker.color = ColorRGBA(r=r, g=g, b=b, a=a)
        marker.lifetime = Duration(sec=lifetime_sec, nanosec=lifetime_nanosec)
        marker.frame_locked = False
        fill(sample, marker)
        markers.append(marker)
    return MarkerArray(markers=markers)


def forecast_markers(tracks: np.ndarray, header: Any, plane: ImagePlane, stride: int = 8,
                     lifetime_s: float = 1.0, line_width: float = 0.004, max_samples: int = 0,
                     max_frames: int = 0, namespace: str = MARKER_NAMESPACE) -> Any:
    """Build the ``MarkerArray`` of a forecast.

    Each sample is one ``LINE_LIST`` whose vertices carry the time-ramp colour of their forecast frame (RViz blends
    the colour along each segment). A position shared by two consecutive segments is one ``Point`` object listed
    twice, so building costs one ``Point`` per drawn position, not two. :func:`serialized_forecast_markers` gives
    the same message already serialised, about 20x faster.

    Args:
        tracks: ``[K, T, H, W, 2]`` pixel positions (x, y) in the source image.
        header: source image header (stamp and camera frame) put on every marker.
        plane: how pixels become 3D points (see :class:`ImagePlane`).
        stride: keep every ``stride``-th grid point in each direction.
        lifetime_s: marker lifetime (0 = forever); a few forecast periods so stale forecasts vanish.
        line_width: line width in metres.
        max_samples: draw at most this many samples (0 = all K).
        max_frames: draw at most this many forecast frames of each track, evenly spaced, the first and the last
            always among them (0 = all); each drawn vertex keeps the colour of its own frame.
    """

    geometry = marker_geometry(tracks, plane, stride, max_samples, max_frames)
    palette = [ColorRGBA(r=float(r), g=float(g), b=float(b), a=float(a)) for r, g, b, a in geometry.frame_colors]
    vertex_index = geometry.vertex_index.tolist()
    vertex_colors = [palette[frame] for frame in geometry.vertex_frame.tolist()]

    def fill(sample: int, marker: Any) -> None:
        table = _point_table(geometry.positions[sample])
        marker.points = list(map(table.__getitem__, vertex_index))
        marker.colors = list(vertex_colors)

    return _marker_array(geometry, header, lifetime_s, line_width, namespace, fill)


# ------------------------------------------------------------------------------------------------ serialised
_SEQUENCE_LENGTH = struct.Struct("<I")  # CDR little endian: a sequence starts with its uint32 length


def _sentinel_point(sample: int) -> Tuple[float, float, float]:
    return (-7.25e-301 * (sample + 1), 3.0e303 + sample, -1.5e-299 * (sample + 3))  # never a real position


def _sentinel_color(sample: int) -> Tuple[float, float, float, float]:
    return (-3.5e-37, 2.5e37 + 1e31 * sample, -1.25e-36, 3.25e36)  # float32-exact, never a real colour


def serialized_forecast_markers(tracks: np.ndarray, header: Any, plane: ImagePlane, stride: int = 8,
                                lifetime_s: float = 1.0, line_width: float = 0.004, max_samples: int = 0,
                                max_frames: int = 0, namespace: str = MARKER_NAMESPACE) -> bytes:
    """:func:`forecast_markers`, serialised (CDR, as ``rclpy.serialization.serialize_message`` writes it), for
    ``Publisher.publish(bytes)``, without building a Python object per vertex.

    The ``MarkerArray`` is serialised by rclpy with one sentinel point and colour per marker; those are then
    replaced by the real arrays, written by numpy (every field around them stays exactly as rclpy wrote it, and
    each marker grows by a multiple of 8 bytes, so no CDR alignment changes). Raises :class:`ValueError` when the
    sentinels are not where a little-endian CDR encoding puts them (another encoding): then use
    :func:`forecast_markers` (:class:`MarkerSerializer` does, after comparing both once). CDR padding bytes are
    whatever rclpy left there (it does not clear them either), so compare the messages read back, not the bytes.
    """

    geometry = marker_geometry(tracks, plane, stride, max_samples, max_frames)
    num_vertices = len(geometry.vertex_index)
    if num_vertices == 0:  # an empty sequence has no alignment padding: nothing to splice, and nothing costly
        return serialize_message(forecast_markers(tracks, header, plane, stride, lifetime_s, line_width,
                                                  max_samples, max_frames, namespace))

    def fill(sample: int, marker: Any) -> None:
        x, y, z = _sentinel_point(sample)
        r, g, b, a = _sentinel_color(sample)
        marker.points = [Point(x=x, y=y, z=z)]
        marker.colors = [ColorRGBA(r=r, g=g, b=b, a=a)]

    template = serialize_message(_marker_array(geometry, header, lifetime_s, line_width, namespace, fill))
    if template[:2] != b"\x00\x01":  # CDR_LE: plain little-endian XCDR1, what ROS 2 middlewares write
        raise ValueError(f"not a little-endian CDR encapsulation: {template[:4].hex()}")
    colors = geometry.frame_colors.astype(np.float32)[geometry.vertex_frame].tobytes()  # [V, 4] float32
    positions = geometry.positions[:, geometry.vertex_index]  # [K', V, 3] float64
    length = _SEQUENCE_LENGTH.pack(num_vertices)
    one = _SEQUENCE_LENGTH.pack(1)
    pieces: List[bytes] = []
    done = 0  # template bytes already copied
    for sample in range(geometry.num_samples):
        point = struct.pack("<3d", *_sentinel_point(sample))
        color = struct.pack("<4f", *_sentinel_color(sample))
        at = template.find(point, done)
        if at < 0 or template.count(point) != 1:
            raise ValueError(f"marker {sample}: sentinel point not found once in the serialised template")
        # [count][padding to 8][point] then [count][color]; the padding is 4 bytes or none.
        count_at = at - 4 if template[at - 4:at] == one else at - 8
        color_at = at + 24 + 4
        if (template[count_at:count_at + 4] != one or template[at + 24:color_at] != one
                or template[color_at:color_at + 16] != color):
            raise ValueError(f"marker {sample}: the serialised template is not laid out as little-endian CDR")
        pieces += [template[done:count_at], length, template[count_at + 4:at], positions[sample].tobytes(), length,
                   colors]
        done = color_at + 16
    pieces.append(template[done:])
    return b"".join(pieces)


class MarkerSerializer:
    """Serialised markers by the fastest path that gives rclpy's message in this process.

    The first call checks the direct path on a small corner of its input (2 samples, 2 x 2 points, 3 frames, the
    same header and style, well under a millisecond): :func:`serialized_forecast_markers` must read back as exactly
    the message :func:`forecast_markers` builds. When it does not (a middleware with another encoding), every call
    serialises the message object instead. ``fast`` says which path is in use (None before the first call).
    """

    def __init__(self, warn: Optional[Callable[[str], None]] = None) -> None:
        self.fast: Optional[bool] = None
        self.warn = warn

    def _check(self, tracks: np.ndarray, header: Any, plane: ImagePlane, options: Dict[str, Any]) -> bool:

        corner = np.asarray(tracks)[:2, :3, :2, :2]  # [<=2, <=3, <=2, <=2, 2]
        small = dict(options, stride=1, max_samples=0, max_frames=0)
        try:
            fast = serialized_forecast_markers(corner, header, plane, **small)
        except ValueError as exc:
            reason = str(exc)
        else:
            expected = serialize_message(forecast_markers(corner, header, plane, **small))
            if deserialize_message(fast, MarkerArray) == deserialize_message(expected, MarkerArray):  # float32 colours
                return True
            reason = "it reads back as a different message"
        if self.warn is not None:
            self.warn(f"markers: serialising message objects (the direct CDR path is off: {reason})")
        return False

    def __call__(self, tracks: np.ndarray, header: Any, plane: ImagePlane, **options: Any) -> bytes:
        """Serialised ``MarkerArray``: the arguments of :func:`forecast_markers`."""

        plane_finite = all(math.isfinite(value) for value in (plane.fx, plane.fy, plane.cx, plane.cy, plane.depth))
        if self.fast is None and plane_finite:  # NaN never compares equal: it would turn the direct path off for good
            self.fast = self._check(tracks, header, plane, options)
        if self.fast:
            try:
                return serialized_forecast_markers(tracks, header, plane, **options)
            except ValueError as exc:  # the layout changed after the check passed: stay correct, say so once
                self.fast = False
                if self.warn is not None:
                    self.warn(f"markers: serialising message objects from now on ({exc})")
        return serialize_message(forecast_markers(tracks, header, plane, **options))


def lifetime_from_period(period_s: Optional[float], periods: float, fallback_s: float = 1.0) -> float:
    """Marker lifetime = ``periods`` forecast periods (``fallback_s`` periods' worth when the period is unknown)."""
    if periods <= 0:
        return 0.0
    return periods * (period_s if period_s and period_s > 0 else fallback_s)
