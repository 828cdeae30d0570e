"""Hostile faults against the node over real DDS (issue 11): the node runs in this process with an injected
forecaster (own context and executor thread, as ``rclpy.spin`` runs it); a probe node talks to it through its topics
and its lifecycle and parameter services. Every test ends with the counters balanced:
``received = published + dropped + rejected`` (failed forecasts are part of dropped), checked against the node's
own counters.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from typing import Any, List, Optional

import numpy as np
import pytest

from ros_helpers import InProcessNode, PauseMeter, Probe, node_diagnostics, ros_available, wait_balanced, wait_until

pytestmark = [pytest.mark.ros, pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))]

if ros_available() is None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from traj_forecast_msgs.msg import TrajectoryForecast

    from traj_forecast_ros.errors import ForecastCancelled
    from traj_forecast_ros.forecast import Forecast
    from traj_forecast_ros.ros.conversions import rgb_to_image_msg

ERROR = 2  # DiagnosticStatus.ERROR
_namespaces = itertools.count()


class SlowFakeForecaster:
    """Straight-line tracks after ``steps - 1`` "denoiser steps" of ``step_s`` seconds each, honouring ``cancel``
    between steps like ``Forecaster.forecast``; records what it was asked."""

    model_id, device, dtype = "slow-fake", "cpu", "float32"

    def __init__(self, step_s: float = 0.0, text: bool = True) -> None:
        self.step_s = step_s
        self.text_encoder = object() if text else None
        self.started = threading.Event()
        self.cancelled = 0
        self.released = threading.Event()
        self.instructions: List[Optional[str]] = []

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        self.released.set()

    def forecast(self, rgb, instruction=None, num_samples=8, steps=None, seed=None, cancel=None):
        steps = 10 if steps is None else steps  # None: the model's default_steps, as Forecaster.forecast
        if instruction and self.text_encoder is None:  # what Forecaster does for a model without language input
            raise ValueError(f"model '{self.model_id}' has no language conditioning; got instruction {instruction!r}")
        self.instructions.append(instruction)
        self.started.set()
        for _ in range(steps - 1):
            if cancel is not None and cancel.is_set():
                self.cancelled += 1
                raise ForecastCancelled("cancelled")
            time.sleep(self.step_s)
        height, width = rgb.shape[:2]
        ys, xs = np.meshgrid(np.linspace(0, height, 4), np.linspace(0, width, 4), indexing="ij")
        query = np.stack([xs, ys], -1).astype(np.float32)  # [4, 4, 2]
        tracks = np.repeat(query[None, None], num_samples, axis=0).repeat(4, axis=1)  # [K, 4, 4, 4, 2]
        return Forecast(tracks=tracks, query_points=query, image_size=(height, width), model_id=self.model_id,
                        instruction=instruction, timings={"total": 0.0})


@pytest.fixture(scope="module")
def probe(diagnostics_probe):
    return diagnostics_probe


class Harness:
    """The in-process node plus the probe's view of it (services, image publisher, forecasts)."""

    def __init__(self, probe: Probe, factory, **params: Any) -> None:
        self.probe = probe
        self.namespace = f"/rel{next(_namespaces)}"
        params.setdefault("max_input_age", 30.0)
        params.setdefault("qos_reliability", "reliable")  # no frame lost to best-effort matching in these tests
        self.node = InProcessNode(factory, self.namespace, **params)
        self.name = self.node.name
        probe.subscribe(TrajectoryForecast, f"{self.name}/forecast")
        self.image_pub = probe.publisher(Image, f"{self.namespace}/image")
        self._stamp = itertools.count(1)

    def transition(self, transition_id: int, timeout: float = 30.0) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        # One kept client: its creation and discovery happen once, so timing a transition times the transition.
        return self.probe.call(ChangeState, f"{self.name}/change_state", request, timeout=timeout,
                               keep_client=True).success

    def balanced(self, timeout: float = 20.0):
        """The first fresh /diagnostics status that balances and matches the node's own counters."""
        return wait_balanced(self.probe, self.name, timeout, stats=lambda: self.node.node.stats.total)

    def state(self) -> str:
        return self.probe.call(GetState, f"{self.name}/get_state", GetState.Request()).current_state.label

    def set_params(self, **values):
        request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                    for k, v in values.items()])
        return self.probe.call(SetParameters, f"{self.name}/set_parameters", request).results

    def start(self) -> None:
        assert self.transition(Transition.TRANSITION_CONFIGURE)
        assert self.transition(Transition.TRANSITION_ACTIVATE)
        assert wait_until(lambda: self.image_pub.get_subscription_count() > 0, 20), "node never subscribed"

    def frame(self, age_s: float = 0.0) -> Any:
        msg = rgb_to_image_msg(np.full((24, 32, 3), 90, np.uint8))
        now_ns = self.probe.node.get_clock().now().nanoseconds - int(age_s * 1e9) + next(self._stamp)  # unique
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 1_000_000_000)
        return msg

    def send(self, msg: Any, timeout: float = 10.0) -> None:
        """Publish a frame and wait until the node has received it and its worker is idle again."""
        stats = self.node.node.stats.total
        before = stats.received
        self.image_pub.publish(msg)
        pipeline = lambda: self.node.node.pipeline  # noqa: E731
        assert wait_until(lambda: stats.received > before and pipeline().waiting == 0
                          and not pipeline().busy, timeout), "the node never took the frame"

    def forecasts(self) -> List[Any]:
        return self.probe.messages(f"{self.name}/forecast")

    def diagnostics(self, timeout: float = 5.0):
        seen = len(self.probe.messages("/diagnostics"))
        values = wait_until(lambda: node_diagnostics(self.probe, self.name, seen), timeout)
        assert values, "no /diagnostics from the node"
        return values

    def subscriptions(self) -> int:
        return len(list(self.node.node.subscriptions))

    def publishers(self) -> int:
        return len(list(self.node.node.publishers))

    def close(self) -> None:
        self.node.close()


