"""The node's ``threads`` parameter (0 = the cores available) and its sampling plan in /diagnostics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ros_helpers import ros_available

pytestmark = pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))

if ros_available() is None:
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from traj_forecast_ros.ros.diagnostics import diagnostic_status
    from traj_forecast_ros.ros.forecast_node import ForecastNode
    from traj_forecast_ros.ros.params import PARAMETER_SPECS
    from traj_forecast_ros.ros.pipeline import PipelineStats

from traj_forecast_ros.cpu_cores import available_cores, resolve_threads
from traj_forecast_ros.sampling_plan import choose_sampling_plan


@dataclasses.dataclass
class PlannedForecaster:
    """Just what the node reads at configure: identity, plan, warmup and release."""

    model_id: str = "planned"
    device: str = "cpu"
    dtype: str = "float32"
    plan: object = dataclasses.field(default_factory=lambda: choose_sampling_plan("cpu"))
    threads_seen: int = 0

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        pass

    def forecast(self, rgb, instruction=None, num_samples=8, steps=10, seed=None):
        raise RuntimeError("not used")


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_resolve_threads() -> None:
    assert resolve_threads(0) == available_cores() >= 1
    assert resolve_threads(3) == 3
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="threads"):
            resolve_threads(bad)
    spec = PARAMETER_SPECS["threads"]
    assert spec.default == 0 and spec.check(0) is None and spec.check(-1) is not None


@pytest.mark.parametrize("requested, expected", [(0, None), (1, 1)])  # None: the cores available
def test_threads_are_applied_before_loading_and_the_plan_is_reported(context, requested, expected) -> None:
    loaded = PlannedForecaster()

    def factory(*args, **options):
        loaded.threads_seen = torch.get_num_threads()  # the plan is chosen for this count
        return loaded

    overrides = [Parameter("model", value="planned"), Parameter("threads", value=requested),
                 Parameter("autostart", value=False)]
    node = ForecastNode(forecaster_factory=factory, context=context, parameter_overrides=overrides)
    try:
        assert node.models.load(node.settings, guidance_scale=-1.0, num_samples=node.settings["num_samples"])
        assert loaded.threads_seen == (expected or available_cores())
        values = {kv.key: kv.value for kv in diagnostic_status("x", "inactive", PipelineStats().snapshot(),
                                                                node.models.model.info, 0).values}
        assert values["threads"] == str(loaded.threads_seen)
        assert values["sampling_plan"] == loaded.plan.summary() and "sample batch" in values["sampling_plan"]
    finally:
        node.destroy_node()


def test_the_model_is_loaded_for_the_configured_k(context) -> None:
    """The CPU plan probe is keyed on the K the node serves: the factory gets the node's num_samples."""
    seen = {}

    def factory(*args, **options):
        seen.update(options)
        return PlannedForecaster()

    overrides = [Parameter("model", value="planned"), Parameter("num_samples", value=3),
                 Parameter("autostart", value=False)]
    node = ForecastNode(forecaster_factory=factory, context=context, parameter_overrides=overrides)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS  # the real path: configure loads it
        assert seen["num_samples"] == 3
    finally:
        node.destroy_node()
