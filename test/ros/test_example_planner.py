"""The example planner's maps, and the planner-side examples' exit codes on Ctrl-C (SIGINT) and SIGTERM."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("traj_forecast_msgs.msg")

from std_msgs.msg import Header  # noqa: E402

from ros_helpers import REPO  # noqa: E402
from traj_forecast_ros.forecast import Forecast  # noqa: E402
from traj_forecast_ros.ros.conversions import forecast_to_msg  # noqa: E402
from traj_forecast_ros.ros.example_planner import grid_to_image, planner_maps  # noqa: E402


def test_grid_values_fill_the_crop_box_only():
    grid = np.array([[1, 2], [3, 4]], np.uint8)
    image = grid_to_image(grid, (2.0, 0.0, 6.0, 4.0), (4, 8))  # a 4 x 8 image whose centre 4 x 4 the grid covers
    np.testing.assert_array_equal(image, [[0, 0, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 2, 2, 0, 0],
                                          [0, 0, 3, 3, 4, 4, 0, 0], [0, 0, 3, 3, 4, 4, 0, 0]])


def test_maps_show_the_motion_probability_and_a_keep_out_within_the_horizon():
    grid = np.stack(np.meshgrid(np.arange(2) * 4.0 + 2, np.arange(2) * 4.0 + 2), axis=-1).astype(np.float32)
    tracks = np.repeat(grid[None, None], 5, axis=1).repeat(4, axis=0)  # [K=4, T=5, 2, 2, 2], static
    tracks[:, 1:, 0, 0, 0] += 5.0  # top-left: every sample moves at frame 1
    tracks[:2, 4:, 1, 1, 0] += 5.0  # bottom-right: half of the samples move, at frame 4
    forecast = Forecast(tracks=tracks, query_points=grid, image_size=(8, 8), model_id="t", frame_interval=0.1)
    msg = forecast_to_msg(forecast, Header(), moving_threshold=2.0)
    maps = planner_maps(msg, horizon_s=0.2)
    np.testing.assert_array_equal(maps["motion_probability"][::4, ::4], [[255, 0], [0, 128]])
    np.testing.assert_array_equal(maps["keep_out"][::4, ::4], [[255, 0], [0, 0]])  # frame 4 = 0.4 s > 0.2 s
    np.testing.assert_array_equal(planner_maps(msg, horizon_s=0.0)["keep_out"][::4, ::4], [[255, 0], [0, 255]])
    assert maps["keep_out"].shape == (8, 8) and maps["keep_out"].dtype == np.uint8


def wait_for_line(process, markers, timeout_s):
    """Output of ``process`` up to the first line holding one of ``markers`` (None at EOF or after ``timeout_s``):
    the node is up, however long its imports took on a loaded machine. Reads the raw pipe, so nothing stays
    buffered where a later ``communicate`` would not see it."""
    deadline, seen = time.monotonic() + timeout_s, b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout.fileno(), selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                return None
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return None
            seen += chunk
            if any(marker.encode() in seen for marker in markers):
                return seen.decode(errors="replace")
    return None


def start(script_args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_LOGGING_BUFFERED_STREAM="0")
    return subprocess.Popen([sys.executable, *script_args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("script", [["docs/examples/forecast_subscriber.py"],
                                    ["-m", "traj_forecast_ros.ros.example_planner"]],
                         ids=["forecast_subscriber", "example_planner"])
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "external_shutdown"])
def test_planner_side_nodes_exit_0_on_ctrl_c_and_external_shutdown(script, stop):
    process = start(script)
    try:
        started = wait_for_line(process, ("listening to", "planning from"), timeout_s=60.0)  # up and spinning
        assert process.poll() is None and started is not None, (started, process.communicate()[0])
        process.send_signal(stop)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output, output


def test_planner_side_imports_no_torch():
    """The planner side (conversions, the example planner, the docs' subscriber) starts without PyTorch: a planner
    host needs only numpy and rclpy, and Ctrl-C during a slow torch import would be a traceback."""
    code = ("import runpy, sys; import traj_forecast_ros.ros.conversions, traj_forecast_ros.ros.example_planner; "
            "runpy.run_path('docs/examples/forecast_subscriber.py', run_name='not_main'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
