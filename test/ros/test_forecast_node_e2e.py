"""The forecast node as a separate process over real DDS (loopback, random domain), with a tiny random model.

One node process is shared by the module (lifecycle transitions and parameter changes go through its ROS services
and are undone by each test); the signal tests start their own processes.
"""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image as PILImage

from ros_helpers import (NodeProcess, PauseMeter, Probe, counts_balance, ros_available, wait_balanced, wait_connected,
                         wait_until)

pytestmark = [pytest.mark.ros, pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))]

if ros_available() is None:
    import array

    from diagnostic_msgs.msg import DiagnosticArray
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.srv import GetParameters, SetParameters
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String
    from traj_forecast_msgs.msg import TrajectoryForecast
    from visualization_msgs.msg import Marker, MarkerArray

    from traj_forecast_ros.ros.conversions import msg_to_arrays, rgb_to_image_msg

NODE = "/forecast_node"
K, T, GRID = 2, 4, 8  # num_samples set below; tiny_config: 4 frames, 8x8 grid
STARTUP_TIMEOUT = 90.0


def libero_frames(shared_images: Path, view: str = "agent"):
    return [np.asarray(PILImage.open(shared_images / f"libero_{view}_{i}.jpg").convert("RGB")) for i in range(8)]


@pytest.fixture(scope="module")
def probe():
    probe = Probe("forecast_test_probe")
    probe.subscribe(TrajectoryForecast, f"{NODE}/forecast")
    probe.subscribe(DiagnosticArray, "/diagnostics")
    yield probe
    probe.close()


@pytest.fixture(scope="module")
def node(tiny_model_dir, tmp_path_factory, probe):
    log = tmp_path_factory.mktemp("node") / "forecast_node.log"
    params = {"model": tiny_model_dir, "device": "cpu", "num_samples": K, "steps": 3, "marker_stride": 2,
              "max_input_age": 5.0, "camera_frame": "libero_agent_optical"}
    process = NodeProcess(log, params)
    if not process.wait_for_log("forecasting /image (raw)", STARTUP_TIMEOUT):
        process.stop()
        pytest.fail(f"node did not activate:\n{process.log()[-3000:]}")
    yield process
    code, _ = process.stop(signal.SIGTERM)
    assert code == 0, process.log()[-3000:]


@pytest.fixture(autouse=True)
def counters_balance_after_each_test(request):
    """received = published + dropped + rejected (+ failed) once the node is idle, after every test of the shared
    node, failed transitions included."""
    yield
    if "node" in request.fixturenames:
        wait_balanced(request.getfixturevalue("probe"), NODE)


@pytest.fixture(scope="module")
def image_pub(probe, node):
    pub = probe.publisher(Image, "/image")
    assert wait_connected(pub, 30), "node never subscribed to /image"
    return pub


# ------------------------------------------------------------------------------------------------ helpers
def stamped(probe: Probe, msg, frame_id: str = "libero_agent_optical", age_s: float = 0.0):
    """Put a fresh, unique stamp (optionally ``age_s`` in the past) and a frame id on ``msg``."""
    now_ns = probe.node.get_clock().now().nanoseconds - int(age_s * 1e9)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


def stamp_key(header) -> tuple:
    return (header.stamp.sec, header.stamp.nanosec)


def wait_forecast(probe: Probe, header, timeout: float = 30.0):
    """The forecast published for the frame with ``header``'s stamp (fails the test on timeout)."""
    key = stamp_key(header)
    found = wait_until(lambda: next((m for m in probe.messages(f"{NODE}/forecast")
                                     if stamp_key(m.header) == key), None), timeout)
    assert found is not None, f"no forecast for the frame stamped {key}"
    return found


def diagnostics(probe: Probe, timeout: float = 5.0) -> Dict[str, str]:
    """Key/values of the node's next /diagnostics status."""
    seen = len(probe.messages("/diagnostics"))

    def fresh():
        for msg in probe.messages("/diagnostics")[seen:]:
            for status in msg.status:
                if status.name.startswith(NODE):
                    return {kv.key: kv.value for kv in status.values} | {"_message": status.message}
        return None

    values = wait_until(fresh, timeout)
    assert values, "no /diagnostics from the node"
    return values


def set_params(probe: Probe, **values):
    request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
    return probe.call(SetParameters, f"{NODE}/set_parameters", request).results


def transition(probe: Probe, transition_id: int) -> bool:
    request = ChangeState.Request()
    request.transition.id = transition_id
    return probe.call(ChangeState, f"{NODE}/change_state", request, timeout=60.0).success


