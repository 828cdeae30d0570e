"""Reading and writing rosbag2 bags (sqlite3 or MCAP storage) with rosbags, no ROS install needed."""

from __future__ import annotations

import collections
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Union

from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.interfaces import Connection, Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode
from rosbags.typesys.store import Typestore

from traj_forecast_ros.bag.typestore import ensure_type, make_typestore
from traj_forecast_ros.errors import BagError

PathLike = Union[str, Path]
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
# rosbag2 metadata version 8 (Jazzy); readable by every rosbag2 from Humble on.
BAG_VERSION = 8
WRITE_QUEUE_SIZE = 1000  # messages a BackgroundBagWriter holds before it drops new ones (bounds its memory)

_log = logging.getLogger(__name__)

_NO_TIME = QosTime(sec=0, nsec=0)
RELIABLE_QOS = Qos(
    history=QosHistory.KEEP_LAST, depth=10, reliability=QosReliability.RELIABLE,
    durability=QosDurability.VOLATILE, deadline=_NO_TIME, lifespan=_NO_TIME,
    liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=_NO_TIME, avoid_ros_namespace_conventions=False,
)


@dataclass(frozen=True)
class BagMessage:
    """One serialized (CDR) message of a bag: topic, type, receive timestamp (ns) and bytes."""

    topic: str
    msgtype: str
    timestamp: int
    data: bytes


@dataclass(frozen=True)
class TopicInfo:
    """A topic of a bag: its message type and how many messages it holds."""

    msgtype: str
    count: int


def _require_bag(path: Path) -> None:
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"{path} is not a rosbag2 bag (no metadata.yaml inside)")


def open_reader(path: PathLike) -> AnyReader:
    """Open a rosbag2 bag folder (sqlite3 or MCAP); errors become :class:`BagError` naming the bag."""
    path = Path(path)
    _require_bag(path)
    reader = AnyReader([path])
    try:
        reader.open()
    except (AnyReaderError, OSError, ValueError) as exc:
        raise BagError(f"cannot read bag {path}: {exc}") from exc
    return reader


def bag_topics(path: PathLike) -> Dict[str, TopicInfo]:
    """Topics of a bag with their message type and message count."""
    reader = open_reader(path)
    try:
        return {name: TopicInfo(info.msgtype or "", info.msgcount) for name, info in reader.topics.items()}
    finally:
        reader.close()


def bag_summary(path: PathLike) -> Dict[str, object]:
    """Storage, duration, message count and per-topic type/count of a bag (what ``ros2 bag info`` shows)."""
    reader = open_reader(path)
    try:
        topics = {name: {"type": info.msgtype or "", "count": info.msgcount}
                  for name, info in sorted(reader.topics.items())}
        return {
            "storage": storage_of(path),
            "duration_s": reader.duration / 1e9 if reader.message_count else 0.0,
            "start_ns": reader.start_time if reader.message_count else 0,
            "message_count": reader.message_count,
            "topics": topics,
        }
    finally:
        reader.close()


def read_messages(path: PathLike, topics: Optional[Iterable[str]] = None) -> Iterator[BagMessage]:
    """Messages of a bag in timestamp order, optionally only those of ``topics`` (each must exist)."""
    reader = open_reader(path)
    try:
        connections = reader.connections
        if topics is not None:
            wanted = set(topics)
            present = {c.topic for c in connections}
            missing = sorted(wanted - present)
            if missing:
                raise BagError(f"bag {path} has no topic {missing}; it has {sorted(present)}")
            connections = [c for c in connections if c.topic in wanted]
        for connection, timestamp, data in reader.messages(connections=connections):
            yield BagMessage(connection.topic, connection.msgtype, timestamp, bytes(data))
    finally:
        reader.close()


def deserialize(message: BagMessage, typestore: Optional[Typestore] = None) -> object:
    """Decode a message's CDR bytes into a rosbags message object (attribute access like a ROS message)."""
    store = typestore or make_typestore([message.msgtype])
    ensure_type(store, message.msgtype)
    return store.deserialize_cdr(message.data, message.msgtype)


def storage_of(path: PathLike) -> str:
    """Storage plugin of a bag folder (``"sqlite3"`` or ``"mcap"``)."""
    path = Path(path)
    _require_bag(path)
    text = (path / "metadata.yaml").read_text()
    for name in STORAGES:
        if f"storage_identifier: {name}" in text:
            return name
    raise BagError(f"{path}: unknown storage in metadata.yaml")


