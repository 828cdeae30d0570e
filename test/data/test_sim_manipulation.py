"""The simulated manipulation generator (traj_forecast_ros.data.sim_manipulation, sim_tasks).

Pure parts (instruction set, scripted policy, object ids, config checks, dataset version 2 fields) always run. The
end-to-end part runs ``traj-forecast data sim-manipulation`` in a subprocess (MuJoCo picks its GL backend at import)
and is skipped, with the reason, where robosuite (``bash scripts/setup_sim.sh``) or libOSMesa is missing.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from traj_forecast_ros.data import sim_manipulation as sm
from traj_forecast_ros.data import sim_clips, sim_config, sim_episodes, sim_tasks, sim_tracks
from traj_forecast_ros.data.dataset import TrajectoryDataset, write_index
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.errors import DatasetError


# ------------------------------------------------------------------------------------------------ pure parts
def test_instruction_set_is_closed_and_covers_every_plan():
    texts = sim_tasks.all_instructions()
    assert len(texts) == len(set(texts))
    for word in sim_tasks.OBJECT_WORDS.values():
        assert f"reach for {word}" in texts and f"pick up {word}" in texts
        for direction in sim_tasks.PUSH_DIRECTIONS:
            assert sim_tasks.push_instruction(word, direction) in texts
    assert "push the can to the left" in texts and "push the can forward" in texts
    assert "put the can in the back left of the right bin" in texts and "open the door" in texts


def test_scripted_policy_reaches_every_waypoint_in_order():
    waypoints = [sim_tasks.Waypoint(np.array([0.1, 0.0, 1.0]), sim_tasks.GRIPPER_OPEN),
                 sim_tasks.Waypoint(np.array([0.1, 0.2, 0.9]), sim_tasks.GRIPPER_CLOSED, hold=3)]
    policy = sim_tasks.ScriptedPolicy(waypoints, speed=0.5)
    eef = np.zeros(3) + [0.0, 0.0, 1.0]
    visited, grippers = [], []
    for _ in range(200):
        action = policy.act(eef)
        assert np.abs(action[:3]).max() <= 0.5 + 1e-12 and not action[3:6].any()  # speed cap, orientation held
        eef = eef + 0.05 * action[:3]  # OSC delta: 1 = 5 cm per step (ideal tracking)
        grippers.append(action[6])
        visited.append(policy.index)
        if policy.done:
            break
    assert policy.done and np.allclose(eef, waypoints[-1].position, atol=0.012)
    assert visited == sorted(visited)
    assert grippers[0] == sim_tasks.GRIPPER_OPEN and grippers[-1] == sim_tasks.GRIPPER_CLOSED
    assert policy.act(eef)[6] == sim_tasks.GRIPPER_CLOSED and not policy.act(eef)[:3].any()  # done: hold still


def test_scripted_policy_gives_up_on_unreachable_waypoints():
    policy = sim_tasks.ScriptedPolicy([sim_tasks.Waypoint(np.array([5.0, 0, 0]), sim_tasks.GRIPPER_OPEN)], speed=0.3,
                               max_steps_per_waypoint=10)
    for _ in range(10):
        policy.act(np.zeros(3))  # the arm does not move (blocked)
    assert policy.done


class _StackScene:
    """The parts of robosuite's Stack that the goal planner reads: two cubes, 20 cm apart on the table."""

    def __init__(self) -> None:
        self.cubeA, self.cubeB = (type("Cube", (), {"name": name, "root_body": name + "_main"})()
                                  for name in ("cubeA", "cubeB"))
        bodies = {"cubeA_main": 0, "cubeB_main": 1}
        self.sim = type("Sim", (), {})()
        self.sim.model = type("Model", (), {"body_name2id": staticmethod(bodies.__getitem__)})()
        self.sim.data = type("Data", (), {"body_xpos": np.array([[0.0, -0.1, 0.82], [0.0, 0.1, 0.82]])})()


