"""What a planner reads from a TrajectoryForecast: every field through the one unpacking helper, the summaries,
the crop box and the intrinsics (with and without CameraInfo), and frames too small to forecast."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("traj_forecast_msgs.msg")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from traj_forecast_msgs.msg import TrajectoryForecast  # noqa: E402

from traj_forecast_ros.forecast import Forecast  # noqa: E402
from traj_forecast_ros.ros.conversions import (ImageMessageError, forecast_to_msg, image_msg_to_rgb,  # noqa: E402
                                               msg_to_arrays, msg_to_forecast, rgb_to_image_msg)
from traj_forecast_ros.summaries import planner_summaries  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def camera_info(width: int = 140, height: int = 100) -> CameraInfo:
    info = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
    info.k = [120.0, 0.0, 69.5, 0.0, 121.0, 49.5, 0.0, 0.0, 1.0]
    info.d = [0.1, -0.02, 0.0, 0.0, 0.0]
    return info


def a_forecast(k: int = 3, t: int = 5, h: int = 4, w: int = 6) -> Forecast:
    rng = np.random.default_rng(1)
    ys, xs = np.meshgrid(np.arange(h) * 20 + 10.5, np.arange(w) * 20 + 10.5, indexing="ij")
    query = np.stack([xs, ys], axis=-1).astype(np.float32)
    tracks = query + np.cumsum(rng.normal(0, 2.0, (k, t, h, w, 2)), axis=1).astype(np.float32)
    tracks[:, 0] = query
    return Forecast(tracks=tracks.astype(np.float32), query_points=query, image_size=(100, 140), model_id="tiny",
                    timings={"total": 0.25}, frame_interval=0.1, crop_box=(20.0, 0.0, 120.0, 100.0))


def test_the_helper_round_trips_every_array_field_of_the_message():
    forecast = a_forecast()
    msg = forecast_to_msg(forecast, Header(frame_id="cam"), moving_threshold=1.5, camera_info=camera_info())
    received = deserialize_message(serialize_message(msg), TrajectoryForecast)
    arrays = msg_to_arrays(received)
    array_fields = {name for name, kind in TrajectoryForecast.get_fields_and_field_types().items()
                    if kind.startswith(("sequence<float", "sequence<double")) or "[" in kind}
    assert array_fields == set(arrays), "msg_to_arrays must unpack every array field"
    summaries = planner_summaries(forecast.tracks, 1.5)
    np.testing.assert_array_equal(arrays["tracks"], forecast.tracks)
    np.testing.assert_array_equal(arrays["query_points"], forecast.query_points)
    np.testing.assert_allclose(arrays["moving_fraction"], summaries.motion_probability)
    np.testing.assert_array_equal(arrays["first_move_frame"], summaries.first_move_frame)
    np.testing.assert_allclose(arrays["spread_per_frame"], summaries.spread_per_frame)
    np.testing.assert_allclose(arrays["spread"], summaries.spread_per_frame[-1])
    np.testing.assert_allclose(arrays["mean_displacement"], summaries.mean_displacement)
    np.testing.assert_allclose(arrays["sample_weights"], [1 / 3] * 3)
    np.testing.assert_allclose(arrays["crop_box"], [20, 0, 120, 100])
    np.testing.assert_allclose(arrays["k"], np.reshape(camera_info().k, (3, 3)))
    np.testing.assert_allclose(arrays["d"], camera_info().d)
    assert received.intrinsics_known and received.distortion_model == "plumb_bob"
    assert received.frame_interval == pytest.approx(0.1)  # the forecast's own when no parameter overrides it
    assert received.moving_threshold == pytest.approx(1.5)
    back = msg_to_forecast(received)
    assert back.frame_interval == pytest.approx(0.1) and back.crop_box == (20.0, 0.0, 120.0, 100.0)


def test_without_usable_camera_info_the_message_says_the_intrinsics_are_unknown():
    forecast = a_forecast()
    uncalibrated = SimpleNamespace(**{**vars_of(camera_info()), "k": [0.0] * 9})
    for info in (None, camera_info(width=640, height=480), uncalibrated):
        msg = forecast_to_msg(forecast, Header(), camera_info=info)
        assert not msg.intrinsics_known
        assert list(msg.k) == [0.0] * 9 and msg.distortion_model == "" and len(msg.d) == 0
        assert "k" not in msg_to_arrays(msg)
        np.testing.assert_allclose(msg.crop_box, [20, 0, 120, 100])  # the crop box does not need a camera model
    stated_size_free = camera_info(width=0, height=0)  # 0 x 0: the CameraInfo does not state a size
    assert forecast_to_msg(forecast, Header(), camera_info=stated_size_free).intrinsics_known


def vars_of(info: CameraInfo) -> dict:
    return {name: getattr(info, name) for name in ("width", "height", "k", "d", "distortion_model")}


def test_a_464_x_256_image_is_centre_cropped_and_the_message_says_where():
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.presets import tiny_config

    forecaster = Forecaster.from_config(tiny_config(text=False), device="cpu", seed=0)
    image = np.zeros((256, 464, 3), np.uint8)
    forecast = forecaster.forecast(image, num_samples=2, steps=2, seed=0)
    assert forecast.crop_box == (104.0, 0.0, 360.0, 256.0)  # the largest centred square
    for info, known in ((None, False), (camera_info(width=464, height=256), True)):
        msg = forecast_to_msg(forecast, Header(), camera_info=info)
        np.testing.assert_allclose(msg.crop_box, [104, 0, 360, 256])
        assert msg.intrinsics_known is known
        query_x = msg_to_arrays(msg)["query_points"][..., 0]
        assert 104 < query_x.min() and query_x.max() < 360  # the grid lies inside the crop box
    assert forecast_to_msg(forecast, Header()).frame_interval == 0.0  # the tiny preset states no interval


def test_a_3_x_3_frame_is_rejected_as_too_small_at_the_node_limit():
    from traj_forecast_ros.geometry import MIN_IMAGE_SIDE

    tiny = rgb_to_image_msg(np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ImageMessageError, match="too_small") as error:
        image_msg_to_rgb(tiny, min_side=MIN_IMAGE_SIDE)
    assert error.value.reason == "too_small"
    edge = rgb_to_image_msg(np.zeros((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3), np.uint8))
    assert image_msg_to_rgb(edge, min_side=MIN_IMAGE_SIDE).shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 3)


def test_the_unpacking_helper_has_no_copies():
    """One helper: no other module, script or example reshapes a TrajectoryForecast's flat arrays itself."""
    copies = []
    fields = "tracks|query_points|spread|moving_fraction"
    pattern = re.compile(rf"def forecast_arrays|\b(msg|message)\.({fields})\b.*reshape")
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if relative.parts[0] in (".venv", "build", "install", "log") or relative.parts[0].startswith("."):
            continue
        if relative in (Path("traj_forecast_ros/ros/conversions.py"), Path(__file__).relative_to(REPO)):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                copies.append(f"{relative}:{number}: {line.strip()}")
    assert not copies, "use traj_forecast_ros.ros.conversions.msg_to_arrays:\n" + "\n".join(copies)
    example = (REPO / "docs/examples/forecast_subscriber.py").read_text()
    assert "from traj_forecast_ros.ros.conversions import msg_to_arrays" in example
    assert "from traj_forecast_ros.ros.conversions import msg_to_arrays" in (
        REPO / "traj_forecast_ros/bag/report.py").read_text()
    assert "traj_forecast_ros.ros.conversions.msg_to_arrays" in (
        REPO / "msgs/traj_forecast_msgs/msg/TrajectoryForecast.msg").read_text()
    readme = (REPO / "README.md").read_text()
    assert "from traj_forecast_ros.ros.conversions import msg_to_arrays" in readme  # the README's example
    assert "## Consuming forecasts: the example planner" in readme


