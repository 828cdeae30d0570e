"""Message definitions for reading and writing bags: the installed ROS interfaces plus this package's messages.

rosbag2 stores each topic's message definition and type hash (RIHS01) next to the data. To write a bag whose
definitions match the bytes rclpy produces, the definitions are read from the ``.msg`` files of the ROS install
(``share/<package>/msg/<Type>.msg`` under ``AMENT_PREFIX_PATH`` or the virtualenv), exactly as ``ros2 bag`` does.
Without a ROS install the store bundled with rosbags for ``$ROS_DISTRO`` (default Kilted) is used, and the
``traj_forecast_msgs`` definitions come from the source tree (``msgs/traj_forecast_msgs/msg``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.base import Nodetype
from rosbags.typesys.store import Typestore

from traj_forecast_ros.errors import BagError

SOURCE_MSGS_DIR = Path(__file__).resolve().parents[2] / "msgs"
PACKAGE_MSGS = "traj_forecast_msgs"
FORECAST_TYPE = "traj_forecast_msgs/msg/TrajectoryForecast"

# Types the bag tools read or write; any other type is resolved on demand.
COMMON_TYPES = (
    "sensor_msgs/msg/Image",
    "sensor_msgs/msg/CompressedImage",
    "sensor_msgs/msg/CameraInfo",
    "visualization_msgs/msg/MarkerArray",
    "diagnostic_msgs/msg/DiagnosticArray",
)

_BUNDLED_STORES = {
    "humble": Stores.ROS2_HUMBLE,
    "iron": Stores.ROS2_IRON,
    "jazzy": Stores.ROS2_JAZZY,
    "kilted": Stores.ROS2_KILTED,
}


def interface_search_roots() -> List[Path]:
    """Folders that may hold ``<package>/msg/<Type>.msg``: the ament prefixes' ``share``, then the source tree."""
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes.append(sys.prefix)
    roots: List[Path] = []
    for prefix in prefixes:
        share = Path(prefix) / "share"
        if share.is_dir() and share not in roots:
            roots.append(share)
    if SOURCE_MSGS_DIR.is_dir():
        roots.append(SOURCE_MSGS_DIR)
    return roots


def find_msg_file(typename: str, roots: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """Path of the ``.msg`` file defining ``typename`` (``pkg/msg/Name``), or ``None`` when not installed."""
    package, kind, name = _split_typename(typename)
    for root in roots if roots is not None else interface_search_roots():
        candidate = root / package / kind / f"{name}.msg"
        if candidate.is_file():
            return candidate
    return None


def _split_typename(typename: str) -> tuple:
    parts = typename.split("/")
    if len(parts) != 3 or parts[1] != "msg" or not all(parts):
        raise BagError(f"not a ROS 2 message type name: '{typename}' (expected 'package/msg/Name')")
    return parts[0], parts[1], parts[2]


def _referenced_types(fields: Iterable) -> Set[str]:
    """Names of the message types a parsed field list refers to (directly, or as array/sequence elements)."""
    names: Set[str] = set()
    for _, (node_type, detail) in fields:
        if node_type == Nodetype.NAME:
            names.add(detail)
        elif node_type in (Nodetype.ARRAY, Nodetype.SEQUENCE):
            (inner_type, inner_detail), _ = detail
            if inner_type == Nodetype.NAME:
                names.add(inner_detail)
    return names


def load_installed_types(typenames: Iterable[str], roots: Optional[Sequence[Path]] = None) -> Optional[Dict]:
    """Parse the installed ``.msg`` files of ``typenames`` and everything they reference.

    Returns rosbags' parsed type dict, or ``None`` if any definition is not installed.
    """
    roots = list(roots) if roots is not None else interface_search_roots()
    parsed: Dict = {}
    pending = list(typenames)
    while pending:
        typename = pending.pop()
        if typename in parsed:
            continue
        path = find_msg_file(typename, roots)
        if path is None:
            return None
        types = get_types_from_msg(path.read_text(), typename)
        parsed.update(types)
        for _, fields in types.values():
            pending.extend(name for name in _referenced_types(fields) if name not in parsed)
    return parsed


def bundled_store_name() -> Stores:
    """The rosbags store matching ``$ROS_DISTRO`` (Kilted, the PyPI wheels' distro, when unset or unknown)."""
    return _BUNDLED_STORES.get(os.environ.get("ROS_DISTRO", "").lower(), Stores.ROS2_KILTED)


def make_typestore(extra_types: Iterable[str] = ()) -> Typestore:
    """A typestore with the common image/marker/diagnostic types, ``TrajectoryForecast`` and ``extra_types``.

    Definitions come from the installed interfaces when all are found, else from the bundled distro store.
    """
    wanted = list(COMMON_TYPES) + [FORECAST_TYPE] + list(extra_types)
    installed = load_installed_types(wanted)
    if installed is not None:
        store = get_typestore(Stores.EMPTY)
        store.register(installed)
        return store
    store = get_typestore(bundled_store_name())
    missing = [name for name in wanted if name not in store.fielddefs]
    if missing:
        package_types = load_installed_types(missing, [SOURCE_MSGS_DIR])
        if package_types is None:
            raise BagError(f"no message definition found for {missing}; searched {interface_search_roots()}")
        store.register(package_types)
    return store


def ensure_type(store: Typestore, typename: str) -> None:
    """Register ``typename`` (and what it references) in ``store`` if it is not there yet."""
    if typename in store.fielddefs:
        return
    types = load_installed_types([typename])
    if types is None:
        raise BagError(f"no message definition found for '{typename}'; searched {interface_search_roots()}")
    store.register({name: value for name, value in types.items() if name not in store.fielddefs})
