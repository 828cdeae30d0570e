"""The node's parameters, diagnostics and lifecycle in-process with a fake forecaster (no second process)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ros_helpers import REPO, ros_available, wait_until

pytestmark = pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))

if ros_available() is None:
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from traj_forecast_ros.ros.conversions import rgb_to_image_msg
    from traj_forecast_ros.forecast import Forecast
    from traj_forecast_ros.ros.diagnostics import diagnostic_status
    from traj_forecast_ros.ros.forecast_node import ForecastNode
    from traj_forecast_ros.ros.params import PARAMETERS
    from traj_forecast_ros.ros.outputs import OutputBuilder
    from traj_forecast_ros.ros.pipeline import Frame, PipelineStats


class FakeForecaster:
    """Straight-line tracks over a 4x4 grid; raises what is queued in ``fail_with``; records release()."""

    model_id, device, dtype = "fake", "cpu", "float32"

    def __init__(self) -> None:
        self.fail_with = []
        self.released = False
        self.instructions = []

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        self.released = True

    def forecast(self, rgb, instruction=None, num_samples=8, steps=10, seed=None):
        if self.released:
            raise RuntimeError("released")
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.instructions.append(instruction)
        height, width = rgb.shape[:2]
        ys, xs = np.meshgrid(np.linspace(0, height, 4), np.linspace(0, width, 4), indexing="ij")
        query = np.stack([xs, ys], -1).astype(np.float32)
        tracks = query + np.arange(4, dtype=np.float32)[None, :, None, None, None] * [2.0, 1.0]
        tracks = np.repeat(tracks, num_samples, axis=0)
        return Forecast(tracks=tracks, query_points=query, image_size=(height, width), model_id="fake",
                        instruction=instruction, timings={"total": 0.01})


def make_node(context, factory, **params):
    overrides = [Parameter(name, value=value) for name, value in params.items()]
    return ForecastNode(forecaster_factory=factory, context=context, parameter_overrides=overrides)


def test_every_parameter_has_a_description_and_the_yaml_sets_valid_values():
    config = yaml.safe_load((REPO / "config" / "forecast.yaml").read_text())
    values = config["/**/forecast_node"]["ros__parameters"]
    assert set(values) == {spec.name for spec in PARAMETERS}, "config/forecast.yaml and the node disagree"
    assert values["model"] == "libero-atm"
    for spec in PARAMETERS:
        assert spec.description and spec.check(values[spec.name]) is None, spec.name
        assert type(values[spec.name]) is type(spec.default), spec.name
        descriptor = spec.descriptor()
        if spec.low is not None:
            assert descriptor.integer_range or descriptor.floating_point_range, spec.name


def test_invalid_startup_value_is_refused_with_the_reason(context):
    with pytest.raises(Exception, match="image_transport"):
        make_node(context, lambda *a, **options: FakeForecaster(), image_transport="h264")


def test_lifecycle_releases_the_model_and_reloads_it(context):
    created = []

    def factory(model, device, dtype, cache_dir, **options):
        created.append((model, device, dtype, cache_dir, options))
        return FakeForecaster()

    node = make_node(context, factory, model="some-model", device="cpu", autostart=False)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert created == [("some-model", "cpu", "auto", None,
                            {"use_cuda_graphs": False, "compile": False, "graph_cache_size": 4,
                             "num_samples": 8})]
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        first = node.models.forecaster
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert first.released and node.models.forecaster is None  # accelerator memory freed
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert len(created) == 2 and not node.models.forecaster.released
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    finally:
        node.destroy_node()


def test_configure_failure_leaves_the_node_unconfigured_and_says_how_to_fix_it(context, capfd):
    def missing(model, *_, **options):
        raise FileNotFoundError(f"model directory not found: {model}")

    node = make_node(context, missing, model="/no/such/dir", autostart=False)
    try:
        assert node.autostart() is False
        assert node._state_label == "unconfigured" and node.models.forecaster is None
        log = capfd.readouterr().err
        assert "cannot load model '/no/such/dir': model directory not found" in log
        assert "traj-forecast download" in log
    finally:
        node.destroy_node()


def test_model_failures_are_counted_and_turn_diagnostics_to_error(context):
    fake = FakeForecaster()

    class FakeOOM(RuntimeError):
        pass

    FakeOOM.__name__ = "OutOfMemoryError"
    fake.fail_with = [FakeOOM("CUDA out of memory"), MemoryError(), RuntimeError("boom")]
    node = make_node(context, lambda *a, **options: fake, instruction="stack the blocks")
    try:
        assert node.autostart()
        published = []
        node.pipeline._publish = lambda frame, forecast, settings: published.append(forecast)
        for _ in range(3):
            node._on_image(node.cameras[0], rgb_to_image_msg(np.zeros((24, 32, 3), np.uint8)))
            assert wait_until(lambda: node.pipeline.waiting == 0 and not node.pipeline.busy, 5)
            time.sleep(0.02)
        assert wait_until(lambda: node.stats.total.not_forecast.total() == 3, 5)
        status = diagnostic_status("n", "active", node.stats.total.snapshot(), node.models.model.info,
                                   node.stats.consecutive_failures)
        assert status.level == DiagnosticStatus.ERROR
        values = {kv.key: kv.value for kv in status.values}
        assert values["dropped.out_of_memory"] == "2" and values["dropped.forecast_failed"] == "1"
        # Failed forecasts are dropped frames (failed_total is a part of dropped_total), never rejected ones.
        assert values["dropped_total"] == values["failed_total"] == "3" and values["rejected_total"] == "0"
        assert not any(key.startswith("rejected.") for key in values)
        node._on_image(node.cameras[0], rgb_to_image_msg(np.zeros((24, 32, 3), np.uint8)))
        assert wait_until(lambda: published, 5)  # recovers on the next frame
        assert fake.instructions == ["stack the blocks"]
        assert node.stats.consecutive_failures == 0
    finally:
        node.stop_worker(timeout=1.0)
        node.destroy_node()


def test_each_frame_is_forecast_with_the_instruction_in_force_when_it_arrived(context):
    """A frame waiting in the mailbox (or in flight) keeps its instruction when a new one arrives after it: the
    instruction message that follows a frame belongs to the next frames, not to it."""
    import threading

    from std_msgs.msg import String

    gate, entered = threading.Event(), threading.Event()

    class HeldForecaster(FakeForecaster):
        def forecast(self, rgb, instruction=None, num_samples=8, steps=10, seed=None):
            entered.set()
            gate.wait(5.0)
            return super().forecast(rgb, instruction, num_samples, steps, seed)

    fake = HeldForecaster()
    node = make_node(context, lambda *a, **options: fake, instruction="pick up the can")
    try:
        assert node.autostart()
        published = []
        node.pipeline._publish = lambda frame, forecast, settings: published.append(forecast.instruction)
        frame = np.zeros((24, 32, 3), np.uint8)
        node._on_image(node.cameras[0], rgb_to_image_msg(frame))  # in flight with "pick up the can"
        assert entered.wait(5.0)
        node._on_instruction(String(data="open the drawer"))
        node._on_image(node.cameras[0], rgb_to_image_msg(frame))  # waits in the mailbox with "open the drawer"
        node._on_instruction(String(data="close the drawer"))  # arrives after both frames
        gate.set()
        assert wait_until(lambda: len(published) == 2, 5)
        assert published == ["pick up the can", "open the drawer"]
        assert fake.instructions == published
        assert node.get_parameter("instruction").value == "close the drawer"  # in force for the next frame
    finally:
        gate.set()
        node.stop_worker(timeout=1.0)
        node.destroy_node()


def test_diagnostic_levels_and_values():
    stats = PipelineStats()
    model = {"model_id": "libero-atm", "device": "cuda:0", "dtype": "float16"}
    status = diagnostic_status("/forecast_node: trajectory forecast", "inactive", stats.snapshot(), model, 0)
    assert status.level == DiagnosticStatus.OK and "inactive" in status.message
    status = diagnostic_status("x", "active", stats.snapshot(), model, 0)
    assert status.level == DiagnosticStatus.WARN and "no images" in status.message
    for value in (0.10, 0.12, 0.30):
        stats.stamp_age.add(value)
        stats.processing.add(value * 10)
    stats.received, stats.published = 10, 3
    stats.not_forecast.add("superseded")
    stats.not_forecast.add("truncated")
    status = diagnostic_status("x", "active", stats.snapshot(), model, 0)
    values = {kv.key: kv.value for kv in status.values}
    assert status.hardware_id == "cuda:0" and status.level == DiagnosticStatus.OK
    assert values["stamp_age_p50_ms"] == "120.0" and float(values["stamp_age_p95_ms"]) > 250
    assert values["processing_latency_p50_ms"] == "1200.0"
    # received 10 = published 3 + dropped_total + rejected_total: the two totals are disjoint.
    assert values["dropped.superseded"] == "1" and values["rejected.truncated"] == "1"
    assert "dropped.truncated" not in values and "rejected.superseded" not in values
    assert values["dropped_total"] == "1" and values["rejected_total"] == "1" and values["failed_total"] == "0"
    stats.not_forecast.add("out_of_memory")
    stats.received += 1
    values = {kv.key: kv.value for kv in diagnostic_status("x", "active", stats.snapshot(), model, 1).values}
    assert values["dropped.out_of_memory"] == "1" and values["failed_total"] == "1"
    assert values["dropped_total"] == "2" and values["rejected_total"] == "1"
    assert values["dtype"] == "float16" and values["model"] == "libero-atm"
    assert values["inference_p50_ms"] == "n/a"


def test_rviz_config_shows_the_node_outputs():
    rviz = yaml.safe_load((REPO / "rviz" / "forecast.rviz").read_text())
    displays = {d["Name"]: d for d in rviz["Visualization Manager"]["Displays"]}
    assert displays["Forecast overlay"]["Topic"]["Value"] == "/forecast_node/overlay"
    assert displays["Forecast trajectories"]["Topic"]["Value"] == "/forecast_node/markers"
    assert displays["Forecast trajectories"]["Class"] == "rviz_default_plugins/MarkerArray"
    assert displays["Camera image"]["Topic"]["Reliability Policy"] == "Best Effort"
    assert "trajectory_forecast" in displays["Forecast trajectories"]["Namespaces"]


def test_package_manifest_lists_what_the_node_imports():
    manifest = (REPO / "package.xml").read_text()
    for dependency in ("rclpy", "sensor_msgs", "std_msgs", "visualization_msgs", "diagnostic_msgs", "lifecycle_msgs",
                       "rcl_interfaces", "builtin_interfaces", "geometry_msgs", "traj_forecast_msgs",
                       "ament_index_python", "launch_ros"):
        assert f"<exec_depend>{dependency}</exec_depend>" in manifest, dependency
    msgs_manifest = Path(REPO / "msgs" / "traj_forecast_msgs" / "package.xml").read_text()
    assert "<member_of_group>rosidl_interface_packages</member_of_group>" in msgs_manifest


def test_setup_installs_everything_a_ros_install_needs(monkeypatch):
    """colcon installs setup.py's data_files: launch, config, RViz, registry, the demo model and the sample bag."""
    import runpy

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    installed = {}
    for target, files in captured["data_files"]:
        for name in files:
            assert (REPO / name).is_file(), name
            installed[f"{target}/{Path(name).name}"] = name
    share = "share/traj_forecast_ros"
    for path in ("package.xml", "launch/forecast.launch.py", "config/forecast.yaml", "config/fastdds_large_data.xml",
                 "rviz/forecast.rviz", "models/registry.yaml", "models/demo-blocks/config.yaml",
                 "models/demo-blocks/denoiser.safetensors", "models/demo-blocks/vae.safetensors",
                 "data/sample_bag/libero_two_views/metadata.yaml",
                 "data/sample_bag/libero_two_views/libero_two_views.mcap",
                 "data/sample_bag/sim_heldout/metadata.yaml", "data/sample_bag/sim_heldout/sim_heldout.mcap"):
        assert f"{share}/{path}" in installed, path
    encoder_files = [p for p in installed if p.startswith(f"{share}/models/demo-blocks/image_encoder/")]
    assert encoder_files, "demo-blocks' image encoder is not installed"
    # every file of every shipped model directory is installed (the sim model has image and text encoders)
    for model_dir in (REPO / "models").iterdir():
        if model_dir.is_dir() and (model_dir / "config.yaml").is_file():
            for path in model_dir.rglob("*"):
                if path.is_file():
                    assert f"{share}/{path.relative_to(REPO)}" in installed, path
    assert "forecast_node = traj_forecast_ros.ros.forecast_node:main" in captured["entry_points"]["console_scripts"]