def test_branch_goals_part_at_once_and_share_one_speed():
    """With ``parting_m`` the goals of a group head first for places that far apart (never "reach for" and "pick up"
    one cube, which share the approach) and take the first goal's speed; without it only the instructions differ."""
    env = _StackScene()
    for seed in range(20):
        goals = sim_tasks.draw_distinct_goals(np.random.default_rng(seed), "stack", env, 3, parting_m=0.06)
        assert len(goals) == 3 and len({g.instruction for g in goals}) == 3
        assert {g.speed for g in goals} == {goals[0].speed}
        heads = [sim_tasks.goal_waypoints(g, env)[0].position for g in goals]
        assert min(np.linalg.norm(a - b) for i, a in enumerate(heads) for b in heads[i + 1:]) >= 0.06
    loose = [sim_tasks.draw_distinct_goals(np.random.default_rng(seed), "stack", env, 3) for seed in range(20)]
    assert any(len({g.speed for g in goals}) > 1 for goals in loose)  # v2's groups: one speed per goal
    assert any(min(np.linalg.norm(sim_tasks.goal_waypoints(a, env)[0].position
                                  - sim_tasks.goal_waypoints(b, env)[0].position)
                   for i, a in enumerate(goals) for b in goals[i + 1:]) < 0.01 for goals in loose)
    with pytest.raises(ValueError, match="goal_parting_m"):
        sim_config.SimConfig(goal_parting_m=-1.0)


def test_object_ids_are_compact_and_static_is_zero():
    weld = np.array([0, 0, 2, 3, 0, 5])  # bodies 1 and 4 welded to the world
    body_ids = np.array([0, 1, 2, 3, 5, sim_tracks.NO_BODY, 4])
    ids = sim_clips.compact_object_ids(body_ids, weld, moving_bodies=[2, 3, 5])
    assert ids.tolist() == [0, 0, 1, 2, 3, 0, 0] and ids.dtype == np.int16


_WITHOUT_THE_SIM_EXTRA = """
import importlib, json, pathlib, pkgutil, sys
sys.modules["robosuite"] = sys.modules["mujoco"] = None  # an import of either now raises ImportError
import traj_forecast_ros.data as data
loaded = [importlib.import_module(f"traj_forecast_ros.data.{module.name}").__name__
          for module in pkgutil.iter_modules(data.__path__)]
from traj_forecast_ros.data import sim_config, sim_manipulation
config = sim_config.SimConfig(query_grid=(4, 4), query_stride=32.0, query_offset=15.5)
meta = sim_manipulation.dataset_meta(config, seed=0, split="train")
try:
    sim_manipulation.generate_shard(pathlib.Path(sys.argv[1]), "train", 0, 0, config)
    failure = None
except ImportError as exc:
    failure = str(exc)
print(json.dumps({"loaded": loaded, "simulator": meta.source["simulator"], "failure": failure}))
"""


