"""Robosuite scenes rendered as episodes: the environment of a scene, the per-episode reset (placements, lights,
camera jitter), one rendered frame (depth, body ids, RGB at clip starts, camera and body poses), a scripted episode
and a branch rolled out from a saved state.

robosuite and MuJoCo (the sim extra, ``bash scripts/setup_sim.sh``) are imported inside the functions that need
them, so this module imports without them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from traj_forecast_ros.data import sim_tracks
from traj_forecast_ros.data.sim_config import ENV_NAMES, HIDDEN_GEOM_GROUP, VIEWS, SimConfig
from traj_forecast_ros.data.sim_tasks import EpisodePlan, ScriptedPolicy, eef_position, goal_waypoints


def ensure_offscreen_gl() -> None:
    """Default to OSMesa (CPU) rendering unless the user chose a GL backend (must run before MuJoCo loads)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    if os.environ["MUJOCO_GL"] == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


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
    # PickPlaceSingle's random object: robosuite's own draw (``single_object_mode`` 1) picks from a set of names,
    # whose order follows the process's string-hash seed; mode 2 uses ``object_id`` as given, drawn per episode from
    # the seeded rng (_draw_single_object). Envs made with a fixed object (mode 2 from the start) keep it.
    env._tf_draws_object = getattr(env, "single_object_mode", 0) == 1
    if env._tf_draws_object:
        env.single_object_mode = 2
    return env


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _draw_single_object(env) -> None:
    """PickPlaceSingle with a random object (see make_env): draw the episode's object by index from the env's seeded
    rng, so the same seed gives the same object in every process."""
    if env._tf_draws_object:
        env.object_id = int(env.rng.integers(len(env.objects)))


def reset_episode(env, rng: np.random.Generator, config: SimConfig) -> Dict[str, Any]:
    """Reset placements and robot noise from ``rng``, jitter lights and the agentview camera; returns what was drawn."""
    env.rng.bit_generator.state = np.random.default_rng(int(rng.integers(2**63))).bit_generator.state
    _draw_single_object(env)
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
