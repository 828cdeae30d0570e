"""K, the Euler steps and the image-size limit are defined once; the node, the CLI, the API and the shipped node
configuration all take them from there (the steps from the model's own ``default_steps``)."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

from traj_forecast_ros.cli import build_parser
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.geometry import DEFAULT_MAX_PIXELS, prepare_image, to_rgb
from traj_forecast_ros.model.config import OFFICIAL_STEPS, ModelConfig
from traj_forecast_ros.ros import conversions
from traj_forecast_ros.ros.params import PARAMETER_SPECS

REPO = Path(__file__).resolve().parents[2]


def _default(function, name: str):
    return inspect.signature(function).parameters[name].default


def test_one_image_size_limit_for_the_api_the_conversions_and_the_node():
    assert DEFAULT_MAX_PIXELS == 4096 * 4096
    assert PARAMETER_SPECS["max_pixels"].default == DEFAULT_MAX_PIXELS
    for function in (conversions.image_msg_to_rgb, conversions.compressed_msg_to_rgb, to_rgb, prepare_image):
        assert _default(function, "max_pixels") == DEFAULT_MAX_PIXELS, function.__name__
    assert not hasattr(conversions, "DEFAULT_MAX_PIXELS") or conversions.DEFAULT_MAX_PIXELS is DEFAULT_MAX_PIXELS


def test_one_k_and_one_step_count_for_the_api_the_node_and_the_cli():
    assert _default(Forecaster.forecast, "num_samples") == DEFAULT_NUM_SAMPLES
    assert PARAMETER_SPECS["num_samples"].default == DEFAULT_NUM_SAMPLES
    # the steps are the model's: None in the API and the CLI, 0 in the node, ModelConfig.default_steps otherwise
    assert ModelConfig().default_steps == OFFICIAL_STEPS == 10
    assert _default(Forecaster.forecast, "steps") is None
    assert PARAMETER_SPECS["steps"].default == PARAMETER_SPECS["steps"].model_default == 0
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("predict", "evaluate"):
        defaults = {action.dest: action.default for action in commands[name]._actions}
        assert (defaults["samples"], defaults["steps"]) == (DEFAULT_NUM_SAMPLES, None), name


def test_shipped_node_configuration_keeps_the_shared_defaults():
    params = yaml.safe_load((REPO / "config" / "forecast.yaml").read_text())["/**/forecast_node"]["ros__parameters"]
    assert params["num_samples"] == DEFAULT_NUM_SAMPLES and params["steps"] == 0 and params["guidance_scale"] == -1.0
    assert params["max_pixels"] == DEFAULT_MAX_PIXELS
