"""Metrics on cases with hand-computed answers."""

import numpy as np
import pytest

from traj_forecast_ros import metrics, paired_metrics


def grid_tracks(frames: int = 4, rows: int = 5, cols: int = 5, step=(0.0, 0.0)) -> np.ndarray:
    """[T, rows, cols, 2] grid translating by ``step`` pixels per frame."""
    ys, xs = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    base = np.stack([xs, ys], axis=-1)
    return np.stack([base + t * np.asarray(step) for t in range(frames)])


def test_best_and_mean_of_k_mse_hand_computed():
    gt = np.stack([grid_tracks(), grid_tracks(step=(1.0, 0.0))])  # [N=2, T, 5, 5, 2]
    pred = np.stack([
        np.stack([gt[0] + [1.0, 2.0], gt[0] + [3.0, 0.0]]),  # mse 2.5 and 4.5
        np.stack([gt[1], gt[1] + [2.0, 2.0]]),  # mse 0 and 4
    ])
    np.testing.assert_allclose(metrics.sample_mse(pred, gt), [[2.5, 4.5], [0.0, 4.0]])
    assert metrics.best_of_k_mse(pred, gt) == pytest.approx((2.5 + 0.0) / 2)
    assert metrics.mean_of_k_mse(pred, gt) == pytest.approx((3.5 + 2.0) / 2)


def test_best_of_k_with_several_ground_truth_rollouts():
    base = grid_tracks()
    gt = np.stack([base, base + [0.0, 4.0]])[None]  # [N=1, R=2, ...]
    pred = np.stack([base + [0.0, 1.0], base + [0.0, 4.0]])[None]  # [N=1, K=2, ...]
    # rollout 0: mse 0.5, 8 -> best 0.5; rollout 1: mse 4.5, 0 -> best 0
    assert metrics.best_of_k_mse(pred, gt, rollouts=True) == pytest.approx(0.25)
    assert metrics.mean_of_k_mse(pred, gt, rollouts=True) == pytest.approx((0.5 + 8 + 4.5 + 0) / 4)


def test_velocity_and_acceleration_are_zero_padded_differences():
    tracks = grid_tracks(frames=4, step=(2.0, 0.0))
    tracks[3] += [1.0, 0.0]  # speeds up in the last frame
    velocity, acceleration = metrics.velocity_acceleration(tracks)
    np.testing.assert_allclose(velocity[:, 0, 0], [[0, 0], [2, 0], [2, 0], [3, 0]])
    np.testing.assert_allclose(acceleration[:, 0, 0], [[0, 0], [2, 0], [0, 0], [1, 0]])


def test_motion_histogram_of_a_uniform_translation():
    right = metrics.velocity_acceleration(grid_tracks(step=(1.0, 0.0)))[0][None]  # [1, 4, 5, 5, 2]
    hist = metrics.motion_histograms(right)
    assert hist.shape == (1, 8)  # one 5x5x4 cube
    # angle 0 -> bin floor(pi / (pi/4)) = 4; |v| = 1 -> ceil(log2 2) / 8 = 1/8; 3 moving frames x 25 points
    expected = np.zeros(8)
    expected[4] = 75 / 8
    np.testing.assert_allclose(hist[0], expected)

    down = metrics.velocity_acceleration(grid_tracks(step=(0.0, 3.0)))[0][None]
    hist = metrics.motion_histograms(down)
    # angle pi/2 -> bin 6; |v| = 3 -> ceil(log2 4) / 8 = 2/8
    assert hist[0, 6] == pytest.approx(75 * 2 / 8) and hist[0].sum() == pytest.approx(75 * 2 / 8)

    fast = metrics.velocity_acceleration(grid_tracks(step=(-1000.0, 0.0)))[0][None]
    hist = metrics.motion_histograms(fast)
    # angle pi -> bin 8 clipped to 7; magnitude capped at 255 -> weight 1
    assert hist[0, 7] == pytest.approx(75.0)


def test_motion_histograms_drop_incomplete_cubes():
    field = np.ones((2, 9, 11, 12, 2))  # 2 full time cubes, 2 x 2 spatial cubes
    assert metrics.motion_histograms(field).shape == (2, 2 * 2 * 2 * 8)
    with pytest.raises(ValueError, match="at least"):
        metrics.motion_histograms(np.ones((1, 3, 5, 5, 2)))


