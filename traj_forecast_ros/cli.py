"""``traj-forecast``: the command-line interface (works without ROS, except the ``bag`` command)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Collection, List, Optional, Sequence

from traj_forecast_ros.commands import COMMANDS


def build_parser(only: Optional[Collection[str]] = None) -> argparse.ArgumentParser:
    """The top-level parser. Every command of :data:`~traj_forecast_ros.commands.COMMANDS` is listed with its help;
    the modules of the commands in ``only`` (None: of every command) are imported and add their full parsers."""
    parser = argparse.ArgumentParser(prog="traj-forecast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    registered = set()
    selected = {entry.module for entry in COMMANDS if only is None or entry.name in only}
    for entry in COMMANDS:
        if entry.name in registered:
            continue
        if entry.module not in selected:
            subparsers.add_parser(entry.name, help=entry.help)  # listed only: its module is not loaded
            registered.add(entry.name)
            continue
        try:
            module = importlib.import_module(entry.module)  # the lazy step: one registry, documented in commands/
        except ModuleNotFoundError as exc:
            if exc.name == entry.module:
                continue  # command not part of this build
            raise SystemExit(f"traj-forecast {entry.name}: needs the Python package '{exc.name}', which is not "
                             "installed (bash scripts/setup.sh installs every dependency)") from exc
        module.register(subparsers)
        registered.update(other.name for other in COMMANDS if other.module == entry.module)
    return parser


def command_of(argv: Sequence[str]) -> Optional[str]:
    """The command named in ``argv`` (its first positional argument), or None (``--help``, nothing, a typo)."""
    first = next((argument for argument in argv if not argument.startswith("-")), None)
    return first if any(entry.name == first for entry in COMMANDS) else None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``traj-forecast`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
