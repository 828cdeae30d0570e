"""Physics-based synthetic scenes with exact dense ground-truth point trajectories.

A scene (:mod:`.scenes`: its kinds, visible layout and hidden state) is simulated with pymunk, rendered to an RGB
image (:mod:`.render`) and its query grid is tracked exactly: the ground truth for a query point is the body under it
at frame 0 (static background and ramps: id 0, the point stays); a body point follows its body's rigid transform,
``p_t = c_t + R(theta_t) R(theta_0)^T (p_0 - c_0)``, so body points move exactly rigidly. One image has
``config.rollouts`` possible futures (one hidden state each). Generation is deterministic per ``(seed, index)``;
:func:`write_dataset` writes a stream of scenes as a sharded dataset (:mod:`.dataset_writer`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import pymunk
from tqdm import tqdm

from traj_forecast_ros.data.dataset import DatasetMeta
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.data.render import render
from traj_forecast_ros.data.scenes import (
    SCENE_KINDS,
    GeneratorConfig,
    HiddenState,
    SceneLayout,
    body_contains,
    body_local_coordinates,
    rotation_matrix,
    sample_hidden,
    sample_layout,
)


@dataclass
class SyntheticSample:
    """One generated scene: the image, ``R`` ground-truth futures of the query grid and per-point object ids."""

    image: np.ndarray  # [H, W, 3] uint8, frame 0
    tracks: np.ndarray  # [R, T, Hq, Wq, 2] float32 pixels (x, y)
    object_ids: np.ndarray  # [Hq, Wq] int16, 0 = static background, k = k-th body
    kind: str
    poses: np.ndarray  # [R, T, n, 3] (x, y, angle) of every body
    frames: Optional[np.ndarray] = None  # [T, H, W, 3] uint8 of rollout 0 (only when asked)


# ------------------------------------------------------------------------------------------------ physics
def simulate(layout: SceneLayout, hidden: HiddenState, config: GeneratorConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Run the physics; return ``(poses [T, n, 3] (x, y, angle), velocities [T, n, 2])`` at every frame."""
    space = pymunk.Space()
    space.gravity = (0.0, config.gravity)
    space.iterations = 30
    size = float(config.image_size)
    static = space.static_body
    ground = pymunk.Poly(static, [(-size, layout.ground_y), (2 * size, layout.ground_y),
                                  (2 * size, layout.ground_y + size), (-size, layout.ground_y + size)])
    walls = [pymunk.Poly(static, [(-size, -4 * size), (0.0, -4 * size), (0.0, 2 * size), (-size, 2 * size)]),
             pymunk.Poly(static, [(size, -4 * size), (2 * size, -4 * size), (2 * size, 2 * size), (size, 2 * size)])]
    statics = [ground, *walls] + [pymunk.Poly(static, [tuple(p) for p in ramp]) for ramp in layout.ramps]
    for shape in statics:
        shape.friction = 0.9
        shape.elasticity = 0.3
    space.add(*statics)

    bodies = []
    for i, spec in enumerate(layout.bodies):
        body = pymunk.Body()
        if spec.shape == "box":
            shape = pymunk.Poly.create_box(body, spec.size)
        else:
            shape = pymunk.Circle(body, spec.size[0])
        shape.density = float(hidden.density[i])
        shape.friction = float(hidden.friction[i])
        shape.elasticity = float(hidden.elasticity[i])
        body.position = spec.position
        body.angle = spec.angle
        body.velocity = tuple(float(v) for v in hidden.velocities[i])
        body.angular_velocity = float(hidden.angular_velocities[i])
        space.add(body, shape)
        bodies.append(body)

    n = len(bodies)
    poses = np.zeros((config.num_frames, n, 3))
    velocities = np.zeros((config.num_frames, n, 2))
    dt = config.frame_interval_s / config.substeps
    for frame in range(config.num_frames):
        if frame > 0:
            for _ in range(config.substeps):
                space.step(dt)
        for i, body in enumerate(bodies):
            poses[frame, i] = (body.position.x, body.position.y, body.angle)
            velocities[frame, i] = (body.velocity.x, body.velocity.y)
    return poses, velocities