def test_frechet_distance_of_one_dimensional_gaussians():
    a = np.array([[0.0], [2.0]])  # mean 1, unbiased variance 2
    b = np.array([[5.0], [5.0], [5.0]])  # mean 5, variance 0
    eps = 1e-5
    expected = (1 - 5) ** 2 + 2 + 0 - 2 * np.sqrt((2 + eps) * eps)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_matches_full_matrix_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 12)), rng.normal(size=(40, 12)) * 1.5 + 0.3  # rank-deficient and full-rank sets
    eps = 1e-5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    product = (cov_a + eps * np.eye(12)) @ (cov_b + eps * np.eye(12))
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(product).real, 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fvmd_is_zero_for_identical_sets_and_grows_with_motion():
    rng = np.random.default_rng(1)
    clips = rng.normal(size=(6, 8, 10, 10, 2)).cumsum(axis=1)
    dim = metrics.motion_features(clips).shape[1]
    # identical sets: only the jitter remains, Tr(S) + Tr(S) - 2 Tr(S + eps I) = -2 D eps
    assert metrics.fvmd(clips, clips) == pytest.approx(-2 * dim * metrics.FVMD_EPS, abs=1e-9)
    static = np.broadcast_to(clips[:, :1], clips.shape)
    assert metrics.fvmd(static, clips) > 1.0


def test_lrtl_of_a_matrix_with_known_singular_values():
    # T = 3 -> trajectory matrix [6, P]; object = 7 points of row 0. M[i, i] = s_i gives singular values s.
    singular = [10.0, 9.0, 8.0, 7.0, 6.0, 3.0]
    matrix = np.zeros((6, 7))
    matrix[np.arange(6), np.arange(6)] = singular
    tracks = np.zeros((3, 2, 7, 2))
    tracks[:, 0, :, 0] = matrix[:3]
    tracks[:, 0, :, 1] = matrix[3:]
    ids = np.zeros((2, 7), dtype=np.int16)
    ids[0] = 1
    np.testing.assert_allclose(metrics.trajectory_matrix(tracks, ids == 1), matrix)
    np.testing.assert_allclose(metrics.lrtl_scores(tracks, ids), [3.0])  # only the 6th singular value remains
    np.testing.assert_allclose(metrics.lrtl_scores(tracks, ids, normalize=True), [3.0 / np.sqrt(7)])


def test_lrtl_is_zero_for_rigid_motion_and_positive_for_deformation():
    base = grid_tracks(frames=1, rows=6, cols=6)[0] + 20.0  # [6, 6, 2]
    frames = []
    for t in range(8):
        angle = 0.2 * t
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        frames.append(base @ rotation.T + [3.0 * t, -1.0 * t])
    rigid = np.stack(frames)
    ids = np.ones((6, 6), dtype=np.int16)
    assert metrics.lrtl(rigid[None, None], ids[None]) < 1e-8
    wobbly = rigid + np.random.default_rng(0).normal(scale=2.0, size=rigid.shape)
    assert metrics.lrtl(wobbly[None, None], ids[None]) > 1.0
    assert np.isnan(metrics.lrtl(rigid[None, None], np.zeros((1, 6, 6), dtype=np.int16)))  # background only


def test_diversity_is_mean_pairwise_distance():
    base = grid_tracks()
    pred = np.stack([base, base + [3.0, 4.0], base + [6.0, 8.0]])[None]  # distances 5, 10, 5
    assert metrics.diversity(pred) == pytest.approx(20.0 / 3.0)
    assert metrics.diversity(pred[:, :1]) == 0.0


