"""Signals against a real node process (issue 21, defects 3 and 4): any sequence of SIGINT/SIGTERM during a
forecast exits 0 without an abort, and SIGTERM during a model load stops the load at once, without error lines.

The node runs through a small launcher that swaps the default model factory for a slow fake (a load that takes
20 s, a forecast that ignores the cancel flag for 20 s), so the signals land where they must whatever the machine's
speed; everything else is the real ``forecast_node.main``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ros_helpers import REPO, Probe, ros_available, wait_connected, wait_until

pytestmark = [pytest.mark.ros, pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))]

LAUNCHER = '''
import sys, time
import numpy as np
from traj_forecast_ros.forecast import Forecast
from traj_forecast_ros.ros import forecast_node

LOAD_S, FORECAST_S = float(sys.argv[1]), float(sys.argv[2])


class Stubborn:
    """Forecasts for FORECAST_S seconds and ignores the cancel flag (as native code in a long step would)."""
    model_id, device, dtype, text_encoder = "stubborn", "cpu", "float32", None

    def warmup(self):
        pass

    def release(self):
        pass

    def forecast(self, rgb, instruction=None, num_samples=1, steps=2, seed=None):
        print("forecast started", flush=True)
        deadline = time.monotonic() + FORECAST_S
        while time.monotonic() < deadline:
            time.sleep(0.01)
        query = np.zeros((2, 2, 2), np.float32)
        return Forecast(tracks=np.zeros((1, 2, 2, 2, 2), np.float32), query_points=query, image_size=rgb.shape[:2],
                        model_id=self.model_id, timings={"total": FORECAST_S})


def slow_load(*args, **kwargs):
    print("load started", flush=True)
    deadline = time.monotonic() + LOAD_S
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print("load finished", flush=True)
    return Stubborn()


forecast_node.load_forecaster = slow_load
forecast_node.main(sys.argv[3:])
'''


class Launched:
    """The node process started through LAUNCHER, its output in a log file."""

    def __init__(self, tmp_path: Path, load_s: float, forecast_s: float, namespace: str) -> None:
        script = tmp_path / "launch_node.py"
        script.write_text(LAUNCHER)
        self.log_path = tmp_path / "node.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(load_s), str(forecast_s), "--ros-args", "-p", "model:=stubborn",
             "-p", "qos_reliability:=reliable", "-p", "max_input_age:=0.0", "-r", f"__ns:={namespace}"],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> bool:
        return bool(wait_until(lambda: text in self.log() or self.process.poll() is not None, timeout)) \
            and text in self.log()

    def exit_code(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self._log.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT),
                                     (signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM, signal.SIGINT)],
                         ids=["INT-INT", "TERM-INT", "TERM-TERM", "INT-TERM-INT"])
def test_any_sequence_of_stop_signals_during_a_forecast_exits_0(tmp_path, signals):
    from sensor_msgs.msg import Image

    from traj_forecast_ros.ros.conversions import rgb_to_image_msg
    import numpy as np

    namespace = f"/sigseq_{'_'.join(str(int(s)) for s in signals)}"
    node = Launched(tmp_path, load_s=0.0, forecast_s=20.0, namespace=namespace)
    probe = Probe(f"sigseq_probe_{len(signals)}_{int(signals[0])}")
    try:
        assert node.wait_for_log("forecasting", 60), node.log()[-3000:]
        publisher = probe.publisher(Image, f"{namespace}/image")
        assert wait_connected(publisher, 30)
        publisher.publish(rgb_to_image_msg(np.zeros((16, 16, 3), np.uint8)))  # the smallest frame the node takes
        assert node.wait_for_log("forecast started", 30), node.log()[-3000:]
        for sig in signals:  # 0.05 s apart: the later ones land while the first is shutting the node down
            node.process.send_signal(sig)
            time.sleep(0.05)
        code = node.exit_code(timeout=10)
        log = node.log()
        assert code == 0, f"exit code {code}:\n{log[-3000:]}"
        assert "Traceback" not in log and "terminate called" not in log, log[-3000:]
    finally:
        if node.process.poll() is None:
            node.process.kill()
        probe.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_the_model_load_exits_at_once_without_error_lines(tmp_path, sig):
    node = Launched(tmp_path, load_s=20.0, forecast_s=0.0, namespace=f"/sigload_{int(sig)}")
    assert node.wait_for_log("load started", 60), node.log()[-3000:]
    node.process.send_signal(sig)
    sent = time.monotonic()
    code = node.exit_code(timeout=15)
    waited = time.monotonic() - sent
    log = node.log()
    assert code == 0, f"exit code {code}:\n{log[-3000:]}"
    assert "load finished" not in log, f"the node waited for the whole load ({waited:.1f} s):\n{log[-3000:]}"
    for false_error in ("configure failed", "autostart: configure failed", "Traceback", "ERROR", "[ERROR]"):
        assert false_error not in log, f"{false_error!r} logged for a requested stop:\n{log[-3000:]}"
