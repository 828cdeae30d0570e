"""Held-out camera streams of the simulated manipulation scenes: one scripted episode rendered at every frame, with
each frame's true future (``traj-forecast bag make-sim-sample`` plays them as a scored sample bag).

Needs the sim extra to run, like :mod:`traj_forecast_ros.data.sim_manipulation` (both import without it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from traj_forecast_ros.data import sim_tracks
from traj_forecast_ros.data.sim_clips import camera_intrinsics, clip_samples, moving_body_list
from traj_forecast_ros.data.sim_config import VIEWS, SimConfig
from traj_forecast_ros.data.sim_episodes import make_env, reset_episode, run_episode
from traj_forecast_ros.data.sim_manipulation import episode_rng
from traj_forecast_ros.data.sim_tasks import ScriptedPolicy, plan_episode

STREAM_SHARD_BASE = 100_000  # stream episodes draw from test-split shards far above any dataset's shard count


@dataclass
class StreamEpisode:
    """One scripted episode rendered at every frame (a camera stream), with each frame's true future.

    ``images[i][view]`` is frame i (``[H, W, 3]`` uint8); ``tracks[i][view]`` (``[T, Hq, Wq, 2]`` float32) and
    ``visibility[i][view]`` (``[T, Hq, Wq]`` uint8) are the exact tracks of the query grid from frame i over the next
    ``num_frames - 1`` frames (the dataset's clip geometry, so a model trained on it can be scored against them)."""

    scene: str
    kind: str
    instruction: str
    frame_interval_s: float
    intrinsics: Dict[str, np.ndarray]  # view -> [3, 3]
    images: List[Dict[str, np.ndarray]] = field(default_factory=list)
    tracks: List[Dict[str, np.ndarray]] = field(default_factory=list)
    visibility: List[Dict[str, np.ndarray]] = field(default_factory=list)


def stream_episode(seed: int, index: int, config: SimConfig, envs: Optional[Dict[str, Any]] = None,
                   max_frames: Optional[int] = None) -> StreamEpisode:
    """Episode ``index`` of the held-out stream of ``seed`` rendered at every frame (``clip_hop`` 1).

    The episode's random stream is test-split shard ``STREAM_SHARD_BASE + index``, which no generated split uses, so
    its placements, lighting and camera jitter are unseen in training. The stream ends at the last frame that still
    has a full future (or after ``max_frames``), or before the first frame whose tracks are not finite."""
    config = SimConfig(**{**asdict(config), "clip_hop": 1, "dense_labels": False})
    envs = {} if envs is None else envs
    rng = episode_rng(seed, "test", STREAM_SHARD_BASE + int(index), 0)
    scene = config.scenes[int(rng.integers(len(config.scenes)))]
    if scene not in envs:
        envs[scene] = make_env(scene, config)
    env = envs[scene]
    reset_episode(env, np.random.default_rng(int(rng.integers(2**63))), config)
    plan, waypoints = plan_episode(rng, scene, env)
    frames = run_episode(env, ScriptedPolicy(waypoints, plan.speed), config)
    if max_frames is not None:
        frames = frames[:int(max_frames) + config.num_frames - 1]
    model = env.sim.model
    intrinsics = camera_intrinsics(env, config)
    episode = StreamEpisode(scene=scene, kind=plan.kind, instruction=plan.instruction,
                            frame_interval_s=config.frame_interval_s, intrinsics=intrinsics)
    samples = clip_samples(frames, intrinsics, config, moving_body_list(env), np.asarray(model.body_weldid),
                           sim_tracks.clip_planes(model)[1])
    for start in range(len(samples) // len(VIEWS)):
        per_view = {s["view"]: s for s in samples[start * len(VIEWS):(start + 1) * len(VIEWS)]}
        if not all(np.isfinite(s["tracks"]).all() for s in per_view.values()):
            break
        episode.images.append({view: s["image"] for view, s in per_view.items()})
        episode.tracks.append({view: s["tracks"] for view, s in per_view.items()})
        episode.visibility.append({view: s["visibility"].astype(np.uint8) for view, s in per_view.items()})
    return episode
