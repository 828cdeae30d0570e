"""Image geometry between a camera frame of any size and the model's fixed input, and the query grid.

Policy (documented contract, tested in ``test/core/test_geometry.py``):

1. **Validate and convert** (:func:`to_rgb`): uint8 only; mono ``HxW`` / ``HxWx1``, ``HxWx3`` (``"rgb"`` or
   ``"bgr"``), ``HxWx4`` (``"rgba"`` or ``"bgra"``; alpha is dropped, not composited). Anything else (empty, float,
   NaN, wrong rank or channel count, more than ``max_pixels``) raises :class:`InvalidImageError` with the reason.
2. **Centre-crop** the largest centred window with the model's aspect ratio (a square for the square LIBERO /
   Kubric models), using whole-pixel offsets ``((W - crop_w) // 2, (H - crop_h) // 2)``.
3. **Resize** the crop to ``config.image_size`` with Pillow's bilinear filter (antialiased when shrinking). A crop
   that already has the model size is passed through untouched (LIBERO 128x128 frames reach DINOv2 unchanged).

Coordinates are continuous (x, y) pixels with a pixel's centre at ``index + 0.5``, so the crop-and-resize is the
affine map ``p_model = (p_input - crop_offset) * scale`` with ``scale = model_size / crop_size`` per axis, and
:meth:`ImageTransform.to_input` is its exact inverse. Model outputs that fall outside the crop map to input pixels
outside the crop (or the image); they are never clamped.

Query grid (spec 1.1): ``x = offset + stride * j``, ``y = offset + stride * i`` in model pixels (LIBERO: 1.5 + 2j on
a 64x64 grid). Normalised coordinates (spec 1.1): ``p_norm = 2 p / size - 1`` per axis (x by width, y by height).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from traj_forecast_ros.errors import InvalidImageError

# The one image-size limit (Forecaster, ROS conversions and the node's max_pixels parameter): 4096 x 4096 = 16.8 MP.
# Larger frames are almost certainly a mistake, and a 50 MP RGB frame would already take 150 MB before resizing.
DEFAULT_MAX_PIXELS = 4096 * 4096
# The smallest image side the node accepts (smaller frames are rejected as too_small): below it the centre crop
# would be enlarged more than 8x to the 128 px model input and the query grid would be denser than the pixels.
MIN_IMAGE_SIDE = 16

# Channel count each colour order expects.
COLOR_ORDERS = {"mono": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}
_DEFAULT_ORDER_FOR_CHANNELS = {1: "mono", 3: "rgb", 4: "rgba"}


def to_rgb(image, color_order: Optional[str] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Validate a camera image and return it as a contiguous ``[H, W, 3]`` uint8 RGB array.

    Args:
        image: uint8 numpy array ``HxW`` (mono), ``HxWx1``, ``HxWx3`` or ``HxWx4`` (a Pillow image or a uint8
            torch tensor of those shapes, on any device, is accepted too).
        color_order: ``"rgb"``, ``"bgr"``, ``"rgba"``, ``"bgra"``, ``"mono"``; ``None`` = rgb / rgba / mono by the
            number of channels.
        max_pixels: refuse images with more pixels than this.

    Raises:
        InvalidImageError: the reason (empty, dtype, NaN, shape, channels vs colour order, too large).
    """
    if hasattr(image, "detach") and hasattr(image, "numpy") and not isinstance(image, np.ndarray):  # torch.Tensor
        image = image.detach().cpu().numpy()  # then checked like any array (uint8 HxWxC)
    if hasattr(image, "mode") and hasattr(image, "convert") and not isinstance(image, np.ndarray):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
        color_order = "rgb"
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"image must be a numpy array (uint8), got {type(image).__name__}")
    if image.size == 0:
        raise InvalidImageError(f"image is empty (shape {image.shape})")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise InvalidImageError(f"image ({image.dtype}) contains NaN or Inf values; expected uint8 0-255")
        raise InvalidImageError(f"image dtype must be uint8 (0-255), got {image.dtype}; convert it first")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise InvalidImageError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got {image.ndim} dims {image.shape}")
    height, width, channels = image.shape
    if channels not in _DEFAULT_ORDER_FOR_CHANNELS:
        raise InvalidImageError(f"image has {channels} channels; expected 1 (mono), 3 (rgb/bgr) or 4 (rgba/bgra)")
    if height * width > max_pixels:
        raise InvalidImageError(f"image is {width}x{height} = {height * width} pixels, above the limit of "
                                f"{max_pixels} (max_pixels); downscale it first")
    order = (color_order or _DEFAULT_ORDER_FOR_CHANNELS[channels]).lower()
    if order in ("gray", "grey", "mono8"):
        order = "mono"
    if order not in COLOR_ORDERS:
        raise InvalidImageError(f"unknown color_order '{color_order}'; use one of {sorted(COLOR_ORDERS)}")
    if COLOR_ORDERS[order] != channels:
        raise InvalidImageError(f"color_order '{order}' needs {COLOR_ORDERS[order]} channels, image has {channels}")
    if order == "mono":
        rgb = np.repeat(image, 3, axis=2)
    elif order in ("bgr", "bgra"):
        rgb = image[:, :, 2::-1]
    else:  # rgb, rgba
        rgb = image[:, :, :3]
    return np.ascontiguousarray(rgb)


