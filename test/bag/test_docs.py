"""The README and the planner example say what the code does."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_readme_starts_with_exactly_the_two_commands():
    code_lines = [line.strip() for line in README.split("\n\n", 2)[1].splitlines()]
    assert [line.split("#")[0].strip() for line in code_lines] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert (REPO / "scripts" / "demo.sh").stat().st_mode & 0o111


def test_parameter_table_matches_the_node():
    node_params = pytest.importorskip("traj_forecast_ros.ros.params")
    section = README.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.MULTILINE))

    def shown(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        return f'"{value}"' if isinstance(value, str) else repr(value)

    assert rows == {spec.name: shown(spec.default) for spec in node_params.PARAMETERS}


def test_what_zero_means_is_documented_alike_in_the_table_and_the_node():
    """0 disables max_input_age but makes max_clock_skew strict, and frame_interval 0 takes the model's value: the
    README table, the parameter descriptions and config/forecast.yaml must say so."""
    node_params = pytest.importorskip("traj_forecast_ros.ros.params")
    section = README.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `[^`]*` \| (.*) \|$", section, flags=re.MULTILINE))
    for name, meaning in (("max_input_age", "0 disables"), ("max_clock_skew", "0 is strict"),
                          ("frame_interval", "0 = the model's own value")):
        assert meaning in node_params.PARAMETER_SPECS[name].description, name
        assert meaning in rows[name], name
    yaml_line = next(line for line in (REPO / "config/forecast.yaml").read_text().splitlines()
                     if line.strip().startswith("frame_interval:"))
    assert "0 = the model's own value" in yaml_line


def test_documented_cli_commands_exist():
    from traj_forecast_ros.cli import build_parser

    parser = build_parser()
    commands = set(re.findall(r"`traj-forecast ((?:bag )?[a-z-]+)", README))
    assert {"bag run", "bag replay", "bag play", "bag record", "bag info", "bag make-sample", "download"} <= commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(command.split() + ["--help"])
        assert exit_info.value.code == 0, command


def test_planner_example_reads_a_forecast_message():
    pytest.importorskip("traj_forecast_msgs.msg")
    from std_msgs.msg import Header

    from traj_forecast_ros.ros.conversions import forecast_to_msg
    from traj_forecast_ros.forecast import Forecast

    spec = importlib.util.spec_from_file_location("forecast_subscriber", REPO / "docs/examples/forecast_subscriber.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    grid = np.stack(np.meshgrid(np.arange(4) * 8.0 + 4, np.arange(3) * 8.0 + 4), axis=-1).astype(np.float32)
    tracks = np.repeat(grid[None, None], 5, axis=1).repeat(2, axis=0)  # [K=2, T=5, H=3, W=4, 2], static
    tracks[:, :, 0, 0, 0] += np.linspace(0, 10, 5)  # the top-left point moves 10 px right in both samples
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = 12, 500_000_000
    forecast = Forecast(tracks=tracks, query_points=grid, image_size=(24, 32), model_id="test")
    msg = forecast_to_msg(forecast, header, frame_interval=0.1, moving_threshold=2.0)

    summary = example.summarise(msg)
    # The point passes 2 px at frame 1 (2.5 px): it starts moving 0.1 s after the frame.
    assert summary == pytest.approx({"stamp": 12.5, "moving_points": 1, "grid_points": 12, "first_move_s": 0.1,
                                     "max_mean_displacement_px": 10.0, "median_spread_px": 0.0, "horizon_s": 0.4})
