"""Reading results back: stamps straight from CDR, latency percentiles, the GIF writer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from traj_forecast_ros.bag.io import deserialize, read_messages
from traj_forecast_ros.bag.report import header_stamp_ns, percentiles_ms, save_gif, stamp_ns
from traj_forecast_ros.bag.sample import SAMPLE_BAG
from traj_forecast_ros.errors import BagError


def test_header_stamp_is_read_without_decoding():
    for message in read_messages(SAMPLE_BAG):
        assert header_stamp_ns(message.data) == stamp_ns(deserialize(message).header)
    with pytest.raises(BagError):
        header_stamp_ns(b"\x07\x07\x00\x00")


def test_percentiles_in_milliseconds():
    stats = percentiles_ms([0.1] * 19 + [1.0])
    assert stats["p50"] == pytest.approx(100.0) and stats["max"] == pytest.approx(1000.0) and stats["count"] == 20
    assert stats["p95"] == pytest.approx(145.0)
    assert percentiles_ms([]) == {"p50": None, "p95": None, "max": None, "count": 0}


def test_gif_keeps_frames_and_durations(tmp_path):
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    frames = []
    for index in range(3):
        frame = background.copy()
        frame[4:8, 4 + 10 * index: 8 + 10 * index] = (255, 255, 0)
        frames.append(frame)
    path = save_gif(frames, tmp_path / "a.gif", [100, 100, 500])
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.size == (48, 32)
        durations = []
        for index in range(3):
            gif.seek(index)
            durations.append(gif.info["duration"])
            red, green, blue = np.asarray(gif.convert("RGB"))[5, 5 + 10 * index].astype(int)
            assert red > 200 and green > 200 and blue < 80  # the moving yellow patch, within palette error
        assert durations == [100, 100, 500]
    exact = save_gif(frames, tmp_path / "exact.gif", [100] * 3, exact_colors=np.array([[255, 255, 0]]))
    with Image.open(exact) as gif:
        gif.seek(2)
        assert tuple(np.asarray(gif.convert("RGB"))[5, 25]) == (255, 255, 0)  # kept exactly, not approximated
    with pytest.raises(BagError):
        save_gif([], tmp_path / "b.gif", [])