def state(probe: Probe) -> str:
    return probe.call(GetState, f"{NODE}/get_state", GetState.Request()).current_state.label


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(120)
def test_real_frames_are_forecast_with_source_header_and_layout(probe, node, image_pub, shared_images):
    frames = libero_frames(shared_images)
    for index in (0, 3):
        sent = stamped(probe, rgb_to_image_msg(frames[index]), frame_id=f"agent_{index}")
        image_pub.publish(sent)
        msg = wait_forecast(probe, sent.header)
        assert msg.header.frame_id == f"agent_{index}"
        assert (msg.image_height, msg.image_width) == (128, 128)
        assert (msg.num_samples, msg.num_frames, msg.grid_rows, msg.grid_cols) == (K, T, GRID, GRID)
        assert msg.model_id == "tiny" and msg.device == "cpu" and msg.dtype == "float32"
        assert msg.inference_time > 0 and msg.moving_threshold == pytest.approx(2.0)
        arrays = msg_to_arrays(msg)
        assert arrays["tracks"].shape == (K, T, GRID, GRID, 2)
        assert np.isfinite(arrays["tracks"]).all()
        query = arrays["query_points"]  # an 8x8 grid over the 128 px image, x along columns
        assert (query >= 0).all() and (query <= 128).all()
        assert (np.diff(query[:, :, 0], axis=1) > 0).all() and (np.diff(query[:, :, 1], axis=0) > 0).all()
        np.testing.assert_allclose(arrays["mean_displacement"],
                                   (arrays["tracks"][:, -1] - arrays["tracks"][:, 0]).mean(0), rtol=1e-5, atol=1e-4)
        assert ((arrays["moving_fraction"] >= 0) & (arrays["moving_fraction"] <= 1)).all()


@pytest.mark.timeout(120)
def test_markers_and_overlay_are_well_formed(probe, node, image_pub, shared_images):
    probe.subscribe(MarkerArray, f"{NODE}/markers")
    probe.subscribe(Image, f"{NODE}/overlay")
    pub_markers = probe.node.count_publishers(f"{NODE}/markers")
    assert pub_markers == 1
    frame = libero_frames(shared_images)[1]

    def markers_for(header):
        key = stamp_key(header)
        return next((m for m in probe.messages(f"{NODE}/markers") if stamp_key(m.markers[0].header) == key), None)

    def overlay_for(header):
        key = stamp_key(header)
        return next((m for m in probe.messages(f"{NODE}/overlay") if stamp_key(m.header) == key), None)

    # the node notices the new subscribers on its next frame; send until both outputs come back
    sent = None
    for _ in range(20):
        sent = stamped(probe, rgb_to_image_msg(frame), frame_id="")  # no frame id: the camera_frame parameter
        image_pub.publish(sent)
        wait_forecast(probe, sent.header)
        if wait_until(lambda: markers_for(sent.header) and overlay_for(sent.header), 3.0):
            break
    markers, overlay = markers_for(sent.header), overlay_for(sent.header)
    assert markers is not None and overlay is not None, "markers/overlay never published"

    assert markers.markers[0].action == Marker.DELETEALL
    lines = markers.markers[1:]
    assert len(lines) == K and {m.id for m in lines} == set(range(K))
    vertices = (GRID // 2) ** 2 * (T - 1) * 2  # marker_stride 2 on an 8x8 grid
    for marker in lines:
        assert marker.type == Marker.LINE_LIST and marker.header.frame_id == "libero_agent_optical"
        assert len(marker.points) == len(marker.colors) == vertices
        assert all(p.z == pytest.approx(1.0) for p in marker.points)  # marker_plane_depth
        assert marker.lifetime.sec > 0 or marker.lifetime.nanosec > 0
        assert marker.colors[0].b > marker.colors[0].r and marker.colors[-1].r > marker.colors[-1].b  # time ramp

    assert overlay.header.frame_id == "libero_agent_optical"
    assert (overlay.height, overlay.width, overlay.encoding, overlay.step) == (128, 128, "rgb8", 384)
    drawn = np.frombuffer(overlay.data, np.uint8).reshape(128, 128, 3)
    tracks = msg_to_arrays(wait_forecast(probe, sent.header))["tracks"][0]
    in_view = ((tracks >= 0) & (tracks < 128)).all(-1).any()
    if in_view:
        assert (drawn != frame).any(), "tracks inside the image but nothing drawn"


@pytest.mark.timeout(120)
def test_instruction_topic_and_parameter_change_the_task(probe, node, image_pub, shared_images):
    frame = libero_frames(shared_images)[2]
    instruction_pub = probe.publisher(String, "/instruction")
    assert wait_until(lambda: instruction_pub.get_subscription_count() > 0, 30)
    instruction_pub.publish(String(data="put the bowl on the plate"))
    assert node.wait_for_log("instruction: 'put the bowl on the plate'", 15)
    sent = stamped(probe, rgb_to_image_msg(frame))
    image_pub.publish(sent)
    assert wait_forecast(probe, sent.header).instruction == "put the bowl on the plate"
    response = probe.call(GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=["instruction"]))
    assert response.values[0].string_value == "put the bowl on the plate"

    assert all(r.successful for r in set_params(probe, instruction="open the top drawer"))
    sent = stamped(probe, rgb_to_image_msg(frame))
    image_pub.publish(sent)
    assert wait_forecast(probe, sent.header).instruction == "open the top drawer"


