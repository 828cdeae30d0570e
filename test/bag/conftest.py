"""Fixtures of the bag tests: a tiny random-weight model directory (the same for every run)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model directory (random weights from seed 0, no language conditioning): fast on a CPU."""
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.checkpoint import save_model_dir
    from traj_forecast_ros.model.presets import tiny_config

    forecaster = Forecaster.from_config(tiny_config(text=False), device="cpu", seed=0)
    directory = tmp_path_factory.mktemp("models") / "tiny"
    return save_model_dir(directory, forecaster.config, forecaster.denoiser, forecaster.vae,
                          forecaster.image_encoder, forecaster.text_encoder)
