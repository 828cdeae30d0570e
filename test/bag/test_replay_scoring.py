"""Replay scoring: best-of-K error of recorded forecasts against ground-truth futures recorded in the input bag.

Pure scoring (metrics.forecast_errors), bag-level matching by stamp (bag.report.score_forecasts), the choice of the
truth topic, and the ROS loop: a bag whose truth topic holds the node's own earlier forecasts scores exactly 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from traj_forecast_ros.bag.io import BagWriter, bag_topics, read_messages
from traj_forecast_ros.bag.report import choose_truth_topic, format_accuracy, score_forecasts, truth_topics
from traj_forecast_ros.bag.typestore import FORECAST_TYPE, make_typestore
from traj_forecast_ros.metrics import forecast_errors

K, T, H, W = 3, 4, 2, 3


def future(seed: int, samples: int = 1) -> np.ndarray:
    """Random tracks [samples, T, H, W, 2] starting from a fixed grid."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(W) * 8 + 4.0, np.arange(H) * 8 + 4.0, indexing="xy"), -1)
    steps = rng.normal(0, 2.0, (samples, T - 1, H, W, 2))
    return np.concatenate([np.broadcast_to(grid, (samples, 1, H, W, 2)),
                           grid + np.cumsum(steps, axis=1)], axis=1)


# ------------------------------------------------------------------------------------------------ pure scoring
def test_truth_fed_as_the_forecast_scores_zero():
    truth = future(0)
    errors = forecast_errors(truth, truth[0])
    assert errors["best_of_k_mse"] == 0.0 and errors["mean_of_k_mse"] == 0.0
    assert errors["best_of_k_ade_px"] == 0.0 and errors["best_of_k_fde_px"] == 0.0
    assert errors["best_of_k_error_px_by_frame"] == [0.0] * T


def test_best_of_k_picks_the_closest_sample_and_reports_known_errors():
    truth = future(1)[0]
    shifted = truth + np.array([3.0, 4.0])  # every point 5 px off in every frame: MSE (9 + 16) / 2
    far = truth + 40.0
    pred = np.stack([far, shifted, far])
    errors = forecast_errors(pred, truth)
    assert errors["best_of_k_mse"] == pytest.approx(12.5)
    assert errors["best_of_k_ade_px"] == pytest.approx(5.0) and errors["best_of_k_fde_px"] == pytest.approx(5.0)
    assert errors["mean_of_k_mse"] == pytest.approx((12.5 + 2 * 1600.0) / 3)
    assert errors["best_of_k_error_px_by_frame"] == pytest.approx([5.0] * T)
    # a sample equal to the truth wins however bad the others are
    assert forecast_errors(np.stack([far, truth]), truth)["best_of_k_mse"] == 0.0


def test_several_true_futures_average_their_best_samples():
    truths = future(2, samples=2)  # R = 2 recorded futures
    pred = np.stack([truths[0], truths[1] + 1.0])  # one sample hits future 0 exactly, the other is 1 px off each axis
    errors = forecast_errors(pred, truths)
    assert errors["best_of_k_mse"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert errors["best_of_k_fde_px"] == pytest.approx(np.sqrt(2) / 2)


def test_mismatched_or_broken_inputs_are_refused():
    truth = future(3)[0]
    with pytest.raises(ValueError, match="differ"):
        forecast_errors(future(3, samples=2)[:, :-1], truth)
    with pytest.raises(ValueError, match="need truth"):
        forecast_errors(future(3, samples=2), truth[0, 0])
    broken = truth.copy()
    broken[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        forecast_errors(broken[None], truth)


# ------------------------------------------------------------------------------------------------ bags
def forecast_message(store, stamp_s: int, tracks: np.ndarray, query: np.ndarray = None):
    types = store.types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=stamp_s, nanosec=0),
                                          frame_id="cam")
    k, t, h, w = tracks.shape[:4]
    query = tracks[0, 0] if query is None else query
    zeros = np.zeros(h * w, np.float32)
    return types[FORECAST_TYPE](
        header=header, image_height=16, image_width=24, model_id="test", instruction="", num_samples=k,
        num_frames=t, frame_interval=0.1, grid_rows=h, grid_cols=w,
        query_points=np.asarray(query, np.float32).reshape(-1), tracks=np.asarray(tracks, np.float32).reshape(-1),
        mean_displacement=np.zeros(h * w * 2, np.float32), spread=zeros, moving_threshold=2.0,
        moving_fraction=zeros, sample_weights=np.full(k, 1 / k, np.float32), first_move_frame=zeros - 1,
        spread_per_frame=np.zeros(t * h * w, np.float32), crop_box=np.array([0, 0, 24, 16], np.float32),
        intrinsics_known=False, k=np.zeros(9), distortion_model="", d=np.zeros(0), inference_time=0.0,
        device="cpu", dtype="float32")


