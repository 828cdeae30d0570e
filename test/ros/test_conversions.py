"""Image and forecast message conversions (no DDS): every encoding, every kind of bad input, the msg round trip."""

import array
import io

import numpy as np
import pytest
from PIL import Image as PILImage

pytest.importorskip("rclpy", reason="needs the ROS 2 message wheels (requirements-ros.txt)")
pytest.importorskip("traj_forecast_msgs", reason="traj_forecast_msgs not built: run scripts/build_msgs.sh")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from traj_forecast_ros.ros.conversions import (  # noqa: E402
    ImageMessageError,
    compressed_msg_to_rgb,
    forecast_to_msg,
    image_msg_to_rgb,
    msg_to_arrays,
    msg_to_forecast,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)
from traj_forecast_ros.errors import InvalidImageError  # noqa: E402
from traj_forecast_ros.forecast import Forecast  # noqa: E402


@pytest.fixture(scope="module")
def libero_rgb(shared_images) -> np.ndarray:
    return np.asarray(PILImage.open(shared_images / "libero_agent_0.jpg").convert("RGB"))


def raw_msg(pixels: np.ndarray, encoding: str, pad: int = 0, big_endian: bool = False) -> Image:
    """An Image message holding ``pixels`` (H, W[, C]) with ``pad`` bytes of padding after each row."""
    height, width = pixels.shape[:2]
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2" if big_endian else "<u2")
    rows = pixels.reshape(height, -1).view(np.uint8)
    padded = np.zeros((height, rows.shape[1] + pad), np.uint8)
    padded[:, : rows.shape[1]] = rows
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(big_endian), step=padded.shape[1])
    msg.data = array.array("B", padded.tobytes())
    return msg


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_decode_to_the_same_rgb(libero_rgb, encoding, pad):
    pixels = libero_rgb[:, :, ::-1] if encoding.startswith("bgr") else libero_rgb
    if encoding.endswith("a8"):
        pixels = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 200, np.uint8)], axis=2)
    rgb = image_msg_to_rgb(raw_msg(np.ascontiguousarray(pixels), encoding, pad=pad))
    assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, libero_rgb)


def test_mono8_replicates_to_three_channels(libero_rgb):
    gray = libero_rgb[:, :, 1].copy()
    rgb = image_msg_to_rgb(raw_msg(gray, "mono8", pad=3))
    assert rgb.shape == (128, 128, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)


