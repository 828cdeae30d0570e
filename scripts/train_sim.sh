#!/usr/bin/env bash
# The whole sim-manipulation pipeline, resumable and deterministic (docs/sim-manipulation.md, docs/results.md):
#   data (robosuite) -> image-encoder pretraining (+ the random encoder's probe) -> VAE -> flow -> regressor
#   -> evaluation on the held-out split -> models/sim-manipulation (< 50 MB, registered in models/registry.yaml).
#
#   bash scripts/train_sim.sh                 # about 3 h on the 2-core CPU; rerun the same command to resume
#   COMPARE_RANDOM=1 bash scripts/train_sim.sh  # also VAE + flow on the random frozen encoder (same budget, +1.2 h)
#
# Every stage writes its run directory under $RUN and a `.done` marker when it finishes: a rerun skips finished
# stages and continues an interrupted training stage from its last checkpoint (`--resume`; identical to an
# uninterrupted run). Data generation resumes by itself (finished shards are kept). Everything is seeded, so a fresh
# machine regenerates the same data and the same model. Settings come from the environment (defaults below).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_sim.sh  # the venv, robosuite and libOSMesa (idempotent)

RUN=${RUN:-runs/sim}
CONFIG=${CONFIG:-sim-manipulation}
MODEL_DEST=${MODEL_DEST:-models/sim-manipulation}
RESULTS_DEST=${RESULTS_DEST:-docs/sim-manipulation-results.json}  # the evaluation JSON (docs/results.md quotes it)
SEED=${SEED:-0}
THREADS=${THREADS:-2}
WORKERS=${WORKERS:-2}
TRAIN_SHARDS=${TRAIN_SHARDS:-24}
TEST_SHARDS=${TEST_SHARDS:-3}
EPISODES_PER_SHARD=${EPISODES_PER_SHARD:-8}
ENCODER_STEPS=${ENCODER_STEPS:-2500}
VAE_STEPS=${VAE_STEPS:-1200}
DECODER_STEPS=${DECODER_STEPS:-800}      # decoder-only fine-tune of the VAE (latent space unchanged)
DECODER_DELTA=${DECODER_DELTA:-0.002}    # its Huber delta (normalised units at 128 px: 0.002 = 0.13 px; near L1)
DECODER_NOISE=${DECODER_NOISE:-0.2}      # its latent noise (units of each channel's latent scale)
FLOW_STEPS=${FLOW_STEPS:-4000}
REGRESSOR_STEPS=${REGRESSOR_STEPS:-400}
EVAL_SAMPLES=${EVAL_SAMPLES:-8}
COMPARE_RANDOM=${COMPARE_RANDOM:-0}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-200}
TF=${TF:-.venv/bin/traj-forecast}

export MUJOCO_GL=${MUJOCO_GL:-osmesa}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-osmesa}
export HF_HUB_OFFLINE=1

COMMON=(--threads "$THREADS" --seed "$SEED" --device cpu --log-every 25 --checkpoint-every "$CHECKPOINT_EVERY")
mkdir -p "$RUN"

stage() {  # stage NAME OUT_DIR COMMAND...: skip when finished, --resume when interrupted after a checkpoint
    local name=$1 out=$2
    shift 2
    if [[ -f "$out/.done" ]]; then
        echo "[$name] finished earlier ($out), skipping"
        return 0
    fi
    local extra=()
    if [[ -f "$out/checkpoints/last.pt" ]]; then
        extra=(--resume)
        echo "[$name] resuming from $out/checkpoints/last.pt"
    fi
    echo "[$name] $* ${extra[*]:-}"
    local start=$SECONDS
    "$@" ${extra[@]+"${extra[@]}"}
    echo "$((SECONDS - start)) s" > "$out/.done"
    echo "[$name] done in $((SECONDS - start)) s"
}