class StraightForecaster:
    """A fake model: every point of a 4 x 4 grid moves 2 px right per frame in every sample."""

    model_id, device, dtype = "fake", "cpu", "float32"

    def warmup(self) -> None:
        pass

    def release(self) -> None:
        pass

    def forecast(self, rgb, instruction=None, num_samples=8, steps=10, seed=None):
        height, width = rgb.shape[:2]
        ys, xs = np.meshgrid(np.linspace(0, height, 4), np.linspace(0, width, 4), indexing="ij")
        query = np.stack([xs, ys], -1).astype(np.float32)
        tracks = query + np.arange(4, dtype=np.float32)[None, :, None, None, None] * [2.0, 0.0]
        return Forecast(tracks=np.repeat(tracks, num_samples, axis=0).astype(np.float32), query_points=query,
                        image_size=(height, width), model_id="fake", timings={"total": 0.01})


def test_the_node_fills_the_geometry_and_rejects_a_3_x_3_frame_as_too_small(context):
    from rclpy.parameter import Parameter

    from ros_helpers import wait_until
    from traj_forecast_ros.ros.diagnostics import diagnostic_status
    from traj_forecast_ros.ros.forecast_node import ForecastNode

    node = ForecastNode(forecaster_factory=lambda *a, **options: StraightForecaster(), context=context,
                        parameter_overrides=[Parameter("frame_interval", value=0.05)])
    try:
        assert node.autostart()
        sent = []
        node.outputs._publishers[""] = {"forecast": SimpleNamespace(publish=sent.append),
                                        "markers": SimpleNamespace(get_subscription_count=lambda: 0),
                                        "overlay": SimpleNamespace(get_subscription_count=lambda: 0)}
        node._on_image(node.cameras[0], rgb_to_image_msg(np.zeros((100, 140, 3), np.uint8)))  # no CameraInfo yet
        assert wait_until(lambda: len(sent) == 1, 5)
        node.inputs.camera_info[""] = camera_info()  # what the camera_info subscription stores
        node._on_image(node.cameras[0], rgb_to_image_msg(np.zeros((100, 140, 3), np.uint8)))
        assert wait_until(lambda: len(sent) == 2, 5)
        without, with_info = sent
        assert not without.intrinsics_known and with_info.intrinsics_known
        np.testing.assert_allclose(with_info.k, camera_info().k)
        for msg in sent:
            np.testing.assert_allclose(msg.crop_box, [0, 0, 140, 100])  # a fake without a crop: the whole image
            assert msg.frame_interval == pytest.approx(0.05)
            # 2 px per frame: more than moving_threshold (2 px) from frame 2 on
            np.testing.assert_array_equal(msg_to_arrays(msg)["first_move_frame"], np.full((4, 4), 2.0))

        node._on_image(node.cameras[0], rgb_to_image_msg(np.zeros((3, 3, 3), np.uint8)))
        assert wait_until(lambda: node.stats.total.not_forecast.counts().get("too_small") == 1, 5)
        status = diagnostic_status("n", "active", node.stats.total.snapshot(), node.models.model.info, 0)
        values = {kv.key: kv.value for kv in status.values}
        assert values["rejected.too_small"] == "1" and values["rejected_total"] == "1"
        assert values["frames_received"] == "3" and values["forecasts_published"] == "2" and len(sent) == 2
    finally:
        node.stop_worker(timeout=1.0)
        node.destroy_node()


@pytest.mark.parametrize("info", [None, camera_info(), camera_info(width=0, height=0)], ids=["none", "full", "no_size"])
def test_rclpy_bytes_read_back_with_rosbags_with_and_without_distortion(info):
    """rclpy (Fast CDR) and rosbags must agree on the layout, also with an empty d (no CameraInfo): bags recorded
    live are read back by the bag tools."""
    from traj_forecast_ros.bag.typestore import FORECAST_TYPE, make_typestore

    if info is not None and info.width == 0:
        info.d = []  # a CameraInfo without distortion coefficients
    msg = forecast_to_msg(a_forecast(), Header(frame_id="cam"), camera_info=info)
    decoded = make_typestore().deserialize_cdr(serialize_message(msg), FORECAST_TYPE)
    for name, values in msg_to_arrays(msg).items():
        np.testing.assert_array_equal(msg_to_arrays(decoded)[name], values, err_msg=name)
    assert decoded.intrinsics_known == msg.intrinsics_known
