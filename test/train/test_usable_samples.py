"""Samples whose truth leaves the image by more than an image size (a point passing the wrist camera's plane) are
neither trained on nor scored: one rule, :func:`traj_forecast_ros.train.data.usable_samples`."""

from __future__ import annotations

import numpy as np
from tiny_sim_data import tiny_sim_meta, tiny_sim_scene

from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.model.presets import preset_config
from traj_forecast_ros.train.data import TrackExamples, usable_samples
from traj_forecast_ros.train.evaluate import evaluate


def write_with_far_points(root, far: dict) -> TrajectoryDataset:
    """Five still samples (shards of 2); ``far[i] = (x, y)`` puts sample i's point (0, 0) there at the last frame."""
    meta = tiny_sim_meta()
    rng = np.random.default_rng(0)
    grid = meta.query_points()
    with DatasetWriter(root, meta, shard_size=2) as writer:
        for index in range(5):
            image = tiny_sim_scene(rng)[0]
            tracks = np.repeat(grid[None], meta.num_frames, axis=0).astype(np.float32)
            if index in far:
                tracks[-1, 0, 0] = far[index]
            writer.add(image, tracks, kind="push", view="agentview")
    return TrajectoryDataset(root)


def test_far_samples_are_left_out_of_training_examples_and_scoring(tmp_path):
    # 128 px images: one image size of margin allows [-128, 256]; the edges themselves are kept
    dataset = write_with_far_points(tmp_path / "d", {1: (5000.0, 10.0), 3: (10.0, -129.0), 4: (256.0, -128.0)})
    assert usable_samples(dataset).tolist() == [0, 2, 4]
    assert usable_samples(dataset, margin=50.0).tolist() == [0, 1, 2, 3, 4]
    examples = TrackExamples(dataset, np.zeros((len(dataset), 4, 8), np.float32), preset_config("tiny-sim"))
    assert len(examples) == 3 and examples.scenes(np.arange(3)).tolist() == [0, 2, 4]
    assert examples.features(np.arange(3)).shape == (3, 4, 8)  # features are indexed by the dataset sample
    assert np.abs(examples.tracks_pixels(np.arange(3))).max() <= 256.0
    report = evaluate(tmp_path / "d", num_samples=2)
    assert report["scenes"] == 3 and report["excluded_offscreen"] == 2
    limited = evaluate(tmp_path / "d", num_samples=2, max_scenes=2)  # the first two samples, less the far one
    assert limited["scenes"] == 1 and limited["excluded_offscreen"] == 1