@dataclass(frozen=True)
class ImageTransform:
    """The centre-crop + resize from an input image to the model's input, as an exact affine map of points.

    Attributes:
        input_size: ``(height, width)`` of the input image.
        model_size: ``(height, width)`` of the model's input.
        crop_offset: ``(x0, y0)`` top-left corner of the crop in input pixels.
        crop_size: ``(height, width)`` of the crop in input pixels.
    """

    input_size: Tuple[int, int]
    model_size: Tuple[int, int]
    crop_offset: Tuple[int, int]
    crop_size: Tuple[int, int]

    @classmethod
    def centre_crop(cls, input_size: Tuple[int, int], model_size: Tuple[int, int]) -> "ImageTransform":
        """The largest centred crop of ``input_size`` with the aspect ratio of ``model_size``."""
        in_h, in_w = (int(v) for v in input_size)
        model_h, model_w = (int(v) for v in model_size)
        if min(in_h, in_w, model_h, model_w) <= 0:
            raise InvalidImageError(f"sizes must be positive: input {input_size}, model {model_size}")
        if in_w * model_h >= in_h * model_w:  # input is wider than the model: keep the full height
            crop_h = in_h
            crop_w = min(in_w, max(1, int(round(in_h * model_w / model_h))))
        else:
            crop_w = in_w
            crop_h = min(in_h, max(1, int(round(in_w * model_h / model_w))))
        offset = ((in_w - crop_w) // 2, (in_h - crop_h) // 2)
        return cls((in_h, in_w), (model_h, model_w), offset, (crop_h, crop_w))

    @property
    def crop_box(self) -> Tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the crop in input pixels: the region the model (and its grid) sees."""
        (x0, y0), (crop_h, crop_w) = self.crop_offset, self.crop_size
        return (float(x0), float(y0), float(x0 + crop_w), float(y0 + crop_h))

    @property
    def scale(self) -> Tuple[float, float]:
        """``(sx, sy)``: model pixels per input pixel along x and y."""
        return (self.model_size[1] / self.crop_size[1], self.model_size[0] / self.crop_size[0])

    @property
    def is_identity(self) -> bool:
        """True when the input already has the model's size (no crop, no resize)."""
        return tuple(self.input_size) == tuple(self.model_size)

    def to_model(self, points: np.ndarray) -> np.ndarray:
        """Map ``[..., 2]`` (x, y) input-image pixels to model pixels."""
        points = _as_float(points)
        offset = np.asarray(self.crop_offset, dtype=points.dtype)
        return ((points - offset) * np.asarray(self.scale, dtype=points.dtype)).astype(points.dtype, copy=False)

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """Map ``[..., 2]`` (x, y) model pixels back to input-image pixels (exact inverse of :meth:`to_model`)."""
        points = _as_float(points)
        offset = np.asarray(self.crop_offset, dtype=points.dtype)
        return (points / np.asarray(self.scale, dtype=points.dtype) + offset).astype(points.dtype, copy=False)

    def apply(self, image_rgb: np.ndarray) -> np.ndarray:
        """Crop and resize an ``[H, W, 3]`` uint8 image (of ``input_size``) to ``[h, w, 3]`` at ``model_size``."""
        if tuple(image_rgb.shape[:2]) != tuple(self.input_size):
            raise InvalidImageError(f"image is {image_rgb.shape[:2]}, this transform was built for {self.input_size}")
        if self.is_identity:
            return image_rgb
        x0, y0 = self.crop_offset
        crop_h, crop_w = self.crop_size
        crop = image_rgb[y0 : y0 + crop_h, x0 : x0 + crop_w]
        if (crop_h, crop_w) == tuple(self.model_size):
            return np.ascontiguousarray(crop)
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
            (self.model_size[1], self.model_size[0]), resample=Image.Resampling.BILINEAR
        )
        return np.asarray(resized)


