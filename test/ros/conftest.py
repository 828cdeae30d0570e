"""Fixtures of the ROS tests (helpers live in ros_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest




@pytest.fixture
def context():
    """A fresh rclpy context for a node created in the test (shut down afterwards)."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)
