"""Subcommands of the ``traj-forecast`` CLI.

Each command module imports what it needs at its top and defines ``register(subparsers)``, which adds its commands.
:data:`COMMANDS` is the one registry of them: every top-level command, the module that defines it and its one-line
help. The CLI lists every command from this table and imports only the module of the command being run, so
``traj-forecast --help`` loads no command module (no torch, no ROS). This package itself imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Command:
    """One top-level command: its name, the module whose ``register`` adds it, and its help line."""

    name: str
    module: str
    help: str


COMMANDS: Tuple[Command, ...] = (
    Command("predict", "traj_forecast_ros.commands.predict", "forecast point trajectories for one image"),
    Command("download", "traj_forecast_ros.commands.models",
            "download a registry model and convert it into a model directory"),
    Command("info", "traj_forecast_ros.commands.models",
            "describe a model: config, parameters, files, weights present"),
    Command("export-official", "traj_forecast_ros.commands.models",
            "convert official .pth checkpoints into a model directory"),
    Command("data", "traj_forecast_ros.commands.data", "synthetic datasets and user data import"),
    Command("train", "traj_forecast_ros.commands.train",
            "train the VAE, the latent flow model or the regressor baseline"),
    Command("evaluate", "traj_forecast_ros.commands.evaluate", "metrics of a model vs baselines on a dataset"),
    Command("bag", "traj_forecast_ros.commands.bag",
            "rosbag2 tools: info, play, record, run, replay, make-sample (needs the ROS 2 Python packages)"),
)


def command_help(name: str) -> str:
    """The help line of the command ``name`` (what its module passes to ``add_parser``)."""
    return next(command.help for command in COMMANDS if command.name == name)
