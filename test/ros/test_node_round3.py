"""Reliability round three (issue 21) over real DDS: the node in this process with an injected forecaster, reached by
a probe node through its topics and services (the harness of ``test_node_reliability.py``)."""

from __future__ import annotations

import io
import math
import threading
from typing import Any, List

import numpy as np
import pytest
from PIL import Image as PILImage

from ros_helpers import ros_available, wait_connected, wait_until
from test_node_reliability import Harness, SlowFakeForecaster, harness_factory, probe  # noqa: F401 - fixtures

pytestmark = [pytest.mark.ros, pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))]

if ros_available() is None:
    from lifecycle_msgs.msg import Transition
    from sensor_msgs.msg import CameraInfo, CompressedImage
    from visualization_msgs.msg import MarkerArray


def compressed_png(height: int, width: int, stamp_from: Any) -> Any:
    """A black ``height x width`` mono PNG (small on the wire) stamped like the harness's frames."""
    buffer = io.BytesIO()
    PILImage.new("L", (width, height)).save(buffer, format="PNG")
    msg = CompressedImage(format="png", data=buffer.getvalue())
    msg.header = stamp_from.header
    return msg


def send_and_wait(harness: Harness, publisher: Any, msg: Any, timeout: float = 30.0) -> None:
    """Publish ``msg`` and wait until the node received it and its worker is idle again."""
    stats = harness.node.node.stats.total
    before = stats.received
    publisher.publish(msg)
    pipeline = lambda: harness.node.node.pipeline  # noqa: E731
    assert wait_until(lambda: stats.received > before and pipeline().waiting == 0 and not pipeline().busy,
                      timeout), "the node never took the frame"


# ------------------------------------------------------------------------------------------------ defect 1
@pytest.mark.timeout(180)
def test_max_pixels_above_4096_squared_is_the_one_limit_on_the_compressed_path(harness_factory):
    """A 4097 x 4097 frame within max_pixels = 2^28 is forecast by the real Forecaster (it was refused against the
    forecaster's own 16.8 MP limit and counted invalid_image); a frame above max_pixels is counted too_large."""
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.presets import tiny_config

    harness = harness_factory(lambda *a, **k: Forecaster.from_config(tiny_config(text=False), device="cpu"),
                              max_pixels=2**28, image_transport="compressed", num_samples=1, steps=2)
    assert harness.transition(Transition.TRANSITION_CONFIGURE) and harness.transition(Transition.TRANSITION_ACTIVATE)
    publisher = harness.probe.publisher(CompressedImage, f"{harness.namespace}/image/compressed")
    assert wait_connected(publisher, 20)
    send_and_wait(harness, publisher, compressed_png(4097, 4097, harness.frame()))
    assert wait_until(lambda: len(harness.forecasts()) == 1, 20), harness.balanced()
    forecast = harness.forecasts()[0]
    assert (forecast.image_height, forecast.image_width) == (4097, 4097)
    assert harness.set_params(max_pixels=4096 * 4096)[0].successful
    send_and_wait(harness, publisher, compressed_png(4097, 4097, harness.frame()))
    values = harness.balanced()
    assert values["rejected.too_large"] == "1" and values["rejected_total"] == "1", values
    assert values["forecasts_published"] == "1", values


def test_pillows_own_decompression_bomb_limit_does_not_apply(monkeypatch):
    """The compressed decoder honours only max_pixels: Pillow's process-wide bomb limit (lowered here so a small PNG
    trips it, as a 182 MP PNG trips the default) neither refuses a frame within max_pixels nor counts it corrupt."""
    from traj_forecast_ros.ros.conversions import ImageMessageError, compressed_msg_to_rgb

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 2x = 2000 < 60 x 60
    buffer = io.BytesIO()
    PILImage.new("RGB", (60, 60), (10, 20, 30)).save(buffer, format="PNG")
    msg = CompressedImage(format="png", data=buffer.getvalue())
    rgb = compressed_msg_to_rgb(msg, max_pixels=2**28)
    assert rgb.shape == (60, 60, 3) and tuple(rgb[0, 0]) == (10, 20, 30)
    with pytest.raises(ImageMessageError) as refused:
        compressed_msg_to_rgb(msg, max_pixels=3599)
    assert refused.value.reason == "too_large"


