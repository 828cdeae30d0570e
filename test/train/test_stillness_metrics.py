"""The evaluation's static-scene figures on hand-made tracks with known answers."""

from __future__ import annotations

import numpy as np

from traj_forecast_ros.train.evaluate import background_mean_displacement, background_moving_share, stillness_metrics


def hand_made_tracks() -> tuple:
    """One scene, K = 4 samples, 3 frames, a 2 x 2 grid; points (0, 0), (0, 1), (1, 0) are static geometry (id 0) and
    (1, 1) an object. Point (0, 1): three samples move it 3 px at frame 1 and bring it back at frame 2. Point (1, 0):
    two samples move it 3 px for good. Point (0, 0) stays still. The object moves 10 px in every sample."""
    pred = np.zeros((1, 4, 3, 2, 2, 2), np.float32)
    pred[0, :3, 1, 0, 1, 0] = 3.0  # wanders mid-horizon in 3 of 4 samples, ends where it started
    pred[0, :2, 1:, 1, 0, 1] = 3.0  # moves in 2 of 4 samples: not more than half
    pred[0, :, 1:, 1, 1, 0] = 10.0  # the object
    ids = np.array([[[0, 0], [0, 7]]])
    return pred, ids


def test_the_moving_share_counts_points_most_samples_move_at_any_frame():
    pred, ids = hand_made_tracks()
    assert background_moving_share(pred, ids) == 1 / 3  # only (0, 1): 3 of 4 samples, at frame 1
    assert background_moving_share(pred, ids, threshold_px=3.5) == 0.0
    # the final displacement misses the point that comes back: (0 + 0 + 2 samples x 3 px) / (3 points x 4 samples)
    assert background_mean_displacement(pred, ids) == 0.5


def test_still_forecasts_score_zero_and_unlabelled_data_none():
    pred, ids = hand_made_tracks()
    assert stillness_metrics(np.zeros_like(pred), ids) == {"background_mean_displacement": 0.0,
                                                           "background_moving_share": 0.0}
    assert stillness_metrics(pred, None) == {"background_mean_displacement": None, "background_moving_share": None}
    assert background_moving_share(pred, np.ones_like(ids)) is None  # no static point