def _as_float(points) -> np.ndarray:
    points = np.asarray(points)
    if points.shape[-1:] != (2,):
        raise ValueError(f"points must have a last axis of size 2 (x, y), got shape {points.shape}")
    return points if np.issubdtype(points.dtype, np.floating) else points.astype(np.float64)


def prepare_image(image, model_size: Tuple[int, int], color_order: Optional[str] = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, ImageTransform]:
    """Validate, convert to RGB and crop/resize a camera image for the model.

    Returns ``(model_image [h, w, 3] uint8 RGB, transform)``.
    """
    rgb = to_rgb(image, color_order=color_order, max_pixels=max_pixels)
    transform = ImageTransform.centre_crop(rgb.shape[:2], model_size)
    return transform.apply(rgb), transform


def query_grid(config) -> np.ndarray:
    """``[Hq, Wq, 2]`` float32 query points in model pixels: ``x = offset + stride*j``, ``y = offset + stride*i``."""
    rows, cols = config.query_grid
    ys = config.query_offset + config.query_stride * np.arange(rows, dtype=np.float64)  # [Hq]
    xs = config.query_offset + config.query_stride * np.arange(cols, dtype=np.float64)  # [Wq]
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")  # [Hq, Wq] each
    return np.stack([grid_x, grid_y], axis=-1).astype(np.float32)


def static_tracks_norm(config, batch: int = 1) -> np.ndarray:
    """``[B, T, 2, Hq, Wq]`` float32: the normalised query grid repeated over all frames (a motionless trajectory;
    the conditioning frame both training and sampling encode; ``torch.from_numpy`` it for the model)."""
    grid = normalise_points(query_grid(config), tuple(config.image_size))  # [Hq, Wq, 2]
    frames = np.broadcast_to(grid.transpose(2, 0, 1)[None, None], (batch, config.num_frames, 2, *grid.shape[:2]))
    return np.ascontiguousarray(frames, dtype=np.float32)


def normalise_points(points, size: Tuple[int, int]):
    """Pixels -> [-1, 1]: ``2 p / size - 1`` with x by width and y by height; ``size = (height, width)``.

    Works on numpy arrays and torch tensors of shape ``[..., 2]``.
    """
    height, width = size
    return points * _xy_factor(points, 2.0 / width, 2.0 / height) - 1.0


def denormalise_points(points_norm, size: Tuple[int, int]):
    """[-1, 1] -> pixels: ``(p + 1) * size / 2`` (inverse of :func:`normalise_points`)."""
    height, width = size
    return (points_norm + 1.0) * _xy_factor(points_norm, width / 2.0, height / 2.0)


def _xy_factor(like, fx: float, fy: float):
    """A per-axis (x, y) factor broadcastable against ``like [..., 2]`` (numpy or torch)."""
    if isinstance(like, np.ndarray):
        return np.asarray([fx, fy], dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64)
    return like.new_tensor([fx, fy])  # a torch tensor: same dtype and device