@pytest.fixture
def harness_factory(probe):
    made: List[Harness] = []

    def make(factory, **params) -> Harness:
        harness = Harness(probe, factory, **params)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


# ------------------------------------------------------------------------------------------------ D1 + D2
@pytest.mark.timeout(120)
def test_failed_activate_rolls_back_fully_and_shows_error(harness_factory, monkeypatch):
    """D1/D2: activate failing after its first subscription leaves nothing behind, logs, shows ERROR; the next
    activate serves every frame exactly once through one publisher."""
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster())
    harness.start()
    active_subscriptions, active_publishers = harness.subscriptions(), harness.publishers()
    assert harness.transition(Transition.TRANSITION_DEACTIVATE)
    inactive_subscriptions = harness.subscriptions()

    real_create = harness.node.node.create_subscription

    def failing_create(msg_type, topic, *args, **kwargs):
        if msg_type is String:  # the instruction subscription, created after the camera's
            raise RuntimeError("injected: cannot create the instruction subscription")
        return real_create(msg_type, topic, *args, **kwargs)

    monkeypatch.setattr(harness.node.node, "create_subscription", failing_create)
    for _ in range(2):  # a second failure must not pile up anything either
        assert not harness.transition(Transition.TRANSITION_ACTIVATE)
        assert harness.state() == "inactive"
        assert harness.subscriptions() == inactive_subscriptions, "a subscription leaked from the failed activate"
        assert harness.publishers() == active_publishers
    values = harness.diagnostics()
    assert values["_level"] == str(ERROR) and "activate failed" in values["_message"], values
    assert "injected" in values["last_transition_error"]

    monkeypatch.setattr(harness.node.node, "create_subscription", real_create)
    assert harness.transition(Transition.TRANSITION_ACTIVATE)
    assert harness.subscriptions() == active_subscriptions
    assert wait_until(lambda: harness.image_pub.get_subscription_count() == 1, 10)
    assert harness.probe.node.count_publishers(f"{harness.name}/forecast") == 1
    values = harness.diagnostics()
    assert values["_level"] != str(ERROR) and values["last_transition_error"] == ""

    sent = []
    for _ in range(10):
        msg = harness.frame()
        sent.append((msg.header.stamp.sec, msg.header.stamp.nanosec))
        harness.image_pub.publish(msg)
        assert wait_until(lambda: len(harness.forecasts()) == len(sent), 10), "a frame was not forecast"
    stamps = [(m.header.stamp.sec, m.header.stamp.nanosec) for m in harness.forecasts()]
    assert stamps == sent, "duplicate or missing forecasts"
    values = harness.balanced()
    assert values["frames_received"] == "10" and values["forecasts_published"] == "10"
    assert values["dropped_total"] == "0", values