def test_the_data_package_imports_and_plans_without_the_sim_extra(tmp_path):
    """With robosuite and MuJoCo unimportable, every data module imports, settings and dataset metadata work, and
    only generating a shard fails, on the missing simulator."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_THE_SIM_EXTRA, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"traj_forecast_ros.data.sim_episodes", "traj_forecast_ros.data.sim_manipulation",
            "traj_forecast_ros.data.sim_streams", "traj_forecast_ros.data.dataset"} <= set(report["loaded"])
    assert set(report["simulator"]) == {"robosuite", "mujoco"}
    assert report["failure"] is not None and "robosuite" in report["failure"]


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown scenes"):
        sim_config.SimConfig(scenes=("kitchen",))
    with pytest.raises(ValueError):
        sim_config.SimConfig(num_frames=1)
    config = sim_config.SimConfig(frame_stride=3)
    assert config.frame_interval_s == pytest.approx(0.15)
    query = config.query_points()
    assert query[0, 0].tolist() == [1.5, 1.5] and query[-1, -1].tolist() == [125.5, 125.5]
    with pytest.raises(ValueError, match="split"):
        sm.write_sim_dataset("/nonexistent", "val", 1, 0, config)


def test_dataset_version_2_fields_round_trip_and_are_validated(tmp_path):
    config = sim_config.SimConfig(query_grid=(4, 4), query_stride=32.0, query_offset=15.5, num_frames=3)
    meta = sm.dataset_meta(config, seed=7, split="test")
    image = np.zeros((128, 128, 3), np.uint8)
    tracks = np.broadcast_to(config.query_points(), (3, 4, 4, 2)).astype(np.float32)
    visible = np.ones((3, 4, 4), bool)
    visible[2, 0, 0] = False
    instruction = "push the can to the left"
    with DatasetWriter(tmp_path / "d", meta) as writer:
        writer.add(image, tracks, kind="push", visibility=visible, view="robot0_eye_in_hand", instruction=instruction,
                   scene_id=12)
        with pytest.raises(DatasetError, match="instruction"):
            writer.add(image, tracks, kind="push", visibility=visible, view="agentview", instruction="dance")
        with pytest.raises(DatasetError, match="view"):
            writer.add(image, tracks, kind="push", visibility=visible, view="frontview", instruction=instruction)
        with pytest.raises(DatasetError, match="visibility"):
            writer.add(image, tracks, kind="push", visibility=visible[:2], view="agentview", instruction=instruction)
    dataset = TrajectoryDataset(tmp_path / "d")
    assert dataset.index["version"] == 2
    sample = dataset[0]
    assert sample.view == "robot0_eye_in_hand" and sample.instruction == instruction and sample.scene_id == 12
    assert sample.visibility.dtype == bool and sample.visibility.shape == (1, 3, 4, 4)
    assert not sample.visibility[0, 2, 0, 0] and sample.visibility.sum() == 47
    assert dataset.meta.views == list(sim_config.VIEWS) and dataset.meta.instructions == sim_tasks.all_instructions()


def test_index_writer_refuses_unknown_or_missing_fields(tmp_path):
    meta = sm.dataset_meta(sim_config.SimConfig(), seed=0, split="train")
    with pytest.raises(DatasetError):
        write_index(tmp_path, meta, ["images", "tracks", "surface_normals"], [])
    with pytest.raises(DatasetError):
        write_index(tmp_path, meta, ["images", "visibility"], [])
    path = write_index(tmp_path, meta, ["images", "tracks", "views"], [{"name": "shard-00000", "num_samples": 3}])
    index = json.loads(path.read_text())
    assert index["version"] == 2 and index["num_samples"] == 3 and index["views"] == list(sim_config.VIEWS)


def test_old_style_datasets_stay_version_1(tmp_path):
    config = sim_config.SimConfig(query_grid=(4, 4), query_stride=32.0, query_offset=15.5, num_frames=3)
    meta = sm.dataset_meta(config, seed=7, split="test")
    tracks = np.broadcast_to(config.query_points(), (3, 4, 4, 2)).astype(np.float32)
    with DatasetWriter(tmp_path / "d", meta) as writer:
        writer.add(np.zeros((128, 128, 3), np.uint8), tracks, kind="reach")
    dataset = TrajectoryDataset(tmp_path / "d")
    assert dataset.index["version"] == 1
    assert dataset[0].visibility is None and dataset[0].view is None and dataset[0].scene_id is None


# ------------------------------------------------------------------------------------------------ end to end
def _skip_reason() -> str:
    missing = [name for name in ("robosuite", "mujoco") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (bash scripts/setup_sim.sh, see docs/sim-manipulation.md)"
    if ctypes.util.find_library("OSMesa") is None:
        return "CPU rendering needs libOSMesa (apt-get install -y libosmesa6)"
    return ""


needs_sim = pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "available")


def _generate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    command = [sys.executable, "-m", "traj_forecast_ros.cli", "data", "sim-manipulation", "--out", str(out),
               "--train-shards", "1", "--test-shards", "1", "--episodes-per-shard", "1", "--goals-per-scene", "1",
               "--scenes", "lift", "--workers", "1", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    result = _generate(root / "a")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


@needs_sim
def test_generator_writes_valid_shards_with_exact_frame_zero(generated):
    root, _ = generated
    for split in ("train", "test"):
        dataset = TrajectoryDataset(root / "a" / split)
        meta = dataset.meta
        assert dataset.index["version"] == 2 and len(dataset) >= 2 and len(dataset) % 2 == 0  # both views per clip
        assert set(dataset.fields) >= {"images", "tracks", "visibility", "object_ids", "kinds", "views",
                                       "instructions", "scene_ids"}
        assert meta.image_size == (128, 128) and meta.query_grid == (32, 32) and meta.num_frames == 16
        assert meta.frame_interval_s == pytest.approx(0.1) and meta.source["split"] == split
        tracks = dataset.load("tracks")[:, 0]  # [N, T, 32, 32, 2]
        visibility = dataset.load("visibility")[:, 0]
        views = [meta.views[v] for v in dataset.load("views")]
        assert set(views) == set(sim_config.VIEWS)
        assert np.array_equal(tracks[:, 0], np.broadcast_to(meta.query_points(), tracks[:, 0].shape))
        assert visibility[:, 0].all()  # every query point is seen in its own frame
        ids = dataset.load("object_ids")
        for n, view in enumerate(views):
            moving = ids[n] > 0
            if view == "agentview":
                # the fixed camera: static geometry has exactly zero motion, the robot moves
                assert np.array_equal(tracks[n][:, ~moving], np.broadcast_to(tracks[n][0, ~moving],
                                                                             tracks[n][:, ~moving].shape))
                assert moving.any() and np.abs(tracks[n][-1, moving] - tracks[n][0, moving]).max() > 1.0
        assert all(instruction in meta.instructions for instruction in
                   [meta.instructions[i] for i in dataset.load("instructions")])
        assert np.isfinite(tracks).all()


@needs_sim
def test_generator_writes_dense_labels_that_agree_with_the_object_ids(generated):
    root, _ = generated
    dataset = TrajectoryDataset(root / "a" / "train")
    assert dataset.meta.segmentation_classes == list(sim_config.SEGMENTATION_CLASSES)
    segmentation, depth = dataset.load("segmentation"), dataset.load("depth").astype(np.float32)
    assert segmentation.shape == depth.shape == (len(dataset), 128, 128)
    robot = sim_config.SEGMENTATION_CLASSES.index("robot")
    cube = sim_config.SEGMENTATION_CLASSES.index("object 1")  # lift: the cube is the only object
    assert set(np.unique(segmentation)) <= {0, 1, robot, cube} and (segmentation == robot).any()
    assert np.isfinite(depth).all() and (depth[segmentation > 0] > 0).all()
    pixels = dataset.meta.query_points().astype(int)  # [32, 32, 2] pixel (column, row) of each query point
    at_queries = segmentation[:, pixels[..., 1], pixels[..., 0]]  # [N, 32, 32]
    ids = dataset.load("object_ids")
    assert np.array_equal(at_queries >= robot, ids > 0)  # moving body <-> robot or object class


@needs_sim
def test_generator_is_deterministic_resumable_and_refuses_other_settings(generated):
    root, _ = generated
    again = _generate(root / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    for split in ("train", "test"):
        first, second = TrajectoryDataset(root / "a" / split), TrajectoryDataset(root / "b" / split)
        for name in first.fields:
            assert np.array_equal(first.load(name), second.load(name)), (split, name)
    train, test = TrajectoryDataset(root / "a" / "train"), TrajectoryDataset(root / "a" / "test")
    assert not np.array_equal(train.load("images")[0], test.load("images")[0])  # disjoint streams
    done = root / "a" / "train" / "shard-00000.done.json"
    before = (done.stat().st_mtime_ns, done.read_text())
    resumed = _generate(root / "a")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (done.stat().st_mtime_ns, done.read_text()) == before  # the finished shard was not generated again
    assert json.loads(done.read_text())["num_samples"] == len(train)
    other = _generate(root / "a", "--frame-stride", "3")
    assert other.returncode != 0 and "other settings" in other.stderr


@needs_sim
def test_parallel_generation_writes_the_same_shards_as_a_serial_run(generated):
    root, _ = generated
    parallel = _generate(root / "c", "--train-shards", "2", "--test-shards", "0", "--workers", "2")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    serial = TrajectoryDataset(root / "a" / "train")
    both = TrajectoryDataset(root / "c" / "train")
    assert len(both.shard_names) == 2 and both.shard_sizes[0] == serial.shard_sizes[0]
    for name in serial.fields:
        assert np.array_equal(np.asarray(both.shard(0).__dict__[name]), np.asarray(serial.shard(0).__dict__[name]))
    assert "sim train" in parallel.stderr  # the progress bar


SINGLE_OBJECT_DRAWS = """
import numpy as np
from traj_forecast_ros.data.sim_config import SimConfig
from traj_forecast_ros.data.sim_episodes import make_env, reset_episode
config = SimConfig(scenes=("pick_place_single",))
env = make_env("pick_place_single", config)
drawn = []
for seed in range(8):
    reset_episode(env, np.random.default_rng(seed), config)
    drawn.append(env.obj_to_use)