# ------------------------------------------------------------------------------------------------ defect 2
@pytest.mark.timeout(120)
def test_max_input_age_and_max_clock_skew_apply_to_the_next_frame(harness_factory):
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster(), max_input_age=30.0, max_clock_skew=1.0)
    harness.start()
    assert harness.set_params(max_input_age=0.5)[0].successful
    harness.send(harness.frame(age_s=10.0))  # 10 s old: too old for 0.5 s
    assert harness.set_params(max_clock_skew=100.0)[0].successful
    harness.send(harness.frame(age_s=-50.0))  # 50 s ahead: within the new 100 s
    assert wait_until(lambda: len(harness.forecasts()) == 1, 10), harness.balanced()
    values = harness.balanced()
    assert values["dropped.too_old"] == "1" and "rejected.future_stamp" not in values, values


# ------------------------------------------------------------------------------------------------ defect 5
def camera_info(fx: float, fy: float, cx: float, cy: float) -> Any:
    info = CameraInfo(width=32, height=24)
    info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    return info


@pytest.mark.timeout(120)
def test_non_finite_camera_info_is_ignored_and_a_later_good_one_keeps_the_fast_marker_path(harness_factory):
    harness = harness_factory(lambda *a, **k: SlowFakeForecaster(), camera_info_topic="camera_info", marker_stride=1)
    harness.start()
    node = harness.node.node
    markers_topic = f"{harness.name}/markers"
    harness.probe.subscribe(MarkerArray, markers_topic)
    assert wait_until(lambda: node.outputs.publisher("", "markers").get_subscription_count() > 0, 20)
    info_pub = harness.probe.publisher(CameraInfo, f"{harness.namespace}/camera_info")
    assert wait_until(lambda: info_pub.get_subscription_count() > 0, 20)

    def points_after(info: Any) -> np.ndarray:
        info_pub.publish(info)
        def stored() -> Any:
            return node.inputs.camera_info.get("")

        assert wait_until(lambda: stored() is not None and list(stored().k) == list(info.k)
                          or (math.isnan(info.k[0]) and stored() is not None and math.isnan(stored().k[0])), 10)
        before = len(harness.probe.messages(markers_topic))
        harness.send(harness.frame())
        assert wait_until(lambda: len(harness.probe.messages(markers_topic)) > before, 10), "no markers"
        array = harness.probe.messages(markers_topic)[-1]
        return np.array([[p.x, p.y, p.z] for marker in array.markers for p in marker.points])

    fallback = points_after(camera_info(math.nan, math.nan, math.nan, math.nan))
    assert fallback.size and np.isfinite(fallback).all(), "NaN intrinsics reached the markers"
    assert node.outputs.builder.direct_markers is True, "a bad first CameraInfo turned the direct marker path off"
    pinhole = points_after(camera_info(20.0, 20.0, 15.5, 11.5))
    assert np.isfinite(pinhole).all() and not np.allclose(pinhole, fallback), "the good CameraInfo was not used"
    assert node.outputs.builder.direct_markers is True
    assert np.isfinite(points_after(camera_info(math.inf, 20.0, 15.5, 11.5))).all()
    harness.balanced()


# ------------------------------------------------------------------------------------------------ defect 9
@pytest.mark.timeout(120)
def test_model_applies_at_configure_only_and_activate_reloads_the_configured_model(harness_factory):
    """Set ``model`` while inactive: activate reloads the configured model (not the new one, which could fail and
    leave the node without a model); the new one loads at the next configure."""
    loaded: List[str] = []
    lock = threading.Lock()

    def factory(model, *args, **kwargs):
        with lock:
            loaded.append(model)
        return SlowFakeForecaster()

    harness = harness_factory(factory, model="libero-atm")
    harness.start()
    assert harness.transition(Transition.TRANSITION_DEACTIVATE)
    assert harness.set_params(model="demo-blocks")[0].successful
    assert harness.transition(Transition.TRANSITION_ACTIVATE)
    assert loaded == ["libero-atm", "libero-atm"] and harness.state() == "active"
    harness.send(harness.frame())
    assert wait_until(lambda: len(harness.forecasts()) == 1, 10)
    assert harness.transition(Transition.TRANSITION_DEACTIVATE)
    assert harness.transition(Transition.TRANSITION_CLEANUP)
    assert harness.transition(Transition.TRANSITION_CONFIGURE)
    assert loaded[-1] == "demo-blocks"
    harness.balanced()
