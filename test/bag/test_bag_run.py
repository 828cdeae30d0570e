"""``traj-forecast bag run``: offline, deterministic forecasts of a bag, checked against a stored expectation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("traj_forecast_msgs.msg")

from traj_forecast_ros.bag.io import BagWriter, bag_topics, deserialize, read_messages  # noqa: E402
from traj_forecast_ros.bag.offline import camera_namespace, output_topics, run_bag  # noqa: E402
from traj_forecast_ros.bag.report import read_forecasts, stamp_ns  # noqa: E402
from traj_forecast_ros.ros.conversions import msg_to_arrays  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402
from traj_forecast_ros.bag.typestore import make_typestore  # noqa: E402
from traj_forecast_ros.errors import BagError  # noqa: E402

EXPECTED = Path(__file__).parent / "data" / "bag_run_expected.npz"
RUN_ARGS = dict(num_samples=2, steps=3, seed=0, device="cpu", dtype="float32", progress=False)
TOLERANCE_PX = 0.005  # CPU-to-CPU float noise is ~1e-4 px; changing the input frame moves these tracks >= 0.06 px


@pytest.fixture(scope="module")
def forecast_bag(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("run") / "forecasts"
    summary = run_bag(SAMPLE_BAG, out, model=str(tiny_model_dir), **RUN_ARGS)
    return out, summary


def _all_tracks(bag: Path):
    result = {}
    for image_topic in ("/agentview/image_raw", "/eye_in_hand/image_raw"):
        forecasts = read_forecasts(bag, output_topics(image_topic)["forecast"])
        result[image_topic] = ([s for s, _ in forecasts], np.stack([msg_to_arrays(f)["tracks"] for _, f in forecasts]))
    return result


def test_every_image_gets_forecast_markers_and_overlay_with_its_stamp(forecast_bag):
    out, summary = forecast_bag
    assert summary["frames_in"] == 16 and summary["forecasts_out"] == 16
    assert summary["dropped"] == {} and summary["rejected"] == {}
    topics = bag_topics(out)
    store = make_typestore()
    for image_topic in ("/agentview/image_raw", "/eye_in_hand/image_raw"):
        source = [(m.timestamp, stamp_ns(deserialize(m, store).header)) for m in read_messages(SAMPLE_BAG, [image_topic])]
        for name, topic in output_topics(image_topic).items():
            assert topics[topic].count == 8, topic
            messages = list(read_messages(out, [topic]))
            assert [m.timestamp for m in messages] == [t for t, _ in source]  # bag time of the source image
            decoded = [deserialize(m, store) for m in messages]
            headers = [d.markers[0].header for d in decoded] if name == "markers" else [d.header for d in decoded]
            assert [stamp_ns(h) for h in headers] == [s for _, s in source]
            assert {h.frame_id for h in headers} == {f"{camera_namespace(image_topic)[1:]}_camera_optical_frame"}
        overlay = deserialize(next(read_messages(out, [output_topics(image_topic)["overlay"]])), store)
        assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", 128, 128)


def test_forecasts_equal_the_python_api_with_the_same_seed(forecast_bag, tiny_model_dir, shared_images):
    from PIL import Image

    from traj_forecast_ros.forecaster import Forecaster

    out, _ = forecast_bag
    forecaster = Forecaster.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    image = np.asarray(Image.open(shared_images / "libero_gripper_3.jpg").convert("RGB"))
    direct = forecaster.forecast(image, num_samples=2, steps=3, seed=0).tracks
    _, from_bag = _all_tracks(out)["/eye_in_hand/image_raw"]
    np.testing.assert_allclose(from_bag[3], direct, atol=1e-5)


def test_output_matches_the_stored_expectation(forecast_bag):
    """A change in results (model code, sampler, geometry, message packing) shows up here.

    After an intended change, regenerate: UPDATE_EXPECTED=1 .venv/bin/python -m pytest test/bag/test_bag_run.py
    """
    out, _ = forecast_bag
    tracks = _all_tracks(out)
    if os.environ.get("UPDATE_EXPECTED") == "1":
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(EXPECTED, **{f"{topic}|{kind}": value[i] for topic, value in tracks.items()
                                         for i, kind in enumerate(("stamps", "tracks"))})
        pytest.skip(f"expectation rewritten: {EXPECTED}")
    expected = np.load(EXPECTED)
    for topic, (stamps, values) in tracks.items():
        np.testing.assert_array_equal(stamps, expected[f"{topic}|stamps"])
        assert values.shape == expected[f"{topic}|tracks"].shape
        difference = np.abs(values - expected[f"{topic}|tracks"]).max()
        assert difference < TOLERANCE_PX, f"{topic}: forecasts moved by up to {difference:.4f} px"


def test_runs_are_deterministic(forecast_bag, tiny_model_dir, tmp_path):
    out, _ = forecast_bag
    run_bag(SAMPLE_BAG, tmp_path / "again", model=str(tiny_model_dir), topics=["/agentview/image_raw"],
            storage="sqlite3", **RUN_ARGS)
    assert list(bag_topics(tmp_path / "again")) == sorted(output_topics("/agentview/image_raw").values())
    first = _all_tracks(out)["/agentview/image_raw"]
    again = read_forecasts(tmp_path / "again", output_topics("/agentview/image_raw")["forecast"])
    np.testing.assert_array_equal(np.stack([msg_to_arrays(f)["tracks"] for _, f in again]), first[1])


def test_bad_images_are_counted_not_skipped_silently(tmp_path, tiny_model_dir, caplog):
    store = make_typestore()
    types = store.types
    bag = tmp_path / "mixed"
    with BagWriter(bag, "mcap", store) as writer:
        for index, (encoding, height) in enumerate([("rgb8", 16), ("yuv422", 16), ("rgb8", 0), ("rgb8", 16)]):
            header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=index, nanosec=0),
                                                  frame_id="cam")
            image = types["sensor_msgs/msg/Image"](header=header, height=height, width=16, encoding=encoding,
                                                   is_bigendian=0, step=48,
                                                   data=np.full(height * 48, 100 + index, np.uint8))
            writer.write_message("/cam/image_raw", "sensor_msgs/msg/Image", index * 10**8, image)
    summary = run_bag(bag, tmp_path / "out", model=str(tiny_model_dir), **RUN_ARGS)
    assert summary["frames_in"] == 4 and summary["forecasts_out"] == 2
    assert summary["rejected"] == {"unsupported_encoding": 1, "empty": 1} and summary["dropped"] == {}
    assert "unsupported_encoding" in caplog.text
    assert [s for s, _ in read_forecasts(tmp_path / "out", "/cam/forecast_node/forecast")] == [0, 3 * 10**9]


def test_default_steps_are_the_models_and_tiny_frames_are_rejected_as_by_the_node(tmp_path, tiny_model_dir):
    """Without --steps, bag run forecasts with the model's default_steps (the node's steps: 0), and a frame below the
    node's minimum side is rejected as too_small, as the node does."""
    store = make_typestore()
    types = store.types
    bag = tmp_path / "small"
    with BagWriter(bag, "mcap", store) as writer:
        for index, side in enumerate([16, 3]):
            header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=index, nanosec=0),
                                                  frame_id="cam")
            image = types["sensor_msgs/msg/Image"](header=header, height=side, width=side, encoding="rgb8",
                                                   is_bigendian=0, step=3 * side,
                                                   data=np.full(3 * side * side, 90, np.uint8))
            writer.write_message("/cam/image_raw", "sensor_msgs/msg/Image", index * 10**8, image)
    summary = run_bag(bag, tmp_path / "out", model=str(tiny_model_dir), num_samples=2, seed=0, device="cpu",
                      dtype="float32", progress=False)
    assert summary["steps"] == 10  # the tiny model's default_steps (the official setting)
    assert summary["frames_in"] == 2 and summary["forecasts_out"] == 1 and summary["rejected"] == {"too_small": 1}


def test_bad_arguments(tmp_path, tiny_model_dir):
    with pytest.raises(BagError, match="not an image type"):
        run_bag(SAMPLE_BAG, tmp_path / "x", model=str(tiny_model_dir), topics=["/agentview/camera_info"], **RUN_ARGS)
    with pytest.raises(BagError, match="no topic /nope"):
        run_bag(SAMPLE_BAG, tmp_path / "x", model=str(tiny_model_dir), topics=["/nope"], **RUN_ARGS)
    with pytest.raises(BagError, match="exists already"):
        run_bag(SAMPLE_BAG, tmp_path, model=str(tiny_model_dir), **RUN_ARGS)


def test_output_topic_names():
    assert output_topics("/agentview/image_raw")["forecast"] == "/agentview/forecast_node/forecast"
    assert output_topics("/arm/cam/image_raw/compressed")["overlay"] == "/arm/cam/forecast_node/overlay"
    assert output_topics("/image")["markers"] == "/forecast_node/markers"