def test_evaluate_predictions_reports_static_scene_motion():
    moving = grid_tracks(frames=8, rows=10, cols=10, step=(1.0, 0.0))
    still = grid_tracks(frames=8, rows=10, cols=10)
    gt = np.stack([moving, still])[:, None]  # [N=2, R=1, ...]
    pred = np.stack([np.stack([moving, still]), np.stack([still, still + [0.0, 0.0]])])  # [2, K=2, ...]
    pred[1, 1, -1] += [0.6, 0.8]  # one static-scene sample drifts by 1 px at the end
    ids = np.ones((2, 10, 10), dtype=np.int16)
    result = metrics.evaluate_predictions(pred, gt, object_ids=ids, kinds=["slide", "rest"])
    assert result["best_of_k_mse"] == pytest.approx((0.0 + 0.0) / 2)
    assert result["static_max_displacement"] == pytest.approx(1.0)
    assert result["static_mean_displacement"] == pytest.approx(0.5)
    assert result["static_median_displacement"] == pytest.approx(0.5)  # half of the 200 points moved 1 px
    assert result["static_moving_share"] == 0.0  # 1 px is under the 2 px threshold
    strict = metrics.evaluate_predictions(pred, gt, kinds=["slide", "rest"], moving_threshold_px=0.5)
    assert strict["static_moving_share"] == pytest.approx(0.5)
    assert result["gt_mean_displacement"] == pytest.approx((7.0 + 0.0) / 2)
    assert result["lrtl"] == pytest.approx(0.0, abs=1e-6)
    assert {"fvmd", "diversity", "mean_of_k_mse"} <= set(result)


def test_one_pass_best_and_mean_equal_the_separate_functions():
    """evaluate_predictions / the per-kind table use the one-pass path: it must give exactly the old numbers."""
    rng = np.random.default_rng(7)
    pred = rng.normal(scale=5.0, size=(3, 4, 4, 5, 5, 2)).astype(np.float32)  # [N, K, T, Hq, Wq, 2]
    gt = rng.normal(scale=5.0, size=(3, 2, 4, 5, 5, 2)).astype(np.float32)  # [N, R, ...]
    both = metrics.best_and_mean_of_k_mse(pred, gt, rollouts=True)
    assert both == (metrics.best_of_k_mse(pred, gt, rollouts=True), metrics.mean_of_k_mse(pred, gt, rollouts=True))
    single = metrics.best_and_mean_of_k_mse(pred, gt[:, 0])
    assert single == (metrics.best_of_k_mse(pred, gt[:, 0]), metrics.mean_of_k_mse(pred, gt[:, 0]))
    results = metrics.evaluate_predictions(pred, gt)
    assert results["best_of_k_mse"] == metrics.best_of_k_mse(pred, gt, rollouts=True)
    assert results["mean_of_k_mse"] == metrics.mean_of_k_mse(pred, gt, rollouts=True)


# ------------------------------------------------------------------------------------------------ moving region
def half_moving_truth(frames: int = 5, step: float = 3.0, rows: int = 2, cols: int = 4) -> np.ndarray:
    """[T, rows, cols, 2]: the first half of the rows slides +x by ``step`` px per frame (12 px at the end for
    T = 5), the other half stays."""
    truth = grid_tracks(frames=frames, rows=rows, cols=cols)
    truth[:, : rows // 2, :, 0] += step * np.arange(frames)[:, None, None]
    return truth


def test_moving_mask_uses_the_peak_true_displacement_strictly_above_the_threshold():
    truth = grid_tracks(frames=4, rows=1, cols=4)  # [T, 1, 4, 2]
    truth[:, 0, 1, 0] += [0.0, 2.0, 4.0, 5.0]  # 5 px exactly: not moving (strictly more than 5)
    truth[:, 0, 2, 1] += [0.0, 6.0, 3.0, 0.0]  # out 6 px and back: moving (the peak counts, not the last frame)
    truth[:, 0, 3] += [[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [4.2, 3.0]]  # 5.0, then 5.16 px: moving
    np.testing.assert_allclose(metrics.peak_displacement(truth)[0], [0.0, 5.0, 6.0, np.hypot(4.2, 3.0)])
    np.testing.assert_array_equal(metrics.moving_mask(truth), [[False, False, True, True]])
    assert metrics.moving_mask(truth, threshold_px=4.0)[0, 1]
    stacked = np.stack([truth, grid_tracks(frames=4, rows=1, cols=4)])  # a leading scene axis
    np.testing.assert_array_equal(metrics.moving_mask(stacked, leading_axes=1),
                                  [[[False, False, True, True]], [[False, False, False, False]]])


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 1.5])
def test_motion_calibration_of_scaled_truths(factor):
    """A forecast that moves every point ``factor`` times as far as the truth calibrates to exactly ``factor``
    (zero motion 0, the truth 1, a 0.5x shrink 0.5), for the best sample and for the mean of the samples."""
    truth = half_moving_truth()
    scaled = truth[:1] + factor * (truth - truth[:1])
    pred = np.stack([scaled, scaled])[None]  # [N=1, K=2, T, 2, 4, 2]
    result = metrics.moving_region_metrics(pred, truth[None])
    assert result["calibration_best_sample"] == pytest.approx(factor)
    assert result["calibration_sample_mean"] == pytest.approx(factor)
    assert result["moving_points"] == 4 and result["moving_share"] == pytest.approx(0.5)
    assert result["moving_true_displacement_px"] == pytest.approx(12.0)
    assert result["moving_best_sample_displacement_px"] == pytest.approx(12.0 * factor)
    # Moving-region errors: the moving row misses by (1 - factor) * 3 t px at frame t = 0..4.
    miss = abs(1.0 - factor) * 3.0 * np.arange(5)
    assert result["moving_best_of_k_mse"] == pytest.approx((miss**2).mean() / 2)  # x only: half the coordinates
    assert result["moving_mean_of_k_mse"] == pytest.approx((miss**2).mean() / 2)
    assert result["moving_best_of_k_ade_px"] == pytest.approx(miss.mean())
    assert result["moving_best_of_k_fde_px"] == pytest.approx(miss[-1])


