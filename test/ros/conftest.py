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


@pytest.fixture(scope="module")
def diagnostics_probe(request):
    """A probe node of the test module, subscribed to ``/diagnostics`` (one per module: DDS discovery is slow)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from ros_helpers import Probe

    probe = Probe(f"{request.module.__name__.rsplit('.', 1)[-1]}_probe")
    probe.subscribe(DiagnosticArray, "/diagnostics")
    yield probe
    probe.close()