def write_bag(path, topic: str, messages) -> None:
    store = make_typestore()
    with BagWriter(path, "mcap", store) as writer:
        for stamp_s, tracks, *query in messages:
            writer.write_message(topic, FORECAST_TYPE, stamp_s * 10**9,
                                 forecast_message(store, stamp_s, tracks, *(query or [None])))


def test_bag_scoring_matches_by_stamp_and_counts_what_it_cannot_score(tmp_path):
    truths = {s: future(10 + s) for s in range(1, 5)}
    write_bag(tmp_path / "truth", "/cam/truth", [(s, tr) for s, tr in truths.items()])
    # forecasts: stamp 1 = its truth (0 error), 2 = truth shifted 1 px in x plus a far sample, 3 = a different grid,
    # 4 = other query points, 9 = no truth with that stamp
    other_grid = future(3, samples=K)[:, :, :1]
    moved_query = truths[4][0, 0] + 3.0
    write_bag(tmp_path / "forecasts", "/cam/forecast_node/forecast", [
        (1, np.concatenate([truths[1], future(99, samples=K - 1)])),
        (2, np.stack([truths[2][0] + [1.0, 0.0], truths[2][0] + 50.0]), truths[2][0, 0]),
        (3, other_grid),
        (4, truths[4], moved_query),
        (9, future(5, samples=K)),
    ])
    accuracy = score_forecasts(tmp_path / "forecasts", "/cam/forecast_node/forecast", tmp_path / "truth", "/cam/truth")
    assert accuracy["truths"] == 4 and accuracy["scored"] == 2
    assert accuracy["unscored"] == {"different_frames_or_grid": 1, "different_query_points": 1,
                                    "no_truth_for_stamp": 1}
    first, second = accuracy["per_forecast"]
    assert first["stamp_ns"] == 10**9 and first["best_of_k_mse"] == 0.0 and first["best_of_k_ade_px"] == 0.0
    assert second["best_of_k_mse"] == pytest.approx(0.5) and second["best_of_k_ade_px"] == pytest.approx(1.0)
    assert accuracy["best_of_k_mse"] == pytest.approx(0.25) and accuracy["best_of_k_ade_px"] == pytest.approx(0.5)
    assert accuracy["best_of_k_error_px_by_frame"] == pytest.approx([0.5] * T)
    line = format_accuracy(accuracy)
    assert "best-of-K MSE 0.25" in line and "over 2 forecasts" in line and "no_truth_for_stamp 1" in line


def test_truth_bag_fed_as_forecast_bag_scores_zero(tmp_path):
    write_bag(tmp_path / "truth", "/cam/truth", [(s, future(20 + s, samples=2)) for s in range(3)])
    accuracy = score_forecasts(tmp_path / "truth", "/cam/truth", tmp_path / "truth", "/cam/truth")
    assert accuracy["scored"] == 3 and accuracy["unscored"] == {}
    assert accuracy["best_of_k_mse"] == 0.0 and accuracy["best_of_k_fde_px"] == 0.0
    assert "best-of-K MSE 0.00" in format_accuracy(accuracy)


def test_bag_scoring_leads_with_the_moving_points(tmp_path):
    """Half the points move 10 px per frame, the rest stay; forecasts move them half as far: calibration 0.5,
    and the summary line starts with the moving points before the whole-grid figures."""
    truths = {}
    for stamp in (1, 2):
        truth = np.repeat(future(0)[:, :1], T, axis=1)  # [1, T, H, W, 2], still
        truth[:, :, 0, :, 0] += 10.0 * stamp * np.arange(T)[:, None]  # row 0 moves (10 or 20 px per frame)
        truths[stamp] = truth
    write_bag(tmp_path / "truth", "/cam/truth", list(truths.items()))
    halved = [(stamp, truth[:, :1] + 0.5 * (truth - truth[:, :1])) for stamp, truth in truths.items()]
    write_bag(tmp_path / "forecasts", "/cam/forecast", halved)
    accuracy = score_forecasts(tmp_path / "forecasts", "/cam/forecast", tmp_path / "truth", "/cam/truth")
    assert accuracy["moving_points"] == 2 * W and accuracy["moving_share"] == pytest.approx(0.5)
    assert accuracy["calibration_best_sample"] == pytest.approx(0.5)
    assert accuracy["calibration_sample_mean"] == pytest.approx(0.5)
    assert accuracy["moving_true_displacement_px"] == pytest.approx((30.0 + 60.0) / 2)
    assert accuracy["moving_best_of_k_fde_px"] == pytest.approx((15.0 + 30.0) / 2)
    line = format_accuracy(accuracy)
    assert line.startswith("moving points (6, 50% of all, true motion > 5 px): they travel 45.0 px, the best sample "
                           "moves them 22.5 px"), line
    assert "calibration best sample 0.50" in line and line.index("moving points") < line.index("whole grid")


