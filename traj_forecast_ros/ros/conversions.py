"""Conversions between ROS messages and numpy: camera images in, trajectory forecasts out (and back).

Every conversion is vectorised (``numpy.frombuffer`` views, ``array.array`` buffers): no per-pixel or per-point
Python loop. Bad images raise :class:`ImageMessageError` (an ``InvalidImageError``) whose ``reason`` is a short
code the node counts in its diagnostics.
"""

from __future__ import annotations

import array
import importlib
import io
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image
from traj_forecast_msgs.msg import TrajectoryForecast

from traj_forecast_ros.errors import InvalidImageError
from traj_forecast_ros.forecast import Forecast
from traj_forecast_ros.geometry import DEFAULT_MAX_PIXELS, MIN_IMAGE_SIDE, to_rgb
from traj_forecast_ros.ros.io_tables import INPUTS
from traj_forecast_ros.summaries import DEFAULT_MOVING_THRESHOLD_PX, planner_summaries

# encoding -> (channels, numpy dtype of one channel, channel order); mono images are replicated to RGB.
_ENCODINGS = {
    "rgb8": (3, np.uint8, "rgb"),
    "bgr8": (3, np.uint8, "bgr"),
    "rgba8": (4, np.uint8, "rgba"),
    "bgra8": (4, np.uint8, "bgra"),
    "mono8": (1, np.uint8, "mono"),
    "mono16": (1, np.uint16, "mono"),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
COMPRESSED_FORMATS = ("JPEG", "PNG", "WEBP")  # what image_transport's compressed plugins produce
_WIDE_MONO_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # Pillow modes of 16-bit grayscale


class ImageMessageError(InvalidImageError):
    """An image message that cannot be decoded; ``reason`` is a short code for counters (e.g. ``"truncated"``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------------------------------------------- images in
def _as_bytes_view(data: Any) -> np.ndarray:
    """A flat uint8 view of a message ``data`` field (array.array, bytes, memoryview or list of ints)."""
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def _check_size(height: int, width: int, max_pixels: int, min_side: int = 1) -> None:
    if height <= 0 or width <= 0:
        raise ImageMessageError("empty", f"image is {height}x{width}")
    if height < min_side or width < min_side:
        raise ImageMessageError("too_small", f"image is {width}x{height}; both sides must be at least {min_side} px")
    if height * width > max_pixels:
        raise ImageMessageError("too_large", f"image is {width}x{height} = {height * width} pixels "
                                             f"> max_pixels {max_pixels}")


def scale_to_uint8(mono: np.ndarray) -> np.ndarray:
    """A 10/12/16-bit ``[H, W]`` integer image scaled so its maximum maps to 255 (all black stays black)."""
    wide = np.clip(mono, 0, None).astype(np.uint32)  # [H, W]
    peak = int(wide.max()) if wide.size else 0
    return (wide * 255 // peak).astype(np.uint8) if peak else np.zeros(mono.shape, np.uint8)  # [H, W]


def image_msg_to_rgb(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` to a contiguous ``[H, W, 3]`` uint8 RGB array.

    Supports rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8 and mono16 (scaled so the frame's maximum maps to 255,
    which suits 10/12/16-bit sensors alike). Honours ``step`` (row padding) and ``is_bigendian``. Images with a side
    under ``min_side`` pixels are rejected (the node passes ``geometry.MIN_IMAGE_SIDE``).

    Raises:
        ImageMessageError: reason ``unsupported_encoding``, ``empty``, ``too_small``, ``too_large``, ``step_mismatch``,
            ``truncated`` or ``size_mismatch``.
    """
    encoding = str(msg.encoding).lower()
    if encoding not in _ENCODINGS:
        raise ImageMessageError("unsupported_encoding",
                                f"encoding '{msg.encoding}' (supported: {', '.join(SUPPORTED_ENCODINGS)})")
    channels, channel_dtype, order = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(height, width, max_pixels, min_side)
    pixel_bytes = channels * np.dtype(channel_dtype).itemsize
    row_bytes = width * pixel_bytes
    if step < row_bytes:
        raise ImageMessageError("step_mismatch", f"step {step} < width {width} x {pixel_bytes} bytes per pixel")
    if step % np.dtype(channel_dtype).itemsize:
        raise ImageMessageError("step_mismatch", f"step {step} is not a multiple of the {encoding} channel size")
    data = _as_bytes_view(msg.data)
    expected = step * height
    if data.size < expected:
        raise ImageMessageError("truncated", f"{data.size} bytes of data, expected step x height = {expected}")
    if data.size > expected:
        raise ImageMessageError("size_mismatch", f"{data.size} bytes of data, expected step x height = {expected}")

    rows = data.reshape(height, step)[:, :row_bytes]
    if channel_dtype is np.uint16:
        big = bool(msg.is_bigendian)
        mono = np.ascontiguousarray(rows).view(">u2" if big else "<u2").reshape(height, width)
        return to_rgb(scale_to_uint8(mono), "mono", max_pixels=max_pixels)
    # max_pixels passed on: the caller's limit (the node's parameter), checked above already.
    return to_rgb(rows.reshape(height, width, channels), color_order=order, max_pixels=max_pixels)


def compressed_format(data: bytes) -> Optional[str]:
    """The Pillow format name of compressed image bytes by their signature: JPEG, PNG, WEBP, or None for any other."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


_DECODERS = {"JPEG": ("JpegImagePlugin", "JpegImageFile"), "PNG": ("PngImagePlugin", "PngImageFile"),
             "WEBP": ("WebPImagePlugin", "WebPImageFile")}


def _open_compressed(data: bytes, image_format: str) -> Any:
    """Open ``data`` with the Pillow decoder of ``image_format`` only (its header is read, not its pixels).

    Not ``PIL.Image.open``: that applies Pillow's own decompression-bomb limit (a process-wide setting, 89 MP warns
    and 179 MP fails), while the caller's ``max_pixels`` is the one limit here, checked before any pixel is decoded.
    """
    module_name, class_name = _DECODERS[image_format]
    decoder = getattr(importlib.import_module(f"PIL.{module_name}"), class_name)
    return decoder(io.BytesIO(data))


def compressed_msg_to_rgb(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG or WebP: what ``image_transport`` produces) to
    ``[H, W, 3]`` RGB.

    Only those three formats are opened (checked by signature, and only that format's Pillow decoder is used): other
    formats, some of which run external programs (EPS runs Ghostscript), are rejected unread. The size is checked from
    the file header against ``max_pixels`` (the one limit: Pillow's own decompression-bomb limit is not applied)
    before the pixels are decoded (``min_side`` as for raw images). 16-bit PNGs are scaled like raw mono16
    (maximum -> 255), not clipped. Any decoder failure, whatever Pillow raises, is an ``ImageMessageError``.

    Raises:
        ImageMessageError: reason ``empty``, ``unsupported_format``, ``too_small``, ``too_large`` or
            ``corrupt_compressed``.
    """
    data = _as_bytes_view(msg.data).tobytes()
    if not data:
        raise ImageMessageError("empty", "compressed image has no data")
    image_format = compressed_format(data)
    if image_format is None:
        raise ImageMessageError("unsupported_format", f"format {str(msg.format)[:40]!r}, data starting {data[:8]!r}: "
                                                      f"not {', '.join(COMPRESSED_FORMATS)}")
    try:
        with _open_compressed(data, image_format) as image:
            width, height = image.size
            _check_size(height, width, max_pixels, min_side)
            if image.mode in _WIDE_MONO_MODES:  # 16-bit grayscale PNG
                mono = np.asarray(image)  # [H, W] uint16 or int32
                return np.ascontiguousarray(to_rgb(scale_to_uint8(mono), "mono", max_pixels=max_pixels))
            rgb = np.asarray(image.convert("RGB"))  # [H, W, 3]
    except ImageMessageError:
        raise
    except PILImage.DecompressionBombError as exc:  # WebP only: its decoder checks Pillow's limit before ours
        raise ImageMessageError("too_large", f"{image_format} image: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - bad data makes Pillow raise anything (OSError, TypeError, ...)
        raise ImageMessageError("corrupt_compressed",
                                f"cannot decode {image_format} image: {type(exc).__name__}: {exc}") from exc
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[:2] != (height, width):
        raise ImageMessageError("corrupt_compressed", f"{image_format} decoded to {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb)


def decode_image(transport: str, message: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image message of ``transport`` -> ``[H, W, 3]`` uint8 RGB, by the input table's decoder for it, with the
    node's limits (``max_pixels``, ``geometry.MIN_IMAGE_SIDE``). Raises ``ImageMessageError`` for bad input."""
    decoder = globals()[INPUTS[transport].decoder]
    return decoder(message, max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE)


def rgb_to_image_msg(rgb: np.ndarray, header: Optional[Any] = None, encoding: str = "rgb8") -> Any:
    """Build a ``sensor_msgs/Image`` from ``[H, W, 3]`` uint8 RGB (``encoding`` rgb8 or bgr8)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImageError(f"expected [H, W, 3] uint8, got {rgb.shape} {rgb.dtype}")
    if encoding == "bgr8":
        rgb = rgb[:, :, ::-1]
    elif encoding != "rgb8":
        raise ValueError(f"rgb_to_image_msg: encoding must be rgb8 or bgr8, not '{encoding}'")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = array.array("B", np.ascontiguousarray(rgb).tobytes())
    return msg


def rgb_to_compressed_msg(rgb: np.ndarray, header: Optional[Any] = None, fmt: str = "jpeg",
                          quality: int = 90) -> Any:
    """Build a ``sensor_msgs/CompressedImage`` (jpeg or png) from ``[H, W, 3]`` uint8 RGB."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(rgb)).save(buffer, format=fmt.upper(), quality=quality)
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = fmt.lower()
    msg.data = array.array("B", buffer.getvalue())
    return msg


# ---------------------------------------------------------------------------------------------- forecasts out
def _float32_array(values: np.ndarray) -> array.array:
    """A flat ``array.array('f')`` copy of ``values`` (the fast path of rosidl float32[] setters)."""
    flat = array.array("f")
    flat.frombytes(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    return flat


def forecast_to_msg(forecast: Forecast, header: Any, frame_interval: Optional[float] = None,
                    moving_threshold: float = DEFAULT_MOVING_THRESHOLD_PX, camera_info: Any = None) -> Any:
    """Pack a :class:`Forecast` into a ``traj_forecast_msgs/TrajectoryForecast`` carrying ``header`` (the source
    image's), with the planner summaries (:func:`~traj_forecast_ros.summaries.planner_summaries`) computed here once.

    ``frame_interval``: seconds between forecast frames (None = the forecast's own, 0 = unknown);
    ``moving_threshold``: pixels, for ``moving_fraction`` and ``first_move_frame``; ``camera_info``: the source
    camera's ``sensor_msgs/CameraInfo`` (rclpy or rosbags object), copied into the intrinsics fields when it is usable
    for this image (:func:`camera_intrinsics`).
    """
    tracks = np.asarray(forecast.tracks, dtype=np.float32)
    if tracks.ndim != 5 or tracks.shape[-1] != 2:
        raise ValueError(f"forecast tracks must be [K, T, H, W, 2], got {tracks.shape}")
    num_samples, num_frames, rows, cols, _ = tracks.shape
    summaries = planner_summaries(tracks, moving_threshold)
    msg = TrajectoryForecast()
    msg.header = header
    msg.image_height, msg.image_width = int(forecast.image_size[0]), int(forecast.image_size[1])
    msg.model_id = str(forecast.model_id)
    msg.instruction = forecast.instruction or ""
    msg.num_samples, msg.num_frames = int(num_samples), int(num_frames)
    msg.frame_interval = float(forecast.frame_interval if frame_interval is None else frame_interval)
    msg.grid_rows, msg.grid_cols = int(rows), int(cols)
    msg.query_points = _float32_array(forecast.query_points)
    msg.tracks = _float32_array(tracks)
    msg.mean_displacement = _float32_array(summaries.mean_displacement)
    msg.spread = _float32_array(summaries.spread)
    msg.moving_threshold = float(moving_threshold)
    msg.moving_fraction = _float32_array(summaries.motion_probability)
    msg.sample_weights = _float32_array(summaries.sample_weights)
    msg.first_move_frame = _float32_array(summaries.first_move_frame)
    msg.spread_per_frame = _float32_array(summaries.spread_per_frame)
    msg.crop_box = [float(v) for v in forecast.grid_region()]
    intrinsics = camera_intrinsics(camera_info, forecast.image_size)
    msg.intrinsics_known = intrinsics is not None
    if intrinsics is not None:
        msg.k = [float(v) for v in intrinsics[0]]
        msg.distortion_model = intrinsics[1]
        msg.d = [float(v) for v in intrinsics[2]]
    msg.inference_time = float(forecast.timings.get("total", 0.0))
    msg.device = str(forecast.device)
    msg.dtype = str(forecast.dtype)
    return msg


def camera_intrinsics(camera_info: Any, image_size: Tuple[int, int]
                      ) -> Optional[Tuple[List[float], str, List[float]]]:
    """``(k, distortion_model, d)`` of a ``sensor_msgs/CameraInfo`` that describes an image of ``image_size``
    ``(height, width)``: its size matches (0 x 0 = not stated) and ``k`` is a finite pinhole with positive focal
    lengths. None otherwise (no CameraInfo, another resolution, or an uncalibrated all-zero ``k``)."""
    if camera_info is None:
        return None
    k = [float(v) for v in camera_info.k]
    size = (int(camera_info.height), int(camera_info.width))
    if len(k) != 9 or size not in ((0, 0), (int(image_size[0]), int(image_size[1]))):
        return None
    if not all(np.isfinite(k)) or k[0] <= 0 or k[4] <= 0:
        return None
    return k, str(camera_info.distortion_model), [float(v) for v in camera_info.d]


# Fields of a TrajectoryForecast that msg_to_arrays unpacks, with their shapes in terms of (K, T, H, W).
ARRAY_SHAPES: Dict[str, Callable[[int, int, int, int], Tuple[int, ...]]] = {
    "query_points": lambda k, t, h, w: (h, w, 2),
    "tracks": lambda k, t, h, w: (k, t, h, w, 2),
    "mean_displacement": lambda k, t, h, w: (h, w, 2),
    "spread": lambda k, t, h, w: (h, w),
    "moving_fraction": lambda k, t, h, w: (h, w),
    "sample_weights": lambda k, t, h, w: (k,),
    "first_move_frame": lambda k, t, h, w: (h, w),
    "spread_per_frame": lambda k, t, h, w: (t, h, w),
}


def msg_to_arrays(msg: Any) -> Dict[str, np.ndarray]:
    """Unpack every array of a ``TrajectoryForecast`` (the one public helper for it): float32 numpy views of the
    message's memory where it allows (no copy), reshaped as documented in ``TrajectoryForecast.msg``.

    Keys: ``query_points [H,W,2]``, ``tracks [K,T,H,W,2]``, ``mean_displacement [H,W,2]``, ``spread [H,W]``,
    ``moving_fraction [H,W]``, ``sample_weights [K]``, ``first_move_frame [H,W]``, ``spread_per_frame [T,H,W]``,
    ``crop_box [4]`` (x_min, y_min, x_max, y_max), and ``k [3,3]`` and ``d`` (float64; only when
    ``intrinsics_known``). Works
    on rclpy and rosbags messages; a message recorded before a field existed simply lacks that key.

    Raises:
        ValueError: an array's length does not match the sizes in the message.
    """
    k, t, h, w = int(msg.num_samples), int(msg.num_frames), int(msg.grid_rows), int(msg.grid_cols)
    arrays = {}
    for name, shape_of in ARRAY_SHAPES.items():
        if not hasattr(msg, name):
            continue
        shape = shape_of(k, t, h, w)
        values = getattr(msg, name)
        flat = (np.frombuffer(values, dtype=np.float32) if isinstance(values, array.array)
                else np.asarray(values, dtype=np.float32))
        if flat.size != int(np.prod(shape)):
            raise ValueError(f"TrajectoryForecast.{name} has {flat.size} values, expected {shape} "
                             f"= {int(np.prod(shape))} from num_samples/num_frames/grid_rows/grid_cols")
        arrays[name] = flat.reshape(shape)
    if hasattr(msg, "crop_box"):
        arrays["crop_box"] = np.asarray(msg.crop_box, dtype=np.float32).reshape(4)
    if getattr(msg, "intrinsics_known", False):
        arrays["k"] = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
        arrays["d"] = np.asarray(msg.d, dtype=np.float64)
    return arrays


def msg_to_forecast(msg: Any) -> Forecast:
    """Rebuild a :class:`Forecast` from a ``TrajectoryForecast`` (arrays copied, so the message may be reused)."""
    arrays = msg_to_arrays(msg)
    return Forecast(
        tracks=arrays["tracks"].copy(),
        query_points=arrays["query_points"].copy(),
        image_size=(int(msg.image_height), int(msg.image_width)),
        model_id=msg.model_id,
        instruction=msg.instruction or None,
        device=msg.device,
        dtype=msg.dtype,
        timings={"total": float(msg.inference_time)},
        frame_interval=float(msg.frame_interval),
        crop_box=tuple(float(v) for v in msg.crop_box) if hasattr(msg, "crop_box") else None,
    )