def test_zero_motion_moving_region_errors_are_the_true_displacements():
    truth = half_moving_truth()
    still = np.broadcast_to(truth[:1], truth.shape)
    result = metrics.moving_region_metrics(np.stack([still])[None], truth[None])
    assert result["moving_best_of_k_mse"] == pytest.approx(27.0)  # mean_t (3t)^2 / 2 over t = 0..4
    assert result["moving_best_of_k_ade_px"] == pytest.approx(6.0) and result["moving_best_of_k_fde_px"] == 12.0
    assert result["calibration_best_sample"] == 0.0 and result["calibration_sample_mean"] == 0.0


def test_calibration_of_the_best_sample_and_of_the_sample_mean_differ():
    """Samples going both ways: the best one moves the points as far as the truth (1), their average not at all."""
    truth = half_moving_truth()
    mirrored = truth.copy()
    mirrored[..., 0] = 2 * truth[:1, ..., 0] - truth[..., 0]  # -x instead of +x
    result = metrics.moving_region_metrics(np.stack([mirrored, truth])[None], truth[None])
    assert result["calibration_best_sample"] == pytest.approx(1.0)
    assert result["calibration_sample_mean"] == pytest.approx(0.0)
    assert result["moving_best_of_k_mse"] == 0.0
    assert result["moving_mean_of_k_mse"] == pytest.approx(((6.0 * np.arange(5)) ** 2).mean() / 2 / 2)


def test_moving_region_uses_each_rollout_and_skips_still_scenes():
    truth = half_moving_truth()
    still = np.broadcast_to(truth[:1], truth.shape)
    gt = np.stack([np.stack([truth, still]), np.stack([still, still])])  # [N=2, R=2, ...]: one future moves
    pred = np.stack([np.stack([truth]), np.stack([still])])  # [N=2, K=1, ...]
    result = metrics.moving_region_metrics(pred, gt, rollouts=True)
    assert result["moving_points"] == 4 and result["moving_share"] == pytest.approx(4 / 32)
    assert result["moving_best_of_k_mse"] == 0.0 and result["calibration_best_sample"] == pytest.approx(1.0)
    nothing = metrics.moving_region_metrics(pred[1:], gt[1:], rollouts=True)
    assert nothing["moving_points"] == 0 and np.isnan(nothing["moving_best_of_k_mse"])
    assert np.isnan(nothing["calibration_best_sample"])
    tally = metrics.MovingRegionTally()  # the same numbers forecast by forecast, one truth [T, ...] at a time
    tally.add(pred[0], truth)
    assert tally.result()["moving_points"] == 4 and tally.result()["moving_share"] == pytest.approx(0.5)


def test_evaluate_predictions_reports_the_moving_region():
    truth = half_moving_truth(frames=8, rows=10, cols=10)
    gt = truth[None, None]  # [N=1, R=1, ...]
    pred = np.stack([truth[:1] + 0.5 * (truth - truth[:1])])[None]  # [N=1, K=1, ...]
    result = metrics.evaluate_predictions(pred, gt)
    assert result["calibration_best_sample"] == pytest.approx(0.5)
    assert result["moving_threshold_px"] == metrics.MOVING_THRESHOLD_PX == 5.0
    assert result["moving_best_of_k_mse"] > result["best_of_k_mse"]  # the still half dilutes the whole grid