def test_truth_topic_choice(tmp_path):
    write_bag(tmp_path / "one", "/agentview/truth", [(1, future(1))])
    topics = bag_topics(tmp_path / "one")
    assert truth_topics(topics) == ["/agentview/truth"]
    assert choose_truth_topic(topics, "/agentview/image_raw") == "/agentview/truth"
    assert choose_truth_topic(topics, "/agentview/image_raw", exclude=["/agentview/truth"]) is None
    store = make_typestore()
    with BagWriter(tmp_path / "two", "mcap", store) as writer:
        for topic in ("/agentview/truth", "/wrist/truth"):
            writer.write_message(topic, FORECAST_TYPE, 10**9, forecast_message(store, 1, future(1)))
    topics = bag_topics(tmp_path / "two")
    assert choose_truth_topic(topics, "/wrist/image_raw") == "/wrist/truth"
    assert choose_truth_topic(topics, "/other/image_raw") is None  # ambiguous: not guessed
    assert format_accuracy({"truth_topic": "/x", "scored": 0, "unscored": {"no_truth_for_stamp": 2}}) == \
        "no forecast scored against /x (no_truth_for_stamp 2)"


# ------------------------------------------------------------------------------------------------ the ROS loop
@pytest.mark.ros
def test_replay_scores_its_own_forecasts_as_truth_with_zero_error(tmp_path, tiny_model_dir):
    """Replay the sample bag once; put the recorded forecasts into a copy of the bag as its truth topic; the second
    replay (same model, same fixed seed, so the same forecasts) scores every forecast with 0 error."""
    pytest.importorskip("rclpy")
    pytest.importorskip("traj_forecast_msgs.msg")
    from traj_forecast_ros.bag.replay import format_summary, replay_through_node
    from traj_forecast_ros.bag.sample import SAMPLE_BAG

    params = ["num_samples:=2", "steps:=2"]
    first = replay_through_node(SAMPLE_BAG, tmp_path / "first", model=str(tiny_model_dir), extra_params=params,
                                timeout_s=120, print_summary=False)
    assert "accuracy" not in first  # the sample bag has no truth topic
    assert first["forecasts_out"] >= 1
    forecast_topic = "/agentview/forecast_node/forecast"
    with_truth = tmp_path / "with_truth"
    with BagWriter(with_truth, "mcap") as writer:
        for message in read_messages(SAMPLE_BAG):
            writer.write(message.topic, message.msgtype, message.timestamp, message.data)
        for message in read_messages(tmp_path / "first" / "forecast_bag", [forecast_topic]):
            writer.write("/agentview/true_future", FORECAST_TYPE, message.timestamp, message.data)
    second = replay_through_node(with_truth, tmp_path / "second", model=str(tiny_model_dir),
                                 image_topic="/agentview/image_raw", extra_params=params, timeout_s=120,
                                 print_summary=False)
    accuracy = second["accuracy"]
    assert accuracy["truth_topic"] == "/agentview/true_future"
    # frames the first run dropped (a loaded machine) have no truth; nothing else may go unscored
    assert set(accuracy["unscored"]) <= {"no_truth_for_stamp"}, accuracy["unscored"]
    assert accuracy["scored"] + accuracy["unscored"].get("no_truth_for_stamp", 0) == second["forecasts_out"]
    assert accuracy["scored"] >= 1, (first["dropped"], second["dropped"])
    errors = {key: accuracy[key] for key in ("best_of_k_mse", "best_of_k_ade_px")}
    assert errors["best_of_k_mse"] < 1e-6 and errors["best_of_k_ade_px"] < 1e-3, errors
    assert "accuracy:" in format_summary(second) and "best-of-K MSE 0.00" in format_summary(second)
