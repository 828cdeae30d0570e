"""Planner summaries from hand-made tracks: motion probability, first-move frame, per-frame spread, weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from traj_forecast_ros.forecast import Forecast
from traj_forecast_ros.summaries import NOT_EXPECTED_TO_MOVE, planner_summaries


def hand_made_tracks() -> np.ndarray:
    """K = 4 samples, T = 5 frames, a 1 x 3 grid. Point 0 never moves; point 1 moves 5 px right from frame 2 in
    samples 0 and 1 and from frame 4 in sample 2 (3 of 4 samples); point 2 moves 1 px per frame (below 2 px until
    frame 3) in every sample, downwards in samples 0-1 and upwards in samples 2-3."""
    tracks = np.zeros((4, 5, 1, 3, 2), np.float32)
    tracks[:, :, 0, 0] = (10.0, 10.0)
    tracks[:, :, 0, 1] = (20.0, 10.0)
    tracks[:2, 2:, 0, 1, 0] += 5.0
    tracks[2, 4:, 0, 1, 0] += 5.0
    tracks[:, :, 0, 2] = (30.0, 10.0)
    frames = np.arange(5, dtype=np.float32)
    tracks[:2, :, 0, 2, 1] += frames
    tracks[2:, :, 0, 2, 1] -= frames
    return tracks


def test_hand_made_tracks_give_known_summaries():
    summaries = planner_summaries(hand_made_tracks(), moving_threshold=2.0)
    np.testing.assert_allclose(summaries.motion_probability, [[0.0, 0.75, 1.0]])
    # Point 1: by frame 2 half of the samples (2 of 4) have moved. Point 2: moves > 2 px from frame 3 on.
    np.testing.assert_array_equal(summaries.first_move_frame, [[NOT_EXPECTED_TO_MOVE, 2, 3]])
    np.testing.assert_allclose(summaries.sample_weights, [0.25] * 4)
    assert summaries.sample_weights.sum() == pytest.approx(1.0)
    # Spread at frame t: point 0 and frame 0 are 0; point 2's samples sit at +-t px from their mean.
    assert summaries.spread_per_frame.shape == (5, 1, 3)
    np.testing.assert_allclose(summaries.spread_per_frame[:, 0, 0], 0.0)
    np.testing.assert_allclose(summaries.spread_per_frame[:, 0, 2], np.arange(5), atol=1e-6)
    np.testing.assert_allclose(summaries.spread_per_frame[0], 0.0)
    # Point 1 at the last frame: 3 samples at +5, one at 0 -> mean 3.75, RMS distance sqrt(3 * 1.25^2 + 3.75^2) / 2.
    assert summaries.spread[0, 1] == pytest.approx(np.sqrt(3 * 1.25**2 + 3.75**2) / 2)
    np.testing.assert_allclose(summaries.mean_displacement[0], [[0, 0], [3.75, 0], [0, 0]], atol=1e-6)


def test_the_threshold_decides_what_moves():
    tracks = hand_made_tracks()
    assert planner_summaries(tracks, moving_threshold=10.0).motion_probability.max() == 0.0
    low = planner_summaries(tracks, moving_threshold=0.5)
    np.testing.assert_array_equal(low.first_move_frame, [[NOT_EXPECTED_TO_MOVE, 2, 1]])


def test_half_of_an_odd_k_is_rounded_up():
    tracks = np.zeros((3, 4, 1, 1, 2), np.float32)
    tracks[0, 1:] = 5.0  # one sample of three moves from frame 1, a second from frame 3
    tracks[1, 3:] = 5.0
    summaries = planner_summaries(tracks, 2.0)
    assert summaries.first_move_frame[0, 0] == 3  # 2 of 3 samples by frame 3; 1 of 3 is not half
    assert summaries.motion_probability[0, 0] == pytest.approx(2 / 3)


def test_forecast_methods_agree_with_the_summaries_and_a_direct_computation():
    rng = np.random.default_rng(3)
    tracks = np.cumsum(rng.normal(0, 1.5, (8, 16, 6, 5, 2)), axis=1).astype(np.float32)
    forecast = Forecast(tracks=tracks, query_points=tracks[0, 0], image_size=(64, 64), model_id="t")
    offsets = np.linalg.norm(tracks - tracks[:, :1], axis=-1)  # [K, T, H, W]
    np.testing.assert_allclose(forecast.moving_fraction(2.0), (offsets.max(axis=1) > 2.0).mean(axis=0))
    final = tracks[:, -1]
    spread = np.sqrt(((final - final.mean(axis=0)) ** 2).sum(-1).mean(axis=0))
    np.testing.assert_allclose(forecast.spread(), spread, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forecast.mean_displacement(), (tracks[:, -1] - tracks[:, 0]).mean(0), atol=1e-5)
    first = np.where((offsets > 2).any(axis=1), (offsets > 2).argmax(axis=1), 16)  # [K, H, W]
    median = np.sort(first, axis=0)[3]
    np.testing.assert_array_equal(forecast.summaries(2.0).first_move_frame, np.where(median < 16, median, -1))


def test_bad_tracks_are_refused():
    with pytest.raises(ValueError, match=r"\[K, T, H, W, 2\]"):
        planner_summaries(np.zeros((2, 3, 4, 2)), 2.0)


def test_summaries_bench_runs(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "summaries_bench.py"
    spec = importlib.util.spec_from_file_location("summaries_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--samples", "2", "--frames", "4", "--grid", "8", "--repeat", "3"]) == 0
    printed = capsys.readouterr().out
    assert "ratio summaries / reference" in printed and "target: summaries <= 2 ms" in printed


def test_more_than_255_samples_are_counted_without_overflow():
    """The per-point sample counter widens past one byte: 300 samples, 200 of which move from frame 1 on."""
    tracks = np.zeros((300, 4, 2, 2, 2), np.float32)
    tracks[:200, 1:, :, :, 0] = 10.0
    found = planner_summaries(tracks, 2.0)
    np.testing.assert_allclose(found.motion_probability, 200 / 300)
    assert (found.first_move_frame == 1).all()  # 200 of 300: more than half moved by frame 1
