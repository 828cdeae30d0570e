"""Replay a bag through the forecast node over DDS and account for every frame (the demo and the replay test).

The node runs as its own process (``python -m traj_forecast_ros.ros.forecast_node``) in the camera's namespace with
``use_sim_time``; this process plays the bag (publishing ``/clock`` from the bag's time), records the node's
outputs into a bag, and watches ``/diagnostics``. When every published frame is either answered by a forecast
or counted as dropped by the node (by reason), the node is stopped and a summary is written:
``forecast_bag/`` (the recording), ``overlay.gif`` (tracks animated over the frames), ``summary.json``,
``node.log``. Latency is measured end to end on the wall clock: image published -> forecast received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from traj_forecast_ros.bag.io import PathLike, bag_topics, read_messages
from traj_forecast_ros.bag.offline import camera_info_topic, camera_namespace, output_topics
from traj_forecast_ros.bag.report import (choose_truth_topic, format_accuracy, header_stamp_ns, percentiles_ms,
                                          score_forecasts, stamp_ns, truth_topics, write_overlay_gif)
from traj_forecast_ros.errors import BagError

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the traj_forecast_ros package
CLOCK_HZ = 50.0
NODE_STOP_TIMEOUT_S = 10.0


def package_config_file(name: str) -> Optional[Path]:
    """``config/<name>`` from the source checkout or the installed share directory (None when absent)."""
    from traj_forecast_ros.registry import package_file_candidates

    return next((path for path in package_file_candidates("config", name) if path.is_file()), None)


def ensure_dds_profile() -> None:
    """Use the package's large-data Fast DDS profile unless the user chose one (must run before ``rclpy.init``)."""
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        profile = package_config_file("fastdds_large_data.xml")
        if profile is not None:
            os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)


@dataclass
class ReplayLog:
    """What happened during a replay, filled from the player, recorder and diagnostics callbacks."""

    published_ns: Dict[int, int] = field(default_factory=dict)  # image stamp -> wall time published
    forecast_received_ns: Dict[int, int] = field(default_factory=dict)  # forecast stamp -> wall time received
    output_counts: Dict[str, int] = field(default_factory=dict)
    diagnostics: Dict[str, str] = field(default_factory=dict)  # the node's latest key/values
    lock: threading.Lock = field(default_factory=threading.Lock)

    def diagnostic_int(self, key: str) -> int:
        """An integer key of the node's latest diagnostics (0 when not reported yet)."""
        with self.lock:
            return int(self.diagnostics.get(key, "0") or 0)

    def counts_by_reason(self, category: str) -> Dict[str, int]:
        """The node's ``dropped`` (good frames not forecast, failures included) or ``rejected`` (bad input)
        counters by reason."""
        prefix = f"{category}."
        with self.lock:
            return {key[len(prefix):]: int(value) for key, value in self.diagnostics.items()
                    if key.startswith(prefix)}


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


