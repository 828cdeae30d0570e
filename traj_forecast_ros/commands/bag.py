"""``traj-forecast bag ...``: inspect, play, record and forecast rosbag2 bags (sqlite3 or MCAP), make the sample bag.

``info``, ``run`` and ``make-sample`` work without a running ROS graph; ``play``, ``record`` and ``replay`` use rclpy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from traj_forecast_ros.bag import sample, sim_sample
from traj_forecast_ros.bag.io import bag_summary
from traj_forecast_ros.bag.offline import run_bag
from traj_forecast_ros.bag.player import play_bag
from traj_forecast_ros.bag.recorder import record_bag
from traj_forecast_ros.bag.replay import replay_through_node
from traj_forecast_ros.commands import command_help
from traj_forecast_ros.commands.data import require_simulator
from traj_forecast_ros.errors import BagError, TrajForecastError
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bag`` command and its subcommands."""
    parser = subparsers.add_parser("bag", help=command_help("bag"),
                                   description=__doc__)
    bag_commands = parser.add_subparsers(dest="bag_command", metavar="SUBCOMMAND")
    bag_commands.required = True

    info = bag_commands.add_parser("info", help="list a bag's topics, types, counts and duration")
    info.add_argument("bag", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_info)

    play = bag_commands.add_parser("play", help="publish a bag's messages over ROS 2 at the recorded pace")
    play.add_argument("bag", type=Path)
    play.add_argument("--rate", type=float, default=1.0, help="speed factor (2 = twice as fast; default 1)")
    play.add_argument("--loop", action="store_true", help="start over at the end until Ctrl-C")
    play.add_argument("--topic", dest="topics", nargs="+", metavar="TOPIC",
                      help="only these topics (default: all)")
    play.add_argument("--qos", choices=("reliable", "best_effort"), default="reliable",
                      help="publisher reliability (reliable reaches every subscriber; default)")
    play.add_argument("--clock", type=float, default=0.0, metavar="HZ",
                      help="also publish the bag time on /clock at HZ (for nodes with use_sim_time:=true)")
    play.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="SECONDS",
                      help="before playing, wait up to SECONDS until every played topic has a subscriber")
    play.set_defaults(func=_play)

    record = bag_commands.add_parser("record", help="record live topics into a new bag (Ctrl-C to stop)")
    record.add_argument("out_bag", type=Path)
    record.add_argument("--topic", dest="topics", nargs="+", metavar="TOPIC",
                        help="topics to record (default: the forecast node's outputs and /diagnostics)")
    record.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    record.add_argument("--duration", type=float, default=0.0, metavar="SECONDS", help="stop after SECONDS")
    record.add_argument("--overwrite", action="store_true", help="replace OUT_BAG if it exists")
    record.set_defaults(func=_record)

    run = bag_commands.add_parser(
        "run", help="forecast every image of a bag offline and deterministically into a new bag",
        description="Runs the forecaster over every image of IN_BAG (no ROS graph; fixed seed) and writes, per "
                    "camera namespace NS (the image topic's parent), NS/forecast_node/forecast, /markers and "
                    "/overlay with the source images' stamps.")
    run.add_argument("in_bag", type=Path)
    run.add_argument("out_bag", type=Path)
    _add_model_arguments(run)
    run.add_argument("--topic", dest="topics", nargs="+", metavar="TOPIC",
                     help="image topics to forecast (default: every sensor_msgs/Image and CompressedImage topic)")
    run.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    run.add_argument("--copy-input", action="store_true", help="also copy the input bag's messages")
    run.add_argument("--overwrite", action="store_true", help="replace OUT_BAG if it exists")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    replay = bag_commands.add_parser(
        "replay", help="replay a bag through the forecast node over DDS, record its outputs, summarise",
        description="Starts the forecast node as a separate process, plays IN_BAG to it over DDS, records the "
                    "node's outputs into OUT_DIR/forecast_bag and writes OUT_DIR/overlay.gif and "
                    "OUT_DIR/summary.json (frames in, forecasts out, drops by reason, latency).")
    replay.add_argument("in_bag", type=Path)
    replay.add_argument("out_dir", type=Path)
    replay.add_argument("--model", default=None,
                        help="registry name or model directory (default: the best model available offline)")
    replay.add_argument("--topic", default=None, nargs="+", metavar="TOPIC",
                        help="image topic(s) to forecast (default: the bag's first image topic); several are the "
                             "cameras of one node (one model, frames batched)")
    replay.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1)")
    replay.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="extra forecast node parameter (repeatable)")
    replay.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="give up waiting for the node after SECONDS")
    replay.add_argument("--untrained-fallback", type=Path, default=None, metavar="DIR",
                        help="if no trained model is available offline, write an untrained tiny model into DIR and "
                             "use it (shows the pipeline working; its forecasts are meaningless)")
    replay.add_argument("--planner", action="store_true",
                        help="also run example_planner on the forecasts and record its images")
    replay.set_defaults(func=_replay)

    sample = bag_commands.add_parser("make-sample", help="regenerate the bundled sample bag from the LIBERO frames")
    sample.add_argument("--images", type=Path, default=None,
                        help="folder with libero_agent_*.jpg and libero_gripper_*.jpg (default: ../shared/data/images)")
    sample.add_argument("--out", type=Path, default=None, help="bag folder (default: data/sample_bag/libero_two_views)")
    sample.add_argument("--rate", type=float, default=10.0, help="frame rate in Hz (default 10)")
    sample.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    sample.set_defaults(func=_make_sample)

    sim_sample = bag_commands.add_parser(
        "make-sim-sample", help="regenerate the scored sample bag from held-out simulated episodes (needs the sim "
                                "extra: bash scripts/setup_sim.sh)")
    sim_sample.add_argument("--out", type=Path, default=None, help="bag folder (default: data/sample_bag/sim_heldout)")
    sim_sample.add_argument("--seed", type=int, default=0, help="held-out stream seed (default 0)")
    sim_sample.add_argument("--episodes", default="0,2,10",
                            help="comma-separated stream episode indices (default 0,2,10: lift, pick_place, stack)")
    sim_sample.add_argument("--frames", type=int, default=12, help="frames per episode, 10 Hz (default 12)")
    sim_sample.set_defaults(func=_make_sim_sample)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="registry name or model directory (default: the best model available offline)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    parser.add_argument("--samples", type=int, default=None, metavar="K",
                        help=f"sampled futures per image (default: the node's num_samples, {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="Euler time points, N-1 denoiser evaluations (default: the node's steps, 0 = the "
                             "model's default_steps)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, the same for every image (default 0)")
    parser.add_argument("--instruction", default=None, help="task instruction for language-conditioned models")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids contention on a busy machine)")


