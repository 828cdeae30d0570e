"""Forecaster.forecast argument types (issue 21, minor): numpy integers and torch tensor images are accepted,
bools and other types are refused with a clear ValueError / InvalidImageError; seed -1 means fresh noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traj_forecast_ros.errors import InvalidImageError
from traj_forecast_ros.forecast import FRESH_SEED
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.presets import tiny_config


@pytest.fixture(scope="module")
def forecaster() -> Forecaster:
    return Forecaster.from_config(tiny_config(text=False), device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_numpy_integers_are_accepted_everywhere(forecaster, image):
    result = forecaster.forecast(image, num_samples=np.int64(2), steps=np.int32(3), seed=np.int64(7))
    reference = forecaster.forecast(image, num_samples=2, steps=3, seed=7)
    assert result.tracks.shape[0] == 2 and result.seed == 7
    np.testing.assert_array_equal(result.tracks, reference.tracks)


def test_a_torch_uint8_image_is_forecast_like_the_same_numpy_image(forecaster, image):
    result = forecaster.forecast(torch.from_numpy(image), num_samples=1, steps=2, seed=1)
    np.testing.assert_array_equal(result.tracks, forecaster.forecast(image, num_samples=1, steps=2, seed=1).tracks)


def test_a_float_torch_image_is_refused_as_an_invalid_image(forecaster, image):
    with pytest.raises(InvalidImageError, match="uint8"):
        forecaster.forecast(torch.from_numpy(image).float(), num_samples=1, steps=2)


@pytest.mark.parametrize("argument", ["num_samples", "steps", "seed"])
@pytest.mark.parametrize("value", [True, 2.0, "2", np.bool_(True)], ids=["bool", "float", "str", "numpy-bool"])
def test_bools_floats_and_strings_are_refused_with_a_value_error(forecaster, image, argument, value):
    arguments = dict(num_samples=1, steps=2, seed=0)
    arguments[argument] = value
    with pytest.raises(ValueError, match=f"{argument}.* must be an integer"):
        forecaster.forecast(image, **arguments)


def test_seed_minus_one_means_fresh_noise_like_none(forecaster, image):
    first = forecaster.forecast(image, num_samples=1, steps=2, seed=FRESH_SEED)
    second = forecaster.forecast(image, num_samples=1, steps=2, seed=FRESH_SEED)
    assert first.seed is not None and first.seed >= 0 and first.seed != second.seed
    replay = forecaster.forecast(image, num_samples=1, steps=2, seed=first.seed)  # the reported seed replays it
    np.testing.assert_array_equal(first.tracks, replay.tracks)
    with pytest.raises(ValueError, match="seed must be >= -1"):
        forecaster.forecast(image, num_samples=1, steps=2, seed=-2)
