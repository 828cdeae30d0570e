"""Synthetic scenes: determinism, exact rigid ground truth, image/ground-truth agreement, several futures."""

import dataclasses

import numpy as np
import pytest

from traj_forecast_ros.data.render import render
from traj_forecast_ros.data.scenes import SCENE_KINDS, GeneratorConfig, sample_layout
from traj_forecast_ros.data.synthetic import generate_sample

CONFIG = GeneratorConfig(rollouts=3, num_frames=8)


def test_generation_is_deterministic_per_seed_and_index():
    first = generate_sample(7, 3, CONFIG)
    again = generate_sample(7, 3, CONFIG)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.tracks, again.tracks)
    np.testing.assert_array_equal(first.object_ids, again.object_ids)
    other = generate_sample(8, 3, CONFIG)
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("kind", SCENE_KINDS)
def test_every_kind_has_valid_shapes_and_query_grid_at_frame_zero(kind):
    sample = generate_sample(1, 0, CONFIG, kind=kind)
    assert sample.kind == kind
    assert sample.image.shape == (128, 128, 3) and sample.image.dtype == np.uint8
    assert sample.tracks.shape == (3, 8, 32, 32, 2) and sample.tracks.dtype == np.float32
    assert sample.object_ids.shape == (32, 32)
    np.testing.assert_allclose(sample.tracks[:, 0], np.broadcast_to(CONFIG.query_points(), (3, 32, 32, 2)))
    assert sample.object_ids.max() >= 1  # every scene shows at least one body


@pytest.mark.parametrize("seed", range(6))
def test_body_points_move_rigidly_with_their_body_and_background_stays(seed):
    sample = generate_sample(seed, 11, CONFIG, kind=SCENE_KINDS[seed % 5])  # kinds with motion
    for rollout in range(CONFIG.rollouts):
        tracks = sample.tracks[rollout].astype(np.float64)  # [T, Hq, Wq, 2]
        poses = sample.poses[rollout]  # [T, n, 3]
        static = sample.object_ids == 0
        np.testing.assert_array_equal(tracks[:, static], np.broadcast_to(tracks[0, static], tracks[:, static].shape))
        for body in range(poses.shape[1]):
            points = tracks[:, sample.object_ids == body + 1]  # [T, m, 2]
            if points.shape[1] < 2:
                continue
            distances = np.linalg.norm(points[:, :, None] - points[:, None], axis=-1)  # [T, m, m]
            np.testing.assert_allclose(distances, np.broadcast_to(distances[0], distances.shape), atol=1e-3)
            # relative to the body centre, points rotate by exactly the body's change of angle
            rel0 = points[0] - poses[0, body, :2]
            for t in (poses.shape[0] // 2, poses.shape[0] - 1):
                turn = poses[t, body, 2] - poses[0, body, 2]
                rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
                np.testing.assert_allclose(points[t] - poses[t, body, :2], rel0 @ rotation.T, atol=1e-3)


def test_object_ids_match_what_the_image_shows():
    sample = generate_sample(3, 5, CONFIG, kind="fall")
    layout = sample_layout(np.random.default_rng([3, 5, 0]), CONFIG, "fall")
    empty = dataclasses.replace(layout, bodies=[])
    background = render(empty, np.zeros((0, 3)), CONFIG).astype(int)
    query = CONFIG.query_points()
    pixels = np.floor(query).astype(int)  # pixel holding each query point
    changed = np.abs(sample.image.astype(int) - background).sum(-1)[pixels[..., 1], pixels[..., 0]] > 0
    on_body = sample.object_ids > 0
    assert on_body.sum() >= 3
    assert changed[on_body].mean() > 0.95  # a body is drawn under (almost) every body point
    assert changed[~on_body].mean() < 0.1  # background points show background (edges may blend)


def test_resting_scenes_do_not_move_and_motion_scenes_have_several_futures():
    for index in range(4):
        rest = generate_sample(2, index, CONFIG, kind="rest")
        assert np.abs(rest.tracks - rest.tracks[:, :1]).max() < 0.05
    spreads = []
    for kind in ("fall", "slide", "ramp"):
        sample = generate_sample(2, 1, CONFIG, kind=kind)
        final = sample.tracks[:, -1]  # [R, Hq, Wq, 2]
        spreads.append(np.abs(final - final[:1]).max())
        assert np.abs(sample.tracks[:, -1] - sample.tracks[:, 0]).max() > 2.0  # something moves
    assert max(spreads) > 1.0  # same image, different hidden state, different futures


def test_invalid_generator_settings_raise():
    with pytest.raises(ValueError, match="unknown scene kinds"):
        GeneratorConfig(kind_weights={"explode": 1.0})
    with pytest.raises(ValueError, match="unknown scene kind"):
        generate_sample(0, 0, CONFIG, kind="explode")
