#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((RANDOM % 100 + 1))}
export FASTDDS_DEFAULT_PROFILES_FILE=$PWD/config/fastdds_large_data.xml
exec .venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip with its reason
