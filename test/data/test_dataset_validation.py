"""Hand-made broken datasets (issue 21, defect 8): the reader refuses them with a DatasetError naming the problem,
never reads outside the dataset folder, and ``traj-forecast evaluate`` prints one line instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traj_forecast_ros.cli import main as cli_main
from traj_forecast_ros.data.dataset import INDEX_FILE, DatasetMeta, TrajectoryDataset
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.errors import DatasetError

META = DatasetMeta(image_size=(24, 24), query_grid=(6, 6), query_stride=4.0, query_offset=1.5, num_frames=5,
                   kinds=["fall", "push"])


def write_dataset(root: Path, samples: int = 3) -> Path:
    rng = np.random.default_rng(0)
    query = META.query_points()
    with DatasetWriter(root, META, shard_size=8) as writer:
        for index in range(samples):
            tracks = np.repeat(query[None, None], 5, axis=1) + rng.normal(0, 1, (1, 5, 6, 6, 2)).astype(np.float32)
            tracks[:, 0] = query
            writer.add(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), tracks, kind=META.kinds[index % 2])
    return root


def edit_index(root: Path, edit) -> None:
    index = json.loads((root / INDEX_FILE).read_text())
    edit(index)
    (root / INDEX_FILE).write_text(json.dumps(index))


def evaluate_cli(root: Path, capsys) -> str:
    """Run ``traj-forecast evaluate --data root`` (baselines only); it must exit 2 with one line on stderr."""
    code = cli_main(["evaluate", "--data", str(root), "--samples", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("traj-forecast evaluate: ") and "Traceback" not in err, err
    return lines[0]


def test_a_valid_dataset_still_evaluates(tmp_path, capsys):
    assert cli_main(["evaluate", "--data", str(write_dataset(tmp_path / "ok")), "--samples", "2"]) == 0
    assert "zero_motion" in capsys.readouterr().out


def test_a_shard_count_that_lies_is_one_line(tmp_path, capsys):
    root = write_dataset(tmp_path / "lies")
    edit_index(root, lambda index: index["shards"][0].update(num_samples=5) or index.update(num_samples=5))
    assert "index.json says 5" in evaluate_cli(root, capsys)


def test_a_total_that_disagrees_with_the_shards_is_refused(tmp_path):
    root = write_dataset(tmp_path / "total")
    edit_index(root, lambda index: index.update(num_samples=7))
    with pytest.raises(DatasetError, match="says 7 samples, its shards hold 3"):
        TrajectoryDataset(root)


def test_zero_samples_is_one_line(tmp_path, capsys):
    root = write_dataset(tmp_path / "empty")
    edit_index(root, lambda index: index.update(shards=[], num_samples=0))
    assert "no samples" in evaluate_cli(root, capsys)


def test_nan_truth_tracks_are_refused_not_a_bincount_value_error(tmp_path, capsys):
    root = write_dataset(tmp_path / "nan")
    tracks = np.load(root / "shard-00000.tracks.npy")
    tracks[1, 0, 2, 1, 1, 0] = np.nan
    np.save(root / "shard-00000.tracks.npy", tracks)
    assert "NaN/Inf" in evaluate_cli(root, capsys)


def test_an_out_of_range_kind_is_refused_not_an_index_error(tmp_path, capsys):
    root = write_dataset(tmp_path / "kind")
    np.save(root / "shard-00000.kinds.npy", np.array([0, 1, 7], np.int16))
    assert "kinds indices 0..7" in evaluate_cli(root, capsys)


@pytest.mark.parametrize("name", ["../../outside", "/etc/shard", "sub/shard", ""])
def test_shard_names_cannot_leave_the_dataset_folder(tmp_path, capsys, name):
    root = write_dataset(tmp_path / "data" / "set")
    outside = write_dataset(tmp_path / "outside_data")
    for path in outside.glob("shard-00000.*.npy"):  # what "../../outside" would read
        path.rename(tmp_path / path.name.replace("shard-00000", "outside"))
    edit_index(root, lambda index: index["shards"][0].update(name=name))
    with pytest.raises(DatasetError, match="not a plain file name inside the dataset folder"):
        TrajectoryDataset(root)
    assert "not a plain file name" in evaluate_cli(root, capsys)


@pytest.mark.parametrize("edit", [lambda index: index.pop("image_size"), lambda index: index.update(shards=[7]),
                                  lambda index: index.update(fields=["images"]), lambda index: index.clear()],
                         ids=["missing-key", "shard-not-object", "no-tracks-field", "empty"])
def test_a_malformed_index_is_a_dataset_error(tmp_path, edit):
    root = write_dataset(tmp_path / "malformed")
    edit_index(root, edit)
    with pytest.raises(DatasetError):
        TrajectoryDataset(root)