# ------------------------------------------------------------------------------------------------ paired instructions
def test_branch_pairs_are_ordered_pairs_with_different_instructions_in_one_group():
    groups = [0, 0, -1, 1, 1, 1, 2]
    instructions = [0, 1, 0, 0, 1, 1, 3]
    assert paired_metrics.branch_pairs(groups, instructions) == [(0, 1), (1, 0), (3, 4), (3, 5), (4, 3), (5, 3)]
    assert paired_metrics.branch_pairs([-1, -1], [0, 1]) == []


def test_paired_instruction_metrics_hand_made():
    right = half_moving_truth()  # row 0 moves +x
    up = grid_tracks(frames=5, rows=2, cols=4)
    up[:, 1, :, 1] += 2.0 * np.arange(5)[:, None]  # row 1 moves +y (8 px)
    still = np.broadcast_to(right[:1], right.shape)
    # case 0: the instruction-following forecaster: matched = own truth, crossed = the partner's truth
    # case 1: a still truth whose partner moves: matched stays (0 error), crossed moves the partner's row
    # case 2: an instruction-blind forecaster: matched == crossed (a tie is not a win)
    # case 3: neither future moves: left out
    matched = np.stack([right[None], still[None], up[None], still[None]])  # [C, K=1, ...]
    crossed = np.stack([up[None], up[None], up[None], still[None]])
    truth = np.stack([right, still, right, still])
    partner = np.stack([up, up, up, still])
    result = paired_metrics.paired_instruction_metrics(matched, crossed, truth, partner)
    assert result["paired_cases"] == 3
    assert result["paired_right_instruction_wins"] == pytest.approx(2 / 3)
    # region of cases 0 and 2: both rows (8 points); case 1: row 1 (4 points)
    err_right_vs_up = (((3.0 * np.arange(5)) ** 2).mean() + ((2.0 * np.arange(5)) ** 2).mean()) / 2 / 2
    err_up_row = ((2.0 * np.arange(5)) ** 2).mean() / 2
    expected_matched = (0.0 + 0.0 + err_right_vs_up) / 3
    expected_crossed = (err_right_vs_up + err_up_row + err_right_vs_up) / 3
    assert result["paired_matched_moving_mse"] == pytest.approx(expected_matched)
    assert result["paired_crossed_moving_mse"] == pytest.approx(expected_crossed)
    assert result["paired_matched_crossed_ratio"] == pytest.approx(expected_matched / expected_crossed)
    empty = paired_metrics.paired_instruction_metrics(matched[3:], crossed[3:], truth[3:], partner[3:])
    assert empty["paired_cases"] == 0 and np.isnan(empty["paired_matched_crossed_ratio"])
    none = paired_metrics.paired_instruction_metrics(matched[:0], crossed[:0], truth[:0], partner[:0])  # no pairs
    assert none["paired_cases"] == 0 and np.isnan(none["paired_right_instruction_wins"])
    assert np.isnan(none["paired_instruction_response"])


def test_paired_distinct_cases_are_the_pairs_whose_true_futures_part():
    """A pair whose two futures coincide in the horizon cannot tell the instructions apart: the distinct figures
    keep only the cases whose futures lie more than 5 px apart on average over the scored region."""
    truth = half_moving_truth()  # row 0 slides +x, 3 px per frame
    opposite = grid_tracks(frames=5, rows=2, cols=4)
    opposite[:, 0, :, 0] -= 3.0 * np.arange(5)[:, None]  # row 0 slides -x: 6t px from the truth, 12 px on average
    close = truth.copy()
    close[1:, 0, :, 1] += 1.0  # the same slide, 1 px lower: the futures coincide
    # case 0 (distinct): the instruction-following forecaster wins; case 1 (not distinct): an instruction-blind tie
    matched = np.stack([truth[None], close[None]])
    crossed = np.stack([opposite[None], close[None]])
    result = paired_metrics.paired_instruction_metrics(matched, crossed, np.stack([truth, truth]),
                                                       np.stack([opposite, close]))
    assert result["paired_cases"] == 2 and result["paired_right_instruction_wins"] == 0.5
    assert result["paired_distinct_cases"] == 1 and result["paired_distinct_right_instruction_wins"] == 1.0
    assert result["paired_distinct_matched_moving_mse"] == 0.0
    assert result["paired_distinct_matched_crossed_ratio"] == 0.0
    blind = paired_metrics.paired_instruction_metrics(matched[1:], crossed[1:], truth[None], close[None])
    assert blind["paired_cases"] == 1 and blind["paired_distinct_cases"] == 0
    assert np.isnan(blind["paired_distinct_right_instruction_wins"])