def _fail(message: str) -> int:
    print(f"traj-forecast bag: {message}", file=sys.stderr)
    return 2


def _info(args: argparse.Namespace) -> int:
    try:
        summary = bag_summary(args.bag)
    except BagError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"bag:      {args.bag}")
    print(f"storage:  {summary['storage']}")
    print(f"duration: {summary['duration_s']:.3f} s   messages: {summary['message_count']}")
    width = max(len(topic) for topic in summary["topics"]) if summary["topics"] else 5
    for topic, info in summary["topics"].items():
        print(f"  {topic:<{width}}  {info['count']:>6}  {info['type']}")
    return 0


def _play(args: argparse.Namespace) -> int:
    try:
        stats, waiting, acked = play_bag(args.bag, topics=args.topics, rate=args.rate, loop=args.loop, qos=args.qos,
                                         clock_hz=args.clock, wait_for_subscribers_s=args.wait_for_subscribers)
    except BagError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    if waiting:
        print(f"no subscriber on {waiting} when playback started", file=sys.stderr)
    if not acked:
        print("some subscribers did not acknowledge every message within 5 s", file=sys.stderr)
    print(f"published {stats.total} messages in {stats.wall_s:.2f} s: {stats.published}")
    return 0


def _record(args: argparse.Namespace) -> int:
    try:
        counts = record_bag(str(args.out_bag), topics=args.topics, storage=args.storage, overwrite=args.overwrite,
                            duration_s=args.duration)
    except BagError as exc:
        return _fail(str(exc))
    print(f"recorded {sum(counts.values())} messages into {args.out_bag}: {counts}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            return _fail(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        result = run_bag(
            args.in_bag, args.out_bag, model=args.model, topics=args.topics, device=args.device, dtype=args.dtype,
            num_samples=args.samples, steps=args.steps, seed=args.seed, instruction=args.instruction,
            storage=args.storage, copy_input=args.copy_input, overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except TrajForecastError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail(f"interrupted; the partial {args.out_bag} was removed")
    print(json.dumps(result, indent=2))
    return 0


def _replay(args: argparse.Namespace) -> int:
    try:
        summary = replay_through_node(args.in_bag, args.out_dir, model=args.model, image_topic=args.topic,
                                      rate=args.rate, extra_params=args.param, timeout_s=args.timeout,
                                      untrained_fallback_dir=args.untrained_fallback, planner=args.planner)
    except TrajForecastError as exc:
        return _fail(str(exc))
    return 0 if summary["frames_unaccounted"] == 0 else 1


def _make_sample(args: argparse.Namespace) -> int:
    try:
        path = sample.make_sample_bag(
            out=args.out or sample.SAMPLE_BAG, images_dir=args.images or sample.SHARED_IMAGES,
            rate_hz=args.rate, storage=args.storage,
        )
    except BagError as exc:
        return _fail(str(exc))
    print(f"wrote {path}")
    return 0


def _make_sim_sample(args: argparse.Namespace) -> int:
    try:
        episodes = [int(index) for index in args.episodes.split(",") if index.strip()]
    except ValueError:
        return _fail(f"--episodes takes comma-separated integers, got '{args.episodes}'")
    if not episodes or args.frames < 1:
        return _fail("give at least one episode and --frames >= 1")
    require_simulator()
    try:
        path = sim_sample.make_sim_sample_bag(out=args.out or sim_sample.SIM_SAMPLE_BAG, seed=args.seed,
                                              episodes=episodes, frames_per_episode=args.frames)
    except BagError as exc:
        return _fail(str(exc))
    print(f"wrote {path}")
    return 0
