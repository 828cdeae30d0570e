#!/usr/bin/env bash
# Install the optional simulation extra into .venv (after scripts/setup.sh): robosuite 1.5.2 without its mink pin
# (mink needs numpy<2; it serves only robosuite's humanoid IK, never the Panda OSC controller used here), the
# packages robosuite imports, pinned, and libOSMesa for CPU offscreen rendering. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup_sim] installing libosmesa6 (CPU OpenGL for offscreen rendering)"
    apt-get update -qq >/dev/null && apt-get install -y -qq libosmesa6 >/dev/null
  else
    echo "[setup_sim] libOSMesa is missing: install it (Debian/Ubuntu: sudo apt-get install libosmesa6)" >&2
    exit 1
  fi
fi
stamp=.venv/.sim-requirements.sha
want=$(cat requirements-sim.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_sim] installing robosuite and its runtime packages into .venv"
  .venv/bin/pip install --disable-pip-version-check -q --no-deps robosuite==1.5.2
  .venv/bin/pip install --disable-pip-version-check -q -r requirements-sim.txt
  echo "$want" > "$stamp"
fi
