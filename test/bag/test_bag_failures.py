"""``bag run`` and ``bag record`` against hostile input (issue 21, defect 7 and a minor item): a foreign message
definition, a run that fails part-way, arguments checked before the model loads, durations that never end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("traj_forecast_msgs.msg")

from rosbags.typesys import Stores, get_typestore, get_types_from_msg  # noqa: E402

from traj_forecast_ros.bag.io import BagWriter, bag_topics  # noqa: E402
from traj_forecast_ros.bag.offline import run_bag  # noqa: E402
from traj_forecast_ros.bag.sample import SAMPLE_BAG  # noqa: E402
from traj_forecast_ros.bag.typestore import make_typestore  # noqa: E402
from traj_forecast_ros.cli import main as cli_main  # noqa: E402
from traj_forecast_ros.errors import BagError  # noqa: E402

RUN_ARGS = dict(num_samples=1, steps=2, seed=0, device="cpu", dtype="float32", progress=False)


def foreign_image_bag(path: Path, frames: int = 3) -> Path:
    """A bag whose ``sensor_msgs/msg/Image`` was recorded with another definition (a header, a note, a gain)."""
    store = get_typestore(Stores.EMPTY)
    types = {}
    types.update(get_types_from_msg("int32 sec\nuint32 nanosec", "builtin_interfaces/msg/Time"))
    types.update(get_types_from_msg("builtin_interfaces/Time stamp\nstring frame_id", "std_msgs/msg/Header"))
    types.update(get_types_from_msg("std_msgs/Header header\nstring note\nfloat64 gain", "sensor_msgs/msg/Image"))
    store.register(types)
    made = store.types
    with BagWriter(path, "mcap", store) as writer:
        for index in range(frames):
            header = made["std_msgs/msg/Header"](stamp=made["builtin_interfaces/msg/Time"](sec=index, nanosec=0),
                                                 frame_id="cam")
            image = made["sensor_msgs/msg/Image"](header=header, note="recorded elsewhere", gain=1.5)
            writer.write_message("/cam/image_raw", "sensor_msgs/msg/Image", index * 10**8, image)
    return path


def test_images_of_a_foreign_definition_are_rejected_per_message(tmp_path, tiny_model_dir):
    summary = run_bag(foreign_image_bag(tmp_path / "foreign"), tmp_path / "out", model=str(tiny_model_dir),
                      **RUN_ARGS)
    assert summary["frames_in"] == 3 and summary["forecasts_out"] == 0
    assert summary["rejected"] == {"undecodable": 3} and summary["dropped"] == {}


def test_the_cli_gives_a_summary_not_a_traceback_for_a_foreign_definition(tmp_path, tiny_model_dir, capsys):
    code = cli_main(["bag", "run", str(foreign_image_bag(tmp_path / "foreign")), str(tmp_path / "out"), "--model",
                     str(tiny_model_dir), "--device", "cpu", "--samples", "1", "--steps", "2", "--no-progress"])
    assert code == 0 and '"undecodable": 3' in capsys.readouterr().out


class ExplodingForecaster:
    """Forecasts its first image, then fails like a bug would (not a counted bad input)."""

    model_id, config = "exploding", None

    def __init__(self) -> None:
        from traj_forecast_ros.forecaster import Forecaster
        from traj_forecast_ros.model.presets import tiny_config

        self.inner = Forecaster.from_config(tiny_config(text=False), device="cpu")
        self.calls = 0

    def forecast(self, rgb, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("injected failure part-way through the bag")
        return self.inner.forecast(rgb, **kwargs)


def test_a_run_that_fails_part_way_leaves_no_output_and_can_be_rerun(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        run_bag(SAMPLE_BAG, out, forecaster=ExplodingForecaster(), **RUN_ARGS)
    assert not out.exists(), "a partial output bag was left behind"
    summary = run_bag(SAMPLE_BAG, out, model=str(tiny_model_dir), topics=["/agentview/image_raw"], **RUN_ARGS)
    assert summary["forecasts_out"] == summary["frames_in"] > 0
    assert "/agentview/forecast_node/forecast" in bag_topics(out)


@pytest.mark.parametrize("arguments, message", [
    (dict(num_samples=0), r"--samples\) must be >= 1"),
    (dict(steps=1), r"--steps\) must be >= 2"),
    (dict(num_samples=True), "must be an integer"),
    (dict(seed=-1), "give --seed >= 0"),
], ids=["zero-samples", "one-step", "bool-samples", "fresh-seed"])
def test_arguments_are_checked_before_the_model_loads(tmp_path, monkeypatch, arguments, message):
    from traj_forecast_ros.forecaster import Forecaster

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Forecaster, "from_pretrained", never)
    with pytest.raises(BagError, match=message):
        run_bag(SAMPLE_BAG, tmp_path / "out", model="demo-blocks", **dict(RUN_ARGS, **arguments))
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(BagError, match="exists already"):
        run_bag(SAMPLE_BAG, tmp_path / "taken", model="demo-blocks", **RUN_ARGS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("duration", ["-1", "nan", "inf"])
def test_bag_record_refuses_a_duration_that_never_ends(tmp_path, capsys, duration):
    code = cli_main(["bag", "record", str(tmp_path / "rec"), "--duration", duration])
    assert code == 2 and "duration must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()
