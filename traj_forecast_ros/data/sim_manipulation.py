"""LIBERO-like simulated manipulation clips with exact point tracks (``traj-forecast data sim-manipulation``).

Needs the optional extra installed by ``bash scripts/setup_sim.sh`` (robosuite + MuJoCo) and an offscreen OpenGL: on a CPU
``apt-get install -y libosmesa6`` and ``MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa`` (set by the CLI when unset). The
package imports without them: robosuite and MuJoCo are imported inside the functions that need them
(:mod:`~traj_forecast_ros.data.sim_episodes`).

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

The generator in modules: :mod:`~traj_forecast_ros.data.sim_config` (settings),
:mod:`~traj_forecast_ros.data.sim_tasks` (scripted goals), :mod:`~traj_forecast_ros.data.sim_episodes` (scenes rendered
as episodes), :mod:`~traj_forecast_ros.data.sim_clips` (episodes to samples) and this module (shards and splits).

Splits and determinism: sample streams are keyed by ``(seed, split, shard, episode)``; ``train`` and ``test`` use
disjoint streams (so the test split holds unseen placements, lighting, camera jitter and seeds). A shard is a fixed
list of episodes, so a shard's content depends only on its key; shards are generated in parallel processes, each
written atomically (``shard-XXXXX.*.npy`` + ``shard-XXXXX.done.json``), and a rerun skips finished shards.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from traj_forecast_ros.data.dataset import DatasetMeta, write_index
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.data.sim_clips import ClipWriter
from traj_forecast_ros.data.sim_config import SEGMENTATION_CLASSES, SPLITS, TASK_KINDS, VIEWS, SimConfig
from traj_forecast_ros.data.sim_episodes import ensure_offscreen_gl, make_env, reset_episode, run_branch, run_episode
from traj_forecast_ros.data.sim_tasks import (
    ScriptedPolicy,
    all_instructions,
    draw_distinct_goals,
    goal_waypoints,
    plan_episode,
)


# ------------------------------------------------------------------------------------------------ shards
def episode_rng(seed: int, split: str, shard: int, scene_index: int) -> np.random.Generator:
    """The random stream of one scene (reset state) of a shard; train and test streams never overlap."""
    return np.random.default_rng([int(seed), SPLITS[split], int(shard), int(scene_index)])


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def dataset_meta(config: SimConfig, seed: int, split: str) -> DatasetMeta:
    """The :class:`~traj_forecast_ros.data.dataset.DatasetMeta` of a generated split."""
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
    found = {}
    for package in ("robosuite", "mujoco"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def branched_scene(env, rng: np.random.Generator, scene: str, reset_seed: int, config: SimConfig,
                   clips: ClipWriter) -> List[Dict[str, Any]]:
    """One reset state, ``goals_per_scene`` distinct goals: the first goal's whole episode, and from each of its
    ``branch_frames`` every other goal rolled out for one clip. The clips that start at a branch frame (the first
    goal's and the branches') share their frame-0 image and form a branch group per view. Returns the episode
    records."""
    drawn = reset_episode(env, np.random.default_rng(reset_seed), config)
    goals = draw_distinct_goals(rng, scene, env, config.goals_per_scene, config.goal_parting_m)
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


def write_sim_dataset(root, split: str, num_shards: int, seed: int, config: SimConfig, workers: int = 1,
                      progress: bool = True) -> Path:
    """Generate ``num_shards`` shards of ``split`` into ``root`` (resuming: finished shards are kept) and write
    ``index.json``. Returns the index path. Raises ValueError on a bad split or a dataset made with other settings."""
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
        # a setting added after the dataset was made takes its default (the data it describes did not change)
        previous["config"] = {**json.loads(json.dumps(asdict(SimConfig()))), **previous.get("config", {})}
        if previous != settings:
            raise ValueError(f"{root} was generated with other settings ({settings_path}); use another --out or "
                             "the same settings to resume")
    else:
        settings_path.write_text(json.dumps(settings, indent=1))
    pending = [s for s in range(num_shards) if not (root / f"{shard_name(s)}.done.json").exists()]
    ensure_offscreen_gl()
    tasks = [(str(root), split, shard, int(seed), asdict(config)) for shard in pending]
    bar = tqdm(total=num_shards, initial=num_shards - len(pending), unit="shard", desc=f"sim {split}",
               disable=not progress)
    if workers <= 1:
        for task in tasks:
            record = _worker(task)
            bar.update(1)
            bar.set_postfix(samples=record["num_samples"])
    else:
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
