"""Frame-0 dense labels (depth, segmentation) as optional dataset fields, and the simulator's class mapping."""

import json

import numpy as np
import pytest

from traj_forecast_ros.data.dataset import DatasetMeta, TrajectoryDataset
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.data.sim_clips import segmentation_classes, segmentation_lookup
from traj_forecast_ros.data.sim_config import SEGMENTATION_CLASSES, SimConfig
from traj_forecast_ros.data.sim_manipulation import dataset_meta
from traj_forecast_ros.data.sim_tracks import NO_BODY
from traj_forecast_ros.errors import DatasetError

CLASSES = ["empty", "static", "robot", "object 1"]


def _meta(classes=CLASSES) -> DatasetMeta:
    return DatasetMeta(image_size=(16, 16), query_grid=(4, 4), query_stride=4.0, query_offset=1.5, num_frames=3,
                       segmentation_classes=classes)


def _tracks(meta: DatasetMeta) -> np.ndarray:
    return np.repeat(meta.query_points()[None], meta.num_frames, axis=0)  # [T, Hq, Wq, 2]


def test_depth_and_segmentation_round_trip(tmp_path):
    meta = _meta()
    rng = np.random.default_rng(0)
    depths = rng.uniform(0.2, 3.0, (3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), (3, 16, 16))
    image = np.zeros((16, 16, 3), np.uint8)
    with DatasetWriter(tmp_path / "d", meta, shard_size=2) as writer:
        for depth, label in zip(depths, labels):
            writer.add(image, _tracks(meta), depth=depth, segmentation=label)
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["version"] == 2 and index["segmentation_classes"] == CLASSES
    assert {"depth", "segmentation"} <= set(index["fields"])
    dataset = TrajectoryDataset(tmp_path / "d")
    assert dataset.meta.segmentation_classes == CLASSES
    for i in range(3):  # across both shards
        sample = dataset[i]
        assert sample.depth.dtype == np.float32 and sample.depth.shape == (16, 16)
        np.testing.assert_allclose(sample.depth, depths[i], rtol=1e-3)  # stored as float16
        np.testing.assert_array_equal(sample.segmentation, labels[i])
    assert dataset.gather("segmentation", [2, 0]).shape == (2, 16, 16)


def test_datasets_without_labels_stay_version_1_and_read_none(tmp_path):
    meta = _meta(classes=None)
    with DatasetWriter(tmp_path / "v1", meta) as writer:
        writer.add(np.zeros((16, 16, 3), np.uint8), _tracks(meta))
    index = json.loads((tmp_path / "v1" / "index.json").read_text())
    assert index["version"] == 1 and "segmentation_classes" not in index
    sample = TrajectoryDataset(tmp_path / "v1")[0]
    assert sample.depth is None and sample.segmentation is None


@pytest.mark.parametrize("depth, segmentation, message", [
    (np.full((16, 16), np.nan, np.float32), None, "finite"),
    (-np.ones((16, 16), np.float32), None, ">= 0"),
    (np.ones((8, 8), np.float32), None, "depth must be float"),
    (np.ones((16, 16), np.int32), None, "depth must be float"),
    (None, np.full((16, 16), 4), "segmentation ids"),
    (None, np.full((16, 16), -1), "segmentation ids"),
    (None, np.zeros((16, 16), np.float32), "segmentation must be integer"),
])
def test_bad_labels_are_refused(tmp_path, depth, segmentation, message):
    meta = _meta()
    with pytest.raises(DatasetError, match=message):
        DatasetWriter(tmp_path / "bad", meta).add(np.zeros((16, 16, 3), np.uint8), _tracks(meta), depth=depth,
                                                   segmentation=segmentation)


def test_segmentation_without_class_names_is_refused(tmp_path):
    meta = _meta(classes=None)
    with pytest.raises(DatasetError, match="segmentation_classes"):
        DatasetWriter(tmp_path / "bad", meta).add(np.zeros((16, 16, 3), np.uint8), _tracks(meta),
                                                   segmentation=np.zeros((16, 16), np.int64))


def test_simulator_bodies_map_to_classes():
    names = ["world", "table", "robot0_link1", "gripper0_right_hand", "cube_main", "can", "milk", "bread", "cereal",
             "extra", "mount0_base"]
    weld = np.array([0, 0, 2, 2, 4, 5, 6, 7, 8, 9, 0])
    moving = [2, 3, 4, 5, 6, 7, 8, 9]
    lookup = segmentation_lookup(names, weld, moving)
    cls = {name: SEGMENTATION_CLASSES[lookup[i]] for i, name in enumerate(names)}
    assert cls["world"] == cls["table"] == cls["mount0_base"] == "static"
    assert cls["robot0_link1"] == cls["gripper0_right_hand"] == "robot"
    assert [cls[n] for n in ("cube_main", "can", "milk", "bread", "cereal")] == [f"object {k}" for k in range(1, 6)]
    assert cls["extra"] == "object 5"  # more objects than classes: the last class takes the rest
    body_map = np.array([[NO_BODY, 1], [2, 4]])
    np.testing.assert_array_equal(segmentation_classes(body_map, lookup),
                                  [[0, 1], [2, SEGMENTATION_CLASSES.index("object 1")]])


def test_generated_metadata_names_the_classes_only_with_labels():
    assert dataset_meta(SimConfig(), 0, "train").segmentation_classes == list(SEGMENTATION_CLASSES)
    assert dataset_meta(SimConfig(dense_labels=False), 0, "train").segmentation_classes is None