@pytest.mark.timeout(120)
def test_failed_configure_rolls_back_and_reconfigure_has_one_set_of_outputs(harness_factory, monkeypatch):
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster())
    baseline = harness.publishers()
    fake_factory_calls = []
    real_create = harness.node.node.create_lifecycle_publisher

    def failing_publisher(msg_type, topic, *args, **kwargs):
        if topic == "~/overlay":
            raise RuntimeError("injected: no overlay publisher")
        fake_factory_calls.append(topic)
        return real_create(msg_type, topic, *args, **kwargs)

    monkeypatch.setattr(harness.node.node, "create_lifecycle_publisher", failing_publisher)
    assert not harness.transition(Transition.TRANSITION_CONFIGURE)
    assert harness.state() == "unconfigured"
    assert harness.publishers() == baseline, "publishers leaked from the failed configure"
    assert harness.node.node.models.forecaster is None, "the model stayed loaded after the failed configure"
    values = harness.diagnostics()
    assert values["_level"] == str(ERROR) and "configure failed" in values["_message"]
    monkeypatch.setattr(harness.node.node, "create_lifecycle_publisher", real_create)
    harness.start()
    assert harness.publishers() == baseline + 3
    assert harness.probe.node.count_publishers(f"{harness.name}/forecast") == 1
    harness.image_pub.publish(harness.frame())
    assert wait_until(lambda: len(harness.forecasts()) == 1, 10)
    harness.balanced()


@pytest.mark.timeout(120)
def test_failed_deactivate_goes_through_on_error_to_a_clean_unconfigured_node(harness_factory, monkeypatch):
    """A deactivate cannot be undone: when it fails, on_error tears down to unconfigured (no inputs, no outputs, no
    model), logs it and shows ERROR; configure + activate then work again."""
    fakes = []
    harness = harness_factory(lambda *a, **k: fakes.append(SlowFakeForecaster()) or fakes[-1])
    baseline_subscriptions, baseline_publishers = harness.subscriptions(), harness.publishers()
    harness.start()
    harness.send(harness.frame())
    real_destroy = harness.node.node.destroy_subscription
    calls = []

    def failing_destroy(subscription):
        calls.append(subscription)
        if len(calls) == 1:
            raise RuntimeError("injected: cannot destroy the camera subscription")
        return real_destroy(subscription)

    monkeypatch.setattr(harness.node.node, "destroy_subscription", failing_destroy)
    assert not harness.transition(Transition.TRANSITION_DEACTIVATE)
    monkeypatch.setattr(harness.node.node, "destroy_subscription", real_destroy)
    assert harness.state() == "unconfigured"
    assert harness.publishers() == baseline_publishers and fakes[-1].released.is_set()
    values = harness.diagnostics()
    assert values["_level"] == str(ERROR) and "deactivate failed" in values["_message"], values
    harness.start()
    assert harness.subscriptions() == baseline_subscriptions + 2  # camera + instruction, nothing left over
    harness.send(harness.frame())
    assert wait_until(lambda: len(harness.forecasts()) == 2, 10)
    harness.balanced()


@pytest.mark.timeout(60)
def test_invalid_topic_names_are_rejected_when_set(harness_factory):
    """D2: the repro of D1 can no longer get in: invalid names are refused at set, with a reason."""
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster())
    harness.start()
    for name, value in (("instruction_topic", "bad topic!"), ("image_topic", "1camera"),
                        ("camera_info_topic", "info//x"), ("instruction_topic", "")):
        (result,) = harness.set_params(**{name: value})
        assert not result.successful and name in result.reason and "topic name" in result.reason, (name, value)
    assert harness.set_params(camera_info_topic="")[0].successful  # '' = no CameraInfo
    assert harness.transition(Transition.TRANSITION_DEACTIVATE)
    assert harness.transition(Transition.TRANSITION_ACTIVATE)
    assert harness.state() == "active"
    harness.balanced()


