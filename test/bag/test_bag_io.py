"""Bag tools on rosbags: write/read round trips in sqlite3 and MCAP, definitions, errors."""

from __future__ import annotations

import numpy as np
import pytest

from traj_forecast_ros.bag.io import (
    BagWriter, bag_summary, bag_topics, deserialize, read_messages, storage_of,
)
from traj_forecast_ros.bag.offline import image_topics
from traj_forecast_ros.bag.typestore import FORECAST_TYPE, find_msg_file, load_installed_types, make_typestore
from traj_forecast_ros.errors import BagError


@pytest.fixture(scope="module")
def store():
    return make_typestore()


def _image(store, seq: int, height: int = 6, width: int = 5):
    types = store.types
    pixels = (np.arange(height * width * 3, dtype=np.uint16) * (seq + 1) % 256).astype(np.uint8)
    header = types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=100 + seq, nanosec=seq * 1000), frame_id="cam"
    )
    return types["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="rgb8",
                                          is_bigendian=0, step=width * 3, data=pixels)


def _forecast(store, seq: int):
    types = store.types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=seq, nanosec=0),
                                          frame_id="cam")
    k, t, h, w = 2, 3, 2, 2
    tracks = np.linspace(0, 10, k * t * h * w * 2, dtype=np.float32) + seq
    return types[FORECAST_TYPE](
        header=header, image_height=6, image_width=5, model_id="tiny", instruction="", num_samples=k,
        num_frames=t, frame_interval=0.1, grid_rows=h, grid_cols=w,
        query_points=np.zeros(h * w * 2, np.float32), tracks=tracks,
        mean_displacement=np.ones(h * w * 2, np.float32), spread=np.full(h * w, 0.5, np.float32),
        moving_threshold=2.0, moving_fraction=np.zeros(h * w, np.float32),
        sample_weights=np.full(k, 1 / k, np.float32), first_move_frame=np.full(h * w, -1, np.float32),
        spread_per_frame=np.zeros(t * h * w, np.float32), crop_box=np.array([0, 0, 5, 6], np.float32),
        intrinsics_known=False, k=np.zeros(9), distortion_model="", d=np.zeros(0), inference_time=0.25,
        device="cpu", dtype="float32",
    )


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_round_trip_keeps_bytes_order_and_types(tmp_path, store, storage):
    bag = tmp_path / f"bag_{storage}"
    written = []
    with BagWriter(bag, storage, store) as writer:
        for seq in range(3):
            image, forecast = _image(store, seq), _forecast(store, seq)
            writer.write_message("/cam/image_raw", "sensor_msgs/msg/Image", 1_000 + 10 * seq, image)
            writer.write_message("/cam/forecast", FORECAST_TYPE, 1_005 + 10 * seq, forecast)
            written += [("/cam/image_raw", image), ("/cam/forecast", forecast)]

    assert storage_of(bag) == storage
    assert bag_topics(bag)["/cam/image_raw"].count == 3
    assert bag_topics(bag)["/cam/forecast"].msgtype == FORECAST_TYPE
    assert image_topics(bag) == ["/cam/image_raw"]
    summary = bag_summary(bag)
    assert summary["message_count"] == 6 and summary["duration_s"] == pytest.approx(25e-9, abs=2e-9)

    messages = list(read_messages(bag))
    assert [m.timestamp for m in messages] == [1000, 1005, 1010, 1015, 1020, 1025]
    for message, (topic, original) in zip(messages, written):
        assert message.topic == topic
        decoded = deserialize(message)  # a fresh store: definitions come from the bag's own type
        assert decoded.header.stamp.sec == original.header.stamp.sec
        if topic == "/cam/image_raw":
            np.testing.assert_array_equal(decoded.data, original.data)
        else:
            np.testing.assert_array_equal(decoded.tracks, original.tracks)
            assert decoded.model_id == "tiny" and decoded.num_samples == 2

    only_images = list(read_messages(bag, ["/cam/image_raw"]))
    assert len(only_images) == 3 and {m.msgtype for m in only_images} == {"sensor_msgs/msg/Image"}


