"""Replay a bag through the forecast node over DDS and account for every frame (the demo and the replay test).

The node runs as its own process (``python -m traj_forecast_ros.ros.forecast_node``) with ``use_sim_time``: for one
image topic in the camera's namespace (the single-camera setup), for several (e.g. both LIBERO views) as ONE node
whose ``cameras`` are the views (one model, their frames batched). This process plays the bag (publishing ``/clock``
from the bag's time), records the node's outputs into a bag, and watches ``/diagnostics``. When every published
frame is either answered by a forecast or counted as dropped by the node (by reason), the node is stopped and a
summary is written: ``forecast_bag/`` (the recording), ``overlay.gif`` (tracks animated over the frames; one
``overlay_<camera>.gif`` per view with several), ``summary.json``, ``node.log``. Latency is measured end to end on
the wall clock: image published -> forecast received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import MultiThreadedExecutor
from rclpy.logging import LoggingSeverity

from traj_forecast_ros.bag import model_choice
from traj_forecast_ros.bag.io import PathLike, bag_topics
from traj_forecast_ros.bag.offline import camera_info_topic, camera_namespace, output_topics
from traj_forecast_ros.bag.player import CONNECT_SETTLE_S, BagPlayer
from traj_forecast_ros.bag.recorder import BagRecorder
from traj_forecast_ros.bag.replay_summary import (  # noqa: F401 - format_summary is part of this module's API
    ReplayLog, View, format_summary, summarise)
from traj_forecast_ros.bag.report import (choose_truth_topic, header_stamp_ns, score_forecasts, truth_topics,
                                          write_overlay_gif)
from traj_forecast_ros.errors import BagError
from traj_forecast_ros.registry import package_file_candidates
from traj_forecast_ros.ros.cameras import CAMERA_NAME, LIBERO_CAMERAS, camera_overrides
from traj_forecast_ros.ros.example_planner import ExamplePlanner
from traj_forecast_ros.ros.qos import qos_from_name

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the traj_forecast_ros package
CLOCK_HZ = 50.0
NODE_STOP_TIMEOUT_S = 10.0
# Queue depth of the played topics, at both ends (the node's ``qos_depth`` maximum). With reliable delivery a frame
# is lost only where a keep-last queue overflows: the node's camera queue (default 5) overflows whenever its
# executor is held up for as long as 5 frames take to arrive (0.5 s at 10 Hz: a first import, a loaded or paused
# machine), and the frames it overwrites never reach the node's books. At this depth they wait, are taken late, and
# are answered or counted (as superseded) instead.
REPLAY_QUEUE_DEPTH = 100


def package_config_file(name: str) -> Optional[Path]:
    """``config/<name>`` from the source checkout or the installed share directory (None when absent)."""
    return next((path for path in package_file_candidates("config", name) if path.is_file()), None)


def ensure_dds_profile() -> None:
    """Use the package's large-data Fast DDS profile unless the user chose one (must run before ``rclpy.init``)."""
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        profile = package_config_file("fastdds_large_data.xml")
        if profile is not None:
            os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)


