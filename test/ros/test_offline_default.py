"""The node's default model (LIBERO) on a machine without its weights: one clear error, and it stays unconfigured."""

from __future__ import annotations

import pytest

from ros_helpers import ros_available

pytestmark = pytest.mark.skipif(ros_available() is not None, reason=str(ros_available()))


def test_default_model_without_weights_logs_one_error_with_the_download_and_the_offline_choice(
        context, capfd, monkeypatch, tmp_path):
    from traj_forecast_ros.ros.forecast_node import ForecastNode
    from traj_forecast_ros.ros.params import PARAMETER_SPECS

    monkeypatch.setenv("TRAJ_FORECAST_HOME", str(tmp_path))  # an empty model cache; the hub is offline in tests
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert PARAMETER_SPECS["model"].default == "libero-atm"  # the default stays LIBERO
    node = ForecastNode(context=context)  # the real loader, the default parameters
    try:
        assert node.autostart() is False
        assert node._state_label == "unconfigured" and node.models.forecaster is None
        log = capfd.readouterr().err
        errors = [line for line in log.splitlines() if "[ERROR]" in line]
        assert len(errors) == 1, log
        assert "cannot load model 'libero-atm'" in errors[0]
        assert "traj-forecast download libero-atm" in log  # how to get it
        assert "model:=sim-manipulation" in log  # what runs offline
        assert log.count("Gabrijel/what-happens-next") <= 1  # the long hand-install text is not repeated
        assert "cannot load model 'libero-atm'" in node._transition_error  # /diagnostics says why (ERROR)
    finally:
        node.destroy_node()