# ------------------------------------------------------------------------------------------------ D4
@pytest.mark.timeout(120)
def test_instruction_to_a_model_without_language_input_is_ignored_with_a_warning(harness_factory):
    fake = SlowFakeForecaster(text=False)
    harness = harness_factory(lambda *a, **k: fake)
    harness.start()
    instruction_pub = harness.probe.publisher(String, f"{harness.namespace}/instruction")
    assert wait_until(lambda: instruction_pub.get_subscription_count() > 0, 20)
    instruction_pub.publish(String(data="open the drawer"))
    assert wait_until(lambda: harness.node.node.param("instruction") == "open the drawer", 10)
    for count in range(1, 4):
        harness.image_pub.publish(harness.frame())
        assert wait_until(lambda: len(harness.forecasts()) == count, 10), "the instruction stopped forecasting"
    assert fake.instructions == [None, None, None]
    values = harness.diagnostics()
    assert values["instruction_ignored"] == "true" and values["failed_total"] == "0"
    assert "instruction is ignored" in values["_message"] and values["_level"] == "1"  # WARN
    harness.balanced()


# ------------------------------------------------------------------------------------------------ D6 + D7
@pytest.mark.timeout(120)
def test_future_stamps_are_rejected_and_latency_stays_sane(harness_factory):
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster(), max_clock_skew=1.0)
    harness.start()
    harness.send(harness.frame(age_s=-3600.0))  # stamped an hour ahead
    harness.send(harness.frame())
    assert wait_until(lambda: len(harness.forecasts()) == 1, 10)
    values = harness.balanced()
    assert values["rejected.future_stamp"] == "1" and int(values["rejected_total"]) == 1
    assert float(values["stamp_age_p50_ms"]) >= 0.0 and float(values["stamp_age_p95_ms"]) < 60_000


@pytest.mark.timeout(120)
def test_an_oversized_old_frame_is_rejected_not_counted_too_old(harness_factory):
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster(), max_input_age=1.0, max_pixels=100)
    harness.start()
    harness.send(harness.frame(age_s=30.0))  # 24x32 > 100 pixels, and 30 s old
    values = harness.balanced()
    assert values["rejected.too_large"] == "1" and "dropped.too_old" not in values, values
    assert values["rejected_total"] == "1" and values["dropped_total"] == "0", values


# ------------------------------------------------------------------------------------------------ D9
@pytest.mark.timeout(240)
def test_deactivate_and_cleanup_cancel_a_long_forecast_quickly(harness_factory):
    """D9: transitions during a forecast return within 1 s (p95) instead of waiting for the forecast; the frame is
    counted as stopped. The fake takes 0.05 s per step and 199 steps (10 s) per forecast."""
    step_s = 0.05
    fakes: List[SlowFakeForecaster] = []

    def factory(*args, **kwargs):
        fakes.append(SlowFakeForecaster(step_s=step_s))
        return fakes[-1]

    harness = harness_factory(factory, steps=200, num_samples=64)
    harness.start()
    durations = []
    for trial in range(8):
        fake = fakes[-1]
        harness.image_pub.publish(harness.frame())
        assert fake.started.wait(20), "the forecast never started"
        started = time.monotonic()
        with PauseMeter() as pauses:  # time the whole machine was paused is not the node's
            assert harness.transition(Transition.TRANSITION_DEACTIVATE)
            if trial == 7:  # the last one goes on to cleanup while the cancelled forecast may still unwind
                assert harness.transition(Transition.TRANSITION_CLEANUP)
        took = time.monotonic() - started - pauses.paused_s
        durations.append(took / 2 if trial == 7 else took)
        assert wait_until(lambda: fake.cancelled == 1 and fake.released.is_set(), 5), "forecast not cancelled"
        if trial < 7:
            assert harness.transition(Transition.TRANSITION_ACTIVATE)
    p95 = float(np.percentile(durations, 95))
    forecast_s = step_s * 199
    print(f"transition p95 {p95:.3f} s over {len(durations)} (one forecast {forecast_s:.1f} s, one step {step_s} s)")
    assert p95 < 1.0, f"transition p95 {p95:.2f} s (a forecast takes {forecast_s:.1f} s): {durations}"
    assert not harness.forecasts(), "a cancelled forecast was published"
    values = harness.balanced()
    assert values["state"] == "unconfigured" and values["dropped.stopped"] == "8", values
    assert values["forecasts_published"] == "0"


