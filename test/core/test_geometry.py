"""Crop/resize policy, exact inverse point mapping, query grid, normalisation and input validation."""

import numpy as np
import pytest
import torch
from PIL import Image

from traj_forecast_ros.errors import InvalidImageError
from traj_forecast_ros.geometry import (
    ImageTransform,
    denormalise_points,
    normalise_points,
    prepare_image,
    query_grid,
    to_rgb,
)
from traj_forecast_ros.model.presets import libero_config, tiny_config


def test_libero_frame_passes_through_untouched(shared_images):
    image = np.asarray(Image.open(shared_images / "libero_agent_0.jpg").convert("RGB"))
    assert image.shape == (128, 128, 3)
    model_image, transform = prepare_image(image, (128, 128))
    assert transform.is_identity and transform.crop_offset == (0, 0) and transform.scale == (1.0, 1.0)
    np.testing.assert_array_equal(model_image, image)


@pytest.mark.parametrize(
    "input_size, offset, crop",
    [((256, 464), (104, 0), (256, 256)), ((480, 640), (80, 0), (480, 480)), ((640, 480), (0, 80), (480, 480)),
     ((257, 300), (21, 0), (257, 257))],
)
def test_centre_crop_is_the_largest_centred_square(input_size, offset, crop):
    transform = ImageTransform.centre_crop(input_size, (128, 128))
    assert transform.crop_offset == offset and transform.crop_size == crop
    assert transform.scale == pytest.approx((128 / crop[1], 128 / crop[0]))


def test_rectangular_model_keeps_its_aspect_ratio():
    transform = ImageTransform.centre_crop((512, 928), (256, 464))  # Physics101-shaped model, 2x input
    assert transform.crop_size == (512, 928) and transform.scale == (0.5, 0.5)
    wide = ImageTransform.centre_crop((256, 1000), (256, 464))
    assert wide.crop_size == (256, 464) and wide.crop_offset == ((1000 - 464) // 2, 0)


def test_point_maps_are_exact_inverses():
    rng = np.random.default_rng(0)
    transform = ImageTransform.centre_crop((256, 464), (128, 128))
    points = rng.uniform(-50, 500, size=(7, 5, 2))
    np.testing.assert_allclose(transform.to_input(transform.to_model(points)), points, rtol=0, atol=1e-10)
    np.testing.assert_allclose(transform.to_model(transform.to_input(points)), points, rtol=0, atol=1e-10)
    # Crop corners map to model corners (pixel-edge convention) and the crop centre to the model centre.
    corners = np.array([[104.0, 0.0], [360.0, 256.0], [232.0, 128.0]])
    np.testing.assert_allclose(transform.to_model(corners), [[0, 0], [128, 128], [64, 64]])
    assert transform.to_model(np.zeros((3, 2), np.float32)).dtype == np.float32


def test_resize_matches_the_mapping(shared_images):
    """A bright dot at a known input position appears at the mapped model position."""
    image = np.zeros((256, 464, 3), np.uint8)
    image[100:108, 300:308] = 255  # centre (304, 104) in input pixels
    model_image, transform = prepare_image(image, (128, 128))
    assert model_image.shape == (128, 128, 3)
    ys, xs = np.nonzero(model_image[..., 0] > 60)
    expected = transform.to_model(np.array([304.0, 104.0]))
    assert abs((xs + 0.5).mean() - expected[0]) < 0.6 and abs((ys + 0.5).mean() - expected[1]) < 0.6
    real = np.asarray(Image.open(shared_images / "physics101_0.jpg").convert("RGB"))
    small, _ = prepare_image(real, (128, 128))
    assert small.shape == (128, 128, 3) and small.dtype == np.uint8


def test_query_grid_libero_and_tiny():
    grid = query_grid(libero_config())
    assert grid.shape == (64, 64, 2) and grid.dtype == np.float32
    assert tuple(grid[0, 0]) == (1.5, 1.5) and tuple(grid[0, 1]) == (3.5, 1.5) and tuple(grid[-1, -1]) == (127.5, 127.5)
    tiny = query_grid(tiny_config())
    assert tiny.shape == (8, 8, 2) and tuple(tiny[1, 0]) == (1.5, 5.5)


def test_normalisation_round_trip_numpy_and_torch():
    points = np.array([[0.0, 0.0], [128.0, 64.0], [64.0, 32.0]])
    norm = normalise_points(points, (64, 128))  # (height, width)
    np.testing.assert_allclose(norm, [[-1, -1], [1, 1], [0, 0]])
    np.testing.assert_allclose(denormalise_points(norm, (64, 128)), points)
    tensor = torch.tensor(points, dtype=torch.float32)
    torch.testing.assert_close(denormalise_points(normalise_points(tensor, (64, 128)), (64, 128)), tensor)


def test_to_rgb_colour_orders():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    np.testing.assert_array_equal(to_rgb(rgb), rgb)
    np.testing.assert_array_equal(to_rgb(rgb[..., ::-1].copy(), "bgr"), rgb)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb(rgba), rgb)
    bgra = np.concatenate([rgb[..., ::-1], np.full((4, 5, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb(bgra, "bgra"), rgb)
    mono = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = to_rgb(mono)
    assert out.shape == (4, 5, 3) and np.all(out[..., 0] == mono) and np.all(out[..., 2] == mono)
    np.testing.assert_array_equal(to_rgb(mono[..., None]), out)
    assert to_rgb(rgb[:, ::-1]).flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    "image, kwargs, reason",
    [
        (np.zeros((0, 5, 3), np.uint8), {}, "empty"),
        (np.zeros((4, 5, 3), np.float32), {}, "uint8"),
        (np.full((4, 5, 3), np.nan, np.float32), {}, "NaN"),
        (np.zeros((4, 5, 3), np.uint16), {}, "uint8"),
        (np.zeros((2, 4, 5, 3), np.uint8), {}, "dims"),
        (np.zeros((4, 5, 2), np.uint8), {}, "channels"),
        (np.zeros((4, 5, 3), np.uint8), {"color_order": "rgba"}, "needs 4 channels"),
        (np.zeros((4, 5, 3), np.uint8), {"color_order": "yuv"}, "unknown color_order"),
        (np.zeros((100, 100, 3), np.uint8), {"max_pixels": 1000}, "max_pixels"),
        ([[1, 2], [3, 4]], {}, "numpy array"),
    ],
)
def test_to_rgb_rejects_bad_images_with_a_reason(image, kwargs, reason):
    with pytest.raises(InvalidImageError, match=reason):
        to_rgb(image, **kwargs)