def replay_through_node(
    in_bag: PathLike,
    out_dir: PathLike,
    model: Optional[str] = None,
    image_topic: Optional[str] = None,
    rate: float = 1.0,
    extra_params: Sequence[str] = (),
    timeout_s: float = 300.0,
    settle_s: float = 5.0,
    print_summary: bool = True,
    untrained_fallback_dir: Optional[PathLike] = None,
    truth_topic: Optional[str] = None,
    planner: bool = False,
) -> Dict[str, Any]:
    """Play ``in_bag``'s camera to a forecast node process, record its outputs, and summarise into ``out_dir``.

    Returns the summary (also written to ``out_dir/summary.json``). ``frames_unaccounted`` is the number of
    frames the node received but neither answered nor counted as dropped: 0 when everything works.
    ``model`` None picks the best model available offline; if there is none, an untrained tiny model is written
    into ``untrained_fallback_dir`` when given (and the summary says so), else ``WeightsNotFoundError``.
    When the bag holds recorded true futures (a ``TrajectoryForecast`` topic: ``truth_topic``, or found with
    :func:`~traj_forecast_ros.bag.report.choose_truth_topic`), ``summary["accuracy"]`` scores every forecast
    against them (:func:`~traj_forecast_ros.bag.report.score_forecasts`: best-of-K MSE, ADE, FDE, per frame).
    ``planner``: also run :class:`~traj_forecast_ros.ros.example_planner.ExamplePlanner` on the node's forecasts (in
    this process) and record its images (``<namespace>/example_planner/{motion_probability,keep_out}``).

    Raises:
        BagError: bad arguments, or the node never came up (its log tail is in the message).
    """
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.logging import LoggingSeverity

    from traj_forecast_ros.bag.player import BagPlayer
    from traj_forecast_ros.bag.recorder import BagRecorder

    started = time.monotonic()
    in_bag, out_dir = Path(in_bag), Path(out_dir)
    topics_in_bag = bag_topics(in_bag)
    image_topic = choose_image_topic(in_bag, image_topic, topics_in_bag)
    namespace = camera_namespace(image_topic)
    info_topic = camera_info_topic(image_topic, topics_in_bag)
    has_info = info_topic is not None
    instruction_topic = find_instruction_topic(topics_in_bag)
    outputs = output_topics(image_topic)
    recorded = dict(outputs)
    if planner:
        recorded.update({name: f"{namespace}/example_planner/{name}" for name in ("motion_probability", "keep_out")})
    if truth_topic is None:
        truth_topic = choose_truth_topic(topics_in_bag, image_topic, exclude=list(outputs.values()))
    elif truth_topic not in truth_topics(topics_in_bag):
        raise BagError(f"bag {in_bag} has no TrajectoryForecast topic {truth_topic}: "
                       f"{truth_topics(topics_in_bag) or 'none'}")
    model_note = None
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        from traj_forecast_ros.bag import model_choice

        if untrained_fallback_dir is None:
            model, model_note = model_choice.best_offline_model()
        else:
            model, model_note = model_choice.untrained_fallback(str(untrained_fallback_dir))
    forecast_bag = out_dir / "forecast_bag"

    node_params: Dict[str, Any] = {
        "model": model,
        "image_topic": image_topic.rsplit("/", 1)[1],
        "use_sim_time": True,
        "seed": 0,
        # The player publishes reliably; a reliable subscription also gets the frames sent while the two ends
        # were still matching (best effort, the camera default, loses them on a loaded machine).
        "qos_reliability": "reliable",
    }
    if has_info:
        node_params["camera_info_topic"] = "camera_info"
    if instruction_topic is not None:
        node_params["instruction_topic"] = instruction_topic
    node_params.update(parse_param_overrides(extra_params))
    if node_params.get("instruction_topic") != instruction_topic:
        instruction_topic = None  # the caller pointed the node elsewhere: the bag's instruction goes unplayed

    ensure_dds_profile()
    log = ReplayLog()
    context = rclpy.context.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    node_process: Optional[NodeProcess] = None
    recorder: Optional[BagRecorder] = None
    player: Optional[BagPlayer] = None
    spin_thread = threading.Thread(target=executor.spin, daemon=True)
    try:
        def on_output(topic: str, receive_ns: int, data: bytes) -> None:
            with log.lock:
                log.output_counts[topic] = log.output_counts.get(topic, 0) + 1
                if topic == outputs["forecast"]:
                    log.forecast_received_ns.setdefault(header_stamp_ns(data), receive_ns)

        recorder = BagRecorder(output=str(forecast_bag), topics=list(recorded.values()) + ["/diagnostics"],
                               storage="mcap", overwrite=True, node_name="replay_recorder",
                               on_message=on_output, context=context)
        recorder.get_logger().set_level(LoggingSeverity.WARN)  # the summary says what was recorded
        player_node = rclpy.create_node("replay_player", context=context)
        _watch_diagnostics(player_node, f"{namespace}/forecast_node", log)
        played = [topic for topic in (image_topic, info_topic, instruction_topic) if topic is not None]
        player = BagPlayer(player_node, in_bag, topics=played, rate=rate, clock_hz=CLOCK_HZ)
        executor.add_node(recorder)
        executor.add_node(player_node)
        if planner:
            from traj_forecast_ros.ros.example_planner import ExamplePlanner

            executor.add_node(ExamplePlanner(context=context, namespace=namespace))  # reads the node's forecasts
        spin_thread.start()

        node_process = NodeProcess(namespace, node_params, out_dir / "node.log")
        _wait_until_ready(node_process, player, recorder, played, recorded, timeout_s)

        def on_publish(message, wall_ns: int) -> None:
            if message.topic == image_topic:
                with log.lock:
                    log.published_ns[header_stamp_ns(message.data)] = wall_ns

        stats = player.play(on_publish=on_publish, keep_clock=True)
        frames_in = stats.published[image_topic]
        complete = _wait_until_accounted(log, frames_in, outputs["forecast"], node_process, timeout_s, settle_s,
                                         followers=[topic for name, topic in recorded.items() if name not in outputs])
    finally:
        exit_code = node_process.stop() if node_process is not None else None
        if player is not None:
            player.close()
        if recorder is not None:
            recorder.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown(context=context)

    summary = _summarise(in_bag, image_topic, outputs, model, model_note, rate, frames_in, log, forecast_bag,
                         complete, exit_code)
    if summary["forecasts_out"]:
        gif = write_overlay_gif(forecast_bag, outputs["forecast"], in_bag, image_topic, out_dir / "overlay.gif",
                                truth_topic=truth_topic)
        summary["outputs"]["overlay_gif"] = str(gif)
    if truth_topic is not None:
        summary["accuracy"] = (score_forecasts(forecast_bag, outputs["forecast"], in_bag, truth_topic)
                               if summary["forecasts_out"] else {"truth_topic": truth_topic, "scored": 0,
                                                                 "unscored": {}, "per_forecast": []})
    summary["outputs"]["node_log"] = str(out_dir / "node.log")
    summary["wall_s"] = round(time.monotonic() - started, 2)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if print_summary:
        print(format_summary(summary))
    return summary