print(",".join(drawn))
"""


@needs_sim
def test_the_single_object_scene_draws_the_same_object_whatever_the_hash_seed():
    """PickPlaceSingle's object comes from the episode's seed alone: two processes with different string-hash seeds
    (robosuite drew it from a set of names, whose order follows that seed) draw the same objects, and not always
    the same one."""
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa", "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", SINGLE_OBJECT_DRAWS], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(result.stdout.strip().splitlines()[-1].split(","))
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


@needs_sim
def test_branches_from_one_saved_state_share_frame_zero_and_differ_in_future(tmp_path):
    """Three parting goals rolled out from the reset state and from a moving state of the first goal's episode: each
    branch group holds one view's identical frame-0 images under different instructions with different futures."""
    result = _generate(tmp_path / "br", "--test-shards", "0", "--episodes-per-shard", "3", "--goals-per-scene", "3",
                       "--branch-frames", "0,8", "--scenes", "stack", "--goal-parting", "0.06")
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = TrajectoryDataset(tmp_path / "br" / "train")
    groups, images = dataset.load("branch_groups"), dataset.load("images")
    tracks, instructions = dataset.load("tracks")[:, 0], dataset.load("instructions")
    views, ids = dataset.load("views"), dataset.load("object_ids")
    assert (groups >= 0).sum() * 2 >= len(dataset)  # at least half of the clips come in branch groups
    record = json.loads((tmp_path / "br" / "train" / "shard-00000.done.json").read_text())
    assert record["branched_samples"] == int((groups >= 0).sum())
    assert {episode.get("branch_of_frame") for episode in record["episodes"]} == {None, 0, 8}
    assert len({episode["speed"] for episode in record["episodes"]}) == 1  # one scene: the goals share a speed
    ids_found = np.unique(groups[groups >= 0])
    assert len(ids_found) == 2 * 2  # two branch points x two views
    for group in ids_found:
        members = np.flatnonzero(groups == group)
        assert len(members) == 3
        assert len(set(views[members].tolist())) == 1
        assert all(np.array_equal(images[m], images[members[0]]) for m in members)
        assert len(set(instructions[members].tolist())) == 3
        for a in members:
            for b in members[members > a]:
                moving = (ids[a] > 0) | (ids[b] > 0)
                assert np.abs(tracks[a][-1, moving] - tracks[b][-1, moving]).max() > 5.0  # different futures