def test_the_instruction_response_is_how_far_the_instruction_moves_the_forecast():
    """1: the two forecasts part as far as the two true futures; 0: the instruction changes nothing; 0.5: half."""
    truth = half_moving_truth()  # row 0 slides +x, 3 px per frame
    opposite = grid_tracks(frames=5, rows=2, cols=4)
    opposite[:, 0, :, 0] -= 3.0 * np.arange(5)[:, None]  # row 0 slides -x
    halfway = (truth + opposite) / 2  # no motion at all: halfway between the futures
    truth_gap = np.linalg.norm(opposite[:, 0] - truth[:, 0], axis=-1).mean()  # over row 0, the moving region
    cases = {"following": (truth, opposite, 1.0), "blind": (truth, truth, 0.0), "half": (truth, halfway, 0.5)}
    for name, (matched, crossed, response) in cases.items():
        # K = 2 samples spread symmetrically around each forecast: the response reads their mean
        spread = np.array([-1.0, 1.0])[:, None, None, None, None]
        result = paired_metrics.paired_instruction_metrics((matched[None] + spread)[None],
                                                           (crossed[None] + spread)[None], truth[None], opposite[None])
        assert result["paired_truth_gap_px"] == pytest.approx(truth_gap), name
        assert result["paired_instruction_response"] == pytest.approx(response), name
        assert result["paired_distinct_instruction_response"] == pytest.approx(response), name
    still = np.broadcast_to(truth[:1], truth.shape)  # neither future moves: no case, no response
    assert np.isnan(paired_metrics.paired_instruction_metrics(still[None, None], still[None, None], still[None],
                                                              still[None])["paired_instruction_response"])


def test_the_instruction_alignment_counts_only_the_parting_the_truth_takes():
    """Forecasts that part as far as the truths but across their difference respond fully (1) and align not at all
    (0); parting the wrong way aligns at -1; following the truth at 1; halfway at 0.5. The wins follow the alignment,
    not the response."""
    truth = half_moving_truth()  # row 0 slides +x, 3 px per frame
    opposite = grid_tracks(frames=5, rows=2, cols=4)
    opposite[:, 0, :, 0] -= 3.0 * np.arange(5)[:, None]  # row 0 slides -x: the partner's future
    across_own, across_other = truth.copy(), truth.copy()  # part by 6t px along y, not x: across the truths' difference
    across_own[:, 0, :, 1] += 3.0 * np.arange(5)[:, None]
    across_other[:, 0, :, 1] -= 3.0 * np.arange(5)[:, None]
    halfway = (truth + opposite) / 2
    cases = {"following": (truth, opposite, 1.0, 1.0), "wrong way": (opposite, truth, 1.0, -1.0),
             "across": (across_own, across_other, 1.0, 0.0), "half": (truth, halfway, 0.5, 0.5),
             "blind": (truth, truth, 0.0, 0.0)}
    for name, (matched, crossed, response, alignment) in cases.items():
        result = paired_metrics.paired_instruction_metrics(matched[None, None], crossed[None, None], truth[None],
                                                           opposite[None])
        assert result["paired_instruction_response"] == pytest.approx(response), name
        assert result["paired_instruction_alignment"] == pytest.approx(alignment, abs=1e-12), name
        assert result["paired_distinct_instruction_alignment"] == pytest.approx(alignment, abs=1e-12), name
    still = np.broadcast_to(truth[:1], truth.shape)  # no case: no alignment
    assert np.isnan(paired_metrics.paired_instruction_metrics(still[None, None], still[None, None], still[None],
                                                              still[None])["paired_instruction_alignment"])
