"""scripts/build_msgs.sh builds traj_forecast_msgs from a clean build dir into a fresh prefix, idempotently."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ros_helpers import REPO

MSG_FILE = REPO / "msgs" / "traj_forecast_msgs" / "msg" / "TrajectoryForecast.msg"


def msg_fields() -> list:
    """Field names declared in the .msg file, in order."""
    fields = []
    for line in MSG_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            fields.append(line.split()[1])
    return fields


def test_every_field_is_documented():
    """Each field (or group of adjacent fields) sits right under a comment that explains it."""
    lines = MSG_FILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        above = number - 1
        while above >= 0 and lines[above].strip() and not lines[above].startswith("#"):
            above -= 1  # skip the other fields of the same group
        assert above >= 0 and lines[above].startswith("#"), f"field without a comment above it: {line}"
    assert {"header", "tracks", "query_points", "spread", "moving_fraction"} <= set(msg_fields())


@pytest.mark.timeout(240)
def test_build_into_a_fresh_prefix_then_skip_when_up_to_date(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    prefix, build = tmp_path / "prefix", tmp_path / "build"
    venv = os.path.dirname(os.path.dirname(sys.executable))
    env = dict(os.environ, VIRTUAL_ENV=venv)
    command = ["bash", str(REPO / "scripts" / "build_msgs.sh"), "--prefix", str(prefix), "--build-dir", str(build)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=220)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed traj_forecast_msgs" in first.stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "up to date" in second.stdout, second.stdout + second.stderr

    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    check = ("import traj_forecast_msgs.msg as m, numpy as np; msg = m.TrajectoryForecast(); "
             "msg.tracks = np.arange(4, dtype=np.float32).tolist(); "
             "print(m.__file__); print(' '.join(msg.get_fields_and_field_types()))")
    env = dict(os.environ, PYTHONPATH=str(site),
               LD_LIBRARY_PATH=os.pathsep.join([str(prefix / "lib"), os.environ.get("LD_LIBRARY_PATH", "")]))
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    module_file, fields = result.stdout.strip().splitlines()
    assert module_file.startswith(str(site)), "imported an installed copy instead of the fresh build"
    assert fields.split() == msg_fields()


def test_installed_messages_match_the_sources():
    pytest.importorskip("traj_forecast_msgs", reason="traj_forecast_msgs not built: run scripts/build_msgs.sh")
    from traj_forecast_msgs.msg import TrajectoryForecast

    assert list(TrajectoryForecast.get_fields_and_field_types()) == msg_fields(), \
        "the installed traj_forecast_msgs is stale: run scripts/build_msgs.sh"
