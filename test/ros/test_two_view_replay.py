"""Both LIBERO views of the bundled bag replayed over real DDS through ONE node process with a real (tiny) model:
both views forecast, every frame is accounted for per camera and in total, each output carries its own camera's
header, and the node loads one model."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("traj_forecast_msgs.msg")

from traj_forecast_ros.bag.io import deserialize, read_messages  # noqa: E402
from traj_forecast_ros.bag.replay import replay_through_node  # noqa: E402
from traj_forecast_ros.bag.report import read_forecasts, stamp_ns  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402

pytestmark = pytest.mark.ros
VIEWS = {"agentview": "/agentview/image_raw", "robot0_eye_in_hand": "/eye_in_hand/image_raw"}
FRAME_IDS = {"agentview": "agentview_camera_optical_frame", "robot0_eye_in_hand": "eye_in_hand_camera_optical_frame"}


@pytest.fixture(scope="module")
def replay(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("two_views")
    # No age limit: a pause of the machine (up to 0.8 s here) must not leave a view without a forecast.
    summary = replay_through_node(SAMPLE_BAG, out, model=str(tiny_model_dir), image_topic=list(VIEWS.values()),
                                  rate=1.0, extra_params=["num_samples:=2", "steps:=3", "max_input_age:=0.0"],
                                  timeout_s=180, print_summary=False)
    return out, summary


def outputs(camera: str) -> dict:
    return {name: f"/forecast_node/{camera}/{name}" for name in ("forecast", "markers", "overlay")}


def test_both_views_are_forecast_and_every_frame_is_accounted_for_per_camera(replay):
    _, summary = replay
    values = summary["node_diagnostics"]
    assert summary["frames_in"] == 16 and summary["all_frames_accounted"] and summary["node_exit_code"] == 0
    for camera in VIEWS:
        received, published = int(values[f"{camera}/frames_received"]), int(values[f"{camera}/forecasts_published"])
        dropped, rejected = int(values[f"{camera}/dropped_total"]), int(values[f"{camera}/rejected_total"])
        assert received == 8, camera  # reliable, REPLAY_QUEUE_DEPTH deep: nothing lost in transport
        assert received == published + dropped + rejected, (camera, values)
        assert published >= 1 and summary["forecasts_by_camera"][camera] == published, camera
        reasons = {k: int(v) for k, v in values.items() if k.startswith(f"{camera}/dropped.")
                   or k.startswith(f"{camera}/rejected.")}
        assert sum(reasons.values()) == dropped + rejected, (camera, reasons)
    for key in ("frames_received", "forecasts_published", "dropped_total", "rejected_total"):
        assert int(values[key]) == sum(int(values[f"{camera}/{key}"]) for camera in VIEWS), key


def test_each_output_carries_its_own_cameras_header(replay):
    out, _ = replay
    bag = out / "forecast_bag"
    for camera, image_topic in VIEWS.items():
        sent = {stamp_ns(deserialize(m).header) for m in read_messages(SAMPLE_BAG, [image_topic])}
        forecasts = read_forecasts(bag, outputs(camera)["forecast"])
        assert forecasts and {stamp for stamp, _ in forecasts} <= sent, camera
        assert {f.header.frame_id for _, f in forecasts} == {FRAME_IDS[camera]}, camera
        overlays = [deserialize(m).header for m in read_messages(bag, [outputs(camera)["overlay"]])]
        assert [stamp_ns(h) for h in overlays] == [stamp for stamp, _ in forecasts], camera
        assert {h.frame_id for h in overlays} == {FRAME_IDS[camera]}, camera


def test_one_model_serves_both_cameras(replay):
    out, summary = replay
    assert summary["node_diagnostics"]["models_loaded"] == "1"
    log = Path(summary["outputs"]["node_log"]).read_text()
    assert log.count("loading model") == 1 and log.count("model ready") == 1
    assert "forecasting /agentview/image_raw (raw) -> /forecast_node/agentview/forecast" in log
    assert "forecasting /eye_in_hand/image_raw (raw) -> /forecast_node/robot0_eye_in_hand/forecast" in log
    assert {Path(summary["outputs"][f"overlay_{camera}_gif"]).name for camera in VIEWS} == {
        f"overlay_{camera}.gif" for camera in VIEWS}