@pytest.mark.parametrize("big_endian", [False, True])
def test_mono16_is_scaled_to_its_maximum_and_honours_endianness(big_endian):
    values = np.array([[0, 1024], [2048, 4095]], np.uint16)  # a 12-bit sensor
    rgb = image_msg_to_rgb(raw_msg(values, "mono16", pad=2, big_endian=big_endian))
    np.testing.assert_array_equal(rgb[:, :, 0], values.astype(np.uint32) * 255 // 4095)
    assert rgb[1, 1, 2] == 255


def test_mono16_all_black_stays_black():
    rgb = image_msg_to_rgb(raw_msg(np.zeros((3, 4), np.uint16), "mono16"))
    assert rgb.shape == (3, 4, 3) and not rgb.any()


def test_image_data_may_be_bytes_or_a_list(libero_rgb):
    msg = rgb_to_image_msg(libero_rgb[:4, :5])
    as_bytes = Image(height=4, width=5, encoding="rgb8", step=15)
    as_bytes._data = bytes(msg.data)  # as a hand-built or rosbags message may hold it
    np.testing.assert_array_equal(image_msg_to_rgb(as_bytes), libero_rgb[:4, :5])
    as_list = Image(height=4, width=5, encoding="rgb8", step=15, data=list(msg.data))
    np.testing.assert_array_equal(image_msg_to_rgb(as_list), libero_rgb[:4, :5])


def bad(msg, reason, **kwargs):
    with pytest.raises(ImageMessageError) as info:
        image_msg_to_rgb(msg, **kwargs)
    assert info.value.reason == reason
    assert isinstance(info.value, InvalidImageError)
    return str(info.value)


def test_bad_raw_images_are_rejected_with_a_reason(libero_rgb):
    good = raw_msg(libero_rgb, "rgb8")
    assert "32FC1" in bad(Image(height=2, width=2, encoding="32FC1", step=8, data=[0] * 16), "unsupported_encoding")
    assert "0x0" in bad(Image(height=0, width=0, encoding="rgb8", step=0), "empty")
    assert "max_pixels" in bad(good, "too_large", max_pixels=128 * 127)
    short_step = raw_msg(libero_rgb, "rgb8")
    short_step.step = 128 * 3 - 1
    assert "step" in bad(short_step, "step_mismatch")
    odd_step = raw_msg(np.zeros((2, 2), np.uint16), "mono16", pad=1)
    bad(odd_step, "step_mismatch")
    truncated = raw_msg(libero_rgb, "rgb8")
    truncated.data = truncated.data[:-10]
    assert "expected" in bad(truncated, "truncated")
    too_long = raw_msg(libero_rgb, "rgb8")
    too_long.data.extend(b"\0" * 4)
    bad(too_long, "size_mismatch")


def test_compressed_jpeg_and_png_decode(libero_rgb):
    png = rgb_to_compressed_msg(libero_rgb, fmt="png")
    np.testing.assert_array_equal(compressed_msg_to_rgb(png), libero_rgb)
    jpeg = rgb_to_compressed_msg(libero_rgb, fmt="jpeg", quality=95)
    decoded = compressed_msg_to_rgb(jpeg)
    assert decoded.shape == libero_rgb.shape
    assert np.abs(decoded.astype(int) - libero_rgb).mean() < 4.0


def test_bad_compressed_images_are_rejected_with_a_reason(shared_images):
    real_jpeg = (shared_images / "libero_agent_1.jpg").read_bytes()
    corrupt = CompressedImage(format="jpeg")
    corrupt.data = array.array("B", real_jpeg[:20] + b"\x00garbage" * 10)
    with pytest.raises(ImageMessageError) as info:
        compressed_msg_to_rgb(corrupt)
    assert info.value.reason == "corrupt_compressed"
    with pytest.raises(ImageMessageError) as info:
        compressed_msg_to_rgb(CompressedImage(format="jpeg"))
    assert info.value.reason == "empty"
    whole = CompressedImage(format="jpeg")
    whole.data = array.array("B", real_jpeg)
    with pytest.raises(ImageMessageError) as info:
        compressed_msg_to_rgb(whole, max_pixels=100)
    assert info.value.reason == "too_large"


def test_rgb_to_image_msg_round_trip_keeps_header(libero_rgb):
    header = Header(frame_id="agent_camera_optical")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = rgb_to_image_msg(libero_rgb, header)
    assert (msg.height, msg.width, msg.step, msg.encoding) == (128, 128, 384, "rgb8")
    assert msg.header.frame_id == "agent_camera_optical" and msg.header.stamp.nanosec == 345
    np.testing.assert_array_equal(image_msg_to_rgb(msg), libero_rgb)
    np.testing.assert_array_equal(image_msg_to_rgb(rgb_to_image_msg(libero_rgb, encoding="bgr8")), libero_rgb)
    with pytest.raises(InvalidImageError):
        rgb_to_image_msg(libero_rgb[:, :, 0])


def make_forecast(k=3, t=5, h=4, w=6, seed=0) -> Forecast:
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(h) * 20 + 10.5, np.arange(w) * 20 + 10.5, indexing="ij")
    query = np.stack([xs, ys], axis=-1).astype(np.float32)
    steps = rng.normal(0, 2.0, (k, t - 1, h, w, 2)).astype(np.float32)
    tracks = np.concatenate([np.broadcast_to(query, (k, 1, h, w, 2)),
                             query + np.cumsum(steps, axis=1)], axis=1).astype(np.float32)
    return Forecast(tracks=tracks, query_points=query, image_size=(100, 140), model_id="tiny",
                    instruction="open the drawer", device="cpu", dtype="float32", timings={"total": 0.25})