def test_sqlite3_and_mcap_hold_the_same_bytes(tmp_path, store):
    payloads = {}
    for storage in ("sqlite3", "mcap"):
        with BagWriter(tmp_path / storage, storage, store) as writer:
            writer.write_message("/img", "sensor_msgs/msg/Image", 5, _image(store, 1))
        payloads[storage] = [m.data for m in read_messages(tmp_path / storage)]
    assert payloads["sqlite3"] == payloads["mcap"]


def test_custom_forecast_type_is_registered_from_msg_file(store):
    path = find_msg_file(FORECAST_TYPE)
    assert path is not None and path.name == "TrajectoryForecast.msg"
    fields = [name for name, _ in store.fielddefs[FORECAST_TYPE][1]]
    assert fields[:3] == ["header", "image_height", "image_width"] and "tracks" in fields
    assert store.hash_rihs01(FORECAST_TYPE).startswith("RIHS01_")


def test_installed_definitions_resolve_nested_types():
    types = load_installed_types(["visualization_msgs/msg/MarkerArray"])
    assert types is not None
    assert {"visualization_msgs/msg/Marker", "std_msgs/msg/Header", "builtin_interfaces/msg/Time"} <= set(types)


def test_writer_refuses_to_overwrite_unless_asked(tmp_path, store):
    bag = tmp_path / "bag"
    with BagWriter(bag, "mcap", store) as writer:
        writer.write_message("/img", "sensor_msgs/msg/Image", 1, _image(store, 0))
    with pytest.raises(BagError, match="exists already"):
        BagWriter(bag, "mcap", store)
    with BagWriter(bag, "sqlite3", store, overwrite=True) as writer:
        writer.write_message("/img", "sensor_msgs/msg/Image", 2, _image(store, 0))
    assert storage_of(bag) == "sqlite3"


def test_overwrite_never_removes_a_folder_that_is_not_a_bag(tmp_path, store):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(BagError, match="not a bag"):
        BagWriter(folder, "mcap", store, overwrite=True)
    assert (folder / "notes.txt").exists()


@pytest.mark.parametrize("bad_call, message", [
    (lambda tmp: bag_topics(tmp / "missing"), "bag not found"),
    (lambda tmp: bag_topics(tmp), "not a rosbag2 bag"),
    (lambda tmp: BagWriter(tmp / "x", "zip"), "unknown bag storage"),
    (lambda tmp: BagWriter(tmp / "x", "sqlite3", compress=True), "only offered for MCAP"),
])
def test_bad_input_raises_bag_error(tmp_path, bad_call, message):
    with pytest.raises(BagError, match=message):
        bad_call(tmp_path)


def test_reading_an_unknown_topic_names_the_topics_present(tmp_path, store):
    with BagWriter(tmp_path / "bag", "mcap", store) as writer:
        writer.write_message("/img", "sensor_msgs/msg/Image", 1, _image(store, 0))
    with pytest.raises(BagError, match=r"no topic \['/nope'\].*'/img'"):
        list(read_messages(tmp_path / "bag", ["/nope"]))


def test_one_topic_cannot_change_type(tmp_path, store):
    with BagWriter(tmp_path / "bag", "mcap", store) as writer:
        writer.write_message("/img", "sensor_msgs/msg/Image", 1, _image(store, 0))
        with pytest.raises(BagError, match="already holds"):
            writer.add_topic("/img", FORECAST_TYPE)


def test_rosbags_and_rclpy_read_each_others_cdr(store):
    """Same layout both ways (bytes may differ only in alignment padding, which Fast CDR leaves unset)."""
    serialization = pytest.importorskip("rclpy.serialization")
    from sensor_msgs.msg import Image

    ours = _image(store, 2)
    from_rosbags = serialization.deserialize_message(bytes(store.serialize_cdr(ours, "sensor_msgs/msg/Image")), Image)
    assert (from_rosbags.header.stamp.sec, from_rosbags.header.frame_id, from_rosbags.encoding) == (102, "cam", "rgb8")
    assert bytes(from_rosbags.data) == ours.data.tobytes()

    from_rclpy = store.deserialize_cdr(serialization.serialize_message(from_rosbags), "sensor_msgs/msg/Image")
    assert (from_rclpy.height, from_rclpy.width, from_rclpy.step) == (6, 5, 15)
    np.testing.assert_array_equal(from_rclpy.data, ours.data)
