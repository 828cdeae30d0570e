"""Settings of the simulated manipulation generator: the scenes, views, task kinds and segmentation classes, and
:class:`SimConfig` (clip geometry, timing, jitter, scene mix). Pure Python: nothing here needs the sim extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from traj_forecast_ros.geometry import query_grid

SCENES: Tuple[str, ...] = ("lift", "stack", "pick_place", "door", "pick_place_single", "nut_assembly")
# door is opt-in: robosuite's Door scene puts the door where agentview sees mostly the robot's base, not the door
DEFAULT_SCENES: Tuple[str, ...] = ("lift", "stack", "pick_place")
# the v2 training mix (scripts/train_sim.sh): the default scenes, PickPlace with one object, and both nuts
WIDE_SCENES: Tuple[str, ...] = ("lift", "stack", "pick_place", "pick_place_single", "nut_assembly")
TASK_KINDS: Tuple[str, ...] = ("reach", "pick_lift", "pick_place", "push", "door")
VIEWS: Tuple[str, ...] = ("agentview", "robot0_eye_in_hand")
SPLITS: Dict[str, int] = {"train": 0, "test": 1}
ENV_NAMES = {"lift": "Lift", "stack": "Stack", "pick_place": "PickPlace", "door": "Door",
             "pick_place_single": "PickPlaceSingle", "nut_assembly": "NutAssembly"}
HIDDEN_GEOM_GROUP = 5  # a geom group no renderer draws (robosuite shows groups 1 and 2)
# Per-pixel classes of the frame-0 "segmentation" label (encoder pretraining): nothing drawn, geometry welded to the
# world (table, bins, arena, door frame), the robot (arm and gripper), then each movable object of the scene in body
# order (the last class also takes any further objects).
MAX_OBJECT_CLASSES = 5
SEGMENTATION_CLASSES: Tuple[str, ...] = ("empty", "static", "robot") + tuple(
    f"object {k}" for k in range(1, MAX_OBJECT_CLASSES + 1))
ROBOT_BODY_PREFIXES = ("robot", "gripper")  # robosuite names robot bodies robot0_*, gripper0_*


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class SimConfig:
    """Geometry, timing and scene mix of the generator."""

    image_size: int = 128
    num_frames: int = 16  # T per clip, including frame 0
    control_freq: int = 20  # Hz (robosuite default, LIBERO's rate)
    frame_stride: int = 2  # control steps between rendered frames: frame interval = stride / control_freq
    clip_hop: int = 8  # rendered frames between clip starts within an episode
    query_grid: Tuple[int, int] = (32, 32)
    query_stride: float = 4.0
    query_offset: float = 1.5
    episodes_per_shard: int = 4
    goals_per_scene: int = 2  # distinct goals rolled out from each branch point (same frame-0 image)
    # Rendered frames of the first goal's episode (clip starts) from which every other goal is rolled out for one
    # clip: 0 branches at rest, later frames while the arm is already moving. Empty: whole episodes from the reset
    # state per goal (the v1 layout, where only clip 0 is shared).
    branch_frames: Tuple[int, ...] = ()
    # > 0: the goals of a branch group head first for places at least this far apart (metres) and share the first
    # goal's speed, so their futures part at once (sim_tasks.draw_distinct_goals); 0: distinct instructions only
    goal_parting_m: float = 0.0
    scenes: Tuple[str, ...] = DEFAULT_SCENES
    max_episode_steps: int = 180
    camera_jitter_m: float = 0.03  # agentview position jitter (std per axis, metres)
    camera_jitter_deg: float = 2.0  # agentview viewing-direction jitter (std, degrees)
    light_jitter: float = 0.25  # relative diffuse intensity jitter (uniform +-)
    visibility_abs_tol_m: float = 0.01
    visibility_rel_tol: float = 0.02
    dense_labels: bool = True  # store frame-0 depth (metres) and segmentation classes for encoder pretraining

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scenes) - set(SCENES))
        if unknown:
            raise ValueError(f"unknown scenes {unknown}; choose from {SCENES}")
        if self.num_frames < 2 or self.frame_stride < 1 or self.clip_hop < 1 or self.episodes_per_shard < 1:
            raise ValueError("num_frames >= 2, frame_stride >= 1, clip_hop >= 1, episodes_per_shard >= 1 required")
        if self.goals_per_scene < 1:
            raise ValueError("goals_per_scene must be >= 1")
        if not self.goal_parting_m >= 0:
            raise ValueError(f"goal_parting_m must be >= 0, got {self.goal_parting_m}")
        self.branch_frames = tuple(sorted({int(f) for f in self.branch_frames}))
        if any(f < 0 or f % self.clip_hop for f in self.branch_frames):
            raise ValueError(f"branch_frames must be clip starts (multiples of clip_hop={self.clip_hop}), got "
                             f"{list(self.branch_frames)}")
        self.query_grid = (int(self.query_grid[0]), int(self.query_grid[1]))
        self.scenes = tuple(self.scenes)

    @property
    def frame_interval_s(self) -> float:
        """Seconds between consecutive clip frames."""
        return self.frame_stride / self.control_freq

    def query_points(self) -> np.ndarray:
        """``[Hq, Wq, 2]`` float32 query grid (x, y)."""
        return query_grid(self)
