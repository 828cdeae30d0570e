#!/usr/bin/env bash
# README command 1: set up the environment, then replay the bundled sample bags through the forecast node over DDS
# with the best model available offline (sim-manipulation when shipped, else demo-blocks):
#   1. data/sample_bag/sim_heldout: held-out simulated manipulation episodes with the true future of every frame,
#      so the summary scores every forecast (best-of-K error against what really happened);
#   2. data/sample_bag/libero_two_views: real LIBERO camera frames (no ground truth: unscored).
# Both bags hold both views, agentview and eye_in_hand (LIBERO's robot0_eye_in_hand): each bag's two views are
# replayed through ONE node with two cameras (one model in memory, frames of both views batched in one call; outputs
# /forecast_node/<camera>/{forecast,markers,overlay}; accuracy per camera for the scored bag).
# Writes into outputs/sim/ and outputs/libero/:
#   forecast_bag/  the node's live outputs (forecasts, markers, overlays, diagnostics), recorded as a rosbag2
#   overlay.gif    forecast tracks animated over the camera frames (beside the true future where the bag has it;
#                  overlay_<camera>.gif per view for the two-view bag)
#   summary.json   frames in, forecasts out, drops by reason, latency p50/p95, accuracy (also printed)
# The bags are played at 0.1x (one frame per second: about a forecast's time on an idle 2-core CPU; on a busy one the
# node skips some frames, counted as "superseded"); DEMO_RATE=1 plays them at the recorded 10 Hz, and the node then
# skips most frames.
# Options (environment): DEMO_MODEL=<registry name or model dir>, DEMO_RATE=<playback speed, default 0.1>,
#   DEMO_TOPIC=<image topic(s), space-separated; default: both views; one topic = the single-camera node>,
#   DEMO_OUT=<folder, default outputs>,
#   DEMO_BAGS=<which: "sim libero" (default), "sim" or "libero">,
#   DEMO_PARAMS=<node parameters, space-separated NAME:=VALUE, e.g. "num_samples:=2 steps:=10">.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((RANDOM % 100 + 1))}
OUT=${DEMO_OUT:-outputs}
if [ -n "${DEMO_MODEL:-}" ]; then
  model_args=(--model "$DEMO_MODEL")
else  # best model available offline (demo-blocks ships with the repo); untrained only if none is there
  model_args=(--untrained-fallback "$OUT/untrained-tiny")
fi
declare -A bags=([sim]=data/sample_bag/sim_heldout [libero]=data/sample_bag/libero_two_views)
BOTH_VIEWS="/agentview/image_raw /eye_in_hand/image_raw"  # both bundled bags hold both views
read -ra names <<< "${DEMO_BAGS:-sim libero}"
for name in "${names[@]}"; do
  if [ -z "${bags[$name]+set}" ]; then
    echo "demo: unknown DEMO_BAGS entry '$name' (choose from: sim libero)" >&2
    exit 2
  fi
done
read -ra node_params <<< "${DEMO_PARAMS:-}"
param_args=()
for param in "${node_params[@]}"; do
  param_args+=(--param "$param")
done
for name in "${names[@]}"; do
  bag=${bags[$name]}
  read -ra topics <<< "${DEMO_TOPIC:-$BOTH_VIEWS}"
  echo "demo: replaying ${topics[*]} of $bag through one forecast_node (outputs in $OUT/$name/)"
  .venv/bin/python -m traj_forecast_ros.cli bag replay "$bag" "$OUT/$name" "${model_args[@]}" \
    --topic "${topics[@]}" --rate "${DEMO_RATE:-0.1}" ${param_args[@]+"${param_args[@]}"}
done