@pytest.mark.timeout(120)
def test_stopped_frames_keep_the_counters_balanced(harness_factory):
    """D9 counting: the cancelled frame is `stopped`; received = published + dropped across the deactivate."""
    fake = SlowFakeForecaster(step_s=0.05)
    harness = harness_factory(lambda *a, **k: fake, steps=200)
    harness.start()
    harness.image_pub.publish(harness.frame())
    assert fake.started.wait(20)
    harness.image_pub.publish(harness.frame())  # waits in the mailbox: stopped too
    assert wait_until(lambda: harness.node.node.stats.total.received == 2, 20), "the node never received frame 2"
    assert harness.transition(Transition.TRANSITION_DEACTIVATE)
    values = harness.balanced()
    assert values["dropped.stopped"] == "2" and values["forecasts_published"] == "0", values
    assert values["frames_received"] == "2" and values["dropped_total"] == "2" and values["rejected_total"] == "0"


class UncancellableForecaster:
    """A forecaster without a cancel flag whose forecast runs until ``proceed`` is set; ``release`` waits for the
    forecast in progress, as ``Forecaster.release`` waits on its forecast lock."""

    model_id, device, dtype = "uncancellable", "cpu", "float32"

    def __init__(self, proceed: threading.Event) -> None:
        self.proceed = proceed
        self.text_encoder = object()
        self.started, self.released = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        with self._lock:
            self.released.set()

    def forecast(self, rgb, instruction=None, num_samples=8, steps=10, seed=None):
        with self._lock:
            self.started.set()
            self.proceed.wait(60)
            return SlowFakeForecaster().forecast(rgb, instruction, num_samples, steps=2)


@pytest.mark.timeout(180)
def test_activate_while_the_old_model_is_still_releasing_fails_cleanly_instead_of_blocking(harness_factory):
    """A deactivated model whose forecast ignores the cancel flag is released in the background; an activate right
    after waits a bounded time, then fails (logged, ERROR in /diagnostics, rolled back, no second model loaded)
    instead of blocking the executor until the forecast ends. Once it has ended, activate works."""
    proceed = threading.Event()
    fakes: List[UncancellableForecaster] = []
    harness = harness_factory(lambda *a, **k: fakes.append(UncancellableForecaster(proceed)) or fakes[-1])
    try:
        harness.start()
        harness.image_pub.publish(harness.frame())
        assert fakes[0].started.wait(20), "the forecast never started"
        assert harness.transition(Transition.TRANSITION_DEACTIVATE)  # the release goes on in the background
        assert not fakes[0].released.is_set()
        assert not harness.transition(Transition.TRANSITION_ACTIVATE, timeout=30), "activate loaded a second model"
        assert harness.state() == "inactive" and len(fakes) == 1
        values = harness.diagnostics()
        assert values["_level"] == str(ERROR) and "still being released" in values["_message"], values
        assert harness.node.node.inputs.subscriptions == [] and harness.node.node.pipeline.stopping.is_set()
        proceed.set()
        assert fakes[0].released.wait(20)
        assert harness.transition(Transition.TRANSITION_ACTIVATE)
        assert len(fakes) == 2 and harness.diagnostics()["last_transition_error"] == ""
        assert wait_until(lambda: harness.image_pub.get_subscription_count() > 0, 20)
        harness.send(harness.frame())
        assert wait_until(lambda: len(harness.forecasts()) == 1, 10)
        values = harness.balanced()
        assert values["dropped.stopped"] == "1" and values["forecasts_published"] == "1", values
    finally:
        proceed.set()


