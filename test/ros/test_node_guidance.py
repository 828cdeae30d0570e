"""The node's ``steps`` and ``guidance_scale`` parameters: the model's own defaults, live changes that reach the next
forecast (also while one is in flight), and guidance refused for models without an unconditional embedding."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from ros_helpers import ros_available, wait_until

pytestmark = pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))

if ros_available() is None:
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from traj_forecast_ros.forecast import Forecast
    from traj_forecast_ros.ros.conversions import rgb_to_image_msg
    from traj_forecast_ros.ros.forecast_node import ForecastNode
    from traj_forecast_ros.ros.params import PARAMETER_SPECS


class RecordingForecaster:
    """Still tracks on a 4x4 grid; records the sampling options of every call; can hold a call in flight."""

    model_id, device, dtype = "recording", "cpu", "float32"

    def __init__(self, supports_guidance: bool) -> None:
        self.config = SimpleNamespace(name="recording", supports_guidance=supports_guidance, frame_interval_s=0.1)
        self.text_encoder = object()
        self.calls = []
        self.released = False
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        self.released = True

    def forecast(self, rgb, instruction=None, num_samples=8, steps=None, seed=None, **options):
        self.calls.append({"steps": steps, "guidance_scale": options.get("guidance_scale")})
        self.entered.set()
        self.gate.wait(5.0)
        height, width = rgb.shape[:2]
        ys, xs = np.meshgrid(np.linspace(0, height, 4), np.linspace(0, width, 4), indexing="ij")
        query = np.stack([xs, ys], -1).astype(np.float32)
        tracks = np.repeat(np.repeat(query[None, None], 3, axis=1), num_samples, axis=0)
        return Forecast(tracks=tracks, query_points=query, image_size=(height, width), model_id="recording",
                        instruction=instruction, timings={"total": 0.01})


def make_node(context, forecaster, **params):
    overrides = [Parameter(name, value=value) for name, value in params.items()]
    return ForecastNode(forecaster_factory=lambda *a, **options: forecaster, context=context,
                        parameter_overrides=overrides)


def test_parameter_table_keeps_the_model_defaults_apart_from_the_ranges():
    steps, guidance = PARAMETER_SPECS["steps"], PARAMETER_SPECS["guidance_scale"]
    assert steps.default == 0 and guidance.default == -1.0  # the model's own settings unless set
    assert steps.check(0) is None and steps.check(2) is None and steps.check(200) is None
    assert "model's own" in steps.check(1) and steps.check(201)
    assert guidance.check(-1.0) is None and guidance.check(0.0) is None and guidance.check(20.0) is None
    assert guidance.check(-0.5) and guidance.check(20.5)
    assert steps.descriptor().integer_range[0].from_value == 0  # ROS accepts the sentinel at declaration
    assert guidance.descriptor().floating_point_range[0].from_value == -1.0


def test_defaults_reach_the_forecaster_as_the_models_own_and_live_changes_apply_to_the_next_frame(context):
    fake = RecordingForecaster(supports_guidance=True)
    node = make_node(context, fake)
    try:
        assert node.autostart()
        published = []
        node.pipeline._publish = lambda frame, forecast, settings: published.append(forecast)
        frame = rgb_to_image_msg(np.zeros((24, 32, 3), np.uint8))
        node._on_image(node.cameras[0], frame)
        assert wait_until(lambda: len(published) == 1, 5)
        assert fake.calls[-1] == {"steps": None, "guidance_scale": None}  # the model's default_steps and guidance
        fake.gate.clear()
        fake.entered.clear()
        node._on_image(node.cameras[0], frame)
        assert fake.entered.wait(5.0)  # in flight while the parameters change
        result = node.set_parameters([Parameter("guidance_scale", value=3.0), Parameter("steps", value=6)])
        assert all(r.successful for r in result)
        fake.gate.set()
        assert wait_until(lambda: len(published) == 2, 5)
        assert fake.calls[1] == {"steps": None, "guidance_scale": None}  # the frame in flight keeps its settings
        node._on_image(node.cameras[0], frame)
        assert wait_until(lambda: len(published) == 3, 5)
        assert fake.calls[2] == {"steps": 6, "guidance_scale": 3.0}
    finally:
        fake.gate.set()
        node.stop_worker(timeout=1.0)
        node.destroy_node()


def test_guidance_is_refused_for_a_model_without_an_unconditional_embedding(context):
    fake = RecordingForecaster(supports_guidance=False)  # like the LIBERO checkpoints
    node = make_node(context, fake)
    try:
        assert node.autostart()
        refused = node.set_parameters([Parameter("guidance_scale", value=2.0)])[0]
        assert not refused.successful and "instruction dropout" in refused.reason
        assert node.get_parameter("guidance_scale").value == -1.0
        assert node.set_parameters([Parameter("guidance_scale", value=1.0)])[0].successful  # 1 = none: fine
    finally:
        node.stop_worker(timeout=1.0)
        node.destroy_node()


def test_configure_with_guidance_for_a_model_without_it_fails_and_releases_the_model(context, capfd):
    fake = RecordingForecaster(supports_guidance=False)
    node = make_node(context, fake, autostart=False, guidance_scale=2.5)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node._state_label == "unconfigured" and node.models.forecaster is None and fake.released
        assert "instruction dropout" in capfd.readouterr().err
    finally:
        node.destroy_node()
