"""Drawing forecast trajectories over camera images (numpy + Pillow only; no matplotlib, no ROS).

Every point's path is drawn as a polyline whose colour ramps over time (early = deep blue, late = yellow, a
perceptually ordered ramp defined below) and ends in a dot at its last position. Coordinates are (x, y) pixels of
the image drawn on, with a pixel's centre at ``index + 0.5`` (the :class:`~traj_forecast_ros.forecast.Forecast`
convention), so a point at (x, y) lands in column ``floor(x)``, row ``floor(y)``.

Rasterisation is vectorised with numpy: every segment of one time step is sampled at sub-pixel spacing and written
in one fancy-indexing assignment, so a 64x64 grid of 16-frame tracks overlays a 640x480 frame in a few tens of ms.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from traj_forecast_ros.errors import InvalidImageError

# Anchor colours of the time ramp (RGB), evenly spaced from t = 0 to t = T-1: deep blue -> teal -> green -> yellow.
# Lightness rises monotonically along the ramp, so the direction of motion reads even in grey scale.
_RAMP_ANCHORS = np.array(
    [
        [48, 18, 130],
        [42, 90, 170],
        [30, 150, 150],
        [90, 200, 95],
        [253, 231, 37],
    ],
    dtype=np.float32,
)


TRACKS_PER_SIDE = 16  # drawings show about this many tracks per grid side, whatever the query grid


def enlarged(image_rgb: np.ndarray, scale: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 enlarged ``scale`` x (bicubic), for drawing tracks at a readable size."""
    height, width = image_rgb.shape[:2]
    return np.asarray(Image.fromarray(image_rgb).resize((width * scale, height * scale), Image.BICUBIC))


