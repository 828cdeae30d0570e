"""LIBERO-like simulated manipulation clips with exact point tracks (``traj-forecast data sim-manipulation``).

Needs the optional extra installed by ``bash scripts/setup_sim.sh`` (robosuite + MuJoCo) and an offscreen OpenGL: on a CPU
``apt-get install -y libosmesa6`` and ``MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa`` (set by the CLI when unset). The
core package never imports this module's simulator code: robosuite is imported inside the functions that need it.

What one episode is:

* a robosuite Panda scene (``lift``: one cube; ``stack``: two cubes; ``pick_place``: milk, bread, cereal and can in a
  bin beside an empty bin; ``door``: a hinged door without latch), reset from a seed: object placements, robot
  initial joint noise, light colour/intensity/direction, and ``agentview`` camera jitter (position and viewing
  direction) all come from the episode's random stream;
* a scripted task on the OSC_POSE controller (``reach``, ``pick_lift``, ``pick_place``, ``push``, ``door``) with a
  randomly chosen goal among the scene's several plausible ones (which object, which target, which direction) and a
  random speed, and an instruction string naming the goal ("put the can in the back left of the right bin");
* rendered every ``frame_stride`` control steps in both LIBERO views (``agentview``, ``robot0_eye_in_hand``) at
  128 x 128: depth + per-element segmentation every rendered frame (cheap), RGB only where a clip starts.

Clips: windows of ``num_frames`` rendered frames starting every ``clip_hop`` frames. Each clip and view is one
dataset sample: the RGB image at the window's first frame, exact tracks of the query grid through the window
(:mod:`traj_forecast_ros.data.sim_tracks`: lifted with frame-0 depth and element ids mapped to bodies, moved with the
body poses, projected with each frame's camera; visibility by a depth test against each frame's depth render),
the per-point object ids (0 = static), the task kind, view, instruction and scene id.

Splits and determinism: sample streams are keyed by ``(seed, split, shard, episode)``; ``train`` and ``test`` use
disjoint streams (so the test split holds unseen placements, lighting, camera jitter and seeds). A shard is a fixed
list of episodes, so a shard's content depends only on its key; shards are generated in parallel processes, each
written atomically (``shard-XXXXX.*.npy`` + ``shard-XXXXX.done.json``), and a rerun skips finished shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from traj_forecast_ros.data import sim_tracks
from traj_forecast_ros.data.dataset import NO_BRANCH_GROUP
from traj_forecast_ros.data.sim_tasks import (
    EpisodePlan,
    ScriptedPolicy,
    all_instructions,
    draw_distinct_goals,
    eef_position,
    goal_waypoints,
    plan_episode,
)

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
        from traj_forecast_ros.geometry import query_grid

        return query_grid(self)


# ------------------------------------------------------------------------------------------------ environments
def make_env(scene: str, config: SimConfig):
    """A robosuite environment for ``scene`` that renders offscreen (no camera observations: we render ourselves)."""
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(controller="BASIC", robot="Panda")
    kwargs: Dict[str, Any] = dict(
        robots="Panda", controller_configs=controller, has_renderer=False, has_offscreen_renderer=True,
        use_camera_obs=False, use_object_obs=False, control_freq=config.control_freq, horizon=100000,
        ignore_done=True, hard_reset=False, seed=0,
    )
    if scene == "door":
        kwargs["use_latch"] = False
    env = robosuite.make(ENV_NAMES[scene], **kwargs)
    env.reset()
    model = env.sim.model
    # Render only what a camera would see: no site markers (drawn into the depth and segmentation buffers even
    # when hidden in RGB) and no translucent helper geoms (IK target markers, PickPlace's ghost objects in the bin).
    env.sim._render_context_offscreen.vopt.sitegroup[:] = 0
    translucent = np.asarray(model.geom_rgba)[:, 3] < 1.0
    model.geom_group[translucent] = HIDDEN_GEOM_GROUP
    env._tf_defaults = {  # what the per-episode jitter starts from
        "cam_pos": np.array(model.cam_pos), "cam_quat": np.array(model.cam_quat),
        "light_diffuse": np.array(model.light_diffuse), "light_dir": np.array(model.light_dir),
    }
    return env


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def reset_episode(env, rng: np.random.Generator, config: SimConfig) -> Dict[str, Any]:
    """Reset placements and robot noise from ``rng``, jitter lights and the agentview camera; returns what was drawn."""
    env.rng.bit_generator.state = np.random.default_rng(int(rng.integers(2**63))).bit_generator.state
    env.reset()
    model = env.sim.model
    defaults = env._tf_defaults
    cam = model.camera_name2id("agentview")
    model.cam_pos[:] = defaults["cam_pos"]
    model.cam_quat[:] = defaults["cam_quat"]
    offset = rng.normal(0.0, config.camera_jitter_m, 3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(config.camera_jitter_deg) * float(rng.normal())
    turn = np.array([math.cos(angle / 2), *(axis * math.sin(angle / 2))])
    model.cam_pos[cam] = defaults["cam_pos"][cam] + offset
    model.cam_quat[cam] = _quat_mul(defaults["cam_quat"][cam], turn)
    scale = 1.0 + rng.uniform(-config.light_jitter, config.light_jitter, (model.nlight, 1))
    tint = 1.0 + rng.uniform(-0.08, 0.08, (model.nlight, 3))
    model.light_diffuse[:] = np.clip(defaults["light_diffuse"] * scale * tint, 0.0, 1.0)
    direction = defaults["light_dir"] + rng.normal(0.0, 0.15, defaults["light_dir"].shape)
    model.light_dir[:] = direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    env.sim.forward()
    return {"camera_offset_m": offset.round(4).tolist(), "camera_turn_deg": round(math.degrees(angle), 3)}


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class FrameState:
    """What is kept of one rendered frame."""

    body_pos: np.ndarray  # [B, 3]
    body_rot: np.ndarray  # [B, 3, 3]
    cameras: Dict[str, np.ndarray]  # view -> [4, 4] world-from-camera
    depth: Dict[str, np.ndarray]  # view -> [H, W] metres, top row first
    bodies: Dict[str, np.ndarray]  # view -> [H, W] body id (NO_BODY where nothing), top row first
    rgb: Dict[str, np.ndarray] = field(default_factory=dict)  # view -> [H, W, 3] uint8 (only at clip starts)


def render_frame(env, config: SimConfig, with_rgb: bool) -> FrameState:
    """Render both views (segmentation + depth; RGB when asked) and record camera and body poses."""
    import mujoco

    sim = env.sim
    model = sim.model
    size = config.image_size
    near, far = sim_tracks.clip_planes(model)
    zero_far = int(sim._render_context_offscreen.con.readDepthMap) == int(mujoco.mjtDepthMap.mjDEPTH_ZEROFAR)
    geom_type = int(mujoco.mjtObj.mjOBJ_GEOM)
    geom_body = np.asarray(model.geom_bodyid)
    state = FrameState(body_pos=np.array(sim.data.xpos), body_rot=np.array(sim.data.xmat).reshape(-1, 3, 3),
                       cameras={}, depth={}, bodies={})
    for view in VIEWS:
        cam = model.camera_name2id(view)
        state.cameras[view] = sim_tracks.extrinsic_matrix(sim.data.cam_xpos[cam], sim.data.cam_xmat[cam])
        seg, raw = sim.render(size, size, camera_name=view, depth=True, segmentation=True)
        seg, raw = seg[::-1], raw[::-1]  # MuJoCo reads bottom row first
        is_geom = seg[..., 0] == geom_type  # robosuite: channel 0 = object type, 1 = object id
        state.bodies[view] = np.where(is_geom, geom_body[np.where(is_geom, seg[..., 1], 0)], sim_tracks.NO_BODY)
        state.depth[view] = sim_tracks.depth_buffer_to_metres(raw, near, far, zero_far=zero_far)
        if with_rgb:
            state.rgb[view] = np.ascontiguousarray(sim.render(size, size, camera_name=view)[::-1])
    return state


def run_episode(env, policy: ScriptedPolicy, config: SimConfig,
                snapshots: Optional[Dict[int, Any]] = None) -> List[FrameState]:
    """Step the scripted policy; render every ``frame_stride`` steps (RGB at clip starts). Stops a few frames after
    the script ends, but always renders at least one full clip. Keys of ``snapshots`` are rendered frame indices:
    each gets the simulator state (``env.sim.get_state()``) at that frame."""
    frames: List[FrameState] = []
    steps_per_clip = (config.num_frames - 1) * config.frame_stride
    step = 0
    done_at: Optional[int] = None
    while True:
        if step % config.frame_stride == 0:
            index = step // config.frame_stride
            if snapshots is not None and index in snapshots:
                snapshots[index] = env.sim.get_state()
            frames.append(render_frame(env, config, with_rgb=index % config.clip_hop == 0))
            finished = done_at is not None and step - done_at >= 4 * config.frame_stride
            if step >= steps_per_clip and (finished or step >= config.max_episode_steps):
                # trim to the last window that starts at a clip start
                usable = (len(frames) - config.num_frames) // config.clip_hop * config.clip_hop + config.num_frames
                return frames[:usable]
        env.step(policy.act(eef_position(env)))
        if policy.done and done_at is None:
            done_at = step
        step += 1


def run_branch(env, state: Any, first_frame: FrameState, plan: EpisodePlan, config: SimConfig) -> List[FrameState]:
    """Roll ``plan``'s goal out for one clip (``num_frames`` frames) from ``state``, the simulator state saved at the
    rendered frame ``first_frame`` of another episode, which becomes the branch's frame 0.

    Reusing that frame keeps the frames' convention exact: robosuite renders right after ``mj_step``, whose kinematics
    (body poses) are those of the state before the step's integration, so re-rendering the restored state after
    ``forward`` would differ by one physics substep. ``forward`` only serves the policy's first end-effector reading.
    """
    env.sim.set_state(state)
    env.sim.forward()
    policy = ScriptedPolicy(goal_waypoints(plan, env), plan.speed)
    frames = [first_frame]
    while len(frames) < config.num_frames:
        for _ in range(config.frame_stride):
            env.step(policy.act(eef_position(env)))
        frames.append(render_frame(env, config, with_rgb=False))
    return frames


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


# ------------------------------------------------------------------------------------------------ shards
def episode_rng(seed: int, split: str, shard: int, scene_index: int) -> np.random.Generator:
    """The random stream of one scene (reset state) of a shard; train and test streams never overlap."""
    return np.random.default_rng([int(seed), SPLITS[split], int(shard), int(scene_index)])


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def dataset_meta(config: SimConfig, seed: int, split: str):
    """The :class:`~traj_forecast_ros.data.dataset.DatasetMeta` of a generated split."""
    from traj_forecast_ros.data.dataset import DatasetMeta

    return DatasetMeta(
        image_size=(config.image_size, config.image_size), query_grid=config.query_grid,
        query_stride=config.query_stride, query_offset=config.query_offset, num_frames=config.num_frames,
        num_rollouts=1, frame_interval_s=config.frame_interval_s, kinds=list(TASK_KINDS),
        views=list(VIEWS), instructions=all_instructions(),
        segmentation_classes=list(SEGMENTATION_CLASSES) if config.dense_labels else None,
        source={"generator": "traj_forecast_ros.data.sim_manipulation", "seed": int(seed), "split": split,
                "config": asdict(config), "simulator": simulator_versions()},
    )


def simulator_versions() -> Dict[str, str]:
    """Versions of the simulator packages (recorded in the dataset's provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("robosuite", "mujoco"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


class ClipWriter:
    """Writes an episode's clips of one shard, per view, with the scene's camera geometry and labels."""

    def __init__(self, writer, config: SimConfig) -> None:
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


def branched_scene(env, rng: np.random.Generator, scene: str, reset_seed: int, config: SimConfig,
                   clips: ClipWriter) -> List[Dict[str, Any]]:
    """One reset state, ``goals_per_scene`` distinct goals: the first goal's whole episode, and from each of its
    ``branch_frames`` every other goal rolled out for one clip. The clips that start at a branch frame (the first
    goal's and the branches') share their frame-0 image and form a branch group per view. Returns the episode
    records."""
    drawn = reset_episode(env, np.random.default_rng(reset_seed), config)
    goals = draw_distinct_goals(rng, scene, env, config.goals_per_scene)
    snapshots: Dict[int, Any] = {frame: None for frame in config.branch_frames}
    lead = goals[0]
    frames = run_episode(env, ScriptedPolicy(goal_waypoints(lead, env), lead.speed), config, snapshots)
    # a branch point needs the lead's own clip there, and a sibling goal
    points = {frame: index for index, frame in enumerate(config.branch_frames)
              if len(goals) > 1 and snapshots[frame] is not None and frame + config.num_frames <= len(frames)}
    records = [{**asdict(lead), "scene_id": clips.scene_id, "frames": len(frames), "branch_frames": sorted(points),
                "skipped_nonfinite": clips.write(frames, lead, groups=points), **drawn}]
    for frame, index in points.items():
        for plan in goals[1:]:
            branch = run_branch(env, snapshots[frame], frames[frame], plan, config)
            skipped = clips.write(branch, plan, first_frame=frame, groups={frame: index})
            records.append({**asdict(plan), "scene_id": clips.scene_id, "frames": len(branch),
                            "branch_of_frame": frame, "skipped_nonfinite": skipped})
    return records


def generate_shard(root: Path, split: str, shard: int, seed: int, config: SimConfig,
                   envs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Generate shard ``shard`` of ``split`` into ``root`` (atomically); returns its ``done.json`` record."""
    from traj_forecast_ros.data.dataset import DatasetWriter

    envs = {} if envs is None else envs
    started = time.monotonic()
    meta = dataset_meta(config, seed, split)
    staging = root / f".{shard_name(shard)}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    episodes: List[Dict[str, Any]] = []
    with DatasetWriter(staging, meta, shard_size=1 << 30) as writer:
        clips = ClipWriter(writer, config)
        scene_count = max(1, config.episodes_per_shard // config.goals_per_scene)
        for scene_index in range(scene_count):
            rng = episode_rng(seed, split, shard, scene_index)
            scene = config.scenes[int(rng.integers(len(config.scenes)))]
            if scene not in envs:
                envs[scene] = make_env(scene, config)
            env = envs[scene]
            reset_seed = int(rng.integers(2**63))
            clips.start_scene(env, scene_id=shard * scene_count + scene_index)
            if config.branch_frames:
                episodes += branched_scene(env, rng, scene, reset_seed, config, clips)
                continue
            for goal in range(config.goals_per_scene):
                drawn = reset_episode(env, np.random.default_rng(reset_seed), config)  # the same state per goal
                plan, waypoints = plan_episode(rng, scene, env)
                frames = run_episode(env, ScriptedPolicy(waypoints, plan.speed), config)
                skipped = clips.write(frames, plan)
                episodes.append({**asdict(plan), "scene_id": clips.scene_id, "frames": len(frames),
                                 "skipped_nonfinite": skipped, **drawn})
    count = clips.count
    fields = json.loads((staging / "index.json").read_text())["fields"]
    name = shard_name(shard)
    for path in sorted(staging.glob("shard-00000.*.npy")):
        os.replace(path, root / path.name.replace("shard-00000", name))
    shutil.rmtree(staging, ignore_errors=True)
    record = {"name": name, "num_samples": count, "branched_samples": clips.grouped, "fields": fields,
              "episodes": episodes,
              "seconds": round(time.monotonic() - started, 2)}
    done = root / f"{name}.done.json"
    done.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    os.replace(done.with_suffix(".tmp"), done)
    return record


_WORKER_ENVS: Dict[str, Any] = {}  # per worker process: robosuite envs by scene, built once (about 5 s each)


def _worker(task: Tuple[str, str, int, int, Dict[str, Any]]) -> Dict[str, Any]:
    root, split, shard, seed, config_dict = task
    config = SimConfig(**config_dict)
    return generate_shard(Path(root), split, shard, seed, config, envs=_WORKER_ENVS)


def ensure_offscreen_gl() -> None:
    """Default to OSMesa (CPU) rendering unless the user chose a GL backend (must run before MuJoCo loads)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    if os.environ["MUJOCO_GL"] == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


def write_sim_dataset(root, split: str, num_shards: int, seed: int, config: SimConfig, workers: int = 1,
                      progress: bool = True) -> Path:
    """Generate ``num_shards`` shards of ``split`` into ``root`` (resuming: finished shards are kept) and write
    ``index.json``. Returns the index path. Raises ValueError on a bad split or a dataset made with other settings."""
    from traj_forecast_ros.data.dataset import write_index

    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose from {sorted(SPLITS)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    settings = {"seed": int(seed), "split": split, "config": json.loads(json.dumps(asdict(config)))}
    settings_path = root / "generator.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(f"{root} was generated with other settings ({settings_path}); use another --out or "
                             "the same settings to resume")
    else:
        settings_path.write_text(json.dumps(settings, indent=1))
    pending = [s for s in range(num_shards) if not (root / f"{shard_name(s)}.done.json").exists()]
    ensure_offscreen_gl()
    tasks = [(str(root), split, shard, int(seed), asdict(config)) for shard in pending]
    from tqdm import tqdm

    bar = tqdm(total=num_shards, initial=num_shards - len(pending), unit="shard", desc=f"sim {split}",
               disable=not progress)
    if workers <= 1:
        for task in tasks:
            record = _worker(task)
            bar.update(1)
            bar.set_postfix(samples=record["num_samples"])
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for record in pool.imap_unordered(_worker, tasks):
                bar.update(1)
                bar.set_postfix(samples=record["num_samples"])
    bar.close()
    records = [json.loads((root / f"{shard_name(s)}.done.json").read_text()) for s in range(num_shards)]
    records = [r for r in records if r["num_samples"] > 0]  # a shard whose every clip was skipped has no files
    if not records:
        raise ValueError(f"{root}: no samples were generated")
    fields = records[0]["fields"]
    meta = dataset_meta(config, seed, split)
    meta.source["seconds"] = round(sum(r["seconds"] for r in records), 2)
    meta.source["episodes"] = sum(len(r["episodes"]) for r in records)
    return write_index(root, meta, fields, [{"name": r["name"], "num_samples": r["num_samples"]} for r in records])
