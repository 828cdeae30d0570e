"""``traj-forecast data ...``: generate synthetic physics datasets, import tracker output, inspect a dataset.

Examples::

    traj-forecast data generate --out runs/blocks-train --scenes 4000 --seed 0 --rollouts 2
    traj-forecast data import --images frames.npy --tracks tracks.npy --layout tpc --config demo-blocks --out mine
    traj-forecast data info runs/blocks-train
    traj-forecast data sim-manipulation --out runs/sim --train-shards 40 --test-shards 4 --workers 2
    traj-forecast data merge --out runs/sim/train_both runs/sim/train runs/sim/parting/train
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from traj_forecast_ros import cpu_cores
from traj_forecast_ros.commands import command_help
from traj_forecast_ros.data.dataset import DatasetMeta, TrajectoryDataset
from traj_forecast_ros.data.dataset_writer import import_arrays, merge_datasets
from traj_forecast_ros.data.scenes import SCENE_KINDS, GeneratorConfig
from traj_forecast_ros.data.sim_config import DEFAULT_SCENES, SimConfig
from traj_forecast_ros.data.sim_manipulation import write_sim_dataset
from traj_forecast_ros.data.synthetic import write_dataset
from traj_forecast_ros.errors import DatasetError
from traj_forecast_ros.model.presets import resolve_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands."""
    parser = subparsers.add_parser("data", help=command_help("data"), description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    commands.required = True

    generate = commands.add_parser("generate", help="simulate and render pymunk block scenes with exact tracks")
    generate.add_argument("--out", type=Path, required=True, help="new dataset directory")
    generate.add_argument("--scenes", type=int, required=True, help="number of scenes (images)")
    generate.add_argument("--seed", type=int, default=0, help="scene stream seed (scene i is a function of seed, i)")
    generate.add_argument("--rollouts", type=int, default=1, help="ground-truth futures per image (default 1)")
    generate.add_argument("--config", default="demo-blocks",
                          help="model preset or config.yaml whose geometry (grid, stride, frames) to match "
                               "(default demo-blocks; images are always 128 px)")
    generate.add_argument("--kinds", default=None,
                          help="comma-separated scene kinds to cycle through (default: drawn from the standard mix; "
                               "kinds: fall, stack, topple, ramp, slide, rest)")
    generate.add_argument("--shard-size", type=int, default=256)
    generate.add_argument("--frames", action="store_true", help="also store every rendered frame (visualisation)")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    generate.set_defaults(func=_generate)

    imports = commands.add_parser("import", help="write images + tracks from any point tracker as a dataset")
    imports.add_argument("--images", type=Path, required=True, help=".npy uint8 [N, H, W, 3] at the model's size")
    imports.add_argument("--tracks", type=Path, required=True,
                         help=".npy float tracks per image in pixels: [N, T, Hq, Wq, 2] (grid), [N, T, P, 2] (tpc, "
                              "CoTracker) or [N, P, T, 2] (ptc, LIBERO shards)")
    imports.add_argument("--layout", choices=("grid", "tpc", "ptc"), default="grid")
    imports.add_argument("--object-ids", type=Path, default=None, help=".npy int [N, Hq, Wq] (0 = background)")
    imports.add_argument("--config", default="demo-blocks", help="model preset or config.yaml to match")
    imports.add_argument("--frame-interval", type=float, default=None, help="seconds between track frames")
    imports.add_argument("--out", type=Path, required=True)
    imports.add_argument("--overwrite", action="store_true")
    imports.set_defaults(func=_import)

    sim = commands.add_parser(
        "sim-manipulation", help="LIBERO-like robosuite clips with exact tracks (needs bash scripts/setup_sim.sh)",
        description="Render scripted Panda manipulation episodes (robosuite + MuJoCo, CPU via OSMesa) into OUT/train "
                    "and OUT/test. Rerun the same command to resume: finished shards are kept. See "
                    "docs/sim-manipulation.md.")
    sim.add_argument("--out", type=Path, required=True, help="dataset root (OUT/train, OUT/test)")
    sim.add_argument("--train-shards", type=int, default=1)
    sim.add_argument("--test-shards", type=int, default=0)
    sim.add_argument("--seed", type=int, default=0, help="stream seed (train and test streams never overlap)")
    sim.add_argument("--episodes-per-shard", type=int, default=8)
    sim.add_argument("--goals-per-scene", type=int, default=2,
                     help="distinct goals rolled out from each branch point (or, without --branch-frames, from the "
                          "reset state); they share the frame-0 image")
    sim.add_argument("--branch-frames", default="",
                     help="comma-separated clip-start frames of the first goal's episode from which every other goal "
                          "is rolled out for one clip (0 = at rest, 8, 16 = while moving); those clips form branch "
                          "groups (the paired-instruction test). Empty: whole episodes per goal from the reset state")
    sim.add_argument("--goal-parting", type=float, default=0.0, metavar="METRES",
                     help="> 0: the goals of a branch group head first for places at least this far apart and share "
                          "one speed, so their futures part at once (0.06 in scripts/train_sim.sh); 0: any distinct "
                          "instructions (v2's data)")
    sim.add_argument("--scenes", default=None, help="comma-separated: lift, stack, pick_place, pick_place_single, "
                                                    "nut_assembly, door (default lift,stack,pick_place)")
    sim.add_argument("--grid", type=int, choices=(32, 64), default=32,
                     help="query grid side on the 128 px image, first point at pixel centre 1.5 (64 = LIBERO's "
                          "stride 2; 32 = stride 4, CPU-sized)")
    sim.add_argument("--frame-stride", type=int, default=2, help="control steps (20 Hz) between clip frames")
    sim.add_argument("--no-dense-labels", action="store_true",
                     help="leave out the frame-0 depth and segmentation labels (used to pretrain the image encoder)")
    sim.add_argument("--workers", type=int, default=None,
                     help="processes (default: the cores available to this process, cgroup CPU quota included)")
    sim.set_defaults(func=_sim_manipulation)

    merge = commands.add_parser("merge", help="join datasets of one geometry into a new dataset (hard links)")
    merge.add_argument("sources", type=Path, nargs="+", help="dataset directories, in order")
    merge.add_argument("--out", type=Path, required=True, help="new dataset directory")
    merge.set_defaults(func=_merge)

    info = commands.add_parser("info", help="summarise a dataset directory")
    info.add_argument("dataset", type=Path)
    info.add_argument("--json", action="store_true", help="print index.json")
    info.set_defaults(func=_info)


def _generate(args: argparse.Namespace) -> int:
    model = resolve_config(args.config)
    if tuple(model.image_size) != (128, 128):
        raise SystemExit(f"error: the generator renders 128x128 images; config '{args.config}' wants "
                         f"{tuple(model.image_size)}")
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    unknown = sorted(set(kinds or []) - set(SCENE_KINDS))
    if unknown:
        raise SystemExit(f"error: unknown scene kinds {unknown}; choose from {', '.join(SCENE_KINDS)}")
    config = GeneratorConfig(
        image_size=128, num_frames=model.num_frames, query_grid=tuple(model.query_grid),
        query_stride=model.query_stride, query_offset=model.query_offset, rollouts=args.rollouts,
        frame_interval_s=model.frame_interval_s or GeneratorConfig.frame_interval_s,
    )
    index = write_dataset(args.out, args.scenes, args.seed, config, shard_size=args.shard_size,
                          render_frames=args.frames, kinds=kinds, progress=True, overwrite=args.overwrite)
    print(f"wrote {args.scenes} scenes x {args.rollouts} rollouts to {index.parent}")
    return 0


def default_workers(requested: Optional[int]) -> int:
    """``--workers``: the value given (at least 1), else the cores available to this process (affinity and cgroup
    CPU quota, not the machine's CPU count)."""
    if requested is None:
        return cpu_cores.available_cores()
    if requested < 1:
        raise SystemExit(f"error: --workers must be at least 1, got {requested}")
    return requested


def require_simulator() -> None:
    """Exit with what to install when the sim extra (robosuite, MuJoCo) is missing."""
    missing = [name for name in ("robosuite", "mujoco") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not installed: bash scripts/setup_sim.sh installs "
                         "robosuite==1.5.2, mujoco==3.3.7 and, for CPU rendering, libosmesa6 (docs/sim-manipulation.md)")


def _sim_manipulation(args: argparse.Namespace) -> int:
    require_simulator()
    workers = default_workers(args.workers)
    scenes = tuple(s.strip() for s in args.scenes.split(",")) if args.scenes else DEFAULT_SCENES
    stride = 128 // args.grid
    try:
        branch_frames = tuple(int(f) for f in args.branch_frames.split(",") if f.strip())
        config = SimConfig(query_grid=(args.grid, args.grid), query_stride=float(stride),
                           query_offset=1.5, frame_stride=args.frame_stride, scenes=scenes,
                           episodes_per_shard=args.episodes_per_shard, goals_per_scene=args.goals_per_scene,
                           branch_frames=branch_frames, goal_parting_m=args.goal_parting,
                           dense_labels=not args.no_dense_labels)
        for split, shards in (("train", args.train_shards), ("test", args.test_shards)):
            if shards > 0:
                index = write_sim_dataset(args.out / split, split, shards, args.seed, config, workers=workers)
                print(f"{split}: {json.loads(index.read_text())['num_samples']} samples in {index.parent}")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return 0


def _import(args: argparse.Namespace) -> int:
    model = resolve_config(args.config)
    meta = DatasetMeta(image_size=tuple(model.image_size), query_grid=tuple(model.query_grid),
                       query_stride=model.query_stride, query_offset=model.query_offset,
                       num_frames=model.num_frames, frame_interval_s=args.frame_interval,
                       source={"imported_from": {"images": str(args.images), "tracks": str(args.tracks)}})
    object_ids = np.load(args.object_ids) if args.object_ids else None
    index = import_arrays(args.out, np.load(args.images, mmap_mode="r"), np.load(args.tracks, mmap_mode="r"), meta,
                          layout=args.layout, object_ids=object_ids, overwrite=args.overwrite)
    print(f"wrote {index.parent}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    try:
        index = merge_datasets(args.out, args.sources)
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(f"{args.out}: {json.loads(index.read_text())['num_samples']} samples from {len(args.sources)} datasets")
    return 0


def _info(args: argparse.Namespace) -> int:
    dataset = TrajectoryDataset(args.dataset)
    if args.json:
        print(json.dumps(dataset.index, indent=1))
        return 0
    meta = dataset.meta
    print(f"{args.dataset}: {len(dataset)} scenes x {meta.num_rollouts} rollouts in {len(dataset.shard_names)} shards")
    print(f"  image {meta.image_size[1]}x{meta.image_size[0]}, grid {meta.query_grid[0]}x{meta.query_grid[1]} "
          f"(stride {meta.query_stride}, offset {meta.query_offset}), {meta.num_frames} frames"
          + (f" every {meta.frame_interval_s} s" if meta.frame_interval_s else ""))
    print(f"  fields: {', '.join(dataset.fields)}")
    kinds = Counter(dataset.kind_names())
    if None not in kinds:
        print("  kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    if dataset.has("views") and meta.views:
        views = Counter(meta.views[int(v)] for v in dataset.load("views"))
        print("  views: " + ", ".join(f"{v} {n}" for v, n in sorted(views.items())))
    if dataset.has("instructions") and meta.instructions:
        used = len(set(int(i) for i in dataset.load("instructions")))
        print(f"  instructions: {used} of a closed set of {len(meta.instructions)}")
    if dataset.has("visibility"):
        print(f"  visible: {float(dataset.load('visibility').mean()):.3f} of point-frames")
    return 0
