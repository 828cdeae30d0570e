"""Helpers for the ROS tests: the node as a separate process and an in-test probe node.

DDS stays on loopback with a random domain and the large-data Fast DDS profile (set in test/conftest.py, inherited
by the node processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "config" / "forecast.yaml"


def ros_available() -> Optional[str]:
    """None when rclpy and the built messages import, else the reason to skip."""
    try:
        import rclpy  # noqa: F401
        import traj_forecast_msgs.msg  # noqa: F401
    except ImportError as exc:
        return f"ROS 2 wheels or traj_forecast_msgs missing ({exc}); run scripts/setup.sh"
    return None


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass (returns None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


CONNECT_SETTLE_S = 0.5  # as bag replay: after the writer sees the reader, the reader may not have matched it yet


def wait_connected(publisher: Any, timeout: float) -> bool:
    """Wait until ``publisher`` has a subscriber, then ``CONNECT_SETTLE_S`` more. A best-effort reader drops samples
    from a writer it has not matched yet, although the writer already counts it: without the settle the first
    frame is sometimes lost in DDS (never seen by the node)."""
    if not wait_until(lambda: publisher.get_subscription_count() > 0, timeout):
        return False
    time.sleep(CONNECT_SETTLE_S)
    return True


class PauseMeter:
    """Adds up the time this process could not run (the machine paused, or every core was taken), as a thread that
    sleeps ``tick`` s at a time sees it: every oversleep beyond ``slack`` s. A timing bound minus :attr:`paused_s`
    holds however often the machine pauses (on this project's 2-core VMs, all processes at once, for up to 0.8 s)."""

    def __init__(self, tick: float = 0.01, slack: float = 0.05) -> None:
        self.tick, self.slack, self.paused_s = tick, slack, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pause-meter", daemon=True)

    def __enter__(self) -> "PauseMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            self.paused_s += max(0.0, now - last - self.tick - self.slack)
            last = now


def _default_sigint() -> None:
    # A child of a non-interactive shell may inherit SIGINT ignored; the node must see it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class NodeProcess:
    """``python -m traj_forecast_ros.ros.forecast_node`` in its own process, output captured in a log file."""

    def __init__(self, log_path: Path, params: Dict[str, Any], namespace: str = "") -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "traj_forecast_ros.ros.forecast_node", "--ros-args",
                   "--params-file", str(PARAMS_FILE)]
        for name, value in params.items():
            command += ["-p", f"{name}:={value}"]
        if namespace:
            command += ["-r", f"__ns:={namespace}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0",
                   RCUTILS_CONSOLE_OUTPUT_FORMAT="[{severity}] [{name}]: {message}")
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        preexec_fn=_default_sigint)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the node printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> bool:
        """True once ``text`` appears in the log (False on timeout or if the process died)."""
        return bool(wait_until(lambda: text in self.log() or self.process.poll() is not None, timeout)) \
            and text in self.log()

    def rss_mb(self) -> float:
        """Resident memory of the node process in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the node process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Tuple[Optional[int], float]:
        """Send ``sig`` and wait; returns (exit code or None if it had to be killed, seconds it took)."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                self._log.close()
                return None, time.monotonic() - started
        self._log.close()
        return self.process.returncode, time.monotonic() - started


