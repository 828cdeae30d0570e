"""Playing and recording over DDS: ``traj-forecast bag play`` (a separate process) into the recorder node."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

from traj_forecast_ros.bag.io import bag_topics, read_messages  # noqa: E402
from traj_forecast_ros.bag.player import BagPlayer  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402
from traj_forecast_ros.errors import BagError  # noqa: E402
from traj_forecast_ros.bag.recorder import BagRecorder  # noqa: E402

pytestmark = pytest.mark.ros
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ros_context():
    context = rclpy.context.Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    yield context, executor, thread
    executor.shutdown()
    rclpy.shutdown(context=context)


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_cli_play_into_recorder_keeps_every_message(tmp_path, ros_context):
    context, executor, thread = ros_context
    topics = ["/agentview/image_raw", "/eye_in_hand/camera_info"]
    recorder = BagRecorder(output=str(tmp_path / "recorded"), topics=topics, storage="sqlite3", context=context)
    executor.add_node(recorder)
    thread.start()
    player = subprocess.run(
        [sys.executable, "-m", "traj_forecast_ros.cli", "bag", "play", str(SAMPLE_BAG), "--rate", "4",
         "--wait-for-subscribers", "20", "--topic", *topics],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=60,
    )
    assert player.returncode == 0, player.stderr
    assert "published 16 messages" in player.stdout
    assert _wait_for(lambda: sum(recorder.counts.values()) == 16, 10), recorder.counts
    recorder.destroy_node()

    assert {t: i.count for t, i in bag_topics(tmp_path / "recorded").items()} == {t: 8 for t in topics}
    for topic in topics:
        original = [m.data for m in read_messages(SAMPLE_BAG, [topic])]
        recorded = [m.data for m in read_messages(tmp_path / "recorded", [topic])]
        assert len(recorded) == len(original)
        for sent, received in zip(original, recorded):
            # DDS delivers the CDR payload padded with zeros to a multiple of 4 bytes (rosbag2 stores it so too)
            assert received[: len(sent)] == sent
            assert received[len(sent):] == bytes(len(received) - len(sent)) and len(received) % 4 == 0


def test_player_paces_loops_and_publishes_clock(ros_context):
    from rosgraph_msgs.msg import Clock

    context, executor, thread = ros_context
    node = rclpy.create_node("test_player", context=context)
    listener = rclpy.create_node("test_listener", context=context)
    clock_stamps = []
    listener.create_subscription(Clock, "/clock", lambda m: clock_stamps.append(m.clock.sec * 10**9 + m.clock.nanosec), 10)
    executor.add_node(node)
    executor.add_node(listener)
    thread.start()
    player = BagPlayer(node, SAMPLE_BAG, topics=["/agentview/image_raw"], rate=2.0, loop=True, clock_hz=50)
    stop = threading.Event()
    publish_times = []

    def on_publish(message, wall_ns: int) -> None:
        publish_times.append(wall_ns)
        if len(publish_times) == 17:  # into the third pass (one pass takes 0.35 s at 2x)
            stop.set()

    # Stopped by count, not after a fixed time: this machine sometimes pauses for most of a second.
    threading.Timer(30.0, stop.set).start()
    stats = player.play(stop, on_publish=on_publish)
    assert stats.loops >= 2
    assert stats.published["/agentview/image_raw"] >= 16
    first_pass = publish_times[:8]
    # 0.7 s of bag at 2x: never faster than that (a loaded machine can only make it slower, so no upper bound).
    assert (first_pass[-1] - first_pass[0]) / 1e9 >= 0.35 - 0.02
    assert _wait_for(lambda: len(clock_stamps) > 5, 5)
    assert min(clock_stamps) >= 1_700_000_000 * 10**9  # bag time, not wall time


def test_player_paces_from_the_first_message_not_from_opening_the_bag(ros_context, monkeypatch):
    """A slow bag open (here 0.6 s before the first message, as on a loaded machine) must not make the first pass
    overdue and publish it in one burst: pacing starts at the first message read."""
    import traj_forecast_ros.bag.player as player_module

    real_read = player_module.read_messages

    def slow_open(*args, **kwargs):
        time.sleep(0.6)
        yield from real_read(*args, **kwargs)

    monkeypatch.setattr(player_module, "read_messages", slow_open)
    context, executor, thread = ros_context
    node = rclpy.create_node("test_player_slow_open", context=context)
    player = BagPlayer(node, SAMPLE_BAG, topics=["/agentview/image_raw"], rate=2.0)
    publish_times = []
    stats = player.play(on_publish=lambda message, wall_ns: publish_times.append(wall_ns))
    node.destroy_node()
    assert stats.published["/agentview/image_raw"] == len(publish_times) == 8
    assert (publish_times[-1] - publish_times[0]) / 1e9 >= 0.35 - 0.02, "the first pass was published in a burst"


def test_player_rejects_bad_arguments(ros_context):
    context, _, _ = ros_context
    node = rclpy.create_node("test_player_bad", context=context)
    with pytest.raises(BagError, match="rate must be > 0"):
        BagPlayer(node, SAMPLE_BAG, rate=0)
    with pytest.raises(BagError, match="no topic"):
        BagPlayer(node, SAMPLE_BAG, topics=["/nope"])


def test_recorder_needs_an_output(ros_context):
    context, _, _ = ros_context
    with pytest.raises(BagError, match="'output'"):
        BagRecorder(context=context)


def test_recorder_processes_finish_their_bags(tmp_path, ros_context):
    """``forecast_recorder`` stopped with Ctrl-C and ``traj-forecast bag record --duration`` both close the bag."""
    import signal

    context, executor, thread = ros_context
    topic = "/agentview/image_raw"
    env = dict(os.environ)
    recorder_node = subprocess.Popen(
        [sys.executable, "-m", "traj_forecast_ros.bag.recorder", "--ros-args", "-p", f"output:={tmp_path / 'node'}",
         "-p", f"topics:=['{topic}']", "-p", "storage:=sqlite3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    cli_record = subprocess.Popen(
        [sys.executable, "-m", "traj_forecast_ros.cli", "bag", "record", str(tmp_path / "cli"), "--topic", topic,
         "--duration", "8"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    node = rclpy.create_node("test_player_rec", context=context)
    executor.add_node(node)
    thread.start()
    player = BagPlayer(node, SAMPLE_BAG, topics=[topic], rate=4.0)
    assert _wait_for(lambda: player.publishers[topic].get_subscription_count() >= 2, 20)
    time.sleep(0.5)
    player.play()
    assert player.flush(10), "a recorder did not acknowledge every message"
    time.sleep(3.0)  # for the recorder node to take them from DDS, with room for a pause of the machine (free: the
    # CLI records for 8 s anyway)
    recorder_node.send_signal(signal.SIGINT)
    node_output, _ = recorder_node.communicate(timeout=20)
    cli_output, _ = cli_record.communicate(timeout=30)
    assert recorder_node.returncode == 0, node_output
    assert cli_record.returncode == 0 and "recorded 8 messages" in cli_output, cli_output
    for name in ("node", "cli"):
        assert bag_topics(tmp_path / name)[topic].count == 8


def test_background_writer_counts_drops_when_its_queue_is_full(tmp_path):
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    from traj_forecast_ros.bag.io import BackgroundBagWriter

    writer = BackgroundBagWriter(tmp_path / "bounded", "sqlite3", max_queue=2)
    data = serialize_message(String(data="hello"))
    # The worker is not started yet, so nothing drains the queue: the third and fourth messages are dropped.
    assert [writer.put("/chatter", "std_msgs/msg/String", 1000 + i, data) for i in range(4)] == [True, True,
                                                                                                   False, False]
    assert writer._queue.qsize() == 2 and writer.dropped == {"/chatter": 2}
    writer.start()
    writer.close()
    assert [m.timestamp for m in read_messages(tmp_path / "bounded")] == [1000, 1001]


def test_recorder_stops_polling_the_graph_once_every_topic_is_subscribed(tmp_path, ros_context):
    from std_msgs.msg import String

    context, executor, thread = ros_context
    talker = rclpy.create_node("test_talker", context=context)
    talker.create_publisher(String, "/chatter", 10)
    recorder = BagRecorder(output=str(tmp_path / "chatter"), topics=["/chatter"], storage="sqlite3", context=context)
    executor.add_node(recorder)
    thread.start()
    try:
        assert _wait_for(lambda: recorder.subscribed_topics == ["/chatter"], 10)
        assert recorder._timer is None or _wait_for(recorder._timer.is_canceled, 5)
    finally:
        recorder.destroy_node()
        talker.destroy_node()