class WarmupFailingForecaster(FakeForecaster):
    """Loads, then fails its warmup (e.g. out of accelerator memory); records release()."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def warmup(self) -> None:
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory during warmup"),
                                   FileNotFoundError("encoder weights missing")])
def test_a_model_whose_warmup_fails_is_released(context, error):
    """configure fails with the reason, and the model that was loaded but failed its warmup is released (its
    accelerator memory freed), not just dropped."""
    loaded = []
    node = make_node(context, lambda *a, **options: loaded.append(WarmupFailingForecaster(error)) or loaded[-1],
                     autostart=False)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert len(loaded) == 1 and loaded[0].released, "the model that failed its warmup was not released"
        assert node.models.forecaster is None and str(error) in node._transition_error
    finally:
        node.destroy_node()


def test_counts_balance_fails_on_every_kind_of_miscount():
    """The helper every DDS test ends with: each of its checks can fail, including against the node's counters."""
    from ros_helpers import counts_balance

    stats = PipelineStats()
    stats.received, stats.published = 6, 2
    for reason in ("superseded", "forecast_failed", "truncated", "future_stamp"):
        stats.not_forecast.add(reason)
    good = {kv.key: kv.value for kv in diagnostic_status("x", "active", stats.snapshot(), {}, 0).values}
    assert counts_balance(good) is None and counts_balance(good, stats) is None
    assert good["dropped_total"] == "2" and good["rejected_total"] == "2" and good["failed_total"] == "1"
    broken = {
        "a frame uncounted": dict(good, frames_received="7"),
        "dropped.* not summing to dropped_total": dict(good, **{"dropped.superseded": "2"}),
        "rejected.* not summing to rejected_total": dict(good, **{"rejected.truncated": "0"}),
        "a rejected reason under dropped.": {**{k: v for k, v in good.items() if k != "rejected.truncated"},
                                             "dropped.truncated": "1"},
        "failed_total wrong": dict(good, failed_total="0"),
    }
    for what, values in broken.items():
        assert counts_balance(values) is not None, what
    stats.not_forecast.add("stopped")  # the node counted a frame the status does not show
    stats.received += 1
    assert counts_balance(good, stats) is not None


