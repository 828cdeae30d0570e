"""Track overlays and animations: colours ramp over time, drawing lands where the tracks are, files are written."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from traj_forecast_ros.errors import InvalidImageError
from traj_forecast_ros import viz
from traj_forecast_ros.viz import draw_tracks, forecast_frames, save_animation, time_colors


def _line_tracks(num_frames: int = 8) -> np.ndarray:
    """[T, 2, 2, 2] tracks: four points moving right by 4 px per frame."""
    start = np.array([[[10.5, 10.5], [10.5, 30.5]], [[40.5, 10.5], [40.5, 30.5]]], dtype=np.float32)  # [2, 2, 2]
    steps = np.arange(num_frames, dtype=np.float32)[:, None, None, None] * np.array([4.0, 0.0], np.float32)
    return start[None] + steps  # [T, 2, 2, 2]


def test_time_colors_ramp_from_blue_to_yellow():
    colors = time_colors(16).astype(int)
    assert colors.shape == (16, 3)
    assert colors[0, 2] > colors[0, 0] and colors[0, 2] > colors[0, 1]  # early: blue dominant
    assert colors[-1, 0] > 200 and colors[-1, 1] > 200 and colors[-1, 2] < 100  # late: yellow
    luminance = colors @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) > 0)  # monotonic lightness


def test_draw_tracks_marks_the_paths_and_leaves_the_rest(shared_images):
    image = np.asarray(Image.open(shared_images / "kubric_0.png").convert("RGB"))
    tracks = _line_tracks()
    out = draw_tracks(image, tracks, stride=1, thickness=1)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out is not image and not np.shares_memory(out, image)
    changed = np.any(out != image, axis=-1)
    # Along the path of the first point (row 10, columns 10..38) pixels are painted with ramp colours.
    assert changed[10, 12:38].mean() > 0.9
    colors = time_colors(8)
    assert tuple(out[10, 12]) == tuple(colors[1])  # first segment drawn in frame 1's colour
    assert tuple(out[10, 36]) == tuple(colors[-1])  # last segment / end dot in the last colour
    # Far from every path nothing changes.
    assert not changed[60:, :].any() and not changed[:, 80:].any()


def test_draw_tracks_stride_and_out_of_image_points():
    image = np.zeros((48, 64, 3), np.uint8)
    tracks = _line_tracks()
    strided = draw_tracks(image, tracks, stride=2)  # keeps only grid point (0, 0)
    assert np.any(strided[10] != 0) and not np.any(strided[30] != 0)
    far = tracks + np.array([1000.0, -1000.0], np.float32)  # entirely outside: drawn nowhere, no error
    assert not draw_tracks(image, far, stride=1).any()
    crossing = np.stack([np.array([[-100.0, 20.5]]), np.array([[200.0, 20.5]])])  # [T=2, N=1, 2] crosses image
    out = draw_tracks(image, crossing, stride=1)
    assert np.all(out[20].any(-1))  # the whole row is painted after clipping


def test_draw_tracks_rejects_bad_input():
    with pytest.raises(InvalidImageError):
        draw_tracks(np.zeros((10, 10), np.uint8), _line_tracks())
    with pytest.raises(InvalidImageError):
        draw_tracks(np.zeros((10, 10, 3), np.float32), _line_tracks())
    with pytest.raises(ValueError, match="NaN"):
        draw_tracks(np.zeros((10, 10, 3), np.uint8), np.full((4, 2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="tracks must be"):
        draw_tracks(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2, 3)))


def test_forecast_frames_animate_positions():
    image = np.zeros((48, 64, 3), np.uint8)
    tracks = _line_tracks(6)
    frames = forecast_frames(image, tracks, stride=1)
    assert len(frames) == 6 and all(f.shape == image.shape for f in frames)
    painted = [np.any(f[10] != 0, axis=-1) for f in frames]
    # The painted extent along row 10 grows as the point moves right; the trail is kept.
    right_edges = [np.nonzero(p)[0].max() for p in painted]
    assert right_edges == sorted(right_edges) and right_edges[-1] > right_edges[0] + 15
    assert painted[-1][11]  # start of the trail still visible in the last frame
    short = forecast_frames(image, tracks, stride=1, trail=1)
    assert not np.any(short[-1][10, :20] != 0)  # with a 1-step trail the start is gone


def test_save_animation_gif_and_png(tmp_path: Path):
    image = np.zeros((32, 48, 3), np.uint8)
    frames = forecast_frames(image, _line_tracks(4) * 0.5, stride=1)
    gif = save_animation(frames, tmp_path / "anim.gif", fps=5)
    with Image.open(gif) as loaded:
        assert loaded.n_frames == 4 and loaded.size == (48, 32)
    png = save_animation(frames, tmp_path / "still.png")
    still = np.asarray(Image.open(png).convert("RGB"))
    np.testing.assert_array_equal(still, frames[-1])
    with pytest.raises(ValueError, match="unsupported"):
        save_animation(frames, tmp_path / "anim.mp4")


def _draw_step_by_step(image: np.ndarray, tracks: np.ndarray, stride: int, thickness: int) -> np.ndarray:
    """Reference: one time step after another (the drawing before it was vectorised), then the end dots."""
    flat = viz._flatten_tracks(tracks, stride)
    colors = time_colors(flat.shape[0])
    canvas = image.copy()
    brush = viz._brush_offsets(thickness)
    for t in range(1, flat.shape[0]):
        viz._draw_segments(canvas, flat[t - 1], flat[t], colors[t], brush)
    viz._stamp(canvas, flat[-1], colors[-1], viz._brush_offsets(thickness + 2))
    return canvas


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_drawing_equals_drawing_step_by_step(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    start = np.stack(np.meshgrid(np.linspace(-20, 150, 9), np.linspace(-20, 110, 7)), -1)  # [7, 9, 2], some outside
    tracks = start + np.cumsum(rng.normal(0, 6.0, (12, 7, 9, 2)), 0)  # [T=12, 7, 9, 2] crossing paths and the border
    for thickness in (1, 2, 3):
        for stride in (1, 2):
            expected = _draw_step_by_step(image, tracks, stride, thickness)
            np.testing.assert_array_equal(draw_tracks(image, tracks, stride=stride, thickness=thickness), expected)


def test_later_segments_cover_earlier_ones():
    image = np.zeros((40, 60, 3), np.uint8)
    there_and_back = np.array([[[5.5, 20.5]], [[50.5, 20.5]], [[5.5, 20.5]]])  # [T=3, N=1, 2]: out, then back
    out = draw_tracks(image, there_and_back, stride=1)
    colors = time_colors(3)
    assert tuple(out[20, 30]) == tuple(colors[2])  # the return leg (frame 2) is on top of the way out (frame 1)
    still = np.repeat(np.array([[[30.5, 10.5]]]), 4, axis=0)  # a point that never moves: just its end dot
    dot = draw_tracks(image, still, stride=1)
    assert tuple(dot[10, 30]) == tuple(time_colors(4)[-1]) and dot.any(-1).sum() <= 9
