"""``forecast_recorder``: a node that writes live topics (by default the forecast node's outputs) to a bag.

Each requested topic is subscribed as soon as a publisher for it appears, with a QoS that matches every
publisher (like ``ros2 bag record``); messages are stored as received (CDR bytes) with their receive time.

    python -m traj_forecast_ros.bag.recorder --ros-args -p output:=outputs/forecast_bag \
        -p topics:="['/forecast_node/forecast', '/forecast_node/markers', '/forecast_node/overlay']"
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter

from traj_forecast_ros.bag.io import BackgroundBagWriter
from traj_forecast_ros.errors import BagError
from traj_forecast_ros.ros.io_tables import OUTPUTS, output_topic
from traj_forecast_ros.ros.qos import message_class, qos_matching_publishers

# The single-camera node's outputs (the output table) and /diagnostics.
DEFAULT_TOPICS = [output_topic("", spec.name, node_prefix="/forecast_node") for spec in OUTPUTS] + ["/diagnostics"]

MessageCallback = Callable[[str, int, bytes], None]  # (topic, receive time ns, CDR bytes)


class BagRecorder(Node):
    """Records the ``topics`` parameter's topics into the bag folder ``output`` (``storage`` mcap or sqlite3)."""

    def __init__(
        self,
        output: Optional[str] = None,
        topics: Optional[Sequence[str]] = None,
        storage: Optional[str] = None,
        overwrite: Optional[bool] = None,
        node_name: str = "forecast_recorder",
        on_message: Optional[MessageCallback] = None,
        context: Optional[Context] = None,
    ) -> None:
        overrides = [
            Parameter(name, value=value)
            for name, value in (("output", output), ("topics", list(topics) if topics else None),
                                ("storage", storage), ("overwrite", overwrite))
            if value is not None
        ]
        super().__init__(node_name, parameter_overrides=overrides, context=context)
        self.declare_parameter("output", "")
        self.declare_parameter("topics", list(DEFAULT_TOPICS))
        self.declare_parameter("storage", "mcap")
        self.declare_parameter("overwrite", False)
        out = self.get_parameter("output").value
        if not out:
            raise BagError("forecast_recorder needs the 'output' parameter (a new bag folder)")
        self.requested: List[str] = [self.resolve_topic_name(t) for t in self.get_parameter("topics").value]
        if not self.requested:
            raise BagError("forecast_recorder: the 'topics' parameter is empty")
        self.writer = BackgroundBagWriter(out, self.get_parameter("storage").value,
                                          overwrite=self.get_parameter("overwrite").value)
        self.writer.start()
        self._lock = threading.Lock()
        self._closed = False
        self._recording_subscriptions: Dict[str, object] = {}
        self._on_message = on_message
        self.counts: Dict[str, int] = {topic: 0 for topic in self.requested}
        self._timer: Optional[Any] = None
        self._discover()
        if not self._all_subscribed():
            self._timer = self.create_timer(0.2, self._discover)
        self.get_logger().info(f"recording {self.requested} into {out}")

    def _discover(self) -> None:
        """Subscribe to every requested topic that now has a publisher and a known type."""
        types = dict(self.get_topic_names_and_types())
        for topic in self.requested:
            if topic in self._recording_subscriptions or topic not in types:
                continue
            publishers = self.get_publishers_info_by_topic(topic)
            if not publishers:
                continue
            msgtype = types[topic][0]
            qos = qos_matching_publishers(publishers)
            self._recording_subscriptions[topic] = self.create_subscription(
                message_class(msgtype), topic, self._make_callback(topic, msgtype), qos, raw=True
            )
            self.get_logger().info(f"subscribed {topic} [{msgtype}] ({qos.reliability.name.lower()})")
        if self._timer is not None and not self._timer.is_canceled() and self._all_subscribed():
            self._timer.cancel()  # every requested topic is recorded: stop polling the graph

    def _all_subscribed(self) -> bool:
        return all(topic in self._recording_subscriptions for topic in self.requested)

    def _make_callback(self, topic: str, msgtype: str) -> Callable[[bytes], None]:
        def store(data: bytes) -> None:
            receive_ns = self.get_clock().now().nanoseconds
            with self._lock:
                if self._closed:
                    return
                self.writer.put(topic, msgtype, receive_ns, data)
                self.counts[topic] += 1
            if self._on_message is not None:
                self._on_message(topic, receive_ns, data)

        return store

    @property
    def subscribed_topics(self) -> List[str]:
        """Requested topics that are being recorded (a publisher was found)."""
        return list(self._recording_subscriptions)

    def close(self) -> None:
        """Stop recording and finish the bag (writes ``metadata.yaml``). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.writer.close()
        self.get_logger().info(f"wrote {self.writer.path}: {self.counts}")
        dropped = self.writer.dropped
        if dropped:
            self.get_logger().warning(f"not written (the disk was slower than the incoming messages): {dropped}")

    def destroy_node(self) -> None:
        """Close the bag, then destroy the node."""
        self.close()
        super().destroy_node()


def record_bag(output: str, topics: Optional[Sequence[str]] = None, storage: str = "mcap", overwrite: bool = False,
               duration_s: float = 0.0) -> Dict[str, int]:
    """Record live topics into a new bag until ``duration_s`` passes (0: until Ctrl-C) (``traj-forecast bag
    record``): rclpy is initialised and shut down here. Returns the messages recorded per topic.

    Raises:
        BagError: ``duration_s`` is negative or not finite (it would record forever), or the bag cannot be written.
    """
    if not math.isfinite(duration_s) or duration_s < 0:
        raise BagError(f"the duration must be a finite number of seconds >= 0 (0: until Ctrl-C), got {duration_s}")
    rclpy.init()
    try:
        recorder = BagRecorder(output=output, topics=topics, storage=storage, overwrite=overwrite)
    except BaseException:
        rclpy.try_shutdown()
        raise
    deadline = time.monotonic() + duration_s if duration_s > 0 else None
    try:
        while rclpy.ok() and (deadline is None or time.monotonic() < deadline):
            rclpy.spin_once(recorder, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        recorder.destroy_node()
        rclpy.try_shutdown()
    return dict(recorder.counts)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``forecast_recorder`` console script; Ctrl-C (or SIGTERM) finishes the bag."""
    rclpy.init(args=argv if argv is not None else sys.argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        recorder = BagRecorder()
    except BagError as exc:
        print(f"forecast_recorder: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    try:
        rclpy.spin(recorder)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        recorder.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