class FakePublisher:
    """Counts publishes; publishing after it was destroyed raises, as rclpy's InvalidHandle does."""

    def __init__(self) -> None:
        self.published = 0
        self.destroyed = False

    def get_subscription_count(self) -> int:
        return 1

    def publish(self, msg) -> None:
        if self.destroyed:
            raise RuntimeError("publish on a destroyed publisher")
        self.published += 1


def test_side_outputs_built_across_a_teardown_are_not_published_on_destroyed_publishers(context, monkeypatch):
    """A markers/overlay job still building when the publishers are destroyed (a transition cannot wait for it)
    must neither publish on them nor count as a failure; destroying them must not wait for the build."""
    import threading
    from types import SimpleNamespace

    from std_msgs.msg import Header

    node = make_node(context, lambda *a, **options: FakeForecaster())
    try:
        publishers = [FakePublisher() for _ in range(3)]
        monkeypatch.setattr(node, "create_lifecycle_publisher", lambda *args: publishers.pop(0))
        node.outputs.create([""])
        publishers = [node.outputs.publisher("", name) for name in ("forecast", "markers", "overlay")]
        monkeypatch.setattr(node, "destroy_lifecycle_publisher", lambda pub: setattr(pub, "destroyed", True))
        building, go = threading.Event(), threading.Event()

        class SlowMarkers(OutputBuilder):
            def forecast(self, job):
                return "forecast"

            def markers(self, job):
                building.set()
                assert go.wait(10)
                return b"markers"

            def overlay(self, job):
                return "overlay"

        node.outputs.builder = SlowMarkers()
        frame = Frame(message=SimpleNamespace(header=Header(frame_id="cam")), stamp_s=0.0, settings=node.settings,
                      rgb=np.zeros((4, 4, 3), np.uint8))
        node.outputs.publish(frame, object(), node.settings)
        assert building.wait(10)
        destroyer = threading.Thread(target=node.outputs.destroy)
        destroyer.start()
        destroyer.join(5)
        assert not destroyer.is_alive(), "destroying the publishers waited for a markers build"
        go.set()
        assert node.outputs.side_outputs.idle(10)
        assert [p.published for p in publishers] == [1, 0, 0]  # the forecast only: nothing after the teardown
        assert node.outputs.side_outputs.counts()["failed"] == 0
    finally:
        go.set()
        node.outputs.side_outputs.stop(5)
        node.destroy_node()
