"""Fixtures of the ROS tests (helpers live in ros_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model directory with a tiny random text-conditioned model (written once per session)."""
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.checkpoint import save_model_dir
    from traj_forecast_ros.model.presets import tiny_config

    config = tiny_config(text=True)
    forecaster = Forecaster.from_config(config, device="cpu")
    directory = tmp_path_factory.mktemp("models") / "tiny"
    save_model_dir(directory, config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                   forecaster.text_encoder)
    return directory


@pytest.fixture
def context():
    """A fresh rclpy context for a node created in the test (shut down afterwards)."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)