def readable_stride(grid_shape: Sequence[int]) -> int:
    """The grid stride that draws about :data:`TRACKS_PER_SIDE` tracks per side of a ``(Hq, Wq)`` query grid."""
    return max(1, max(int(side) for side in grid_shape) // TRACKS_PER_SIDE)


def time_colors(num_frames: int) -> np.ndarray:
    """``[num_frames, 3]`` uint8 RGB colours of the time ramp (frame 0 = blue ... last frame = yellow)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    anchor_pos = np.linspace(0.0, 1.0, len(_RAMP_ANCHORS))
    sample_pos = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.array([1.0])
    channels = [np.interp(sample_pos, anchor_pos, _RAMP_ANCHORS[:, c]) for c in range(3)]
    return np.clip(np.round(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def _check_image(image_rgb: np.ndarray) -> None:
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise InvalidImageError(f"viz needs a uint8 numpy image, got {type(image_rgb).__name__} "
                                f"{getattr(image_rgb, 'dtype', '')}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.shape[0] == 0 or image_rgb.shape[1] == 0:
        raise InvalidImageError(f"viz needs an HxWx3 RGB image, got shape {image_rgb.shape}")


def _flatten_tracks(tracks: np.ndarray, stride: int) -> np.ndarray:
    """``[T, Hq, Wq, 2]`` (or ``[T, N, 2]``) -> ``[T, M, 2]`` float64, the grid subsampled by ``stride``."""
    tracks = np.asarray(tracks)
    if tracks.ndim not in (3, 4) or tracks.shape[-1] != 2 or tracks.shape[0] < 1:
        raise ValueError(f"tracks must be [T, Hq, Wq, 2] or [T, N, 2], got shape {tracks.shape}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if tracks.ndim == 4:
        tracks = tracks[:, ::stride, ::stride]
    else:
        tracks = tracks[:, ::stride]
    tracks = tracks.reshape(tracks.shape[0], -1, 2).astype(np.float64)
    if not np.isfinite(tracks).all():
        raise ValueError("tracks contain NaN or Inf; nothing sensible can be drawn")
    return tracks


def _brush_offsets(width: int) -> np.ndarray:
    """``[P, 2]`` integer (dx, dy) offsets of a round brush ``width`` pixels across (1 = a single pixel)."""
    width = max(int(width), 1)
    low, high = -((width - 1) // 2), width // 2
    centre = (low + high) / 2.0
    dy, dx = np.mgrid[low : high + 1, low : high + 1]
    inside = (dx - centre) ** 2 + (dy - centre) ** 2 <= (width / 2.0) ** 2
    return np.stack([dx[inside], dy[inside]], axis=-1)


def _clip_segments(start: np.ndarray, end: np.ndarray, box: np.ndarray):
    """Liang-Barsky clip of segments ``[M, 2]`` to ``box = (xmin, ymin, xmax, ymax)``; returns (start, end, keep)."""
    delta = end - start  # [M, 2]
    t0 = np.zeros(len(start))
    t1 = np.ones(len(start))
    keep = np.ones(len(start), dtype=bool)
    for axis in range(2):
        lo, hi = box[axis], box[axis + 2]
        d = delta[:, axis]
        p = start[:, axis]
        moving = np.abs(d) > 1e-12
        # Segments parallel to this axis: kept only if inside the slab.
        keep &= moving | ((p >= lo) & (p <= hi))
        with np.errstate(divide="ignore", invalid="ignore"):
            ta = np.where(moving, (lo - p) / d, -np.inf)
            tb = np.where(moving, (hi - p) / d, np.inf)
        t0 = np.maximum(t0, np.minimum(ta, tb))
        t1 = np.minimum(t1, np.maximum(ta, tb))
    keep &= t0 <= t1
    return start + t0[:, None] * delta, start + t1[:, None] * delta, keep


def _stamp(canvas: np.ndarray, points_xy: np.ndarray, color: np.ndarray, brush: np.ndarray) -> None:
    """Paint ``color`` at every (x, y) of ``points_xy [P, 2]`` dilated by ``brush [B, 2]``, in place."""
    if len(points_xy) == 0:
        return
    height, width = canvas.shape[:2]
    pixels = np.floor(points_xy).astype(np.int64)  # [P, 2] (col, row)
    pixels = (pixels[:, None, :] + brush[None, :, :]).reshape(-1, 2)  # [P*B, 2]
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] >= 0) & (pixels[:, 1] < height)
    pixels = pixels[inside]
    canvas[pixels[:, 1], pixels[:, 0]] = color


def _sample_segments(shape: Sequence[int], start: np.ndarray, end: np.ndarray, brush: np.ndarray):
    """Points every half pixel along segments ``start[i] -> end[i]`` (``[M, 2]`` xy), clipped to the canvas
    ``shape`` plus the brush margin; returns (``[S, 2]`` xy samples, ``[S]`` index of each sample's segment)."""
    height, width = shape[:2]
    margin = float(np.abs(brush).max()) + 1.0
    box = np.array([-margin, -margin, width + margin, height + margin])
    start, end, keep = _clip_segments(start, end, box)
    kept = np.flatnonzero(keep)  # [M'] original segment index
    start, end = start[kept], end[kept]
    if len(start) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    # Sample each segment every half pixel (variable count per segment, flattened with np.repeat).
    lengths = np.abs(end - start).max(axis=1)  # [M'] Chebyshev length in px
    counts = np.ceil(lengths * 2.0).astype(np.int64) + 1  # [M']
    segment_of = np.repeat(np.arange(len(start)), counts)  # [S]
    first = np.cumsum(counts) - counts  # [M']
    step = np.arange(len(segment_of)) - first[segment_of]  # [S] 0 .. count-1
    frac = step / np.maximum(counts[segment_of] - 1, 1)  # [S] in [0, 1]
    samples = start[segment_of] + frac[:, None] * (end - start)[segment_of]  # [S, 2]
    return samples, kept[segment_of]


def _draw_segments(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, color: np.ndarray,
                   brush: np.ndarray) -> None:
    """Draw straight segments ``start[i] -> end[i]`` (``[M, 2]`` xy) in one colour, in place."""
    samples, _ = _sample_segments(canvas.shape, start, end, brush)
    _stamp(canvas, samples, color, brush)


def _stamp_layers(canvas: np.ndarray, points_xy: np.ndarray, layer: np.ndarray, colors: np.ndarray,
                  brush: np.ndarray) -> None:
    """Paint ``colors[layer[i]]`` at every (x, y) of ``points_xy [P, 2]`` dilated by ``brush [B, 2]``, in place.

    Where several points cover a pixel the highest layer wins, exactly as if the layers were drawn one after
    another (so one fancy-indexing write replaces a loop over layers).
    """
    if len(points_xy) == 0:
        return
    height, width = canvas.shape[:2]
    pixels = np.floor(points_xy).astype(np.int64)  # [P, 2] (col, row)
    pixels = (pixels[:, None, :] + brush[None, :, :]).reshape(-1, 2)  # [P*B, 2]
    layer = np.repeat(np.asarray(layer, np.int64), len(brush))  # [P*B]
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] >= 0) & (pixels[:, 1] < height)
    linear = pixels[inside, 1] * width + pixels[inside, 0]  # [Q] row-major pixel index
    owner = np.full(height * width, -1, np.int64)  # [H*W] highest layer reaching each pixel
    np.maximum.at(owner, linear, layer[inside])
    canvas.reshape(-1, canvas.shape[2])[linear] = colors[owner[linear]]  # duplicates all write the same colour


