"""Writing trajectory datasets: :class:`DatasetWriter` validates each sample and writes shards,
:func:`import_arrays` brings any point tracker's output in (``traj-forecast data import``), and
:func:`merge_datasets` joins datasets (``traj-forecast data merge``). The format itself, its
``index.json`` and the reader are in :mod:`traj_forecast_ros.data.dataset`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from traj_forecast_ros.data.dataset import (
    FIELD_DTYPES,
    INDEX_FILE,
    NO_BRANCH_GROUP,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    DatasetMeta,
    TrajectoryDataset,
    write_index,
)
from traj_forecast_ros.errors import DatasetError


# ------------------------------------------------------------------------------------------------ writing
class DatasetWriter:
    """Append samples and write them as shards of ``shard_size`` plus ``index.json`` (use as a context manager).

    >>> with DatasetWriter(out_dir, meta) as writer:
    ...     writer.add(image, tracks, object_ids=ids, kind="fall")
    """

    def __init__(self, root: Union[str, Path], meta: DatasetMeta, shard_size: int = 256,
                 overwrite: bool = False) -> None:
        self.root = Path(root)
        if (self.root / INDEX_FILE).exists() and not overwrite:
            raise DatasetError(f"{self.root} already holds a dataset ({INDEX_FILE}); choose another --out")
        if shard_size < 1:
            raise DatasetError(f"shard_size must be >= 1, got {shard_size}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.shard_size = int(shard_size)
        self._pending: Dict[str, List[np.ndarray]] = {}
        self._shards: List[Dict[str, Any]] = []
        self._fields: Optional[Tuple[str, ...]] = None
        self._count = 0
        self._closed = False

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def add(self, image: np.ndarray, tracks: np.ndarray, object_ids: Optional[np.ndarray] = None,
            kind: Optional[str] = None, frames: Optional[np.ndarray] = None, visibility: Optional[np.ndarray] = None,
            view: Optional[str] = None, instruction: Optional[str] = None, scene_id: Optional[int] = None,
            depth: Optional[np.ndarray] = None, segmentation: Optional[np.ndarray] = None,
            branch_group: Optional[int] = None) -> None:
        """Add one sample; ``tracks`` is ``[T, Hq, Wq, 2]`` or ``[R, T, Hq, Wq, 2]`` pixels. Validates everything.

        Optional (version 2): ``visibility`` bool ``[T, Hq, Wq]`` / ``[R, T, Hq, Wq]``; ``view`` and ``instruction``
        must be in ``meta.views`` / ``meta.instructions``; ``scene_id`` >= 0 groups samples of one reset state;
        ``branch_group`` (>= 0, or :data:`NO_BRANCH_GROUP`) groups samples with one frame-0 image and view whose
        instructions and futures differ;
        ``depth`` ``[H, W]`` metres (finite, >= 0) and ``segmentation`` ``[H, W]`` integer class ids (below
        ``len(meta.segmentation_classes)``) label the image.
        """
        meta = self.meta
        image = np.asarray(image)
        tracks = np.asarray(tracks)
        where = f"sample {self._count}"
        if image.dtype != np.uint8 or image.shape != (*meta.image_size, 3):
            raise DatasetError(f"{where}: image must be uint8 {(*meta.image_size, 3)}, got {image.dtype} "
                               f"{image.shape} (resize/crop it to the model size first)")
        if tracks.ndim == 4:
            tracks = tracks[None]
        expected = (meta.num_rollouts, meta.num_frames, *meta.query_grid, 2)
        if tracks.shape != expected:
            raise DatasetError(f"{where}: tracks must be [R, T, Hq, Wq, 2] = {list(expected)}, "
                               f"got {list(tracks.shape)}")
        if not np.isfinite(tracks).all():
            raise DatasetError(f"{where}: tracks contain NaN/Inf (fill occluded points: every point needs a position)")
        values = {"images": image, "tracks": tracks.astype(np.float32)}
        if object_ids is not None:
            object_ids = np.asarray(object_ids)
            if object_ids.shape != tuple(meta.query_grid) or not np.issubdtype(object_ids.dtype, np.integer):
                raise DatasetError(f"{where}: object_ids must be integer {tuple(meta.query_grid)}, got "
                                   f"{object_ids.dtype} {object_ids.shape}")
            values["object_ids"] = object_ids.astype(np.int16)
        if kind is not None:
            if not meta.kinds or kind not in meta.kinds:
                raise DatasetError(f"{where}: kind '{kind}' is not in the dataset kinds {meta.kinds}")
            values["kinds"] = np.int16(meta.kinds.index(kind))
        if frames is not None:
            frames = np.asarray(frames)
            if frames.dtype != np.uint8 or frames.shape != (meta.num_frames, *meta.image_size, 3):
                raise DatasetError(f"{where}: frames must be uint8 {(meta.num_frames, *meta.image_size, 3)}, "
                                   f"got {frames.dtype} {frames.shape}")
            values["frames"] = frames
        if visibility is not None:
            visibility = np.asarray(visibility)
            if visibility.ndim == 3:
                visibility = visibility[None]
            if visibility.shape != expected[:-1] or visibility.dtype not in (np.bool_, np.uint8):
                raise DatasetError(f"{where}: visibility must be bool [R, T, Hq, Wq] = {list(expected[:-1])}, got "
                                   f"{visibility.dtype} {list(visibility.shape)}")
            values["visibility"] = visibility.astype(np.uint8)
        for name, value, choices in (("views", view, meta.views), ("instructions", instruction, meta.instructions)):
            if value is None:
                continue
            if not choices or value not in choices:
                raise DatasetError(f"{where}: {name[:-1]} '{value}' is not in the dataset {name} {choices}")
            values[name] = np.int16(choices.index(value))
        if scene_id is not None:
            if int(scene_id) < 0 or int(scene_id) > np.iinfo(np.int32).max:
                raise DatasetError(f"{where}: scene_id must be in [0, 2^31), got {scene_id}")
            values["scene_ids"] = np.int32(scene_id)
        if branch_group is not None:
            if int(branch_group) < NO_BRANCH_GROUP or int(branch_group) > np.iinfo(np.int32).max:
                raise DatasetError(f"{where}: branch_group must be -1 or in [0, 2^31), got {branch_group}")
            values["branch_groups"] = np.int32(branch_group)
        values.update(_dense_labels(where, meta, depth, segmentation))
        fields = tuple(name for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS) if name in values)
        if self._fields is None:
            self._fields = fields
        elif fields != self._fields:
            raise DatasetError(f"{where}: has fields {list(fields)} but earlier samples had {list(self._fields)}")
        for name, value in values.items():
            self._pending.setdefault(name, []).append(value)
        self._count += 1
        if len(self._pending["images"]) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending.get("images"):
            return
        name = f"shard-{len(self._shards):05d}"
        for field_name, values in self._pending.items():
            np.save(self.root / f"{name}.{field_name}.npy", np.stack(values).astype(FIELD_DTYPES[field_name]))
        self._shards.append({"name": name, "num_samples": len(self._pending["images"])})
        self._pending = {}

    def close(self) -> Path:
        """Write the last shard and ``index.json``; returns the index path."""
        if self._closed:
            return self.root / INDEX_FILE
        self._flush()
        path = write_index(self.root, self.meta, self._fields or REQUIRED_FIELDS, self._shards)
        self._closed = True
        return path


def _dense_labels(where: str, meta: DatasetMeta, depth: Optional[np.ndarray],
                  segmentation: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """Validated ``depth`` / ``segmentation`` label arrays of one sample (absent ones left out)."""
    values: Dict[str, np.ndarray] = {}
    size = tuple(meta.image_size)
    if depth is not None:
        depth = np.asarray(depth)
        if depth.shape != size or not np.issubdtype(depth.dtype, np.floating):
            raise DatasetError(f"{where}: depth must be float {size} metres, got {depth.dtype} {depth.shape}")
        if not np.isfinite(depth).all() or (depth < 0).any() or depth.max() > np.finfo(np.float16).max:
            raise DatasetError(f"{where}: depth must be finite, >= 0 and below 65504 m")
        values["depth"] = depth.astype(np.float16)
    if segmentation is not None:
        segmentation = np.asarray(segmentation)
        classes = meta.segmentation_classes
        if segmentation.shape != size or not np.issubdtype(segmentation.dtype, np.integer):
            raise DatasetError(f"{where}: segmentation must be integer {size}, got {segmentation.dtype} "
                               f"{segmentation.shape}")
        if not classes or segmentation.min() < 0 or segmentation.max() >= len(classes):
            raise DatasetError(f"{where}: segmentation ids must index the dataset's segmentation_classes {classes}")
        values["segmentation"] = segmentation.astype(np.uint8)
    return values



# ------------------------------------------------------------------------------------------------ user data
def tracks_to_grid(tracks: np.ndarray, grid: Tuple[int, int], layout: str) -> np.ndarray:
    """Bring one clip of tracker output into ``[T, Hq, Wq, 2]``.

    ``layout``: ``"grid"`` (already ``[T, Hq, Wq, 2]``), ``"tpc"`` (``[T, P, 2]``, CoTracker style) or ``"ptc"``
    (``[P, T, 2]``, the LIBERO shards) with ``P = Hq * Wq`` points in row-major grid order.
    """
    tracks = np.asarray(tracks)
    rows, cols = grid
    if layout == "grid":
        if tracks.ndim != 4 or tracks.shape[1:] != (rows, cols, 2):
            raise DatasetError(f"grid tracks must be [T, {rows}, {cols}, 2], got {list(tracks.shape)}")
        return tracks
    if layout not in ("tpc", "ptc"):
        raise DatasetError(f"unknown track layout '{layout}'; use grid, tpc ([T, P, 2]) or ptc ([P, T, 2])")
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise DatasetError(f"{layout} tracks must be 3-D with a last axis of 2, got {list(tracks.shape)}")
    if layout == "ptc":
        tracks = tracks.transpose(1, 0, 2)  # [T, P, 2]
    if tracks.shape[1] != rows * cols:
        raise DatasetError(f"tracks have {tracks.shape[1]} points, the {rows}x{cols} query grid needs {rows * cols}")
    return tracks.reshape(tracks.shape[0], rows, cols, 2)


def import_arrays(root: Union[str, Path], images: np.ndarray, tracks: np.ndarray, meta: DatasetMeta,
                  layout: str = "grid", object_ids: Optional[np.ndarray] = None,
                  query_tolerance_px: float = 0.75, shard_size: int = 256, overwrite: bool = False) -> Path:
    """Write user data (``images [N, H, W, 3]``, per-clip tracks ``[N, ...]`` in ``layout``) as a dataset.

    Frame 0 of every clip must be the dataset's query grid within ``query_tolerance_px`` (the model is always
    queried on its grid); a mismatch raises :class:`DatasetError` naming the clip and the error.
    """
    images = np.asarray(images)
    tracks = np.asarray(tracks)
    if images.ndim != 4 or len(images) != len(tracks):
        raise DatasetError(f"need images [N, H, W, 3] and one track array per image; got images {list(images.shape)}"
                           f" and {len(tracks)} track arrays")
    query = meta.query_points()
    with DatasetWriter(root, meta, shard_size=shard_size, overwrite=overwrite) as writer:
        for i in range(len(images)):
            grid_tracks = tracks_to_grid(tracks[i], meta.query_grid, layout)
            error = float(np.abs(grid_tracks[0] - query).max())
            if error > query_tolerance_px:
                raise DatasetError(f"clip {i}: frame 0 differs from the query grid by up to {error:.2f} px (> "
                                   f"{query_tolerance_px}); track the model's grid (offset {meta.query_offset}, "
                                   f"stride {meta.query_stride})")
            writer.add(images[i], grid_tracks, object_ids=None if object_ids is None else object_ids[i])
    return Path(root) / INDEX_FILE


# ------------------------------------------------------------------------------------------------ merging
SAME_META = ("image_size", "query_grid", "query_stride", "query_offset", "num_frames", "num_rollouts",
             "frame_interval_s", "kinds", "views", "instructions", "segmentation_classes")
RENUMBERED_FIELDS = ("scene_ids", "branch_groups")  # ids that mean "the same simulated state": unique per source


def merge_datasets(root: Union[str, Path], sources: List[Union[str, Path]]) -> Path:
    """One dataset at ``root`` holding every sample of ``sources`` in order (``traj-forecast data merge``).

    The sources must agree on geometry, fields and label lists. Shard files are hard-linked where the file system
    allows (else copied); scene ids and branch groups are renumbered so that two sources never share one. Returns
    the index path. Raises :class:`DatasetError` on a mismatch or an existing ``root``."""
    root = Path(root)
    if not sources:
        raise DatasetError("merge needs at least one source dataset")
    if root.exists():
        raise DatasetError(f"{root} exists; merge writes a new dataset directory")
    datasets = [TrajectoryDataset(source) for source in sources]
    first = datasets[0]
    for dataset in datasets[1:]:
        differs = [name for name in SAME_META if getattr(dataset.meta, name) != getattr(first.meta, name)]
        if differs or dataset.fields != first.fields:
            raise DatasetError(f"{dataset.root} does not match {first.root}: "
                               f"{', '.join(differs) if differs else 'fields'} differ")
    staging = root.with_name(f".{root.name}.partial")  # renamed to root once complete
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards, offsets = [], {name: 0 for name in RENUMBERED_FIELDS}
    for dataset in datasets:
        next_offsets = dict(offsets)
        for name, size in zip(dataset.shard_names, dataset.shard_sizes):
            merged = f"shard-{len(shards):05d}"
            for field_name in dataset.fields:
                source, target = dataset.root / f"{name}.{field_name}.npy", staging / f"{merged}.{field_name}.npy"
                if field_name in RENUMBERED_FIELDS:
                    ids = np.load(source)
                    renumbered = np.where(ids >= 0, ids + offsets[field_name], ids).astype(FIELD_DTYPES[field_name])
                    np.save(target, renumbered)
                    if (ids >= 0).any():
                        next_offsets[field_name] = max(next_offsets[field_name], int(renumbered.max()) + 1)
                    continue
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            shards.append({"name": merged, "num_samples": size})
        offsets = next_offsets
    meta = DatasetMeta(**{name: getattr(first.meta, name) for name in SAME_META},
                       source={"merged_from": [{"path": str(d.root), "num_samples": len(d), "source": d.meta.source}
                                               for d in datasets]})
    write_index(staging, meta, list(first.fields), shards)
    staging.rename(root)
    return root / INDEX_FILE
