"""Sharded on-disk trajectory datasets (synthetic scenes or user data from any point tracker).

Layout of a dataset directory::

    <dataset>/
      index.json                     format, geometry, fields, shard list (below)
      shard-00000.images.npy         [N, H, W, 3] uint8   the conditioning image (frame 0)
      shard-00000.tracks.npy         [N, R, T, Hq, Wq, 2] float32, (x, y) pixels of that image, R rollouts
      shard-00000.object_ids.npy     [N, Hq, Wq] int16    optional; 0 = static background, k > 0 = object k
      shard-00000.kinds.npy          [N] int16            optional; index into index.json "kinds"
      shard-00000.frames.npy         [N, T, H, W, 3] uint8 optional; every frame of rollout 0 (visualisation)
      shard-00000.visibility.npy     [N, R, T, Hq, Wq] uint8 optional (version 2); 1 = the point is seen in that frame
      shard-00000.views.npy          [N] int16            optional (version 2); index into index.json "views"
      shard-00000.instructions.npy   [N] int16            optional (version 2); index into index.json "instructions"
      shard-00000.scene_ids.npy      [N] int32            optional (version 2); samples of one simulated reset state
      shard-00000.branch_groups.npy  [N] int32            optional (version 2); -1, or a group id: samples with one id
                                                          share the frame-0 image and view, and differ in instruction
                                                          and true future (branches rolled out from one saved state)
      shard-00000.depth.npy          [N, H, W] float16    optional (version 2); metric depth of the image (metres)
      shard-00000.segmentation.npy   [N, H, W] uint8      optional (version 2); per-pixel class, index into
                                                          index.json "segmentation_classes"
      shard-00001.*.npy ...

Every array is a plain ``.npy`` file, so a reader memory-maps one shard at a time (``np.load(mmap_mode="r")``)
and never holds the whole dataset in memory. ``index.json``::

    {"format": "traj-forecast-dataset", "version": 1,
     "image_size": [H, W], "query_grid": [Hq, Wq], "query_stride": s, "query_offset": o,
     "num_frames": T, "num_rollouts": R, "frame_interval_s": dt | null,
     "fields": ["images", "tracks", ...], "kinds": ["fall", ...] | null,
     "num_samples": N_total, "shards": [{"name": "shard-00000", "num_samples": n}, ...],
     "source": {...free-form provenance: generator settings, tracker name...},
     "views": ["agentview", ...] | absent, "instructions": ["put the can in the bin", ...] | absent,
     "segmentation_classes": ["empty", "static", "robot", ...] | absent}

``depth`` and ``segmentation`` are dense labels of the conditioning image (frame 0), used to pretrain the image
encoder (:mod:`traj_forecast_ros.train.encoder`).

A dataset that stores any of the version-2 fields is written as version 2 (so an older reader refuses it clearly);
every other dataset stays version 1, and this reader reads both.

Tracks are absolute positions (not displacements) in the pixels of the stored image; frame 0 is the query grid
(``x = offset + stride * j``, ``y = offset + stride * i``). Points without a position (occluded and not tracked)
are not allowed: trackers such as CoTracker give a position for every point and frame. User data goes in through
:class:`~traj_forecast_ros.data.dataset_writer.DatasetWriter` (or
:func:`~traj_forecast_ros.data.dataset_writer.import_arrays` / ``traj-forecast data import``); images must already be
at the model's input size, with the tracks in those pixels.

This module is the format and its reader; writing and importing are in :mod:`traj_forecast_ros.data.dataset_writer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from traj_forecast_ros.errors import DatasetError
from traj_forecast_ros.geometry import query_grid

FORMAT_NAME = "traj-forecast-dataset"
FORMAT_VERSION = 2  # the newest version this reader understands (version 1 = without the V2_FIELDS)
INDEX_FILE = "index.json"
REQUIRED_FIELDS = ("images", "tracks")
OPTIONAL_FIELDS = ("object_ids", "kinds", "frames", "visibility", "views", "instructions", "scene_ids",
                   "branch_groups", "depth", "segmentation")
V2_FIELDS = ("visibility", "views", "instructions", "scene_ids", "branch_groups", "depth", "segmentation")
NO_BRANCH_GROUP = -1  # the branch_groups value of a sample that has no sibling branches
FIELD_DTYPES = {"images": np.uint8, "tracks": np.float32, "object_ids": np.int16, "kinds": np.int16,
                "frames": np.uint8, "visibility": np.uint8, "views": np.int16, "instructions": np.int16,
                "scene_ids": np.int32, "branch_groups": np.int32, "depth": np.float16, "segmentation": np.uint8}


@dataclass
class DatasetMeta:
    """Geometry and provenance shared by every sample of a dataset (the non-shard part of ``index.json``)."""

    image_size: Tuple[int, int]
    query_grid: Tuple[int, int]
    query_stride: float
    query_offset: float
    num_frames: int
    num_rollouts: int = 1
    frame_interval_s: Optional[float] = None
    kinds: Optional[List[str]] = None
    source: Dict[str, Any] = field(default_factory=dict)
    views: Optional[List[str]] = None  # camera names the "views" field indexes
    instructions: Optional[List[str]] = None  # the closed instruction set the "instructions" field indexes
    segmentation_classes: Optional[List[str]] = None  # names of the "segmentation" field's class ids

    def query_points(self) -> np.ndarray:
        """``[Hq, Wq, 2]`` float32 query grid (x, y) of this dataset."""
        return query_grid(self)

    def check_model_geometry(self, config) -> None:
        """Raise :class:`DatasetError` when a ``ModelConfig`` expects a different image, grid or length."""
        problems = []
        if tuple(config.image_size) != tuple(self.image_size):
            problems.append(f"image size {tuple(self.image_size)} vs model {tuple(config.image_size)}")
        if tuple(config.query_grid) != tuple(self.query_grid):
            problems.append(f"query grid {tuple(self.query_grid)} vs model {tuple(config.query_grid)}")
        if abs(config.query_stride - self.query_stride) > 1e-6 or abs(config.query_offset - self.query_offset) > 1e-6:
            problems.append(f"query stride/offset {self.query_stride}/{self.query_offset} vs model "
                            f"{config.query_stride}/{config.query_offset}")
        if int(config.num_frames) != int(self.num_frames):
            problems.append(f"{self.num_frames} frames vs model {config.num_frames}")
        if problems:
            raise DatasetError("dataset does not match the model: " + "; ".join(problems))


@dataclass
class Shard:
    """The arrays of one shard (memory-mapped when read from disk); absent optional fields are None."""

    images: np.ndarray  # [n, H, W, 3] uint8
    tracks: np.ndarray  # [n, R, T, Hq, Wq, 2] float32
    object_ids: Optional[np.ndarray] = None  # [n, Hq, Wq] int16
    kinds: Optional[np.ndarray] = None  # [n] int16
    frames: Optional[np.ndarray] = None  # [n, T, H, W, 3] uint8
    visibility: Optional[np.ndarray] = None  # [n, R, T, Hq, Wq] uint8
    views: Optional[np.ndarray] = None  # [n] int16
    instructions: Optional[np.ndarray] = None  # [n] int16
    scene_ids: Optional[np.ndarray] = None  # [n] int32
    branch_groups: Optional[np.ndarray] = None  # [n] int32, NO_BRANCH_GROUP where a sample has no branches
    depth: Optional[np.ndarray] = None  # [n, H, W] float16 metres
    segmentation: Optional[np.ndarray] = None  # [n, H, W] uint8 class ids

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Sample:
    """One dataset entry."""

    image: np.ndarray  # [H, W, 3] uint8
    tracks: np.ndarray  # [R, T, Hq, Wq, 2] float32
    object_ids: Optional[np.ndarray]  # [Hq, Wq] int16
    kind: Optional[str]
    frames: Optional[np.ndarray] = None  # [T, H, W, 3] uint8
    visibility: Optional[np.ndarray] = None  # [R, T, Hq, Wq] bool
    view: Optional[str] = None
    instruction: Optional[str] = None
    scene_id: Optional[int] = None
    branch_group: Optional[int] = None
    depth: Optional[np.ndarray] = None  # [H, W] float32 metres
    segmentation: Optional[np.ndarray] = None  # [H, W] uint8 class ids



# ------------------------------------------------------------------------------------------------ index
def write_index(root: Union[str, Path], meta: DatasetMeta, fields: Sequence[str],
                shards: Sequence[Dict[str, Any]]) -> Path:
    """Write ``index.json`` for shards already on disk (``[{"name": ..., "num_samples": n}, ...]``); the version is 2
    when any of :data:`V2_FIELDS` is stored, else 1. Returns the index path."""
    fields = list(fields)
    unknown = sorted(set(fields) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown or not set(REQUIRED_FIELDS) <= set(fields):
        raise DatasetError(f"fields {fields} must include {list(REQUIRED_FIELDS)} and only known optional fields")
    index = {
        "format": FORMAT_NAME,
        "version": 2 if set(fields) & set(V2_FIELDS) else 1,
        "image_size": list(meta.image_size),
        "query_grid": list(meta.query_grid),
        "query_stride": float(meta.query_stride),
        "query_offset": float(meta.query_offset),
        "num_frames": int(meta.num_frames),
        "num_rollouts": int(meta.num_rollouts),
        "frame_interval_s": meta.frame_interval_s,
        "fields": fields,
        "kinds": meta.kinds,
        "num_samples": int(sum(int(shard["num_samples"]) for shard in shards)),
        "shards": [dict(shard) for shard in shards],
        "source": meta.source,
    }
    if meta.views is not None:
        index["views"] = list(meta.views)
    if meta.instructions is not None:
        index["instructions"] = list(meta.instructions)
    if meta.segmentation_classes is not None:
        index["segmentation_classes"] = list(meta.segmentation_classes)
    path = Path(root) / INDEX_FILE
    path.write_text(json.dumps(index, indent=1))
    return path



# ------------------------------------------------------------------------------------------------ reading
class TrajectoryDataset:
    """Read a dataset directory shard by shard (memory-mapped), or sample by sample.

    ``len(ds)``, ``ds[i] -> Sample``, ``ds.iter_shards() -> Shard`` (one shard in memory at a time),
    ``ds.meta -> DatasetMeta``, ``ds.load(field)`` (one field of every shard, concatenated).
    """

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise DatasetError(f"{self.root}: no {INDEX_FILE}; not a trajectory dataset (see traj-forecast data -h)")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{index_path}: invalid JSON ({exc})") from exc
        if index.get("format") != FORMAT_NAME:
            raise DatasetError(f"{index_path}: format is {index.get('format')!r}, expected {FORMAT_NAME!r}")
        if int(index.get("version", -1)) > FORMAT_VERSION:
            raise DatasetError(f"{index_path}: format version {index['version']} is newer than this reader "
                               f"({FORMAT_VERSION}); update traj_forecast_ros")
        if not isinstance(index, dict):
            raise DatasetError(f"{index_path}: not a dataset index (expected a JSON object)")
        self.index = index
        try:
            self._read_index(index)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"{index_path}: malformed ({type(exc).__name__}: {exc})") from exc
        self._maps: Dict[Tuple[int, str], np.ndarray] = {}

    def _read_index(self, index: Dict[str, Any]) -> None:
        """Geometry, fields and shards from ``index.json``; shard names must name files inside the dataset folder."""
        self.meta = DatasetMeta(
            image_size=tuple(index["image_size"]),
            query_grid=tuple(index["query_grid"]),
            query_stride=float(index["query_stride"]),
            query_offset=float(index["query_offset"]),
            num_frames=int(index["num_frames"]),
            num_rollouts=int(index.get("num_rollouts", 1)),
            frame_interval_s=index.get("frame_interval_s"),
            kinds=index.get("kinds"),
            source=index.get("source", {}),
            views=index.get("views"),
            instructions=index.get("instructions"),
            segmentation_classes=index.get("segmentation_classes"),
        )
        self.fields: Tuple[str, ...] = tuple(index["fields"])
        unknown = set(self.fields) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
        if unknown or not set(REQUIRED_FIELDS) <= set(self.fields):
            raise DatasetError(f"{self.root}: fields {list(self.fields)} must include {list(REQUIRED_FIELDS)} and only "
                               f"known optional fields")
        self.shard_names = [s["name"] for s in index["shards"]]
        self.shard_sizes = [int(s["num_samples"]) for s in index["shards"]]
        for name, size in zip(self.shard_names, self.shard_sizes):
            if not isinstance(name, str) or not name or any(mark in name for mark in ("/", "\\", "\0")):
                raise DatasetError(f"{self.root}: shard name {name!r} is not a plain file name inside the dataset "
                                   "folder")
            if size < 0:
                raise DatasetError(f"{self.root}: shard {name} has {size} samples")
        self._offsets = np.cumsum([0] + self.shard_sizes)
        if int(index.get("num_samples", self._offsets[-1])) != int(self._offsets[-1]):
            raise DatasetError(f"{self.root}: index.json says {index['num_samples']} samples, its shards hold "
                               f"{int(self._offsets[-1])}")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def has(self, field_name: str) -> bool:
        """Whether the optional field is stored."""
        return field_name in self.fields

    def _load_array(self, shard: int, field_name: str) -> np.ndarray:
        key = (shard, field_name)
        if key in self._maps:
            return self._maps[key]
        path = self.root / f"{self.shard_names[shard]}.{field_name}.npy"
        if not path.is_file():
            raise DatasetError(f"{path}: missing (index.json lists field '{field_name}')")
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise DatasetError(f"{path}: unreadable ({exc})") from exc
        if array.ndim == 0 or array.shape[0] != self.shard_sizes[shard]:
            held = array.shape[0] if array.ndim else "no"
            raise DatasetError(f"{path}: holds {held} samples, index.json says {self.shard_sizes[shard]}")
        self._check_values(path, field_name, array)
        self._maps[key] = array  # memory maps are lazy: keeping them open costs no memory
        return array

    def _check_values(self, path: Path, field_name: str, array: np.ndarray) -> None:
        """Truth tracks must be finite and name indices must index their list (checked once per shard and field)."""
        if field_name == "tracks":
            for first in range(0, len(array), 16):  # a few rows at a time: a shard is never all in memory
                if not np.isfinite(array[first:first + 16]).all():
                    raise DatasetError(f"{path}: tracks hold NaN/Inf (every point needs a position in every frame)")
        names = {"kinds": self.meta.kinds, "views": self.meta.views,
                 "instructions": self.meta.instructions}.get(field_name)
        if names and array.size and (int(array.min()) < 0 or int(array.max()) >= len(names)):
            raise DatasetError(f"{path}: {field_name} indices {int(array.min())}..{int(array.max())} do not all "
                               f"index the {len(names)} {field_name} of index.json")

    def shard(self, shard: int) -> Shard:
        """The arrays of shard number ``shard``."""
        if not 0 <= shard < len(self.shard_names):
            raise IndexError(f"shard {shard} out of range (dataset has {len(self.shard_names)})")
        arrays = {name: self._load_array(shard, name) for name in self.fields}
        return Shard(**arrays)

    def iter_shards(self) -> Iterator[Shard]:
        """Yield every shard in order (only one is referenced at a time)."""
        for shard in range(len(self.shard_names)):
            yield self.shard(shard)

    def locate(self, index: int) -> Tuple[int, int]:
        """``(shard, row)`` of sample ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range (dataset has {len(self)})")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return shard, int(index - self._offsets[shard])

    def __getitem__(self, index: int) -> Sample:
        shard_id, row = self.locate(index)
        shard = self.shard(shard_id)  # cheap: the shard's memory maps are opened once and kept
        kinds = self.meta.kinds
        return Sample(
            image=np.asarray(shard.images[row]),
            tracks=np.asarray(shard.tracks[row]),
            object_ids=None if shard.object_ids is None else np.asarray(shard.object_ids[row]),
            kind=None if shard.kinds is None or not kinds else kinds[int(shard.kinds[row])],
            frames=None if shard.frames is None else np.asarray(shard.frames[row]),
            visibility=None if shard.visibility is None else np.asarray(shard.visibility[row]).astype(bool),
            view=None if shard.views is None or not self.meta.views else self.meta.views[int(shard.views[row])],
            instruction=(None if shard.instructions is None or not self.meta.instructions
                         else self.meta.instructions[int(shard.instructions[row])]),
            scene_id=None if shard.scene_ids is None else int(shard.scene_ids[row]),
            branch_group=None if shard.branch_groups is None else int(shard.branch_groups[row]),
            depth=None if shard.depth is None else np.asarray(shard.depth[row], dtype=np.float32),
            segmentation=None if shard.segmentation is None else np.asarray(shard.segmentation[row]),
        )

    def load(self, field_name: str, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """One field of all samples (or of ``indices``), concatenated into memory."""
        if field_name not in self.fields:
            raise DatasetError(f"{self.root}: field '{field_name}' is not stored (fields: {list(self.fields)})")
        if indices is None:
            return np.concatenate([np.asarray(self._load_array(s, field_name)) for s in range(len(self.shard_names))])
        return self.gather(field_name, indices)

    def gather(self, field_name: str, indices: Sequence[int]) -> np.ndarray:
        """Rows ``indices`` of one field (any order, repeats allowed), reading only those rows of each shard."""
        if field_name not in self.fields:
            raise DatasetError(f"{self.root}: field '{field_name}' is not stored (fields: {list(self.fields)})")
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)} samples")
        shards = np.searchsorted(self._offsets, indices, side="right") - 1
        out: Optional[np.ndarray] = None
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            rows = indices[where] - self._offsets[shard]
            order = np.argsort(rows, kind="stable")  # ascending reads from the memory map
            values = np.asarray(self._load_array(int(shard), field_name)[rows[order]])
            if out is None:
                out = np.empty((len(indices), *values.shape[1:]), dtype=values.dtype)
            out[where[order]] = values
        if out is None:
            raise DatasetError(f"{self.root}: no samples to read (gather got no index; the dataset holds {len(self)})")
        return out

    def kind_names(self) -> List[Optional[str]]:
        """The scene kind of every sample (None where the dataset has no kinds)."""
        if not self.has("kinds") or not self.meta.kinds:
            return [None] * len(self)
        return [self.meta.kinds[int(k)] for k in self.load("kinds")]