@pytest.mark.timeout(180)
def test_debug_level_logging_of_rejected_superseded_and_stopped_frames_keeps_the_node_serving(harness_factory):
    """The node's logger at DEBUG: a rejected frame (warning), then superseded and stopped frames (debug) logged by
    the same counting code. One call site for both severities made rclpy raise ValueError, which ended the worker
    or escaped the subscription callback and stopped the executor."""
    from rclpy.logging import LoggingSeverity

    fake = SlowFakeForecaster(step_s=0.05)
    harness = harness_factory(lambda *a, **k: fake, steps=200)
    harness.node.node.get_logger().set_level(LoggingSeverity.DEBUG)
    harness.start()
    bad = harness.frame()
    bad.data = bytes(bad.data)[:10]  # truncated
    harness.send(bad)
    harness.image_pub.publish(harness.frame())
    assert fake.started.wait(20), "the worker stopped after the rejected frame"
    harness.image_pub.publish(harness.frame())  # waits in the mailbox ...
    harness.image_pub.publish(harness.frame())  # ... and is superseded by this one
    assert wait_until(lambda: harness.node.node.stats.total.received == 4, 20), "the node stopped receiving"
    assert harness.transition(Transition.TRANSITION_DEACTIVATE)  # the executor still answers
    values = harness.balanced()
    assert values["rejected_total"] == "1" and values["dropped.superseded"] == "1", values
    assert values["dropped.stopped"] == "2", values
    assert harness.set_params(steps=2)[0].successful
    assert harness.transition(Transition.TRANSITION_ACTIVATE)
    assert wait_until(lambda: harness.image_pub.get_subscription_count() > 0, 20)
    harness.send(harness.frame())
    assert wait_until(lambda: len(harness.forecasts()) == 1, 10), "no forecast after the debug-level drops"
    harness.balanced()


class _FakeRclpy:
    """The rclpy calls of ``forecast_node.main``: ``spin`` raises ``spin_error``; ``signal_shutdown`` says whether a
    signal shut the context down first (as rclpy's handler does when SIGTERM lands while the executor builds its wait
    set)."""

    def __init__(self, spin_error: Exception, signal_shutdown: bool) -> None:
        self.spin_error, self.context_ok = spin_error, True
        self.signal_shutdown = signal_shutdown

    def init(self, **_kwargs) -> None:
        pass

    def spin(self, _node) -> None:
        if self.signal_shutdown:
            self.context_ok = False
        raise self.spin_error

    def ok(self) -> bool:
        return self.context_ok

    def try_shutdown(self) -> None:
        self.context_ok = False


class _FakeNode:
    def __init__(self) -> None:
        self.stopped = self.destroyed = False

    def param(self, _name: str) -> bool:
        return False

    def stop_worker(self, timeout: float) -> None:
        self.stopped = True

    def destroy_node(self) -> None:
        self.destroyed = True


@pytest.mark.parametrize("signal_shutdown, expected", [(True, 0), (False, 1)], ids=["signal", "failure"])
def test_main_exit_code_when_spin_raises(monkeypatch, capsys, signal_shutdown, expected):
    """A signal that shuts ROS down while the executor builds its wait set makes rcl raise "the given context is not
    valid": the node must exit 0 (it exited 1 in one full run of this suite on a fresh clone). The same error while
    ROS is still up is a real failure: exit 1 with the reason on stderr. Either way the worker is stopped and the node
    destroyed."""
    from traj_forecast_ros.ros import forecast_node

    fake = _FakeRclpy(RuntimeError("failed to initialize wait set: the given context is not valid"), signal_shutdown)
    nodes: List[_FakeNode] = []
    monkeypatch.setattr(forecast_node, "rclpy", fake)
    monkeypatch.setattr(forecast_node, "ForecastNode", lambda: nodes.append(_FakeNode()) or nodes[-1])

    def leave(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(forecast_node.os, "_exit", leave)
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}  # main() sets them
    try:
        with pytest.raises(SystemExit) as exited:
            forecast_node.main([])
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    assert exited.value.code == expected
    assert nodes[0].stopped and nodes[0].destroyed
    assert ("context is not valid" in capsys.readouterr().err) == (expected == 1)