class NodeProcess:
    """The forecast node as a child process, its output in a log file."""

    def __init__(self, namespace: str, params: Dict[str, Any], log_path: Path) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "traj_forecast_ros.ros.forecast_node", "--ros-args"]
        params_file = package_config_file("forecast.yaml")
        if params_file is not None:
            command += ["--params-file", str(params_file)]
        if namespace:
            command += ["-r", f"__ns:={namespace}"]
        for name, value in params.items():
            command += ["-p", f"{name}:={_param_text(value)}"]
        self.command = command
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores SIGINT
        )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the node's output."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_text(self) -> str:
        """The node's whole output so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT (clean rclpy shutdown), then SIGTERM, then SIGKILL; returns the exit code."""
        for sig, wait_s in ((signal.SIGINT, NODE_STOP_TIMEOUT_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        return self.process.returncode


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_param_overrides(items: Sequence[str]) -> Dict[str, str]:
    """``["name:=value", ...]`` -> dict (values stay text; rcl parses them as YAML)."""
    parsed = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            raise BagError(f"parameter override '{item}' is not NAME:=VALUE")
        parsed[name] = value
    return parsed


def choose_image_topic(bag: PathLike, image_topic: Optional[str], topics: Optional[Dict[str, Any]] = None) -> str:
    """``image_topic`` (checked to be a ``sensor_msgs/Image`` topic of the bag) or the bag's first such topic;
    ``topics``: the bag's topic table when already read."""
    topics = bag_topics(bag) if topics is None else topics
    if image_topic is None:
        images = sorted(t for t, info in topics.items() if info.msgtype == "sensor_msgs/msg/Image")
        if not images:
            raise BagError(f"bag {bag} has no sensor_msgs/Image topic: {sorted(topics)}")
        return images[0]
    if image_topic not in topics:
        raise BagError(f"bag {bag} has no topic {image_topic}: {sorted(topics)}")
    if topics[image_topic].msgtype != "sensor_msgs/msg/Image":
        raise BagError(f"{image_topic} carries {topics[image_topic].msgtype}; replay plays sensor_msgs/Image topics "
                       "(forecast CompressedImage bags offline with `traj-forecast bag run`)")
    return image_topic


def find_instruction_topic(topics: Dict[str, Any]) -> Optional[str]:
    """The bag's task-instruction topic: its one ``std_msgs/String`` topic named ``.../instruction`` (None when it
    has none or several). Replay plays it to the node's ``instruction_topic``."""
    found = [topic for topic, info in topics.items()
             if topic.rsplit("/", 1)[-1] == "instruction" and getattr(info, "msgtype", None) == "std_msgs/msg/String"]
    return found[0] if len(found) == 1 else None


def camera_views(image_topics: Sequence[str], topics_in_bag: Dict[str, Any]) -> List[View]:
    """The views to replay: one image topic is the single-camera setup (the node in the camera's namespace, outputs
    ``<ns>/forecast_node/<output>``); several are the cameras of one node in the root namespace, named as in
    :data:`~traj_forecast_ros.ros.cameras.LIBERO_CAMERAS` when the topic is one of LIBERO's, else after the topic's
    namespace (outputs ``/forecast_node/<camera>/<output>``)."""
    if len(image_topics) == 1:
        topic = image_topics[0]
        return [View(topic, "", output_topics(topic), camera_info_topic(topic, topics_in_bag))]
    libero = {fields["image_topic"]: name for name, fields in LIBERO_CAMERAS.items()}
    views, names = [], set()
    for topic in image_topics:
        name = libero.get(topic) or camera_namespace(topic).strip("/").replace("/", "_") or "camera"
        if not CAMERA_NAME.fullmatch(name) or name in names:
            name = f"camera{len(views)}"
        names.add(name)
        views.append(View(topic, name, output_topics(f"/{topic.rsplit('/', 1)[1]}", camera=name),
                          camera_info_topic(topic, topics_in_bag)))
    return views


def view_parameters(views: Sequence[View]) -> Dict[str, Any]:
    """The node parameters that subscribe it to ``views``: relative names in the camera's namespace for one view,
    the ``cameras`` scheme with absolute topics for several."""
    if len(views) == 1:
        params: Dict[str, Any] = {"image_topic": views[0].image_topic.rsplit("/", 1)[1]}
        if views[0].info_topic is not None:
            params["camera_info_topic"] = "camera_info"
        return params
    cameras = {view.camera: {"image_topic": view.image_topic, "camera_info_topic": view.info_topic or ""}
               for view in views}
    return camera_overrides(cameras)


def replay_through_node(
    in_bag: PathLike,
    out_dir: PathLike,
    model: Optional[str] = None,
    image_topic: Union[None, str, Sequence[str]] = None,
    rate: float = 1.0,
    extra_params: Sequence[str] = (),
    timeout_s: float = 300.0,
    settle_s: float = 5.0,
    print_summary: bool = True,
    untrained_fallback_dir: Optional[PathLike] = None,
    truth_topic: Optional[str] = None,
    planner: bool = False,
) -> Dict[str, Any]:
    """Play ``in_bag``'s camera(s) to a forecast node process, record its outputs, and summarise into ``out_dir``.

    ``image_topic``: one image topic (default: the bag's first), or several: the views are then the cameras of ONE
    node (one model in memory, frames that wait together forecast in one batch). Returns the summary (also written
    to ``out_dir/summary.json``). ``frames_unaccounted`` is the number of frames the node received but neither
    answered nor counted as dropped: 0 when everything works.
    ``model`` None picks the best model available offline; if there is none, an untrained tiny model is written
    into ``untrained_fallback_dir`` when given (and the summary says so), else ``WeightsNotFoundError``.
    When the bag holds recorded true futures (a ``TrajectoryForecast`` topic: ``truth_topic``, or found with
    :func:`~traj_forecast_ros.bag.report.choose_truth_topic`), ``summary["accuracy"]`` scores every forecast of the
    first view against them (:func:`~traj_forecast_ros.bag.report.score_forecasts`: best-of-K MSE, ADE, FDE).
    ``planner``: also run :class:`~traj_forecast_ros.ros.example_planner.ExamplePlanner` on the node's forecasts (in
    this process, single view only) and record its images (``<namespace>/example_planner/{motion_probability,
    keep_out}``).

    Raises:
        BagError: bad arguments, or the node never came up (its log tail is in the message).
    """
    started = time.monotonic()
    in_bag, out_dir = Path(in_bag), Path(out_dir)
    topics_in_bag = bag_topics(in_bag)
    requested = [image_topic] if image_topic is None or isinstance(image_topic, str) else list(image_topic)
    if not requested:
        raise BagError("give at least one image topic (or none: the bag's first)")
    views = camera_views([choose_image_topic(in_bag, topic, topics_in_bag) for topic in requested], topics_in_bag)
    if len({view.image_topic for view in views}) != len(views):
        raise BagError(f"an image topic is given twice: {requested}")
    if planner and len(views) > 1:
        raise BagError("--planner follows one camera: give one image topic")
    namespace = camera_namespace(views[0].image_topic) if len(views) == 1 else ""
    instruction_topic = find_instruction_topic(topics_in_bag)
    node_outputs = [topic for view in views for topic in view.outputs.values()]
    recorded = list(node_outputs)
    if planner:
        recorded += [f"{namespace}/example_planner/{name}" for name in ("motion_probability", "keep_out")]
    if truth_topic is None:
        truth_topic = choose_truth_topic(topics_in_bag, views[0].image_topic, exclude=node_outputs)
    elif truth_topic not in truth_topics(topics_in_bag):
        raise BagError(f"bag {in_bag} has no TrajectoryForecast topic {truth_topic}: "
                       f"{truth_topics(topics_in_bag) or 'none'}")
    model_note = None
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        if untrained_fallback_dir is None:
            model, model_note = model_choice.best_offline_model()
        else:
            model, model_note = model_choice.untrained_fallback(str(untrained_fallback_dir))
    forecast_bag = out_dir / "forecast_bag"

    node_params: Dict[str, Any] = {
        "model": model,
        "use_sim_time": True,
        "seed": 0,
        # The player publishes reliably; a reliable subscription also gets the frames sent while the two ends
        # were still matching (best effort, the camera default, loses them on a loaded machine).
        "qos_reliability": "reliable",
        "qos_depth": REPLAY_QUEUE_DEPTH,
        **view_parameters(views),
    }
    if instruction_topic is not None:
        node_params["instruction_topic"] = instruction_topic
    node_params.update(parse_param_overrides(extra_params))
    if node_params.get("instruction_topic") != instruction_topic:
        instruction_topic = None  # the caller pointed the node elsewhere: the bag's instruction goes unplayed
    forecast_topics = {view.outputs["forecast"] for view in views}

    ensure_dds_profile()
    log = ReplayLog()
    context = rclpy.context.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    node_process: Optional[NodeProcess] = None
    recorder: Optional[BagRecorder] = None
    player: Optional[BagPlayer] = None
    frames_in: Dict[str, int] = {view.image_topic: 0 for view in views}
    spin_thread = threading.Thread(target=executor.spin, daemon=True)
    try:
        def on_output(topic: str, receive_ns: int, data: bytes) -> None:
            with log.lock:
                log.output_counts[topic] = log.output_counts.get(topic, 0) + 1
                if topic in forecast_topics:
                    log.forecast_received_ns.setdefault((topic, header_stamp_ns(data)), receive_ns)

        recorder = BagRecorder(output=str(forecast_bag), topics=recorded + ["/diagnostics"],
                               storage="mcap", overwrite=True, node_name="replay_recorder",
                               on_message=on_output, context=context)
        recorder.get_logger().set_level(LoggingSeverity.WARN)  # the summary says what was recorded
        player_node = rclpy.create_node("replay_player", context=context)
        _watch_diagnostics(player_node, f"{namespace}/forecast_node", log)
        played = [topic for view in views for topic in (view.image_topic, view.info_topic) if topic is not None]
        played += [instruction_topic] if instruction_topic is not None else []
        player = BagPlayer(player_node, in_bag, topics=played, rate=rate, clock_hz=CLOCK_HZ,
                           qos=qos_from_name("reliable", depth=REPLAY_QUEUE_DEPTH))
        executor.add_node(recorder)
        executor.add_node(player_node)
        if planner:
            executor.add_node(ExamplePlanner(context=context, namespace=namespace))  # reads the node's forecasts
        spin_thread.start()

        node_process = NodeProcess(namespace, node_params, out_dir / "node.log")
        _wait_until_ready(node_process, player, recorder, played, recorded, timeout_s)

        def on_publish(message, wall_ns: int) -> None:
            if message.topic in frames_in:
                with log.lock:
                    log.published_ns[(message.topic, header_stamp_ns(message.data))] = wall_ns

        stats = player.play(on_publish=on_publish, keep_clock=True)
        frames_in = {topic: stats.published[topic] for topic in frames_in}
        complete = _wait_until_accounted(log, sum(frames_in.values()), sorted(forecast_topics), node_process,
                                         timeout_s, settle_s,
                                         followers=[topic for topic in recorded if topic not in node_outputs])
    finally:
        exit_code = node_process.stop() if node_process is not None else None
        if player is not None:
            player.close()
        if recorder is not None:
            recorder.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown(context=context)

    summary = summarise(in_bag, views, model, model_note, rate, frames_in, log, forecast_bag, complete, exit_code)
    truths = {view.image_topic: truth_topic if index == 0 else
              choose_truth_topic(topics_in_bag, view.image_topic, exclude=node_outputs + [truth_topic or ""])
              for index, view in enumerate(views)}
    for view in views:
        forecast_topic, truth = view.outputs["forecast"], truths[view.image_topic]
        if summary["forecasts_by_camera"][view.camera or view.image_topic]:
            name = f"overlay_{view.camera}.gif" if len(views) > 1 else "overlay.gif"
            gif = write_overlay_gif(forecast_bag, forecast_topic, in_bag, view.image_topic, out_dir / name,
                                    truth_topic=truth)
            summary["outputs"][name.replace(".gif", "_gif")] = str(gif)
        if truth is not None:
            scored = (score_forecasts(forecast_bag, forecast_topic, in_bag, truth) if summary["forecasts_out"]
                      else {"truth_topic": truth, "scored": 0, "unscored": {}, "per_forecast": []})
            summary.setdefault("accuracy", scored)  # the first view's (the single-camera figure)
            if len(views) > 1:
                summary.setdefault("accuracy_by_camera", {})[view.camera] = scored
    summary["outputs"]["node_log"] = str(out_dir / "node.log")
    summary["wall_s"] = round(time.monotonic() - started, 2)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if print_summary:
        print(format_summary(summary))
    return summary


def _watch_diagnostics(node, node_fqn: str, log: ReplayLog) -> None:
    """Keep the latest key/values of the node's ``/diagnostics`` status in ``log``."""
    prefix = f"{node_fqn}:"

    def store(message: DiagnosticArray) -> None:
        for status in message.status:
            if status.name.startswith(prefix):
                with log.lock:
                    log.diagnostics = {kv.key: kv.value for kv in status.values}

    node.create_subscription(DiagnosticArray, "/diagnostics", store, 10)


def _wait_until_ready(node_process: NodeProcess, player, recorder, played: Sequence[str], outputs: Sequence[str],
                      timeout_s: float) -> None:
    """Block until the node subscribes to every played topic (camera, camera info, instruction) and the recorder
    follows the node's outputs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node_process.alive():
            raise BagError(f"the forecast node exited (code {node_process.process.returncode}) before it was "
                           f"ready:\n{node_process.log_tail()}")
        if any(marker in node_process.log_text() for marker in ("configure failed", "cannot load model")):
            raise BagError(f"the forecast node could not load its model:\n{node_process.log_tail()}")
        subscribed = not player.wait_for_subscribers(list(played), 0.0)
        if subscribed and set(outputs) <= set(recorder.subscribed_topics):
            time.sleep(CONNECT_SETTLE_S)  # let both ends of every new connection match before the first frame
            return
        time.sleep(0.1)
    raise BagError(f"the forecast node did not subscribe to {', '.join(played)} within {timeout_s:.0f} s:\n"
                   f"{node_process.log_tail()}")


def _wait_until_accounted(log: ReplayLog, frames_in: int, forecast_topics: Sequence[str], node_process: NodeProcess,
                          timeout_s: float, settle_s: float, followers: Sequence[str] = ()) -> bool:
    """Wait until the node has answered or dropped every frame it received and the recorder has every forecast
    (and as many messages on each of ``followers``, topics published once per forecast).

    Frames the node never received (lost in transport) cannot be waited for: once the counts have not changed
    for ``settle_s`` seconds, the wait ends. Returns True when every published frame is accounted for.
    """
    deadline = time.monotonic() + timeout_s
    last_counts, stable_since = None, time.monotonic()
    while time.monotonic() < deadline and node_process.alive():
        received = log.diagnostic_int("frames_received")
        published = log.diagnostic_int("forecasts_published")
        dropped = log.diagnostic_int("dropped_total") + log.diagnostic_int("rejected_total")
        with log.lock:
            recorded = sum(log.output_counts.get(topic, 0) for topic in forecast_topics)
            following = min([log.output_counts.get(topic, 0) for topic in followers], default=recorded)
        settled = published + dropped == received and recorded >= published and following >= recorded
        if settled and received >= frames_in:
            return True
        counts = (received, published, dropped, recorded)
        if counts != last_counts:
            last_counts, stable_since = counts, time.monotonic()
        elif settled and time.monotonic() - stable_since > settle_s:
            return False
        time.sleep(0.1)
    return False