@needs_sim
def test_stream_episode_reproduces_the_bundled_scored_bag():
    """The held-out camera stream behind data/sample_bag/sim_heldout: frame i carries the exact future from frame i,
    and regenerating episode 0 gives the bag's frames and truths again."""
    from traj_forecast_ros.bag.report import read_forecasts, read_images
    from traj_forecast_ros.ros.conversions import msg_to_arrays
    from traj_forecast_ros.bag.sim_sample import SIM_SAMPLE_BAG
    from traj_forecast_ros.data.sim_streams import stream_episode

    sim_episodes.ensure_offscreen_gl()
    config = sim_config.SimConfig()
    episode = stream_episode(0, 0, config, max_frames=3)
    assert len(episode.images) == len(episode.tracks) == 3 and episode.instruction
    grid = config.query_points()
    for tracks in episode.tracks:
        for view in sim_config.VIEWS:
            assert tracks[view].shape == (config.num_frames, *config.query_grid, 2)
            np.testing.assert_array_equal(tracks[view][0], grid)
    # consecutive frames: the camera stream moves on by one frame (the robot moves in the agent view)
    assert np.abs(episode.images[1]["agentview"].astype(int) - episode.images[0]["agentview"]).max() > 0
    truths = read_forecasts(SIM_SAMPLE_BAG, "/agentview/true_future")[:3]
    images = read_images(SIM_SAMPLE_BAG, "/agentview/image_raw", [stamp for stamp, _ in truths])
    for i, (stamp, message) in enumerate(truths):
        assert message.instruction == episode.instruction
        np.testing.assert_allclose(msg_to_arrays(message)["tracks"][0], episode.tracks[i]["agentview"], atol=1e-2)
        assert np.abs(images[stamp].astype(float) - episode.images[i]["agentview"]).mean() < 2.0
