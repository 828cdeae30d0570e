"""Fixtures of the bag tests: a tiny random-weight model directory (the same for every run)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _tiny_model(directory: Path, text: bool) -> Path:
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.checkpoint import save_model_dir
    from traj_forecast_ros.model.presets import tiny_config

    forecaster = Forecaster.from_config(tiny_config(text=text), device="cpu", seed=0)
    return save_model_dir(directory, forecaster.config, forecaster.denoiser, forecaster.vae,
                          forecaster.image_encoder, forecaster.text_encoder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model directory (random weights from seed 0, no language conditioning): fast on a CPU."""
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny", text=False)


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> Path:
    """The same with a tiny random text encoder (the model takes instructions)."""
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny_text", text=True)
