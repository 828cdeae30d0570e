"""The sample bag replayed through the forecast node process over DDS: every frame answered or counted as dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("traj_forecast_msgs.msg")

from PIL import Image  # noqa: E402

from traj_forecast_ros.bag.io import bag_topics, deserialize, read_messages  # noqa: E402
from traj_forecast_ros.bag.replay import replay_through_node  # noqa: E402
from traj_forecast_ros.bag.report import read_forecasts, stamp_ns  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402
from traj_forecast_ros.errors import BagError  # noqa: E402
from traj_forecast_ros.ros.stats import PipelineStats  # noqa: E402

pytestmark = pytest.mark.ros
REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = {name: f"/agentview/forecast_node/{name}" for name in ("forecast", "markers", "overlay")}


@pytest.fixture(scope="module")
def replay(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("replay")
    summary = replay_through_node(SAMPLE_BAG, out, model=str(tiny_model_dir), rate=1.0,
                                  extra_params=["num_samples:=4", "steps:=4"], timeout_s=120, print_summary=False)
    return out, summary


def test_every_frame_is_answered_or_counted_as_dropped(replay):
    _, summary = replay
    assert summary["frames_in"] == 8
    assert summary["frames_received_by_node"] == 8  # reliable, REPLAY_QUEUE_DEPTH deep: nothing lost in transport
    assert summary["frames_unaccounted"] == 0 and summary["all_frames_accounted"]
    assert summary["forecasts_out"] + sum(summary["dropped"].values()) + sum(summary["rejected"].values()) == 8
    assert summary["forecasts_out"] >= 1
    assert summary["node_diagnostics"]["forecasts_published"] == str(summary["forecasts_out"])
    assert summary["latency_ms"]["count"] == summary["forecasts_out"] and summary["latency_ms"]["p50"] > 0
    assert summary["node_exit_code"] == 0


def test_output_stamps_match_the_source_frames(replay):
    out, summary = replay
    sent = {stamp_ns(deserialize(m).header) for m in read_messages(SAMPLE_BAG, ["/agentview/image_raw"])}
    forecast_stamps = [stamp for stamp, _ in read_forecasts(out / "forecast_bag", OUTPUTS["forecast"])]
    assert len(forecast_stamps) == summary["forecasts_out"] == len(set(forecast_stamps))
    assert set(forecast_stamps) <= sent
    assert forecast_stamps == sorted(forecast_stamps)  # answered in order; a dropped frame never comes back late
    overlays = [stamp_ns(deserialize(m).header) for m in read_messages(out / "forecast_bag", [OUTPUTS["overlay"]])]
    assert overlays == forecast_stamps
    assert summary["stamps"]["ok"]


def test_outputs_on_disk(replay):
    out, summary = replay
    assert json.loads((out / "summary.json").read_text()) == summary
    recorded = bag_topics(out / "forecast_bag")
    assert {OUTPUTS["forecast"], OUTPUTS["markers"], OUTPUTS["overlay"], "/diagnostics"} <= set(recorded)
    with Image.open(out / "overlay.gif") as gif:
        assert gif.size == (384, 384) and gif.n_frames > 1
    assert "model ready" in (out / "node.log").read_text()


def test_a_model_that_cannot_load_is_reported_with_the_node_log(tmp_path):
    with pytest.raises(BagError, match="could not load its model"):
        replay_through_node(SAMPLE_BAG, tmp_path, model=str(tmp_path / "no_such_model"), timeout_s=60,
                            print_summary=False)


def test_a_frame_the_node_rejects_is_counted_by_reason(tmp_path, tiny_model_dir):
    from traj_forecast_ros.bag.io import BagWriter
    from traj_forecast_ros.bag.typestore import make_typestore

    store = make_typestore()
    bag = tmp_path / "with_bad_frame"
    with BagWriter(bag, "mcap", store) as writer:
        for index, message in enumerate(read_messages(SAMPLE_BAG, ["/agentview/image_raw"])):
            if index == 4:
                break
            image = deserialize(message, store)
            if index == 2:
                image.encoding = "yuv422"  # not decodable by the node
            writer.write_message(message.topic, message.msgtype, message.timestamp, image)
    # 1 s between frames: the bad frame must reach the worker, not be superseded by the next one on a loaded machine
    summary = replay_through_node(bag, tmp_path / "out", model=str(tiny_model_dir), rate=0.1,
                                  extra_params=["num_samples:=2", "steps:=3"], timeout_s=120, print_summary=False)
    assert summary["frames_in"] == 4 and summary["frames_unaccounted"] == 0
    assert summary["rejected"] == {"unsupported_encoding": 1}, summary  # bad input: rejected, not dropped
    assert "unsupported_encoding" not in summary["dropped"]
    assert summary["forecasts_out"] + sum(summary["dropped"].values()) + sum(summary["rejected"].values()) == 4
    sent = [stamp_ns(deserialize(m).header) for m in read_messages(bag, ["/agentview/image_raw"])]
    assert sent[2] not in {stamp for stamp, _ in read_forecasts(tmp_path / "out" / "forecast_bag", OUTPUTS["forecast"])}


def test_replay_checks_the_image_topic_before_starting_anything(tmp_path):
    with pytest.raises(BagError, match="carries sensor_msgs/msg/CameraInfo"):
        replay_through_node(SAMPLE_BAG, tmp_path, model="unused", image_topic="/agentview/camera_info")
    with pytest.raises(BagError, match="has no topic /nope"):
        replay_through_node(SAMPLE_BAG, tmp_path, model="unused", image_topic="/nope")


def test_live_outputs_equal_the_offline_run_with_the_same_seed(replay, tiny_model_dir, tmp_path):
    """The node (over DDS) and ``bag run`` build the same forecasts and messages from the same frames."""
    import numpy as np

    from traj_forecast_ros.bag.offline import run_bag

    out, _ = replay
    run_bag(SAMPLE_BAG, tmp_path / "offline", model=str(tiny_model_dir), topics=["/agentview/image_raw"],
            num_samples=4, steps=4, seed=0, device="cpu", dtype="float32", progress=False)
    offline = dict(read_forecasts(tmp_path / "offline", OUTPUTS["forecast"]))
    live = read_forecasts(out / "forecast_bag", OUTPUTS["forecast"])
    assert live
    for stamp, message in live:
        expected = offline[stamp]
        for name in ("tracks", "query_points", "mean_displacement", "spread", "moving_fraction"):
            np.testing.assert_allclose(getattr(message, name), getattr(expected, name), atol=1e-4, err_msg=name)
        for name in ("image_height", "image_width", "num_samples", "num_frames", "grid_rows", "grid_cols",
                     "frame_interval", "moving_threshold", "model_id", "instruction"):
            assert getattr(message, name) == getattr(expected, name), name
        assert message.header.frame_id == expected.header.frame_id
    live_markers = [deserialize(m) for m in read_messages(out / "forecast_bag", [OUTPUTS["markers"]])]
    offline_markers = {stamp_ns(d.markers[0].header): d for d in
                       (deserialize(m) for m in read_messages(tmp_path / "offline", [OUTPUTS["markers"]]))}
    for markers in live_markers:
        expected = offline_markers[stamp_ns(markers.markers[0].header)]
        assert [len(m.points) for m in markers.markers] == [len(m.points) for m in expected.markers]
        assert [m.type for m in markers.markers] == [m.type for m in expected.markers]


# --------------------------------------------------------------------------------- the example planner, sim time
SIM_MODEL = REPO_ROOT / "models" / "sim-manipulation"


@pytest.fixture(scope="module")
def planner_replay(tmp_path_factory):
    """The scored sim bag at half speed (use_sim_time: the node's clock runs at 0.5x the wall clock) through the
    shipped sim-manipulation model, with the example planner on its forecasts."""
    if not (SIM_MODEL / "denoiser.safetensors").is_file():
        pytest.skip("models/sim-manipulation is not in this checkout")
    from traj_forecast_ros.bag.sim_sample import SIM_SAMPLE_BAG

    out = tmp_path_factory.mktemp("planner_replay")
    summary = replay_through_node(SIM_SAMPLE_BAG, out, model=str(SIM_MODEL), rate=0.5, planner=True,
                                  extra_params=["num_samples:=4", "steps:=4"], timeout_s=180, print_summary=False)
    return out, summary, SIM_SAMPLE_BAG


def test_the_example_planner_marks_where_the_true_future_moves(planner_replay):
    import numpy as np

    from traj_forecast_ros.ros.conversions import msg_to_arrays

    out, summary, sim_bag = planner_replay
    assert summary["forecasts_out"] >= 3 and summary["frames_unaccounted"] == 0
    truths = dict(read_forecasts(sim_bag, "/agentview/true_future"))
    images = {}
    for message in read_messages(out / "forecast_bag", ["/agentview/example_planner/motion_probability"]):
        image = deserialize(message)
        assert image.encoding == "mono8" and (image.height, image.width) == (128, 128)
        images[stamp_ns(image.header)] = np.frombuffer(bytes(image.data), np.uint8).reshape(128, 128)
    forecast_stamps = {stamp for stamp, _ in read_forecasts(out / "forecast_bag", OUTPUTS["forecast"])}
    assert set(images) == forecast_stamps  # one map per forecast, with the forecast's (the frame's) stamp
    assert summary["outputs_recorded"]["/agentview/example_planner/keep_out"] == len(images)
    covered = moving_total = 0
    for stamp, pixels in images.items():
        truth = msg_to_arrays(truths[stamp])
        moving = truth["query_points"][truth["moving_fraction"] > 0]  # (x, y) of the points that truly move
        if not len(moving):
            continue
        values = pixels[moving[:, 1].astype(int), moving[:, 0].astype(int)]
        assert (values > 0).any(), f"frame {stamp}: the map is empty where the truth moves"
        covered, moving_total = covered + int((values > 0).sum()), moving_total + len(moving)
        # a map of where things move, not of everything: most of the view is where at most half the samples
        # move (v2's samples disagree, so one sample in K moving covers about half of the agent view)
        assert (pixels > 128).mean() < 0.5
    assert moving_total and covered / moving_total >= 0.5


def test_diagnostics_name_their_clocks_and_agree_with_the_replay_under_sim_time(planner_replay):
    _, summary, _ = planner_replay
    node = summary["node_diagnostics"]
    wall_p50 = summary["latency_ms"]["p50"]  # measured here: image published -> forecast received, wall clock
    processing_p50 = float(node["processing_latency_p50_ms"])  # the node: frame received -> published, wall clock
    assert processing_p50 == pytest.approx(wall_p50, rel=0.2)
    # The stamp age runs on the node's clock: simulated time at 0.5x, about half the wall-clock figure.
    assert float(node["stamp_age_p50_ms"]) < 0.8 * processing_p50
    # Rates share one clock and window, so they compare as counts do. A forecast published inside the window may
    # be of a frame received just before it: at most the two a camera has in flight (one waiting in its mailbox,
    # one in the worker), so the forecasts in the window exceed the frames by at most two.
    window_s = PipelineStats().input_rate.window_s
    assert float(node["forecast_rate_hz"]) <= float(node["input_rate_hz"]) + 2 / window_s + 1e-9