evaluate() {  # evaluate NAME MODEL_DIR OUT_JSON [ARGS...]: the model, zero motion and the regressor on the test split
    local name=$1 model=$2 out=$3
    shift 3
    if [[ -f "$out" && "$out" -nt "$model/.done" && "$out" -nt "$RUN/regressor/.done" ]]; then
        echo "[$name] finished earlier ($out, newer than the model and the regressor), skipping"
        return 0
    fi
    echo "[$name] evaluating $model on $RUN/test"
    "$TF" evaluate --model "$model" --data "$RUN/test" --regressor "$RUN/regressor" --samples "$EVAL_SAMPLES" \
        --seed "$SEED" --threads "$THREADS" --device cpu --markdown --out "$out.partial.json" "$@" \
        | tee "${out%.json}.md"
    mv "$out.partial.json" "$out"
}

# 1. data: train and held-out test splits (disjoint random streams), dense labels for the encoder
if [[ ! -f "$RUN/data.done" ]]; then
    echo "[data] generating into $RUN (resumes: finished shards are kept)"
    start=$SECONDS
    "$TF" data sim-manipulation --out "$RUN" --train-shards "$TRAIN_SHARDS" --test-shards "$TEST_SHARDS" \
        --episodes-per-shard "$EPISODES_PER_SHARD" --seed "$SEED" --workers "$WORKERS"
    echo "$((SECONDS - start)) s" > "$RUN/data.done"
fi

# 2. image encoder pretrained on depth + segmentation, and the same heads on the frozen random encoder (its probe)
ENCODER_ARGS=(--data "$RUN/train" --config "$CONFIG" --eval-data "$RUN/test" --steps "$ENCODER_STEPS"
              --batch-size 32 --lr 5e-4 --warmup 100 --schedule cosine --ema-decay 0.999 "${COMMON[@]}")
stage encoder "$RUN/encoder" "$TF" train encoder --out "$RUN/encoder" "${ENCODER_ARGS[@]}"
stage probe "$RUN/encoder_random_probe" "$TF" train encoder --out "$RUN/encoder_random_probe" --frozen-backbone \
    "${ENCODER_ARGS[@]}"

# 3. stage 1 (VAE) on the frozen pretrained encoder, then its decoder fine-tuned alone (near-L1 reconstruction on
#    noisy latents: still points stay still); 4. stage 2 (flow, with the words text encoder) on the same latents
VAE_ARGS=(--data "$RUN/train" --config "$CONFIG" --steps "$VAE_STEPS" --batch-size 8 --lr 1e-3 --warmup 50
          --schedule cosine --ema-decay 0.995 "${COMMON[@]}")
FLOW_ARGS=(--data "$RUN/train" --steps "$FLOW_STEPS" --batch-size 16 --lr 8e-4 --warmup 100 --schedule cosine
           --ema-decay 0.999 --latent-draw mean "${COMMON[@]}")
stage vae "$RUN/vae" "$TF" train vae --out "$RUN/vae" --encoder "$RUN/encoder" "${VAE_ARGS[@]}"
stage vae_decoder "$RUN/vae_decoder" "$TF" train vae --out "$RUN/vae_decoder" --init "$RUN/vae" --decoder-only \
    --recon-delta "$DECODER_DELTA" --latent-noise "$DECODER_NOISE" --data "$RUN/train" --steps "$DECODER_STEPS" \
    --batch-size 8 --lr 3e-4 --warmup 50 --schedule cosine --ema-decay 0.995 "${COMMON[@]}"
stage flow "$RUN/flow" "$TF" train flow --out "$RUN/flow" --vae "$RUN/vae_decoder" "${FLOW_ARGS[@]}"

# 5. the deterministic regressor baseline on the same frozen encoder
stage regressor "$RUN/regressor" "$TF" train regressor --data "$RUN/train" --encoder "$RUN/vae" --config "$CONFIG" \
    --out "$RUN/regressor" --steps "$REGRESSOR_STEPS" --batch-size 16 --lr 5e-4 --warmup 50 --schedule cosine \
    --ema-decay 0.995 "${COMMON[@]}"

