"""A replay through a node whose executor stalls: no frame is lost at the replay's queue depth, and the losses of a
shallow camera queue are counted, not hidden.

The stall is injected into the node process only: a ``sitecustomize`` module on its ``PYTHONPATH`` makes the
pipeline's ``submit`` (called from the image callback, on the executor thread) sleep once, on the first frame. CI
once lost 2 of 8 frames this way, when the node's executor was held up (probably by a pause of the whole machine).
"""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("traj_forecast_msgs.msg")

from traj_forecast_ros.bag.replay import REPLAY_QUEUE_DEPTH, replay_through_node  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402

pytestmark = pytest.mark.ros
STALL_S = 1.5  # the 8 frames come 0.1 s apart: the stall outlasts the arrival of the 7 after the first
STALL_MARKER = "test stall: the executor sleeps"
STALLING_SITECUSTOMIZE = f'''
import sys
import time

from traj_forecast_ros.ros import pipeline

_submit = pipeline.ForecastPipeline.submit
_stalled = []


def _submit_after_one_stall(self, frame):
    if not _stalled:
        _stalled.append(True)
        print("{STALL_MARKER} {STALL_S} s on the first frame", file=sys.stderr, flush=True)
        time.sleep({STALL_S})
    return _submit(self, frame)


pipeline.ForecastPipeline.submit = _submit_after_one_stall
'''


@pytest.fixture
def stalling_node_env(tmp_path, monkeypatch):
    """Every Python process started from now on (the node) stalls its executor on its first frame."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STALLING_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(site))


def _replay(tmp_path, tiny_model_dir, *params: str) -> dict:
    out = tmp_path / "out"
    summary = replay_through_node(SAMPLE_BAG, out, model=str(tiny_model_dir), rate=1.0,
                                  extra_params=["num_samples:=2", "steps:=2", *params], timeout_s=120,
                                  print_summary=False)
    assert STALL_MARKER in (out / "node.log").read_text(), "the injected stall did not happen"
    assert summary["frames_in"] == 8 and summary["node_exit_code"] == 0
    assert summary["frames_unaccounted"] == 0
    assert summary["forecasts_out"] + sum(summary["dropped"].values()) + sum(summary["rejected"].values()) == 8
    return summary


def test_a_stalled_executor_loses_no_frame_at_the_replay_queue_depth(stalling_node_env, tmp_path, tiny_model_dir):
    assert REPLAY_QUEUE_DEPTH >= 8  # the queue holds every frame that arrives during the stall
    summary = _replay(tmp_path, tiny_model_dir)
    assert summary["node_diagnostics"]["frames_received"] == "8"
    assert summary["frames_received_by_node"] == 8 and "lost_in_transport" not in summary["dropped"]
    assert summary["all_frames_accounted"]
    # The frames that waited in the queue reached the pipeline together, while it forecast the first: some were
    # superseded there, and counted.
    assert summary["dropped"].get("superseded", 0) >= 1


def test_a_shallow_camera_queue_loses_frames_and_the_summary_counts_them(stalling_node_env, tmp_path,
                                                                         tiny_model_dir):
    summary = _replay(tmp_path, tiny_model_dir, "qos_depth:=2")
    received = summary["frames_received_by_node"]
    # The first frame was taken before the stall; of the 7 that came during it the queue kept the newest 2 (more
    # only if the player itself fell behind by the length of the stall).
    assert 3 <= received < 8, summary
    assert summary["dropped"]["lost_in_transport"] == 8 - received
    assert not summary["all_frames_accounted"]  # the node never saw every frame, and the replay says so