class SpunNode:
    """An rclpy node spun in this process by its own context, executor and thread (as ``rclpy.spin`` runs it)."""

    def __init__(self, make_node: Callable[[Any], Any]) -> None:
        """``make_node(context)`` creates the node in the fresh context."""
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = make_node(self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def close(self, timeout: float = 1.0) -> None:
        """Stop spinning, destroy the node and shut its context down."""
        import rclpy

        self.executor.shutdown(timeout_sec=timeout)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


class Probe(SpunNode):
    """An in-test node that publishes, records and calls."""

    def __init__(self, name: str) -> None:
        import rclpy

        self._lock = threading.Lock()
        self.received: Dict[str, List[Tuple[float, Any]]] = {}
        self._clients: Dict[str, Any] = {}  # kept service clients by service name
        super().__init__(lambda context: rclpy.create_node(name, context=context))

    def subscribe(self, msg_type: Any, topic: str, depth: int = 50) -> None:
        """Record every message on ``topic`` (reliable QoS) with its receive time (time.time())."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        with self._lock:
            self.received.setdefault(topic, [])

        def record(msg: Any) -> None:
            with self._lock:
                self.received[topic].append((time.time(), msg))

        self.node.create_subscription(msg_type, topic, record,
                                      QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE))

    def messages(self, topic: str) -> List[Any]:
        """Messages received on ``topic`` so far (oldest first)."""
        with self._lock:
            return [msg for _, msg in self.received.get(topic, [])]

    def timed_messages(self, topic: str) -> List[Tuple[float, Any]]:
        with self._lock:
            return list(self.received.get(topic, []))

    def clear(self, topic: str) -> None:
        with self._lock:
            self.received[topic] = []

    def publisher(self, msg_type: Any, topic: str, reliable: bool = True, depth: int = 10) -> Any:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        return self.node.create_publisher(msg_type, topic, QoSProfile(depth=depth, reliability=reliability))

    def call(self, srv_type: Any, name: str, request: Any, timeout: float = 15.0, keep_client: bool = False) -> Any:
        """Call a service and return its response (fails the test on timeout). With ``keep_client`` the client
        (and its discovery) is made once and reused by later calls that keep it too, so timing such a call measures
        the service, not client creation and discovery."""
        client = self._clients.get(name) if keep_client else None
        if client is None:
            client = self.node.create_client(srv_type, name)
            if keep_client:
                self._clients[name] = client
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                pytest.fail(f"service {name} not available after {timeout} s")
            future = client.call_async(request)
            if not wait_until(future.done, timeout):
                pytest.fail(f"service {name} did not answer within {timeout} s")
            return future.result()
        finally:
            if not keep_client:
                self.node.destroy_client(client)


# ------------------------------------------------------------------------------------------------ counters
def counts_balance(values: Dict[str, str], stats: Any = None) -> Optional[str]:
    """None when a /diagnostics status accounts for every frame, else what does not add up.

    ``frames_received == forecasts_published + dropped_total + rejected_total``; the ``dropped.<reason>`` keys sum to
    ``dropped_total`` and name only reasons of the dropped and failed categories, the ``rejected.<reason>`` keys sum to
    ``rejected_total`` and name only bad-input reasons; ``failed_total`` is the failed part of ``dropped_total``.
    With ``stats`` (the in-process node's ``PipelineStats``), every count must also equal the node's own counters,
    so a reason missing from (or invented by) the diagnostics fails too.
    """
    from traj_forecast_ros.ros.pipeline import reason_category

    received, published = int(values["frames_received"]), int(values["forecasts_published"])
    dropped_total, rejected_total = int(values["dropped_total"]), int(values["rejected_total"])
    by_prefix: Dict[str, Dict[str, int]] = {"dropped": {}, "rejected": {}}
    for key, value in values.items():
        prefix, _, reason = key.partition(".")
        if prefix in by_prefix and reason:
            by_prefix[prefix][reason] = int(value)
    problems = []
    if received != published + dropped_total + rejected_total:
        problems.append(f"received {received} != published {published} + dropped_total {dropped_total} + "
                        f"rejected_total {rejected_total}")
    for prefix, total in (("dropped", dropped_total), ("rejected", rejected_total)):
        if sum(by_prefix[prefix].values()) != total:
            problems.append(f"{prefix}.* sum to {sum(by_prefix[prefix].values())}, {prefix}_total is {total}")
    misfiled = [f"dropped.{r}" for r in by_prefix["dropped"] if reason_category(r) == "rejected"]
    misfiled += [f"rejected.{r}" for r in by_prefix["rejected"] if reason_category(r) != "rejected"]
    if misfiled:
        problems.append(f"reasons under the wrong prefix: {misfiled}")
    failed = sum(count for r, count in by_prefix["dropped"].items() if reason_category(r) == "failed")
    if failed != int(values["failed_total"]):
        problems.append(f"failed reasons sum to {failed}, failed_total is {values['failed_total']}")
    if stats is not None:
        node_counts = {"received": stats.received, "published": stats.published,
                       "reasons": stats.not_forecast.counts()}
        reported = {"received": received, "published": published,
                    "reasons": {**by_prefix["dropped"], **by_prefix["rejected"]}}
        if reported != node_counts:
            problems.append(f"diagnostics {reported} != the node's counters {node_counts}")
    return "; ".join(problems) or None


def node_diagnostics(probe: "Probe", node_name: str, after: int = 0) -> Optional[Dict[str, str]]:
    """Key/values (plus ``_level`` and ``_message``) of the newest /diagnostics status of ``node_name`` among the
    messages after index ``after``; None when there is none yet."""
    for msg in reversed(probe.messages("/diagnostics")[after:]):
        for status in msg.status:
            if status.name.startswith(f"{node_name}:"):
                values = {kv.key: kv.value for kv in status.values}
                values.update(_level=str(int.from_bytes(bytes(status.level), "little") if isinstance(
                    status.level, (bytes, bytearray)) else int(status.level)), _message=status.message)
                return values
    return None


def wait_balanced(probe: "Probe", node_name: str, timeout: float = 20.0,
                  stats: Optional[Callable[[], Any]] = None) -> Dict[str, str]:
    """The node's first fresh /diagnostics status whose counters balance (fails the test with the last status when
    none does within ``timeout``: a frame went uncounted). ``stats``: returns the in-process node's
    ``PipelineStats``, which the status must then match exactly."""
    seen = len(probe.messages("/diagnostics"))
    last: Dict[str, Any] = {}

    def balanced() -> Optional[Dict[str, str]]:
        values = node_diagnostics(probe, node_name, seen)
        if values is None:
            return None
        last["values"] = values
        return values if counts_balance(values, stats() if stats else None) is None else None

    values = wait_until(balanced, timeout, interval=0.1)
    if values is None:
        got = last.get("values")
        problem = counts_balance(got, stats() if stats else None) if got else "no diagnostics"
        pytest.fail(f"counters never balanced: {problem}; {got}")
    return values


class InProcessNode(SpunNode):
    """A ``ForecastNode`` with an injected forecaster factory, spun in this process (own context and executor
    thread) and reached over real DDS through its topics and lifecycle/parameter services."""

    def __init__(self, factory: Callable[..., Any], namespace: str, **params: Any) -> None:
        from rclpy.parameter import Parameter

        from traj_forecast_ros.ros.forecast_node import ForecastNode

        overrides = [Parameter(name, value=value) for name, value in params.items()]
        super().__init__(lambda context: ForecastNode(forecaster_factory=factory, context=context,
                                                      namespace=namespace, parameter_overrides=overrides))
        self.name = self.node.get_fully_qualified_name()

    def close(self, timeout: float = 2.0) -> None:
        self.node.stop_worker(timeout=timeout)
        super().close(timeout)