# 6. evaluation on the held-out split: overall, per task kind and per view (JSON + markdown)
evaluate evaluate "$RUN/flow" "$RUN/eval.json" --figure "$RUN/heldout_figure.png" --vae-bound
# the same without instructions: the marginal over tasks, where the samples should spread over the candidate goals
evaluate evaluate_no_instruction "$RUN/flow" "$RUN/eval_no_instruction.json" --no-instructions

# optional: the same VAE + flow budget on the random frozen encoder (no --encoder), evaluated the same way
if [[ "$COMPARE_RANDOM" == 1 ]]; then
    stage vae_random "$RUN/vae_random" "$TF" train vae --out "$RUN/vae_random" "${VAE_ARGS[@]}"
    stage flow_random "$RUN/flow_random" "$TF" train flow --out "$RUN/flow_random" --vae "$RUN/vae_random" \
        "${FLOW_ARGS[@]}"
    evaluate evaluate_random "$RUN/flow_random" "$RUN/eval_random_encoder.json"
fi

# 7. ship the model directory (atomically) and check its size
if [[ ! -f "$MODEL_DEST/config.yaml" || "$RUN/flow/.done" -nt "$MODEL_DEST/config.yaml" ]]; then
    staging="$MODEL_DEST.partial"
    rm -rf "$staging"
    mkdir -p "$staging"
    cp -r "$RUN/flow/config.yaml" "$RUN/flow/denoiser.safetensors" "$RUN/flow/vae.safetensors" \
        "$RUN/flow/image_encoder" "$RUN/flow/text_encoder" "$staging/"
    cp "$RUN/eval.json" "$staging/eval.json"
    cat > "$staging/README.md" <<README
# sim-manipulation

Trained by \`scripts/train_sim.sh\` (RUN=$RUN, seed $SEED; steps: encoder $ENCODER_STEPS, VAE $VAE_STEPS + decoder
$DECODER_STEPS (Huber delta $DECODER_DELTA, latent noise $DECODER_NOISE), flow
$FLOW_STEPS, regressor $REGRESSOR_STEPS; data: $TRAIN_SHARDS train + $TEST_SHARDS test shards of
$EPISODES_PER_SHARD episodes) on simulated LIBERO-like manipulation clips (docs/sim-manipulation.md). Image encoder:
a small ViT pretrained on the sim frames' depth and segmentation, frozen. Text encoder: word-level, trained with the
denoiser on the closed instruction set (vocabulary in config.yaml). Held-out results: eval.json, docs/results.md.
README
    size_mb=$(du -sm "$staging" | cut -f1)
    if (( size_mb >= 50 )); then
        echo "error: the model directory is $size_mb MB (limit 50 MB); not shipped" >&2
        exit 1
    fi
    rm -rf "$MODEL_DEST"
    mv "$staging" "$MODEL_DEST"
    cp "$RUN/eval.json" "$RESULTS_DEST"
    if [[ -f "$RUN/heldout_figure.png" ]]; then
        mkdir -p docs/figures && cp "$RUN/heldout_figure.png" docs/figures/sim_heldout.png
    fi
    echo "[ship] $MODEL_DEST ($size_mb MB); Forecaster.from_pretrained('sim-manipulation') now loads it"
fi
.venv/bin/python - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for name in ("eval.json", "eval_no_instruction.json", "eval_random_encoder.json"):
    path = run / name
    if path.is_file():
        results = json.loads(path.read_text())["results"]
        print(name, {m: {k: round(v[k], 3) for k in ("best_of_k_mse", "fvmd", "diversity") if v.get(k) is not None}
                     for m, v in results.items()})
for name in ("encoder", "encoder_random_probe"):
    path = run / name / "encoder_eval.json"
    if path.is_file():
        print(name, json.loads(path.read_text()))
EOF
