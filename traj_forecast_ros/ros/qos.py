"""Bridge between bag type names (``sensor_msgs/msg/Image``) and the installed rclpy message classes and QoS."""

from __future__ import annotations

import importlib
from typing import Iterable, Type

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from traj_forecast_ros.errors import BagError


def message_class(msgtype: str) -> Type:
    """The rclpy message class for ``package/msg/Name``; :class:`BagError` if that package is not installed."""
    package, kind, name = msgtype.split("/")
    try:
        module = importlib.import_module(f"{package}.{kind}")
        return getattr(module, name)
    except (ImportError, AttributeError) as exc:
        hint = " (build it: bash scripts/build_msgs.sh)" if package == "traj_forecast_msgs" else ""
        raise BagError(f"message type {msgtype} is not installed in this ROS environment{hint}: {exc}") from exc


def qos_from_name(reliability: str, depth: int = 10) -> QoSProfile:
    """A volatile keep-last profile with ``reliability`` ``"reliable"`` or ``"best_effort"``."""
    policies = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
    if reliability not in policies:
        raise BagError(f"unknown QoS reliability '{reliability}' (choose reliable or best_effort)")
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=policies[reliability],
        durability=DurabilityPolicy.VOLATILE,
    )


def qos_matching_publishers(publisher_infos: Iterable, depth: int = 100) -> QoSProfile:
    """A subscription profile that connects to every given publisher (the rule ``ros2 bag record`` uses).

    Reliable only if all publishers are reliable, transient-local only if all are transient-local.
    """
    infos = list(publisher_infos)
    reliable = bool(infos) and all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
    latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )
