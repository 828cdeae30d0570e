"""SideOutputs: markers and overlay built off the forecast worker, newest job first, every job accounted for;
OutputBuilder: the serialised markers are the message, every output carries the source header. Nothing is timed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from traj_forecast_ros.ros.outputs import SideOutputs


def test_jobs_run_off_the_caller_thread_and_a_waiting_job_is_replaced() -> None:
    side = SideOutputs()
    release, started = threading.Event(), threading.Event()
    ran = []

    def blocking() -> None:
        ran.append(("first", threading.current_thread().name))
        started.set()
        release.wait(30)

    side.submit(blocking)
    assert started.wait(30)
    side.submit(lambda: ran.append(("stale", None)))  # waits behind the running job ...
    side.submit(lambda: ran.append(("newest", None)))  # ... and is replaced by this one
    release.set()
    assert side.idle(30)
    assert [name for name, _ in ran] == ["first", "newest"]
    assert ran[0][1] == "forecast_side_outputs" != threading.current_thread().name
    assert side.skipped == 1 and side.done == 2 and side.failed == 0
    assert side.stop(30)


def test_a_failing_job_is_reported_and_the_thread_keeps_going() -> None:
    errors = []
    side = SideOutputs(on_error=errors.append)
    side.submit(lambda: 1 / 0)
    assert side.idle(30)
    done = threading.Event()
    side.submit(done.set)
    assert done.wait(30) and side.idle(30)
    assert side.failed == 1 and side.done == 1 and isinstance(errors[0], ZeroDivisionError)
    assert side.stop(30)


def test_stop_drops_the_waiting_job_and_submit_restarts() -> None:
    side = SideOutputs()
    release, started = threading.Event(), threading.Event()
    ran = []
    side.submit(lambda: (started.set(), release.wait(30), ran.append("running")))
    assert started.wait(30)
    side.submit(lambda: ran.append("dropped"))
    assert not side.stop(0)  # drops the waiting job; the running one is still busy
    release.set()
    assert side.stop(30)
    assert ran == ["running"] and side.skipped == 1
    side.submit(lambda: ran.append("after restart"))
    assert side.idle(30) and ran == ["running", "after restart"]
    assert side.stop(30)


def test_a_job_submitted_while_a_stopped_thread_still_runs_is_not_lost() -> None:
    """stop() timed out on a long job (a transition may not wait for it); the next activate's job must still run."""
    side = SideOutputs()
    release = threading.Event()
    started = threading.Event()
    ran = threading.Event()

    def long_job() -> None:
        started.set()
        release.wait(10)

    side.submit(long_job)
    assert started.wait(5)
    assert not side.stop(timeout=0.05)  # the long job is still running
    side.submit(ran.set)
    release.set()  # the old thread finishes its job and must leave the new one to the new thread
    assert ran.wait(5), "the job submitted after a timed-out stop never ran"
    assert side.idle(5)
    assert side.counts() == {"done": 2, "skipped": 0, "failed": 0, "pending": 0}
    side.stop(5)


def test_counts_account_for_every_submitted_job() -> None:
    side = SideOutputs(on_error=lambda exc: None)
    release, started = threading.Event(), threading.Event()
    side.submit(lambda: (started.set(), release.wait(30)))
    assert started.wait(30)
    assert side.counts() == {"done": 0, "skipped": 0, "failed": 0, "pending": 1}
    for _ in range(5):  # four of these are replaced while the first job runs
        side.submit(lambda: None)
    assert side.counts() == {"done": 0, "skipped": 4, "failed": 0, "pending": 2}
    release.set()
    assert side.idle(30)
    side.submit(lambda: 1 / 0)
    assert side.idle(30)
    counts = side.counts()
    assert counts == {"done": 2, "skipped": 4, "failed": 1, "pending": 0}
    assert sum(counts.values()) == 1 + 5 + 1
    assert side.stop(30)


