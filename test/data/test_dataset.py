"""Sharded dataset format: round trip, memory-mapped shard reading, user data import, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from traj_forecast_ros.data.dataset import DatasetMeta, TrajectoryDataset
from traj_forecast_ros.data.dataset_writer import DatasetWriter, import_arrays, merge_datasets, tracks_to_grid
from traj_forecast_ros.data.scenes import GeneratorConfig
from traj_forecast_ros.data.synthetic import write_dataset
from traj_forecast_ros.errors import DatasetError

META = DatasetMeta(image_size=(16, 16), query_grid=(4, 4), query_stride=4.0, query_offset=1.5, num_frames=3,
                   kinds=["a", "b"])


def make_sample(i: int):
    image = np.full((16, 16, 3), i, dtype=np.uint8)
    tracks = np.broadcast_to(META.query_points(), (3, 4, 4, 2)) + np.float32(i)
    return image, np.ascontiguousarray(tracks)


def test_round_trip_over_several_shards(tmp_path):
    with DatasetWriter(tmp_path / "ds", META, shard_size=2) as writer:
        for i in range(5):
            image, tracks = make_sample(i)
            writer.add(image, tracks, object_ids=np.full((4, 4), i, dtype=np.int16), kind="ab"[i % 2])
    ds = TrajectoryDataset(tmp_path / "ds")
    assert len(ds) == 5 and ds.shard_sizes == [2, 2, 1]
    assert isinstance(ds.shard(0).tracks, np.memmap)  # read lazily, one shard at a time
    sample = ds[3]
    assert sample.image[0, 0, 0] == 3 and sample.kind == "b" and sample.object_ids[0, 0] == 3
    assert sample.tracks.shape == (1, 3, 4, 4, 2)  # one rollout axis added
    np.testing.assert_allclose(ds.load("tracks")[:, 0, 0, 0, 0], META.query_points()[0, 0] + np.arange(5)[:, None])
    assert ds.kind_names() == ["a", "b", "a", "b", "a"]
    np.testing.assert_array_equal(ds.gather("images", [4, 0, 3, 4])[:, 0, 0, 0], [4, 0, 3, 4])  # any order, repeats
    with pytest.raises(IndexError):
        ds.gather("images", [5])
    assert sum(len(shard) for shard in ds.iter_shards()) == 5
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["fields"] == ["images", "tracks", "object_ids", "kinds"] and index["num_samples"] == 5


def test_writer_rejects_bad_samples(tmp_path):
    image, tracks = make_sample(0)
    with pytest.raises(DatasetError, match="image must be uint8"):
        DatasetWriter(tmp_path / "a", META).add(image.astype(np.float32), tracks)
    with pytest.raises(DatasetError, match="tracks must be"):
        DatasetWriter(tmp_path / "b", META).add(image, tracks[:2])
    bad = tracks.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        DatasetWriter(tmp_path / "c", META).add(image, bad)
    with pytest.raises(DatasetError, match="kind 'z'"):
        DatasetWriter(tmp_path / "d", META).add(image, tracks, kind="z")
    writer = DatasetWriter(tmp_path / "e", META)
    writer.add(image, tracks, kind="a")
    with pytest.raises(DatasetError, match="fields"):
        writer.add(image, tracks)  # same dataset, different fields


def test_branch_groups_round_trip_and_are_checked(tmp_path):
    """The optional branch group: -1 = none, >= 0 groups samples with one frame 0 and other futures (version 2)."""
    with DatasetWriter(tmp_path / "ds", META) as writer:
        for i, group in enumerate([0, 0, -1]):
            writer.add(*make_sample(i), branch_group=group)
    ds = TrajectoryDataset(tmp_path / "ds")
    assert ds.has("branch_groups") and [ds[i].branch_group for i in range(3)] == [0, 0, -1]
    np.testing.assert_array_equal(ds.load("branch_groups"), [0, 0, -1])
    assert json.loads((tmp_path / "ds" / "index.json").read_text())["version"] == 2
    assert TrajectoryDataset(_plain(tmp_path))[0].branch_group is None
    with pytest.raises(DatasetError, match="branch_group"):
        DatasetWriter(tmp_path / "bad", META).add(*make_sample(0), branch_group=-2)


def test_merge_keeps_every_sample_and_never_joins_two_sources_groups(tmp_path):
    """``data merge``: the samples of every source in order, shards linked, and the scene ids and branch groups of the
    second source renumbered past the first's (two sources' group 0 are different saved states)."""
    for name, groups, first in (("a", [0, 0, -1], 0), ("b", [-1, 0, 0, 1, 1], 10)):
        with DatasetWriter(tmp_path / name, META, shard_size=2) as writer:
            for i, group in enumerate(groups):
                writer.add(*make_sample(first + i), kind="a", scene_id=max(group, 0), branch_group=group)
    merged = TrajectoryDataset(Path(merge_datasets(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])).parent)
    assert len(merged) == 8 and len(merged.shard_names) == 5
    np.testing.assert_array_equal(merged.load("images")[:, 0, 0, 0], [0, 1, 2, 10, 11, 12, 13, 14])
    np.testing.assert_array_equal(merged.load("tracks"), np.concatenate(
        [TrajectoryDataset(tmp_path / n).load("tracks") for n in "ab"]))
    np.testing.assert_array_equal(merged.load("branch_groups"), [0, 0, -1, -1, 1, 1, 2, 2])
    np.testing.assert_array_equal(merged.load("scene_ids"), [0, 0, 0, 1, 1, 1, 2, 2])
    assert [entry["num_samples"] for entry in merged.meta.source["merged_from"]] == [3, 5]
    with pytest.raises(DatasetError, match="exists"):
        merge_datasets(tmp_path / "m", [tmp_path / "a"])
    other = DatasetMeta(image_size=(16, 16), query_grid=(4, 4), query_stride=4.0, query_offset=1.5, num_frames=3,
                        kinds=["a", "c"])
    with DatasetWriter(tmp_path / "c", other) as writer:
        writer.add(*make_sample(0), kind="a", scene_id=0, branch_group=0)
    with pytest.raises(DatasetError, match="kinds differ"):
        merge_datasets(tmp_path / "n", [tmp_path / "a", tmp_path / "c"])
    assert not (tmp_path / "n").exists()


def _plain(tmp_path):
    with DatasetWriter(tmp_path / "plain", META) as writer:
        writer.add(*make_sample(0))
    return tmp_path / "plain"


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="no index.json"):
        TrajectoryDataset(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(DatasetError, match="format"):
        TrajectoryDataset(tmp_path)


def test_import_tracker_output_in_points_first_layout(tmp_path):
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    grid = np.broadcast_to(META.query_points(), (3, 4, 4, 2))
    libero_style = np.stack([grid.reshape(3, 16, 2).transpose(1, 0, 2)] * 2)  # [N, P, T, 2]
    import_arrays(tmp_path / "user", images, libero_style, META, layout="ptc")
    ds = TrajectoryDataset(tmp_path / "user")
    np.testing.assert_allclose(ds[1].tracks[0], grid)
    assert ds[1].object_ids is None and ds[1].kind is None
    with pytest.raises(DatasetError, match="query grid"):
        import_arrays(tmp_path / "shifted", images, libero_style + 3.0, META, layout="ptc")
    with pytest.raises(DatasetError, match="points"):
        tracks_to_grid(np.zeros((3, 15, 2)), (4, 4), "tpc")
    with pytest.raises(DatasetError, match="layout"):
        tracks_to_grid(np.zeros((3, 16, 2)), (4, 4), "xyz")


def test_model_geometry_check_names_the_mismatch():
    from traj_forecast_ros.model.presets import tiny_config

    with pytest.raises(DatasetError, match="query grid"):
        META.check_model_geometry(tiny_config(text=False))


def test_write_synthetic_dataset(tmp_path):
    config = GeneratorConfig(num_frames=4, rollouts=2, query_grid=(8, 8), query_stride=16.0, query_offset=7.5)
    write_dataset(tmp_path / "syn", 3, seed=0, config=config, shard_size=2, kinds=["rest", "fall"])
    ds = TrajectoryDataset(tmp_path / "syn")
    assert len(ds) == 3 and ds.meta.num_rollouts == 2 and ds.kind_names() == ["rest", "fall", "rest"]
    assert ds[1].tracks.shape == (2, 4, 8, 8, 2) and ds.meta.source["seed"] == 0
    with pytest.raises(DatasetError, match="already holds"):
        write_dataset(tmp_path / "syn", 3, seed=0, config=config)


def test_indexing_across_shards_matches_gather_and_reuses_memory_maps(tmp_path):
    with DatasetWriter(tmp_path / "ds", META, shard_size=2) as writer:
        for i in range(5):
            image, tracks = make_sample(i)
            writer.add(image, tracks, kind="ab"[i % 2])
    ds = TrajectoryDataset(tmp_path / "ds")
    for i in (4, 0, 3, 1, 2, -1):
        np.testing.assert_array_equal(ds[i].tracks, ds.gather("tracks", [i % 5])[0])
        np.testing.assert_array_equal(ds[i].image, ds.gather("images", [i % 5])[0])
    assert ds.shard(1).images is ds.shard(1).images  # each shard file is memory-mapped once
