"""Publish a bag's messages over rclpy at the recorded pace (or a multiple of it), optionally in a loop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import QoSProfile

from traj_forecast_ros.bag.io import BagMessage, PathLike, bag_topics, read_messages
from traj_forecast_ros.ros.qos import message_class, qos_from_name
from traj_forecast_ros.errors import BagError

PublishCallback = Callable[[BagMessage, int], None]


CONNECT_SETTLE_S = 0.5  # after every played topic has a subscriber: both ends of each connection match


@dataclass
class PlayStats:
    """What a playback sent: messages per topic, loops completed, wall time."""

    published: Dict[str, int] = field(default_factory=dict)
    loops: int = 0
    wall_s: float = 0.0

    @property
    def total(self) -> int:
        """Messages published over all topics."""
        return sum(self.published.values())


class BagPlayer:
    """Publishes the messages of one bag from a given rclpy node.

    Messages are sent as their recorded CDR bytes (no decode/encode), ``rate`` times the recorded speed, with
    the recorded headers unchanged. The default QoS is reliable/volatile, which every subscriber accepts.
    With ``clock_hz`` > 0 the bag time is also published on ``/clock`` (for nodes run with ``use_sim_time``),
    like ``ros2 bag play --clock``.
    """

    def __init__(
        self,
        node: Node,
        bag: PathLike,
        topics: Optional[Sequence[str]] = None,
        rate: float = 1.0,
        loop: bool = False,
        qos: Optional[QoSProfile] = None,
        clock_hz: float = 0.0,
    ) -> None:
        if not rate > 0:
            raise BagError(f"playback rate must be > 0, got {rate}")
        if clock_hz < 0:
            raise BagError(f"clock rate must be >= 0, got {clock_hz}")
        self.bag = Path(bag)
        available = bag_topics(self.bag)
        selected = list(topics) if topics else sorted(available)
        missing = [t for t in selected if t not in available]
        if missing:
            raise BagError(f"bag {self.bag} has no topic {missing}; it has {sorted(available)}")
        self.topics = selected
        self.rate = rate
        self.loop = loop
        self.node = node
        profile = qos or qos_from_name("reliable")
        self.publishers = {
            topic: node.create_publisher(message_class(available[topic].msgtype), topic, profile) for topic in selected
        }
        self._clock = SimClock(node, clock_hz) if clock_hz > 0 else None

    def wait_for_subscribers(self, topics: Sequence[str], timeout_s: float, settle_s: float = 0.0) -> List[str]:
        """Wait until each of ``topics`` has a matched subscriber; returns those still without one at timeout.
        ``settle_s``: once all have one, wait that long more, so each subscriber also matches this publisher (a
        best-effort subscriber drops messages from a publisher it has not matched yet, though the publisher
        already counts it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [t for t in topics if self.publishers[t].get_subscription_count() == 0]
            if not waiting and settle_s > 0:
                time.sleep(settle_s)
            if not waiting or time.monotonic() >= deadline:
                return waiting
            time.sleep(0.05)

    def play(
        self,
        stop: Optional[threading.Event] = None,
        on_publish: Optional[PublishCallback] = None,
        keep_clock: bool = False,
    ) -> PlayStats:
        """Publish every selected message (again and again with ``loop``) until done or ``stop`` is set.

        ``on_publish(message, wall_time_ns)`` is called right after each publish (``time.time_ns()`` clock).
        With ``keep_clock`` the ``/clock`` keeps running past the end of the bag until :meth:`close`.
        """
        stop = stop or threading.Event()
        stats = PlayStats(published={topic: 0 for topic in self.topics})
        started = time.monotonic()
        try:
            while not stop.is_set():
                self._play_once(stop, stats, on_publish)
                stats.loops += 1
                if not self.loop:
                    break
        finally:
            if not keep_clock:
                self.close()
        stats.wall_s = time.monotonic() - started
        return stats

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every matched reliable subscriber has acknowledged what was published.

        A reader that discovers this publisher late still gets reliable messages by retransmission, but only
        while the publisher exists: call this before destroying the node. Returns False on timeout.
        """
        deadline = time.monotonic() + timeout_s
        acked = True
        for publisher in self.publishers.values():
            left = max(0.0, deadline - time.monotonic())
            acked = publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))) and acked
        return acked

    def close(self) -> None:
        """Stop publishing ``/clock``."""
        if self._clock is not None:
            self._clock.stop()

    def _play_once(self, stop: threading.Event, stats: PlayStats, on_publish: Optional[PublishCallback]) -> None:
        first_bag_ns: Optional[int] = None
        start_wall = 0.0
        for message in read_messages(self.bag, self.topics):
            if first_bag_ns is None:
                # Paced from the first message read, not from opening the bag: a slow open (a loaded machine) must
                # not make the first messages overdue and publish them in one burst.
                first_bag_ns, start_wall = message.timestamp, time.monotonic()
                if self._clock is not None:
                    self._clock.restart(first_bag_ns, self.rate)
            due = start_wall + (message.timestamp - first_bag_ns) / 1e9 / self.rate
            if stop.wait(max(0.0, due - time.monotonic())):
                return
            self.publishers[message.topic].publish(message.data)
            stats.published[message.topic] += 1
            if on_publish is not None:
                on_publish(message, time.time_ns())


def play_bag(bag: PathLike, topics: Optional[Sequence[str]] = None, rate: float = 1.0, loop: bool = False,
             qos: str = "reliable", clock_hz: float = 0.0, wait_for_subscribers_s: float = 0.0,
             stop: Optional[threading.Event] = None,
             notify: Callable[[str], None] = print) -> Tuple[PlayStats, List[str], bool]:
    """Play a bag from a node of its own (``traj-forecast bag play``): rclpy is initialised and shut down here.

    With ``wait_for_subscribers_s`` > 0, first waits up to that long for a subscriber on every played topic.
    ``notify`` gets one line when playback starts. Returns the playback statistics, the topics that still had no
    subscriber when playback started, and whether every reliable subscriber acknowledged every message.
    """
    rclpy.init()
    node = rclpy.create_node("bag_player")
    try:
        player = BagPlayer(node, bag, topics=topics, rate=rate, loop=loop, qos=qos_from_name(qos), clock_hz=clock_hz)
        waiting = (player.wait_for_subscribers(player.topics, wait_for_subscribers_s, settle_s=CONNECT_SETTLE_S)
                   if wait_for_subscribers_s > 0 else [])
        notify(f"playing {bag} ({', '.join(player.topics)}) at {rate}x{' in a loop' if loop else ''}")
        stats = player.play(stop)
        return stats, waiting, player.flush()
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


class SimClock:
    """Publishes a simulated time on ``/clock`` from its own thread: ``bag_ns`` advancing at ``rate`` x wall time."""

    def __init__(self, node: Node, hz: float) -> None:
        from rosgraph_msgs.msg import Clock

        self._message_type = Clock
        self._publisher = node.create_publisher(Clock, "/clock", qos_from_name("reliable", depth=1))
        self._period = 1.0 / hz
        self._lock = threading.Lock()
        self._base: Optional[tuple] = None  # (bag_ns, monotonic start, rate)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def restart(self, bag_ns: int, rate: float) -> None:
        """Continue from ``bag_ns`` now (starts the thread on first use)."""
        with self._lock:
            self._base = (bag_ns, time.monotonic(), rate)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sim-clock", daemon=True)
            self._thread.start()
        self._publish_now()

    def now_ns(self) -> Optional[int]:
        """The simulated time now (None before :meth:`restart`)."""
        with self._lock:
            if self._base is None:
                return None
            bag_ns, started, rate = self._base
        return bag_ns + int((time.monotonic() - started) * rate * 1e9)

    def stop(self) -> None:
        """Stop publishing and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _publish_now(self) -> None:
        now = self.now_ns()
        if now is None:
            return
        message = self._message_type()
        message.clock.sec, message.clock.nanosec = divmod(now, 10**9)
        self._publisher.publish(message)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._publish_now()