def test_jobs_of_different_cameras_are_never_replaced_by_each_other() -> None:
    """One waiting job per key (camera): a newer job of camera b does not drop camera a's; a newer one of a does."""
    side = SideOutputs()
    release, started = threading.Event(), threading.Event()
    ran = []
    side.submit(lambda: (started.set(), release.wait(30)), key="a")
    assert started.wait(30)
    side.submit(lambda: ran.append("a old"), key="a")
    side.submit(lambda: ran.append("b"), key="b")
    side.submit(lambda: ran.append("a new"), key="a")
    release.set()
    assert side.idle(30)
    assert ran == ["b", "a new"] and side.skipped == 1
    assert side.stop(30)


# ------------------------------------------------------------------------------------------------ OutputBuilder
def _builder(**overrides):
    pytest.importorskip("visualization_msgs", reason="needs the ROS 2 message wheels (requirements-ros.txt)")
    from traj_forecast_ros.ros.outputs import OutputBuilder
    from traj_forecast_ros.ros.params import default_settings

    warnings = []
    return OutputBuilder(warn=warnings.append), default_settings().updated(overrides), warnings


def _job(forecast, header, settings, camera_info=None, rgb=None, period_s=0.1):
    from traj_forecast_ros.ros.outputs import OutputJob

    rgb = np.zeros((120, 160, 3), np.uint8) if rgb is None else rgb
    return OutputJob(forecast, rgb, header, settings, camera_info=camera_info, period_s=period_s)


def _forecast(k=3, t=6, grid=16, size=(120, 160), seed=0):
    from traj_forecast_ros.forecast import Forecast

    rng = np.random.default_rng(seed)
    coords = (np.arange(grid) + 0.5) * min(size) / grid
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    query = np.stack([xs, ys], -1).astype(np.float32)
    tracks = query + np.cumsum(rng.normal(0, 2.0, (k, t, grid, grid, 2)), 1).astype(np.float32)
    tracks[:, 0] = query
    return Forecast(tracks=tracks, query_points=query, image_size=size, model_id="test", instruction=None,
                    timings={"total": 0.05})


def _header(frame_id="camera_optical"):
    from std_msgs.msg import Header

    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = 1_700_000_001, 250_000_000
    return header


def test_serialised_markers_are_the_markers_message() -> None:
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CameraInfo
    from visualization_msgs.msg import MarkerArray

    builder, settings, warnings = _builder(marker_stride=4, marker_max_frames=4, marker_samples=2)
    forecast, header = _forecast(), _header()
    info = CameraInfo(width=320, height=240, k=[300.0, 0.0, 160.0, 0.0, 300.0, 120.0, 0.0, 0.0, 1.0])
    for camera_info in (None, info):
        job = _job(forecast, header, settings, camera_info)
        message = builder.markers_message(job)
        data = builder.markers(job)
        assert isinstance(data, bytes)
        assert deserialize_message(data, MarkerArray) == deserialize_message(serialize_message(message), MarkerArray)
        lines = message.markers[1:]
        assert len(lines) == 2 and all(m.header == header for m in message.markers)  # the source header, stamp too
        assert all(len(m.points) == len(m.colors) == (4 - 1) * 4 * 4 * 2 for m in lines)  # 4 frames, 4x4 points
    assert builder.direct_markers is True and not warnings


def test_overlay_carries_the_source_header_and_draws_the_chosen_sample() -> None:
    builder, settings, _ = _builder(overlay_sample=7, overlay_stride=2)  # clamped to the last sample
    forecast, header = _forecast(), _header("cam")
    rgb = np.zeros((120, 160, 3), np.uint8)
    message = builder.overlay(_job(forecast, header, settings, rgb=rgb))
    assert message.header == header and (message.height, message.width, message.encoding) == (120, 160, "rgb8")
    from traj_forecast_ros.viz import draw_tracks

    expected = draw_tracks(rgb, forecast.tracks[2], stride=2)
    np.testing.assert_array_equal(np.frombuffer(bytes(message.data), np.uint8).reshape(120, 160, 3), expected)
    assert not rgb.any()  # the source frame is not drawn on
