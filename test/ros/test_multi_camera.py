"""Several cameras in one node (issue 20): one model, per-camera mailboxes and counters, one batched forecaster call
for frames that wait together, a fair scheduler, outputs per camera with their own headers, and the hostile cases of
the ``cameras`` scheme. In-process nodes reached over real DDS (loopback, random domain) with fake forecasters, plus
the LIBERO two-view replay through a node process with a real (tiny) model."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Dict, List

import numpy as np
import pytest

from ros_helpers import InProcessNode, Probe, counts_balance, node_diagnostics, ros_available, wait_until

pytestmark = [pytest.mark.ros, pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))]

if ros_available() is None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.srv import SetParameters
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from traj_forecast_msgs.msg import TrajectoryForecast

    from traj_forecast_ros.forecast import Forecast
    from traj_forecast_ros.ros.conversions import rgb_to_image_msg
    from traj_forecast_ros.ros.forecast_node import ForecastNode

_namespaces = itertools.count()


class BatchFake:
    """``forecast_batch``: straight tracks per image; records every call's size and max_pixels; ``gate`` (when set)
    holds the first call until released; ``step_s`` per call. Counts how many instances were made."""

    made = 0

    def __init__(self, step_s: float = 0.0) -> None:
        type(self).made += 1
        self.step_s = step_s
        self.calls: List[int] = []
        self.max_pixels: List[Any] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.model_id, self.device, self.dtype = "batch-fake", "cpu", "float32"
        self.lock = threading.Lock()

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        pass

    def forecast_batch(self, requests, num_samples=8, steps=None, cancel=None, max_pixels=None, **options):
        with self.lock:
            self.calls.append(len(requests))
            self.max_pixels.append(max_pixels)
        self.entered.set()
        assert self.gate.wait(10)
        time.sleep(self.step_s)
        results = []
        for request in requests:
            height, width = request.image.shape[:2]
            query = np.stack(np.meshgrid(np.linspace(0, width, 4), np.linspace(0, height, 4)), -1).astype(np.float32)
            tracks = np.repeat(query[None, None], num_samples, axis=0).repeat(3, axis=1)  # [K, 3, 4, 4, 2]
            results.append(Forecast(tracks=tracks, query_points=query, image_size=(height, width),
                                    model_id=self.model_id, instruction=request.instruction, timings={"total": 0.0}))
        return results


@pytest.fixture(scope="module")
def probe(diagnostics_probe):
    return diagnostics_probe


class TwoCameras:
    """An in-process node with cameras ``left`` and ``right`` (raw, topics ``<ns>/left/image``, ...)."""

    def __init__(self, probe: Probe, fake: BatchFake, **params: Any) -> None:
        self.probe, self.fake = probe, fake
        self.namespace = f"/multi{next(_namespaces)}"
        params = {"cameras": ["left", "right"], "qos_reliability": "reliable", "max_input_age": 30.0,
                  "left.camera_frame": "left_optical", "right.camera_frame": "right_optical", **params}
        self.node = InProcessNode(lambda *a, **k: fake, self.namespace, **params)
        self.name = self.node.name
        self.images = {camera: probe.publisher(Image, f"{self.namespace}/{camera}/image") for camera in ("left", "right")}
        for camera in ("left", "right"):
            probe.subscribe(TrajectoryForecast, f"{self.name}/{camera}/forecast")
        self._stamp = itertools.count(1)

    def start(self) -> None:
        assert self.node.node.autostart(), self.node.node._transition_error
        for camera, publisher in self.images.items():
            assert wait_until(lambda: publisher.get_subscription_count() > 0, 20), f"{camera} never subscribed"

    def frame(self, frame_id: str = "") -> Any:
        msg = rgb_to_image_msg(np.full((24, 32, 3), 90, np.uint8))
        now_ns = self.probe.node.get_clock().now().nanoseconds + next(self._stamp)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 1_000_000_000)
        msg.header.frame_id = frame_id
        return msg

    def forecasts(self, camera: str) -> List[Any]:
        return self.probe.messages(f"{self.name}/{camera}/forecast")

    def diagnostics(self) -> Dict[str, str]:
        """The first fresh /diagnostics status whose totals and per-camera counters balance exactly."""
        seen = len(self.probe.messages("/diagnostics"))

        def balanced():
            values = node_diagnostics(self.probe, self.name, seen)
            if values is None or counts_balance(values, self.node.node.stats.total) is not None:
                return None
            for camera in ("left", "right"):
                per = {key.split("/", 1)[1]: value for key, value in values.items() if key.startswith(f"{camera}/")}
                if counts_balance(per, self.node.node.stats.cameras[camera]) is not None:
                    return None
            return values

        values = wait_until(balanced, 20, interval=0.1)
        assert values is not None, f"counters never balanced: {node_diagnostics(self.probe, self.name)}"
        return values

    def close(self) -> None:
        self.node.close()


def test_frames_of_two_cameras_waiting_together_are_forecast_in_one_call_each_with_its_own_header(probe):
    fake = BatchFake()
    node = TwoCameras(probe, fake)
    try:
        node.start()
        fake.gate.clear()
        node.images["left"].publish(node.frame())  # taken by the worker, held at the gate
        assert fake.entered.wait(10)
        left, right = node.frame(), node.frame("right_from_camera")
        node.images["left"].publish(left)  # both wait in their mailboxes ...
        node.images["right"].publish(right)
        assert wait_until(lambda: node.node.node.stats.total.received == 3, 10)
        fake.gate.set()  # ... and go into ONE forecaster call
        assert wait_until(lambda: len(node.forecasts("left")) == 2 and len(node.forecasts("right")) == 1, 10)
        assert fake.calls == [1, 2], (fake.calls, node.forecasts("left"), node.node.node.stats.total.snapshot())
        right_out = node.forecasts("right")[0]
        left_out = node.forecasts("left")[1]
        assert (right_out.header.stamp, right_out.header.frame_id) == (right.header.stamp, "right_from_camera")
        assert (left_out.header.stamp, left_out.header.frame_id) == (left.header.stamp, "left_optical")
        values = node.diagnostics()
        assert (values["left/frames_received"], values["left/forecasts_published"]) == ("2", "2")
        assert (values["right/frames_received"], values["right/forecasts_published"]) == ("1", "1")
        assert values["frames_received"] == "3" and values["batch_size_max"] == "2"
        assert values["models_loaded"] == "1" and BatchFake.made >= 1
    finally:
        fake.gate.set()
        node.close()


def test_a_flooding_camera_does_not_starve_a_quiet_one_that_dies_and_comes_back(probe):
    """left floods (as fast as the probe can publish); right sends a frame now and then, stops (a dead camera: the
    worker never waits for it), then comes back. Every right frame is forecast; left keeps being served while right
    is silent; every frame of both is accounted for, per camera."""
    fake = BatchFake(step_s=0.02)
    node = TwoCameras(probe, fake, max_batch_cameras=1)  # one camera per call: the round-robin order decides
    stop_flood = threading.Event()

    def flood():
        while not stop_flood.is_set():
            node.images["left"].publish(node.frame())
            time.sleep(0.002)

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        node.start()
        flooder.start()
        assert wait_until(lambda: len(node.forecasts("left")) >= 3, 20)
        for round_ in range(3):
            node.images["right"].publish(node.frame())
            assert wait_until(lambda: len(node.forecasts("right")) == round_ + 1, 10), "the quiet camera starved"
        served = len(node.forecasts("left"))
        # right is dead: left goes on (waited for, not counted in a fixed window: this machine can pause for 0.8 s)
        assert wait_until(lambda: len(node.forecasts("left")) > served + 5, 10), "the flooding camera stopped"
        assert len(node.forecasts("right")) == 3
        node.images["right"].publish(node.frame())  # right comes back
        assert wait_until(lambda: len(node.forecasts("right")) == 4, 10)
    finally:
        stop_flood.set()
        flooder.join(5)
    try:
        values = node.diagnostics()
        assert values["right/frames_received"] == values["right/forecasts_published"] == "4"
        assert int(values["left/dropped.superseded"]) > 0 and set(fake.calls) == {1}
    finally:
        node.close()


@pytest.mark.parametrize("names, reason", [
    (["left", "bad-name"], "not a valid camera name"), (["1cam"], "not a valid camera name"),
    (["a/b"], "not a valid camera name"), (["a.b"], "not a valid camera name"), (["__x"], "not a valid camera name"),
    (["left", "left"], "more than once"),
])
def test_invalid_camera_names_are_refused_at_startup(context, names, reason):
    with pytest.raises(Exception, match=reason):
        ForecastNode(forecaster_factory=lambda *a, **k: BatchFake(), context=context,
                     parameter_overrides=[Parameter("cameras", value=names)])


def test_two_cameras_on_one_topic_fail_activate_with_the_reason_and_leave_the_node_inactive(context):
    overrides = [Parameter("cameras", value=["a", "b"]), Parameter("a.image_topic", value="/same/image"),
                 Parameter("b.image_topic", value="/same/image")]
    node = ForecastNode(forecaster_factory=lambda *a, **k: BatchFake(), context=context, parameter_overrides=overrides)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() != TransitionCallbackReturn.SUCCESS
        assert "cameras a and b both subscribe to /same/image" in node._transition_error
        assert node._state_label == "inactive" and node.inputs.subscriptions == []
        result = node.set_parameters([Parameter("b.image_topic", value="/other/image")])[0]
        assert result.successful  # topics apply at activate: fixing one is allowed while inactive ...
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS  # ... and activate now works
    finally:
        node.stop_worker(timeout=1.0)
        node.destroy_node()


def test_cameras_change_only_while_unconfigured_and_apply_at_configure(context):
    """Refused while active or inactive (the publishers and subscriptions are made for the configured cameras);
    accepted while unconfigured, the new camera's parameters are declared and its outputs made at configure."""
    node = ForecastNode(forecaster_factory=lambda *a, **k: BatchFake(), context=context,
                        parameter_overrides=[Parameter("cameras", value=["left"])])
    try:
        assert node.autostart()
        for state in ("active", "inactive"):
            result = node.set_parameters([Parameter("cameras", value=["left", "right"])])[0]
            assert not result.successful and "only while the node is unconfigured" in result.reason, state
            assert node.get_parameter("cameras").value == ["left"]
            if state == "active":
                assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.set_parameters([Parameter("cameras", value=["left", "right"])])[0].successful
        assert not node.has_parameter("right.image_topic")  # declared at configure
        assert node.set_parameters([Parameter("cameras", value=["left", "bad name"])])[0].successful is False
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.get_parameter("right.image_topic").value == "right/image"
        assert node.outputs.cameras == ["left", "right"]
        result = node.set_parameters([Parameter("right.image_topic", value="no spaces allowed")])[0]
        assert not result.successful and "not a valid topic name" in result.reason
        result = node.set_parameters([Parameter("right.transport", value="h264")])[0]
        assert not result.successful and "must be one of" in result.reason
    finally:
        node.stop_worker(timeout=1.0)
        node.destroy_node()