def _draw_onto(canvas: np.ndarray, tracks: np.ndarray, colors: np.ndarray, thickness: int,
               end_dots: bool = True) -> None:
    """Draw flattened tracks ``[T, M, 2]`` with per-frame ``colors [T, 3]`` onto ``canvas`` in place.

    Every segment is rasterised in one vectorised pass: the segment from frame ``t-1`` to ``t`` takes
    ``colors[t]``, later segments cover earlier ones, and the end dots cover both.
    """
    brush = _brush_offsets(thickness)
    num_frames, num_points = tracks.shape[:2]
    if num_frames > 1:
        starts, ends = tracks[:-1].reshape(-1, 2), tracks[1:].reshape(-1, 2)  # [(T-1)*M, 2], frame-major
        samples, segment = _sample_segments(canvas.shape, starts, ends, brush)
        _stamp_layers(canvas, samples, segment // num_points + 1, colors, brush)
    if end_dots:
        _stamp(canvas, tracks[-1], colors[-1], _brush_offsets(thickness + 2))


def draw_tracks(image_rgb: np.ndarray, tracks: np.ndarray, stride: int = 4, thickness: int = 1) -> np.ndarray:
    """Overlay point trajectories on a copy of an image.

    Args:
        image_rgb: ``[H, W, 3]`` uint8 RGB image (not modified).
        tracks: ``[T, Hq, Wq, 2]`` (or ``[T, N, 2]``) (x, y) positions in this image's pixels.
        stride: draw every ``stride``-th query point along each grid axis.
        thickness: line width in pixels (the end dot is a little wider).

    Returns:
        ``[H, W, 3]`` uint8 RGB image: each path as a polyline coloured blue (early) to yellow (late) with a dot at
        its final position.
    """
    _check_image(image_rgb)
    flat = _flatten_tracks(tracks, stride)
    canvas = image_rgb.copy()
    _draw_onto(canvas, flat, time_colors(flat.shape[0]), thickness)
    return canvas


def draw_forecast(image_rgb: np.ndarray, forecast, sample: int = 0, stride: int = 4, thickness: int = 1) -> np.ndarray:
    """Overlay sample ``sample`` of a :class:`~traj_forecast_ros.forecast.Forecast` on the image it was made from."""
    if not 0 <= sample < forecast.num_samples:
        raise ValueError(f"sample {sample} out of range: the forecast has {forecast.num_samples} samples")
    return draw_tracks(image_rgb, forecast.tracks[sample], stride=stride, thickness=thickness)


def forecast_frames(image_rgb: np.ndarray, tracks: np.ndarray, stride: int = 4, thickness: int = 1,
                    trail: Optional[int] = None) -> List[np.ndarray]:
    """Animate a forecast: ``T`` frames, frame ``t`` shows each point at its position ``t`` with its trail.

    Args:
        image_rgb: ``[H, W, 3]`` uint8 RGB background.
        tracks: ``[T, Hq, Wq, 2]`` (or ``[T, N, 2]``) (x, y) positions in this image's pixels.
        stride, thickness: as in :func:`draw_tracks`.
        trail: number of past steps kept in the trail (``None`` = the whole path so far).

    Returns:
        list of ``T`` ``[H, W, 3]`` uint8 frames; the trail colours follow the same blue -> yellow ramp.
    """
    _check_image(image_rgb)
    flat = _flatten_tracks(tracks, stride)
    num_frames = flat.shape[0]
    colors = time_colors(num_frames)
    dot = _brush_offsets(thickness + 2)
    frames: List[np.ndarray] = []
    canvas = image_rgb.copy()  # full trails, drawn incrementally
    for t in range(num_frames):
        if trail is None:
            if t > 0:
                _draw_onto(canvas, flat[t - 1 : t + 1], colors[t - 1 : t + 1], thickness, end_dots=False)
            frame = canvas.copy()
        else:
            frame = image_rgb.copy()
            first = max(0, t - int(trail))
            if t > first:
                _draw_onto(frame, flat[first : t + 1], colors[first : t + 1], thickness, end_dots=False)
        _stamp(frame, flat[t], colors[t], dot)
        frames.append(frame)
    return frames


def save_animation(frames: Union[np.ndarray, Sequence[np.ndarray]], path: Union[str, Path], fps: float = 8.0) -> Path:
    """Write frames as an animated GIF (``.gif``) or the last frame as a still (``.png``, ``.jpg``).

    Returns the path written.
    """
    path = Path(path)
    frames = list(frames) if not isinstance(frames, np.ndarray) or frames.ndim == 4 else [frames]
    if not frames:
        raise ValueError("save_animation needs at least one frame")
    for frame in frames:
        _check_image(frame)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        write_gif(frames, path, [int(round(1000.0 / fps))] * len(frames))
    elif suffix in (".png", ".jpg", ".jpeg"):
        Image.fromarray(frames[-1]).save(path)
    else:
        raise ValueError(f"unsupported output format '{suffix}' for {path}: use .gif (animation) or .png/.jpg (still)")
    return path


def write_gif(frames: Sequence[np.ndarray], path: Union[str, Path], durations_ms: Sequence[int],
              exact_colors: Optional[np.ndarray] = None) -> Path:
    """Animated GIF with one palette for all frames and no dithering.

    Unchanged pixels stay identical from frame to frame, so the file is about 10x smaller than with a palette
    (and dither noise) per frame. ``exact_colors`` (``[N, 3]`` uint8, N < 128) go into the palette as they are (e.g.
    the track colour ramp); the rest of the palette is fitted to the frames.
    """
    if len(frames) == 0:
        raise ValueError("write_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exact = np.zeros((0, 3), np.uint8) if exact_colors is None else np.asarray(exact_colors, np.uint8).reshape(-1, 3)
    samples = list(frames[:: max(1, len(frames) // 8)][:8])
    fitted = Image.fromarray(np.concatenate(samples, axis=0)).quantize(colors=256 - len(exact),
                                                                       method=Image.Quantize.MEDIANCUT)
    entries = np.asarray(fitted.getpalette()[: 3 * (256 - len(exact))], np.uint8).reshape(-1, 3)
    palette = Image.new("P", (1, 1))
    palette.putpalette(np.concatenate([exact, entries]).reshape(-1).tolist())
    indexed = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    indexed[0].save(path, save_all=True, append_images=indexed[1:], duration=list(durations_ms), loop=0)
    return path