def test_forecast_message_round_trip_preserves_layout():
    forecast = make_forecast()
    header = Header(frame_id="cam")
    header.stamp.sec = 7
    msg = forecast_to_msg(forecast, header, frame_interval=0.1, moving_threshold=1.5)
    assert (msg.num_samples, msg.num_frames, msg.grid_rows, msg.grid_cols) == (3, 5, 4, 6)
    assert (msg.image_height, msg.image_width) == (100, 140)
    assert msg.header.frame_id == "cam" and msg.header.stamp.sec == 7
    assert msg.instruction == "open the drawer" and msg.model_id == "tiny"
    assert msg.frame_interval == pytest.approx(0.1) and msg.inference_time == pytest.approx(0.25)
    assert len(msg.tracks) == 3 * 5 * 4 * 6 * 2
    # documented flat layout: index ((((k*T + t)*H + i)*W + j)*2 + c)
    k, t, i, j = 2, 3, 1, 4
    flat_index = (((k * 5 + t) * 4 + i) * 6 + j) * 2
    assert msg.tracks[flat_index] == pytest.approx(forecast.tracks[k, t, i, j, 0])
    assert msg.tracks[flat_index + 1] == pytest.approx(forecast.tracks[k, t, i, j, 1])

    arrays = msg_to_arrays(msg)
    np.testing.assert_array_equal(arrays["tracks"], forecast.tracks)
    np.testing.assert_array_equal(arrays["query_points"], forecast.query_points)
    np.testing.assert_allclose(arrays["mean_displacement"], forecast.mean_displacement())
    np.testing.assert_allclose(arrays["spread"], forecast.spread())
    np.testing.assert_allclose(arrays["moving_fraction"], forecast.moving_fraction(1.5))
    assert arrays["moving_fraction"].min() >= 0 and arrays["moving_fraction"].max() <= 1

    back = msg_to_forecast(msg)
    np.testing.assert_array_equal(back.tracks, forecast.tracks)
    assert back.image_size == (100, 140) and back.instruction == "open the drawer"


def test_msg_to_arrays_survives_serialisation_and_rejects_inconsistent_sizes():
    from rclpy.serialization import deserialize_message, serialize_message
    from traj_forecast_msgs.msg import TrajectoryForecast

    msg = forecast_to_msg(make_forecast(), Header())
    received = deserialize_message(serialize_message(msg), TrajectoryForecast)
    np.testing.assert_array_equal(msg_to_arrays(received)["tracks"], make_forecast().tracks)
    received.num_frames = 4
    with pytest.raises(ValueError, match="tracks"):
        msg_to_arrays(received)


def test_compressed_fixture_bytes_are_a_real_jpeg(shared_images):
    # the helper must produce something a standard decoder reads (what an image_transport subscriber gets)
    rgb = np.asarray(PILImage.open(shared_images / "libero_gripper_0.jpg").convert("RGB"))
    msg = rgb_to_compressed_msg(rgb)
    assert PILImage.open(io.BytesIO(bytes(msg.data))).format == "JPEG"


def test_forecaster_output_starts_exactly_at_the_query_points_through_the_message(shared_images):
    """A real (tiny, random) forecast of a non-square frame: after serialisation every sample's frame 0 is exactly
    the query grid, and the message's mean displacement is measured from it."""
    from rclpy.serialization import deserialize_message, serialize_message
    from traj_forecast_msgs.msg import TrajectoryForecast

    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.presets import tiny_config

    rgb = np.asarray(PILImage.open(shared_images / "physics101_0.jpg").convert("RGB"))  # 256 x 464
    forecast = Forecaster.from_config(tiny_config(), seed=0).forecast(rgb, "push", num_samples=2, steps=3, seed=1)
    received = deserialize_message(serialize_message(forecast_to_msg(forecast, Header())), TrajectoryForecast)
    arrays = msg_to_arrays(received)
    for sample in range(2):
        np.testing.assert_array_equal(arrays["tracks"][sample, 0], arrays["query_points"])
    np.testing.assert_allclose(arrays["mean_displacement"], (arrays["tracks"][:, -1] - arrays["query_points"]).mean(0),
                               rtol=0, atol=1e-4)
    back = msg_to_forecast(received)
    np.testing.assert_array_equal(back.tracks[:, 0], np.broadcast_to(back.query_points, back.tracks[:, 0].shape))