class BagWriter:
    """Write a new rosbag2 bag; topics are added on first use. Use as a context manager.

    Messages are given either as CDR bytes (``write``, e.g. from ``rclpy.serialization.serialize_message``) or
    as rosbags message objects (``write_message``). The bag records each topic's definition and type hash.
    """

    def __init__(
        self,
        path: PathLike,
        storage: str = "mcap",
        typestore: Optional[Typestore] = None,
        overwrite: bool = False,
        compress: bool = False,
    ) -> None:
        self.path = Path(path)
        if storage not in STORAGES:
            raise BagError(f"unknown bag storage '{storage}' (choose from {sorted(STORAGES)})")
        if self.path.exists():
            if not overwrite:
                raise BagError(f"{self.path} exists already (pass overwrite / --overwrite to replace it)")
            remove_bag(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.storage = storage
        self.typestore = typestore or make_typestore()
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        if compress:
            if storage != "mcap":
                raise BagError("compression is only offered for MCAP bags (zstd chunks, read natively by rosbag2)")
            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._connections: Dict[str, Connection] = {}

    def __enter__(self) -> "BagWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def open(self) -> None:
        """Create the bag folder and storage file."""
        try:
            self._writer.open()
        except WriterError as exc:
            raise BagError(f"cannot create bag {self.path}: {exc}") from exc

    def close(self) -> None:
        """Write the index and ``metadata.yaml``."""
        self._writer.close()

    def add_topic(self, topic: str, msgtype: str, qos: Sequence[Qos] = (RELIABLE_QOS,)) -> None:
        """Declare ``topic`` with type ``msgtype`` (a second call with the same type does nothing)."""
        known = self._connections.get(topic)
        if known is not None:
            if known.msgtype != msgtype:
                raise BagError(f"topic {topic} already holds {known.msgtype}, cannot also write {msgtype}")
            return
        ensure_type(self.typestore, msgtype)
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=self.typestore, offered_qos_profiles=list(qos)
        )

    def write(self, topic: str, msgtype: str, timestamp_ns: int, data: bytes) -> None:
        """Append one CDR-serialized message received (or stamped) at ``timestamp_ns``."""
        self.add_topic(topic, msgtype)
        if timestamp_ns < 0:
            raise BagError(f"negative timestamp {timestamp_ns} for {topic}")
        self._writer.write(self._connections[topic], int(timestamp_ns), data)

    def write_message(self, topic: str, msgtype: str, timestamp_ns: int, message: object) -> None:
        """Serialize a rosbags message object with this bag's typestore and append it."""
        self.add_topic(topic, msgtype)
        self.write(topic, msgtype, timestamp_ns, bytes(self.typestore.serialize_cdr(message, msgtype)))


def remove_bag(path: PathLike) -> None:
    """Delete a bag folder; refuses folders that are not empty and hold no ``metadata.yaml`` or storage file."""
    path = Path(path)
    if not path.is_dir():
        raise BagError(f"{path} exists and is not a bag folder; not removing it")
    entries = list(path.iterdir())
    looks_like_bag = any(e.name == "metadata.yaml" or e.suffix in (".mcap", ".db3") for e in entries)
    if entries and not looks_like_bag:
        raise BagError(f"{path} is not empty and not a bag; not removing it")
    shutil.rmtree(path)


class BackgroundBagWriter:
    """A :class:`BagWriter` owned by one worker thread, fed through a queue (safe to call from any thread).

    sqlite3 connections may only be used by the thread that made them, and disk writes should not block ROS
    callbacks: ``put`` only enqueues. ``start`` opens the bag (errors raised there); ``close`` drains the queue,
    finishes the bag and re-raises a write error if one occurred. The queue holds at most ``max_queue`` messages:
    when the disk is slower than the incoming data, new messages are dropped and counted per topic in ``dropped``
    (with a warning at most every ``warn_interval_s`` seconds) instead of growing memory without bound.
    """

    def __init__(self, path: PathLike, storage: str = "mcap", overwrite: bool = False,
                 max_queue: int = WRITE_QUEUE_SIZE, warn_interval_s: float = 5.0) -> None:
        self.path = Path(path)
        self.storage = storage
        self.overwrite = overwrite
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_queue)
        self._dropped: Dict[str, int] = collections.Counter()
        self._dropped_lock = threading.Lock()
        self._warn_interval_s = warn_interval_s
        self._last_warning: Optional[float] = None
        self._opened = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="bag-writer", daemon=True)

    def start(self) -> None:
        """Open the bag in the worker thread; raises what opening raised (e.g. :class:`BagError`)."""
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def put(self, topic: str, msgtype: str, timestamp_ns: int, data: bytes) -> bool:
        """Queue one CDR message for writing (never blocks); False when the queue was full and it was dropped."""
        try:
            self._queue.put_nowait((topic, msgtype, timestamp_ns, data))
            return True
        except queue.Full:
            pass
        now = time.monotonic()
        with self._dropped_lock:
            self._dropped[topic] += 1
            warn = self._last_warning is None or now - self._last_warning >= self._warn_interval_s
            if warn:
                self._last_warning = now
                dropped = dict(self._dropped)
        if warn:
            _log.warning("bag writer queue full (%d messages; the disk is slower than the incoming data): "
                         "dropping messages, so far %s", self._queue.maxsize, dropped)
        return False

    @property
    def dropped(self) -> Dict[str, int]:
        """Messages dropped because the write queue was full, by topic (empty when none were)."""
        with self._dropped_lock:
            return dict(self._dropped)

    def close(self) -> None:
        """Write what is queued, finish the bag, stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            writer = BagWriter(self.path, self.storage, overwrite=self.overwrite)
            writer.open()
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                if self._error is None:
                    try:
                        writer.write(*item)
                    except BaseException as exc:  # noqa: BLE001 - re-raised by close()
                        self._error = exc
        finally:
            writer.close()
