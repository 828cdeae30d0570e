"""Rendered episodes to dataset samples: every clip window x view with its exact tracks, visibility, compact object
ids and frame-0 dense labels (:func:`clip_samples`), and :class:`ClipWriter`, which writes them for one scene.
Pure numpy on the simulator's arrays.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from traj_forecast_ros.data import sim_tracks
from traj_forecast_ros.data.dataset import NO_BRANCH_GROUP
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.data.sim_config import ROBOT_BODY_PREFIXES, SEGMENTATION_CLASSES, VIEWS, SimConfig
from traj_forecast_ros.data.sim_episodes import FrameState
from traj_forecast_ros.data.sim_tasks import EpisodePlan


def compact_object_ids(body_ids: np.ndarray, body_weld: np.ndarray, moving_bodies: Sequence[int]) -> np.ndarray:
    """Per-point object id: 0 for static geometry (welded to the world) and empty pixels, else 1 + the body's index
    in ``moving_bodies`` (a fixed list per scene, so ids mean the same body across a scene's samples)."""
    lookup = np.zeros(len(body_weld) + 1, dtype=np.int16)  # last entry: NO_BODY
    for index, body in enumerate(moving_bodies):
        lookup[body] = index + 1
    ids = np.where(body_ids == sim_tracks.NO_BODY, len(body_weld), body_ids)
    return lookup[ids]


def segmentation_lookup(body_names: Sequence[str], body_weld: np.ndarray, moving_bodies: Sequence[int]) -> np.ndarray:
    """``[num_bodies + 1]`` uint8 table: body id -> :data:`SEGMENTATION_CLASSES` index (last entry: ``NO_BODY``).

    Welded bodies are ``static``, bodies named ``robot*`` / ``gripper*`` are ``robot``, and the other moving bodies
    are ``object k`` in the order of ``moving_bodies`` (capped at the last object class)."""
    lookup = np.zeros(len(body_weld) + 1, dtype=np.uint8)  # NO_BODY (last entry) -> empty
    lookup[:len(body_weld)] = SEGMENTATION_CLASSES.index("static")
    first_object = SEGMENTATION_CLASSES.index("object 1")
    objects = 0
    for body in moving_bodies:
        if str(body_names[body]).startswith(ROBOT_BODY_PREFIXES):
            lookup[body] = SEGMENTATION_CLASSES.index("robot")
        else:
            lookup[body] = min(first_object + objects, len(SEGMENTATION_CLASSES) - 1)
            objects += 1
    return lookup


def segmentation_classes(body_map: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """``[H, W]`` body ids (``NO_BODY`` where empty) -> ``[H, W]`` uint8 class ids through :func:`segmentation_lookup`."""
    ids = np.where(body_map == sim_tracks.NO_BODY, len(lookup) - 1, body_map)
    return lookup[ids]


def clip_samples(frames: List[FrameState], intrinsics: Dict[str, np.ndarray], config: SimConfig,
                 moving_bodies: Sequence[int], body_weld: np.ndarray, sky_depth: float,
                 class_lookup: Optional[np.ndarray] = None, first_frame: int = 0) -> List[Dict[str, Any]]:
    """Every clip window x view of an episode as dataset sample fields (image, tracks, visibility, object_ids and,
    with ``class_lookup`` (:func:`segmentation_lookup`), frame-0 ``depth`` and ``segmentation``). ``start_frame``
    counts from ``first_frame``, the episode frame that ``frames[0]`` is (a branch starts mid-episode)."""
    query = config.query_points().astype(np.float64)
    rows, cols = config.query_grid
    samples = []
    for start in range(0, len(frames) - config.num_frames + 1, config.clip_hop):
        window = frames[start:start + config.num_frames]
        body_pos = np.stack([f.body_pos for f in window])
        body_rot = np.stack([f.body_rot for f in window])
        for view in VIEWS:
            clip = sim_tracks.clip_tracks(
                query, window[0].bodies[view], window[0].depth[view], intrinsics[view],
                np.stack([f.cameras[view] for f in window]), body_pos, body_rot,
                depth_maps=np.stack([f.depth[view] for f in window]),
                abs_tolerance=config.visibility_abs_tol_m, rel_tolerance=config.visibility_rel_tol,
                sky_depth=sky_depth)
            samples.append({
                "image": window[0].rgb[view],
                "tracks": clip.tracks.reshape(config.num_frames, rows, cols, 2).astype(np.float32),
                "visibility": clip.visible.reshape(config.num_frames, rows, cols),
                "object_ids": compact_object_ids(clip.body_ids, body_weld, moving_bodies).reshape(rows, cols),
                "view": view,
                "start_frame": start + first_frame,
                "depth": None if class_lookup is None else window[0].depth[view].astype(np.float32),
                "segmentation": (None if class_lookup is None
                                 else segmentation_classes(window[0].bodies[view], class_lookup)),
            })
    return samples


def camera_intrinsics(env, config: SimConfig) -> Dict[str, np.ndarray]:
    """view -> ``[3, 3]`` pinhole intrinsics of the scene's cameras at the rendered size."""
    model = env.sim.model
    size = config.image_size
    return {view: sim_tracks.intrinsic_matrix(float(model.cam_fovy[model.camera_name2id(view)]), size, size)
            for view in VIEWS}


def moving_body_list(env) -> List[int]:
    """Bodies not welded to the world (robot links, gripper, objects, door leaf), in id order."""
    weld = np.asarray(env.sim.model.body_weldid)
    return [int(b) for b in range(1, len(weld)) if weld[b] != 0]


class ClipWriter:
    """Writes an episode's clips of one shard, per view, with the scene's camera geometry and labels."""

    def __init__(self, writer: DatasetWriter, config: SimConfig) -> None:
        self.writer = writer
        self.config = config
        self.count = 0  # samples written
        self.grouped = 0  # samples written with a branch group
        self.scene_id = -1
        self._geometry: Tuple[Any, ...] = ()

    def start_scene(self, env, scene_id: int) -> None:
        """Take the geometry of ``env`` (intrinsics, moving bodies, labels) for the clips of scene ``scene_id``."""
        model = env.sim.model
        intrinsics = camera_intrinsics(env, self.config)
        moving = moving_body_list(env)
        weld = np.asarray(model.body_weldid)
        names = [model.body_id2name(b) or "" for b in range(len(weld))]
        lookup = segmentation_lookup(names, weld, moving) if self.config.dense_labels else None
        self._geometry = (intrinsics, self.config, moving, weld, sim_tracks.clip_planes(model)[1], lookup)
        self.scene_id = int(scene_id)

    def branch_group(self, branch_index: int, view: str) -> int:
        """The dataset-wide id of the branch group of (this scene, branch point ``branch_index``, ``view``)."""
        points = len(self.config.branch_frames)
        return (self.scene_id * points + branch_index) * len(VIEWS) + VIEWS.index(view)

    def write(self, frames: List[FrameState], plan: EpisodePlan, first_frame: int = 0,
              groups: Optional[Dict[int, int]] = None) -> int:
        """Write every clip of ``frames`` (episode frames from ``first_frame`` on) under ``plan``'s instruction.
        ``groups`` maps a clip's start frame to its branch point index (in branch mode every clip gets a
        ``branch_group``, -1 when it has no branches). Returns the number of clips skipped for non-finite tracks."""
        skipped = 0
        for sample in clip_samples(frames, *self._geometry, first_frame=first_frame):
            if not np.isfinite(sample["tracks"]).all():  # a point exactly in the camera plane: no pixel
                skipped += 1
                continue
            group = None
            if groups is not None:
                index = groups.get(sample["start_frame"])
                group = NO_BRANCH_GROUP if index is None else self.branch_group(index, sample["view"])
                self.grouped += int(index is not None)
            self.writer.add(sample["image"], sample["tracks"], object_ids=sample["object_ids"], kind=plan.kind,
                            visibility=sample["visibility"], view=sample["view"], instruction=plan.instruction,
                            scene_id=self.scene_id, depth=sample["depth"], segmentation=sample["segmentation"],
                            branch_group=group)
            self.count += 1
        return skipped
