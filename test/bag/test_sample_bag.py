"""The committed sample bag: real LIBERO frames from both cameras, plausible camera_info, reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image as PILImage

from traj_forecast_ros.bag.io import bag_summary, deserialize, read_messages
from traj_forecast_ros.bag.sample import SAMPLE_BAG, SAMPLE_CAMERAS, make_sample_bag, pinhole_intrinsics
from traj_forecast_ros.errors import BagError

IMAGE_TOPICS = ("/agentview/image_raw", "/eye_in_hand/image_raw")


def test_sample_bag_layout():
    summary = bag_summary(SAMPLE_BAG)
    assert summary["storage"] == "mcap"
    assert summary["duration_s"] == pytest.approx(0.7, abs=1e-6)  # 8 frames at 10 Hz
    assert {topic: info["count"] for topic, info in summary["topics"].items()} == {
        "/agentview/image_raw": 8, "/agentview/camera_info": 8,
        "/eye_in_hand/image_raw": 8, "/eye_in_hand/camera_info": 8,
    }
    size = sum(p.stat().st_size for p in SAMPLE_BAG.iterdir())
    assert size < 400_000, f"sample bag grew to {size} bytes"


def test_sample_images_are_the_shared_frames_in_order(shared_images):
    for camera, topic in zip(SAMPLE_CAMERAS, IMAGE_TOPICS):
        messages = [deserialize(m) for m in read_messages(SAMPLE_BAG, [topic])]
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in messages]
        assert np.allclose(np.diff(stamps), 100_000_000)
        for index, message in enumerate(messages):
            assert (message.encoding, message.height, message.width, message.step) == ("rgb8", 128, 128, 384)
            assert message.header.frame_id == camera.frame_id
            expected = np.asarray(PILImage.open(shared_images / f"{camera.file_prefix}{index}.jpg").convert("RGB"))
            np.testing.assert_array_equal(np.asarray(message.data).reshape(128, 128, 3), expected)


def test_camera_info_matches_the_mujoco_cameras():
    for camera in SAMPLE_CAMERAS:
        infos = [deserialize(m) for m in read_messages(SAMPLE_BAG, [f"{camera.namespace}/camera_info"])]
        images = [deserialize(m) for m in read_messages(SAMPLE_BAG, [f"{camera.namespace}/image_raw"])]
        for info, image in zip(infos, images):
            assert info.header.stamp == image.header.stamp and info.header.frame_id == image.header.frame_id
            fx = info.k[0]
            # back to the vertical field of view of the MuJoCo camera (45 deg agentview, 75 deg wrist)
            assert math.degrees(2 * math.atan(64 / fx)) == pytest.approx(camera.fovy_deg)
            assert (info.k[2], info.k[5], info.k[4]) == (63.5, 63.5, fx)
            assert info.distortion_model == "plumb_bob" and not np.any(info.d)
            np.testing.assert_allclose(np.asarray(info.p).reshape(3, 4)[:, :3], np.asarray(info.k).reshape(3, 3))


def test_pinhole_intrinsics_formula():
    k = pinhole_intrinsics(width=640, height=480, fovy_deg=90.0)
    assert k["fx"] == pytest.approx(240.0) and k["fy"] == pytest.approx(240.0)
    assert (k["cx"], k["cy"]) == (319.5, 239.5)


def test_make_sample_regenerates_the_committed_bag(tmp_path, shared_images):
    out = make_sample_bag(tmp_path / "sample", images_dir=shared_images)
    ours = [(m.topic, m.timestamp, m.data) for m in read_messages(out)]
    committed = [(m.topic, m.timestamp, m.data) for m in read_messages(SAMPLE_BAG)]
    assert ours == committed


def test_make_sample_needs_the_frames(tmp_path):
    with pytest.raises(BagError, match="no libero_agent_"):
        make_sample_bag(tmp_path / "sample", images_dir=tmp_path)