@pytest.mark.timeout(60)
def test_invalid_parameter_values_are_rejected_with_a_reason(probe, node):
    (result,) = set_params(probe, num_samples=1000)
    assert not result.successful and "num_samples" in result.reason
    (result,) = set_params(probe, image_transport="theora")
    assert not result.successful and "raw" in result.reason and "compressed" in result.reason
    (result,) = set_params(probe, device="gpu0")
    assert not result.successful and "device" in result.reason
    (result,) = set_params(probe, marker_plane_depth=-1.0)
    assert not result.successful
    # validated on set, not at the next activate (D2, issue 11): topic names, the model, the device
    (result,) = set_params(probe, instruction_topic="instruction\n[ERROR] forged")
    assert not result.successful and "instruction_topic" in result.reason and "topic name" in result.reason
    (result,) = set_params(probe, image_topic="cam era")
    assert not result.successful and "image_topic" in result.reason
    (result,) = set_params(probe, model="/nonexistent/what-happens-next")
    assert not result.successful and "registry name" in result.reason and "config.yaml" in result.reason
    (result,) = set_params(probe, device="cuda:7")
    assert not result.successful and "cuda:7" in result.reason and "does not exist" in result.reason
    assert state(probe) == "active"
    response = probe.call(GetParameters, f"{NODE}/get_parameters",
                          GetParameters.Request(names=["instruction_topic", "image_topic", "device"]))
    assert [v.string_value for v in response.values] == ["instruction", "image", "cpu"]
    assert "\n[ERROR] forged" not in node.log(), "a parameter value forged a log line"


@pytest.mark.timeout(60)
def test_instructions_are_logged_escaped_and_truncated(probe, node):
    """D5: a newline cannot forge a log line and 100 kB are not echoed."""
    instruction_pub = probe.publisher(String, "/instruction")
    assert wait_until(lambda: instruction_pub.get_subscription_count() > 0, 30)
    hostile = "pick the cup\n[ERROR] [forecast_node]: forged line" + "x" * 100_000
    before = len(node.log())
    try:
        instruction_pub.publish(String(data=hostile))
        assert node.wait_for_log("instruction: 'pick the cup\\n[ERROR]", 15), node.log()[-2000:]
        time.sleep(0.5)
        new_log = node.log()[before:]
        assert "\n[ERROR] [forecast_node]: forged line" not in new_log
        assert len(new_log) < 5_000, f"{len(new_log)} characters logged for one instruction"
        assert "more characters" in new_log
    finally:
        assert all(r.successful for r in set_params(probe, instruction=""))