# ------------------------------------------------------------------------------------------------ ground truth
def object_ids_at(points: np.ndarray, layout: SceneLayout, poses: np.ndarray) -> np.ndarray:
    """``[...]`` int16 id of the body under each point (``k`` = body ``k - 1``, drawn last wins; 0 = static)."""
    ids = np.zeros(points.shape[:-1], dtype=np.int16)
    for k, body in enumerate(layout.bodies):
        inside = body_contains(body, body_local_coordinates(points, poses[k]))
        ids[inside] = k + 1
    return ids


def rigid_tracks(query_points: np.ndarray, object_ids: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """``[T, Hq, Wq, 2]``: each point follows its body's transform; static points (id 0) stay.

    ``p_t = c_t + R(theta_t) R(theta_0)^T (p_0 - c_0)`` with body poses ``[T, n, 3]``.
    """
    num_frames = poses.shape[0]
    tracks = np.broadcast_to(query_points, (num_frames, *query_points.shape)).astype(np.float64).copy()
    for k in range(poses.shape[1]):
        mask = object_ids == k + 1
        if not mask.any():
            continue
        local = body_local_coordinates(query_points[mask], poses[0, k])  # [m, 2]
        for t in range(num_frames):
            tracks[t][mask] = poses[t, k, :2] + local @ rotation_matrix(float(poses[t, k, 2])).T
    return tracks.astype(np.float32)



# ------------------------------------------------------------------------------------------------ public API
def generate_sample(seed: int, index: int, config: GeneratorConfig, kind: Optional[str] = None,
                    render_frames: bool = False) -> SyntheticSample:
    """Generate scene ``index`` of the stream ``seed`` (deterministic), with ``config.rollouts`` futures."""
    layout_rng = np.random.default_rng([seed, index, 0])
    layout = sample_layout(layout_rng, config, kind)
    query = config.query_points()
    rest_pose = np.array([[*b.position, b.angle] for b in layout.bodies]).reshape(-1, 3)
    blur = np.array([b.blur_velocity for b in layout.bodies], dtype=np.float64).reshape(-1, 2)
    image = render(layout, rest_pose, config, blur_velocities=blur)
    object_ids = object_ids_at(query.astype(np.float64), layout, rest_pose)

    all_tracks, all_poses, frames = [], [], None
    for rollout in range(config.rollouts):
        hidden = sample_hidden(np.random.default_rng([seed, index, rollout + 1]), layout)
        poses, velocities = simulate(layout, hidden, config)
        all_poses.append(poses)
        all_tracks.append(rigid_tracks(query.astype(np.float64), object_ids, poses))
        if render_frames and rollout == 0:
            frames = np.stack([image] + [render(layout, poses[t], config, velocities[t])
                                         for t in range(1, config.num_frames)])
    return SyntheticSample(
        image=image,
        tracks=np.stack(all_tracks),
        object_ids=object_ids,
        kind=layout.kind,
        poses=np.stack(all_poses),
        frames=frames,
    )



def write_dataset(root, num_scenes: int, seed: int, config: GeneratorConfig, shard_size: int = 256,
                  render_frames: bool = False, kinds: Optional[Sequence[str]] = None, progress: bool = False,
                  overwrite: bool = False):
    """Generate scenes ``0 .. num_scenes - 1`` of stream ``seed`` into a sharded dataset at ``root``.

    ``kinds`` (optional) cycles through the given scene kinds instead of drawing them. Returns the index path.
    """
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    meta = DatasetMeta(
        image_size=(config.image_size, config.image_size),
        query_grid=config.query_grid,
        query_stride=config.query_stride,
        query_offset=config.query_offset,
        num_frames=config.num_frames,
        num_rollouts=config.rollouts,
        frame_interval_s=config.frame_interval_s,
        kinds=list(SCENE_KINDS),
        source={"generator": "traj_forecast_ros.data.synthetic", "seed": int(seed), "config": asdict(config),
                "kinds_cycled": list(kinds) if kinds else None},
    )
    indices = range(num_scenes)
    if progress:
        indices = tqdm(indices, desc="scenes", unit="scene")
    with DatasetWriter(root, meta, shard_size=shard_size, overwrite=overwrite) as writer:
        for index in indices:
            kind = kinds[index % len(kinds)] if kinds else None
            sample = generate_sample(seed, index, config, kind=kind, render_frames=render_frames)
            writer.add(sample.image, sample.tracks, object_ids=sample.object_ids, kind=sample.kind,
                       frames=sample.frames)
    return writer.close()
