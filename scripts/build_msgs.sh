#!/usr/bin/env bash
# Build the interface package msgs/traj_forecast_msgs with plain CMake and install it into a prefix (default: the
# project's .venv, which the ROS 2 PyPI wheels turn into an ament prefix, so nothing needs sourcing at run time).
# Idempotent: skips the build when the installed copy was built from the same sources for the same Python.
#
# usage: scripts/build_msgs.sh [--prefix DIR] [--build-dir DIR] [--python PY] [--force]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PKG=traj_forecast_msgs
SRC=$ROOT/msgs/$PKG
PREFIX=${VIRTUAL_ENV:-$ROOT/.venv}
BUILD_DIR=$ROOT/build/$PKG
PY=""
FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) PREFIX=$2; shift 2 ;;
    --build-dir) BUILD_DIR=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "build_msgs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
VENV=${VIRTUAL_ENV:-$ROOT/.venv}
PY=${PY:-$VENV/bin/python}
if [ ! -x "$PY" ]; then
  echo "build_msgs.sh: no Python at $PY; run scripts/setup.sh first (it creates .venv)" >&2
  exit 1
fi
command -v cmake >/dev/null || { echo "build_msgs.sh: cmake (>= 3.21) is required: apt-get install cmake" >&2; exit 1; }
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)

# Fingerprint of everything the build depends on: sources, interpreter, prefix.
py_version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
fingerprint=$( (cd "$SRC" && find . -type f -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum; \
  echo "$py_version $PREFIX") | sha256sum | cut -d' ' -f1)
stamp=$PREFIX/share/$PKG/.build_fingerprint
site=$PREFIX/lib/python$py_version/site-packages/$PKG
if [ "$FORCE" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] && [ -d "$site" ]; then
  echo "build_msgs.sh: $PKG is up to date in $PREFIX"
  exit 0
fi

# The PyPI wheels install ament/rosidl CMake packages into the venv: both paths must point there while building
# (without AMENT_PREFIX_PATH: "No 'rosidl_typesupport_c' found").
export CMAKE_PREFIX_PATH=$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
export AMENT_PREFIX_PATH=$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}
export PATH=$VENV/bin:$PATH
echo "build_msgs.sh: building $PKG into $PREFIX"
mkdir -p "$(dirname "$BUILD_DIR")"
cmake -S "$SRC" -B "$BUILD_DIR" -DCMAKE_INSTALL_PREFIX="$PREFIX" -DBUILD_TESTING=OFF \
  -DPython3_EXECUTABLE="$PY" -DPython3_FIND_VIRTUALENV=FIRST -DCMAKE_BUILD_TYPE=Release >"$BUILD_DIR.log" 2>&1 \
  || { tail -40 "$BUILD_DIR.log" >&2; exit 1; }
cmake --build "$BUILD_DIR" -j "$(nproc 2>/dev/null || echo 2)" >>"$BUILD_DIR.log" 2>&1 \
  || { tail -40 "$BUILD_DIR.log" >&2; exit 1; }
cmake --install "$BUILD_DIR" >>"$BUILD_DIR.log" 2>&1 || { tail -40 "$BUILD_DIR.log" >&2; exit 1; }
echo "$fingerprint" > "$stamp"
echo "build_msgs.sh: installed $PKG into $PREFIX (log: $BUILD_DIR.log)"