@pytest.mark.timeout(180)
def test_bad_raw_images_are_counted_and_the_next_good_frame_is_served(probe, node, image_pub, shared_images):
    frame = libero_frames(shared_images)[4]
    good = rgb_to_image_msg(frame)

    def variant(**fields):
        msg = rgb_to_image_msg(frame)
        for name, value in fields.items():
            setattr(msg, name, value)
        return msg

    bad_inputs = {
        "unsupported_encoding": variant(encoding="32FC1"),
        "step_mismatch": variant(step=100),
        "truncated": variant(data=array.array("B", bytes(good.data)[: len(good.data) // 2])),
        "empty": variant(height=0, width=0, step=0, data=array.array("B")),
        "too_old": None,  # stamped 30 s in the past (max_input_age 5 s)
        "too_large": None,  # max_pixels lowered below 128 x 128
    }
    for reason, bad in bad_inputs.items():
        age = 0.0
        if reason == "too_old":
            bad, age = rgb_to_image_msg(frame), 30.0
        if reason == "too_large":
            assert set_params(probe, max_pixels=128 * 100)[0].successful
            bad = rgb_to_image_msg(frame)
        image_pub.publish(stamped(probe, bad, age_s=age))
        logged_as = "dropped" if reason == "too_old" else "rejected"
        assert node.wait_for_log(f"{logged_as} frame ({reason}, ", 20), f"no log line for {reason}"
        if reason == "too_large":
            assert set_params(probe, max_pixels=16777216)[0].successful
        served = stamped(probe, rgb_to_image_msg(frame))
        image_pub.publish(served)
        wait_forecast(probe, served.header)  # the node is still serving
    assert node.process.poll() is None
    values = diagnostics(probe)
    for reason in bad_inputs:
        prefix = "dropped" if reason == "too_old" else "rejected"  # all but too_old are bad input
        assert int(values.get(f"{prefix}.{reason}", 0)) >= 1, (reason, values)
    assert int(values["rejected_total"]) >= len(bad_inputs) - 1


@pytest.mark.timeout(180)
def test_compressed_transport_serves_jpeg_and_counts_corrupt_frames(probe, node, shared_images):
    assert set_params(probe, image_transport="compressed")[0].successful
    assert transition(probe, Transition.TRANSITION_DEACTIVATE)
    assert transition(probe, Transition.TRANSITION_ACTIVATE)
    assert state(probe) == "active"
    try:
        pub = probe.publisher(CompressedImage, "/image/compressed")
        assert wait_connected(pub, 30)
        jpeg = (shared_images / "libero_gripper_0.jpg").read_bytes()  # a real camera jpeg, sent as is
        sent = stamped(probe, CompressedImage(format="jpeg", data=array.array("B", jpeg)), frame_id="gripper")
        pub.publish(sent)
        msg = wait_forecast(probe, sent.header)
        assert (msg.image_height, msg.image_width, msg.header.frame_id) == (128, 128, "gripper")

        corrupt = bytearray(jpeg)
        corrupt[20:] = b"\x00" * (len(jpeg) - 20)
        pub.publish(stamped(probe, CompressedImage(format="jpeg", data=array.array("B", bytes(corrupt)))))
        assert node.wait_for_log("rejected frame (corrupt_compressed", 20)
        sent = stamped(probe, CompressedImage(format="jpeg", data=array.array("B", jpeg)))
        pub.publish(sent)
        wait_forecast(probe, sent.header)

        # D3/S2: foreign formats are rejected unread; a DDS whose pixel-format flags are 0 made the old decoder raise
        # NotImplementedError, counted as the node's own failure (three in a row: ERROR).
        buffer = io.BytesIO()
        PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="DDS")
        dds = bytearray(buffer.getvalue())
        dds[80:84] = b"\x00\x00\x00\x00"
        buffer = io.BytesIO()
        PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="EPS")
        before = diagnostics(probe)
        for data in (bytes(dds), buffer.getvalue(), b"\x89PNG\r\n\x1a\n" + bytes(dds)):
            received = int(diagnostics(probe)["frames_received"])
            pub.publish(stamped(probe, CompressedImage(format="jpeg", data=array.array("B", data))))
            assert wait_until(lambda: int(diagnostics(probe)["frames_received"]) > received, 15)
        after = wait_balanced(probe, NODE)
        assert int(after["rejected_total"]) - int(before["rejected_total"]) == 3, after
        assert after["failed_total"] == before["failed_total"], "bad input counted as the node's own failure"
        assert int(after.get("rejected.unsupported_format", 0)) >= 2
        assert after["_level"] != "2", after["_message"]  # not ERROR
    finally:
        assert set_params(probe, image_transport="raw")[0].successful
        assert transition(probe, Transition.TRANSITION_DEACTIVATE)
        assert transition(probe, Transition.TRANSITION_ACTIVATE)


@pytest.mark.timeout(180)
def test_missing_model_fails_configure_with_instructions(probe, node, tiny_model_dir, tmp_path):
    assert transition(probe, Transition.TRANSITION_DEACTIVATE)
    assert transition(probe, Transition.TRANSITION_CLEANUP)
    assert state(probe) == "unconfigured"
    no_weights = tmp_path / "no-weights"  # a model directory (config.yaml) whose weights are missing
    no_weights.mkdir()
    (no_weights / "config.yaml").write_text((tiny_model_dir / "config.yaml").read_text())
    try:
        assert not set_params(probe, model="/nonexistent/what-happens-next")[0].successful  # refused on set
        assert set_params(probe, model=str(no_weights))[0].successful
        assert not transition(probe, Transition.TRANSITION_CONFIGURE)
        assert state(probe) == "unconfigured"
        assert node.wait_for_log(f"cannot load model '{no_weights}'", 10)
        assert "traj-forecast download" in node.log() and "model directory" in node.log()
        values = diagnostics(probe)
        assert values["state"] == "unconfigured" and "configure failed" in values["_message"]
        assert node.wait_for_log("configure failed: cannot load model", 5)  # logged, not swallowed (D2)
        assert counts_balance(values) is None, values
    finally:
        assert set_params(probe, model=str(tiny_model_dir))[0].successful
        assert transition(probe, Transition.TRANSITION_CONFIGURE)
        assert transition(probe, Transition.TRANSITION_ACTIVATE)
    assert state(probe) == "active"


@pytest.mark.timeout(180)
def test_30hz_burst_stays_current_drops_frames_and_keeps_memory_flat(probe, node, image_pub, shared_images):
    frames = [rgb_to_image_msg(f) for f in libero_frames(shared_images)]
    # K=16 and 30 steps: several times slower than the 30 Hz camera, so the mailbox must drop most frames
    assert all(r.successful for r in set_params(probe, num_samples=16, steps=30))
    try:
        before = diagnostics(probe)
        sent_at: Dict[tuple, float] = {}
        sent_order = []
        start = due = time.time()
        rss_early = None
        index = 0
        while time.time() - start < 5.0:
            msg = stamped(probe, frames[index % len(frames)])
            image_pub.publish(msg)
            key = stamp_key(msg.header)
            sent_at[key] = time.time()
            sent_order.append(key)
            index += 1
            if rss_early is None and time.time() - start > 1.5:
                rss_early = node.rss_mb()
            # 30 Hz; after a pause of the machine the schedule moves on instead of sending the missed frames at once
            due = max(due + 1 / 30.0, time.time())
            time.sleep(max(0.0, due - time.time()))
        burst_end = time.time()
        rss_late = node.rss_mb()
        time.sleep(1.5)
        after = diagnostics(probe)
    finally:
        assert all(r.successful for r in set_params(probe, num_samples=K, steps=3))

    served = [(received, m) for received, m in probe.timed_messages(f"{NODE}/forecast")
              if stamp_key(m.header) in sent_at]
    assert len(served) >= 3, f"only {len(served)} forecasts during a {index}-frame burst"
    for received, msg in served:
        key = stamp_key(msg.header)
        assert received - sent_at[key] < 2.5, "a forecast referred to a stale frame"
        if received <= burst_end:  # frames sent between the frame and its forecast: a bounded backlog
            newer = sum(1 for k in sent_order if sent_at[k] > sent_at[key] and sent_at[k] < received)
            assert newer <= 75
    def delta(key):
        return int(after.get(key, 0)) - int(before.get(key, 0))

    received, published = delta("frames_received"), delta("forecasts_published")
    assert received >= 0.9 * index, (received, index)  # best-effort DDS on loopback loses (almost) nothing
    assert published == len(served)
    assert received == published + delta("dropped_total") + delta("rejected_total"), "a frame went uncounted"
    superseded = delta("dropped.superseded")
    assert superseded >= received // 2, (superseded, received, after["inference_p50_ms"])
    assert after["stamp_age_p50_ms"] != "n/a" and float(after["stamp_age_p95_ms"]) < 2500
    assert rss_late - rss_early < 40.0, f"RSS grew {rss_early:.0f} -> {rss_late:.0f} MiB"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_inference_exits_within_2_s(sig, tiny_model_dir, tmp_path, shared_images):
    probe = Probe(f"signal_probe_{sig.name.lower()}")
    namespace = f"/sig_{sig.name.lower()}"
    # 64 samples x 40 steps keeps the tiny model busy for several seconds
    process = NodeProcess(tmp_path / "node.log", {"model": tiny_model_dir, "device": "cpu", "num_samples": 64,
                                                  "steps": 40}, namespace=namespace)
    try:
        assert process.wait_for_log("forecasting", STARTUP_TIMEOUT), process.log()[-3000:]
        pub = probe.publisher(Image, f"{namespace}/image")
        assert wait_connected(pub, 30)
        cpu_before = process.cpu_seconds()
        pub.publish(stamped(probe, rgb_to_image_msg(libero_frames(shared_images)[0])))
        assert wait_until(lambda: process.cpu_seconds() - cpu_before > 0.5, 20), "inference never started"
        with PauseMeter() as pauses:
            code, seconds = process.stop(sig, timeout=10.0)
        assert code == 0, f"exit code {code}:\n{process.log()[-3000:]}"
        # The README's 2 s, not counting time the whole machine was paused (this process could not run either)
        assert seconds - pauses.paused_s < 2.0, f"took {seconds:.2f} s to exit ({pauses.paused_s:.2f} s paused)"
        assert "Traceback" not in process.log() and "terminate called" not in process.log()
    finally:
        process.stop(signal.SIGKILL, timeout=5)
        probe.close()