def _tiny_node(context, **params):
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.presets import tiny_config

    overrides = [Parameter(name, value=value) for name, value in dict(num_samples=1, steps=2, **params).items()]
    return ForecastNode(forecaster_factory=lambda *a, **k: Forecaster.from_config(tiny_config(text=False),
                                                                                  device="cpu"),
                        context=context, parameter_overrides=overrides)


def test_a_4100_x_4100_frame_is_forecast_with_max_pixels_raised_and_rejected_once_with_the_default(context):
    """The node's max_pixels is the one limit: the frame is decoded against it and the real Forecaster is given it
    (before, the forecaster kept its own 4096 x 4096 limit and refused what the node had accepted)."""
    big = rgb_to_image_msg(np.full((4100, 4100, 3), 60, np.uint8))
    node = _tiny_node(context, max_pixels=4100 * 4100)
    try:
        assert node.autostart()
        node._on_image(node.cameras[0], big)
        assert wait_until(lambda: node.stats.total.published == 1 or node.stats.total.not_forecast.total(), 120)
        assert node.stats.total.snapshot()["not_forecast"] == {} and node.stats.total.published == 1
        assert node.set_parameters([Parameter("max_pixels", value=4096 * 4096)])[0].successful  # the default
        node._on_image(node.cameras[0], big)
        assert wait_until(lambda: node.stats.total.not_forecast.total() == 1 and not node.pipeline.busy, 60)
        snapshot = node.stats.total.snapshot()
        assert snapshot["not_forecast"] == {"too_large": 1}  # counted once, as bad input
        assert (snapshot["received"], snapshot["published"]) == (2, 1)
    finally:
        node.stop_worker(timeout=1.0)
        node.destroy_node()