def _watch_diagnostics(node, node_fqn: str, log: ReplayLog) -> None:
    """Keep the latest key/values of the node's ``/diagnostics`` status in ``log``."""
    from diagnostic_msgs.msg import DiagnosticArray

    prefix = f"{node_fqn}:"

    def store(message: DiagnosticArray) -> None:
        for status in message.status:
            if status.name.startswith(prefix):
                with log.lock:
                    log.diagnostics = {kv.key: kv.value for kv in status.values}

    node.create_subscription(DiagnosticArray, "/diagnostics", store, 10)


def _wait_until_ready(node_process: NodeProcess, player, recorder, played: Sequence[str], outputs: Dict[str, str],
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
        if subscribed and set(outputs.values()) <= set(recorder.subscribed_topics):
            time.sleep(0.5)  # let both ends of every new connection match before the first frame
            return
        time.sleep(0.1)
    raise BagError(f"the forecast node did not subscribe to {', '.join(played)} within {timeout_s:.0f} s:\n"
                   f"{node_process.log_tail()}")


def _wait_until_accounted(log: ReplayLog, frames_in: int, forecast_topic: str, node_process: NodeProcess,
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
            recorded = log.output_counts.get(forecast_topic, 0)
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


def _check_stamps(forecast_bag: Path, outputs: Dict[str, str], sent: Sequence[int]) -> Dict[str, Any]:
    """Every recorded output must carry the stamp of a frame that was sent; forecasts one per frame."""
    from traj_forecast_ros.bag.io import deserialize
    from traj_forecast_ros.bag.typestore import make_typestore

    store = None
    sent_set = set(sent)
    present = bag_topics(forecast_bag) if (forecast_bag / "metadata.yaml").exists() else {}
    result: Dict[str, Any] = {"unknown_stamps": 0, "duplicate_forecasts": 0}
    for name, topic in outputs.items():
        if topic not in present:
            continue
        stamps = []
        for message in read_messages(forecast_bag, [topic]):
            if name != "markers":  # forecast and overlay start with their header: no need to decode the rest
                stamps.append(header_stamp_ns(message.data))
                continue
            store = store or make_typestore()
            stamps += sorted({stamp_ns(m.header) for m in deserialize(message, store).markers})
        result["unknown_stamps"] += sum(1 for s in stamps if s not in sent_set)
        if name == "forecast":
            result["duplicate_forecasts"] = len(stamps) - len(set(stamps))
    result["ok"] = result["unknown_stamps"] == 0 and result["duplicate_forecasts"] == 0
    return result


def _summarise(in_bag: Path, image_topic: str, outputs: Dict[str, str], model: str, model_note: Optional[str],
               rate: float, frames_in: int, log: ReplayLog, forecast_bag: Path, complete: bool,
               exit_code: Optional[int]) -> Dict[str, Any]:
    with log.lock:
        published_ns = dict(log.published_ns)
        received_ns = dict(log.forecast_received_ns)
        output_counts = dict(log.output_counts)
        diagnostics = dict(log.diagnostics)
    frames_received = log.diagnostic_int("frames_received")
    dropped, rejected = log.counts_by_reason("dropped"), log.counts_by_reason("rejected")
    forecasts_out = output_counts.get(outputs["forecast"], 0)
    lost = max(0, frames_in - frames_received)
    latencies = [(received_ns[s] - published_ns[s]) / 1e9 for s in received_ns if s in published_ns]
    unaccounted = frames_in - forecasts_out - sum(dropped.values()) - sum(rejected.values()) - lost
    return {
        "bag": str(in_bag),
        "image_topic": image_topic,
        "model": model,
        "model_choice": model_note or "given with --model",
        "rate": rate,
        "frames_in": frames_in,
        "frames_received_by_node": frames_received,
        "forecasts_out": forecasts_out,
        "dropped": {**dropped, **({"lost_in_transport": lost} if lost else {})},
        "rejected": rejected,
        "frames_unaccounted": unaccounted,
        "all_frames_accounted": complete and unaccounted == 0,
        "latency_ms": percentiles_ms(latencies),
        "stamps": _check_stamps(forecast_bag, outputs, list(published_ns)),
        "outputs_recorded": output_counts,
        "node_diagnostics": diagnostics,
        "node_exit_code": exit_code,
        "outputs": {"forecast_bag": str(forecast_bag)},
    }


def node_latency_line(diagnostics: Dict[str, str]) -> str:
    """The node's own latency figures from its /diagnostics, each with its clock."""
    if diagnostics.get("processing_latency_p50_ms", "n/a") == "n/a":
        return "no latency reported"
    return (f"processing p50 {diagnostics['processing_latency_p50_ms']} ms (wall clock: frame received -> forecast "
            f"published), stamp age p50 {diagnostics.get('stamp_age_p50_ms', 'n/a')} ms (node clock, simulated time "
            "in a replay)")


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as a few human-readable lines."""
    latency = summary["latency_ms"]
    dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["dropped"].items())) or "none"
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["rejected"].items())) or "none"
    lines = [
        f"replayed {summary['bag']} ({summary['image_topic']}, {summary['rate']}x) through forecast_node",
        f"  model:         {summary['model']} ({summary['model_choice']})",
        f"  frames in:     {summary['frames_in']}   received by the node: {summary['frames_received_by_node']}",
        f"  forecasts out: {summary['forecasts_out']}",
        f"  dropped:       {dropped}",
        f"  rejected:      {rejected}",
        f"  unaccounted:   {summary['frames_unaccounted']}",
        "  latency:       " + (f"p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms (wall clock: image published "
                              "-> forecast received)" if latency["count"] else "n/a (no forecasts)"),
        "  node:          " + node_latency_line(summary.get("node_diagnostics", {})),
        f"  stamps:        {'every output carries a source frame stamp' if summary['stamps']['ok'] else summary['stamps']}",
    ]
    if "accuracy" in summary:
        lines.append(f"  accuracy:      {format_accuracy(summary['accuracy'])}")
    for name, path in summary["outputs"].items():
        lines.append(f"  {name + ':':<14} {path}")
    return "\n".join(lines)
