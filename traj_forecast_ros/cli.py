"""``traj-forecast``: the command-line interface (works without ROS, except ``bag play/record/replay`` (rclpy) and ``bag run`` (ROS message packages))."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from traj_forecast_ros.commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="traj-forecast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``traj-forecast`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
