#!/usr/bin/env bash
# The whole sim-manipulation pipeline, resumable and deterministic (docs/sim-manipulation.md, docs/results.md):
#   data (robosuite; branch groups: several goals from one saved state) -> image encoder (pretrained here, or reused
#   from ENCODER_FROM) -> VAE (moving points weighted) -> [decoder fine-tune] -> flow (instruction dropout: guidance)
#   -> [v3: the flow fine-tuned with the instruction contrast] -> [v4: + the grounding map, then + the word bag]
#   -> regressor -> evaluation on the held-out split -> models/sim-manipulation (< 50 MB, models/registry.yaml).
#
#   bash scripts/train_sim.sh                 # v4, shipped: about 5 h on the 2-core CPU; rerun to resume
#   V4=0 bash scripts/train_sim.sh            # stop at v3 and ship that
#   V3=0 bash scripts/train_sim.sh            # stop at v2 (the flow before the v3 fine-tune) and ship that
#   COMPARE_RANDOM=1 bash scripts/train_sim.sh  # also VAE + flow on the random frozen encoder (same budget, +1.2 h)
#   ENCODER_FROM= PROBE=1 bash scripts/train_sim.sh  # pretrain the image encoder here (+ the random encoder's probe)
#
# Every stage writes its run directory under $RUN and a `.done` marker when it finishes: a rerun skips finished
# stages and continues an interrupted training stage from its last checkpoint (`--resume`; identical to an
# uninterrupted run). Data generation resumes by itself (finished shards are kept). Everything is seeded, so a fresh
# machine regenerates the same data and the same model. Data generated before 2026-12-07 are the exception: there,
# PickPlaceSingle's object followed the process's string-hash seed (fixed in sim_episodes._draw_single_object).
# Settings come from the environment (defaults below).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_sim.sh  # the venv, robosuite and libOSMesa (idempotent)

RUN=${RUN:-runs/sim2}
CONFIG=${CONFIG:-sim-manipulation}
MODEL_DEST=${MODEL_DEST:-models/sim-manipulation}
RESULTS_DEST=${RESULTS_DEST:-docs/sim-manipulation-results.json}  # the evaluation JSON (docs/results.md quotes it)
SEED=${SEED:-0}
THREADS=${THREADS:-2}
WORKERS=${WORKERS:-2}
TRAIN_SHARDS=${TRAIN_SHARDS:-40}
TEST_SHARDS=${TEST_SHARDS:-6}
EPISODES_PER_SHARD=${EPISODES_PER_SHARD:-12}
SCENES=${SCENES:-lift,stack,pick_place,pick_place_single,nut_assembly}
GOALS_PER_SCENE=${GOALS_PER_SCENE:-3}    # distinct goals per branch point
BRANCH_FRAMES=${BRANCH_FRAMES:-0,8,16}   # at rest, and twice while the first goal's arm moves
# The image encoder: reused from this model directory (v2 reuses v1's, pretrained on the same kind of frames), or
# pretrained here when empty.
ENCODER_FROM=${ENCODER_FROM-models/sim-manipulation}
PROBE=${PROBE:-0}                         # 1: also the random frozen encoder's probe (a comparison in docs)
ENCODER_STEPS=${ENCODER_STEPS:-2500}
VAE_STEPS=${VAE_STEPS:-1200}
MOVING_WEIGHT=${MOVING_WEIGHT:-8}         # VAE: extra weight of points whose true track moves > 5 px
DECODER_STEPS=${DECODER_STEPS:-0}        # decoder-only fine-tune of the VAE (latent space unchanged); 0 = none
DECODER_DELTA=${DECODER_DELTA:-0.002}    # its Huber delta (normalised units at 128 px: 0.002 = 0.13 px; near L1)
DECODER_NOISE=${DECODER_NOISE:-0.2}      # its latent noise (units of each channel's latent scale)
FLOW_STEPS=${FLOW_STEPS:-3000}
# v3: v2's flow fine-tuned with the instruction as a context token and the instruction contrast on the tokens that
# some branch of a group moves, while a crossed instruction keeps the rest still (docs/results.md)
V3=${V3:-1}                               # 1: the v3 stage below, shipped (0: ship v2's flow, the model before v3)
V3_FLOW_STEPS=${V3_FLOW_STEPS:-2500}
FLOW_MOVING_WEIGHT=${FLOW_MOVING_WEIGHT:-3}  # extra loss weight of moving points' latent tokens
INSTRUCTION_CONTRAST=${INSTRUCTION_CONTRAST:-0.2}  # weight of the instruction contrast
CROSSED_STILL=${CROSSED_STILL:-1}         # weight of the crossed instruction's error where no branch moves
FLOW_TIME_MEAN=${FLOW_TIME_MEAN:--0.5}    # the logit-normal flow time location (0: the official recipe)
V3_THREADS=${V3_THREADS:-1}               # the shipped v3 ran on one thread (thread counts change float sums)
# v4 (needs V3=1): v3's flow + the grounding map with a stronger contrast and crossed-still term (flow_v4a), then the
# words text encoder's bag-of-words path (flow_v4); docs/results.md "v4"
V4=${V4:-1}                               # 1: the two v4 stages below, shipped (0: ship v3)
V4A_FLOW_STEPS=${V4A_FLOW_STEPS:-2500}
V4_FLOW_STEPS=${V4_FLOW_STEPS:-2000}
V4_CONTRAST=${V4_CONTRAST:-0.4}           # the instruction contrast's weight in both v4 stages
V4_CROSSED_STILL=${V4_CROSSED_STILL:-3}   # the crossed instruction's still-token weight in both v4 stages
V4A_THREADS=${V4A_THREADS:-1}             # the shipped v4 ran flow_v4a on one thread, flow_v4 on two
V4_THREADS=${V4_THREADS:-2}
V3_DECODER_STEPS=${V3_DECODER_STEPS:-0}   # then the decoder fine-tuned alone for still points (0: none, shipped)
V3_DECODER_NOISE=${V3_DECODER_NOISE:-0.2}  # its latent noise (units of each channel's latent scale)
V3_DECODER_STILL_ONLY=${V3_DECODER_STILL_ONLY:-0}  # 1: that noise only on latent tokens holding no moving point
REGRESSOR_STEPS=${REGRESSOR_STEPS:-400}
SAMPLE_STEPS=${SAMPLE_STEPS:-10}          # the shipped model's default Euler steps (chosen from the steps curve)
GUIDANCE_SCALE=${GUIDANCE_SCALE:-1.0}     # the shipped model's default guidance (chosen by measurement)
EVAL_NO_INSTRUCTION=${EVAL_NO_INSTRUCTION:-1}  # 1: also evaluate without instructions (the marginal over tasks)
STOP_AFTER_FLOW=${STOP_AFTER_FLOW:-0}     # 1: stop once the flow is trained (to measure the sampling defaults)
EVAL_SAMPLES=${EVAL_SAMPLES:-8}
EVAL_MAX_SCENES=${EVAL_MAX_SCENES:-}          # evaluate only the first N held-out samples (v2: 240); empty = all
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
    echo "[$name] evaluating $model on $TEST_DATA"
    "$TF" evaluate --model "$model" --data "$TEST_DATA" --regressor "$RUN/regressor" --samples "$EVAL_SAMPLES" \
        --steps "$SAMPLE_STEPS" --guidance-scale "$GUIDANCE_SCALE" --seed "$SEED" --threads "$THREADS" --device cpu \
        ${EVAL_MAX_SCENES:+--max-scenes "$EVAL_MAX_SCENES"} --markdown --out "$out.partial.json" "$@" \
        | tee "${out%.json}.md"
    mv "$out.partial.json" "$out"
}

# 1. data: train and held-out test splits (disjoint random streams), dense labels for the encoder
if [[ ! -f "$RUN/data.done" ]]; then
    echo "[data] generating into $RUN (resumes: finished shards are kept)"
    start=$SECONDS
    "$TF" data sim-manipulation --out "$RUN" --train-shards "$TRAIN_SHARDS" --test-shards "$TEST_SHARDS" \
        --episodes-per-shard "$EPISODES_PER_SHARD" --goals-per-scene "$GOALS_PER_SCENE" \
        --branch-frames "$BRANCH_FRAMES" --scenes "$SCENES" --seed "$SEED" --workers "$WORKERS"
    echo "$((SECONDS - start)) s" > "$RUN/data.done"
fi

# 2. image encoder pretrained on depth + segmentation, and the same heads on the frozen random encoder (its probe)
ENCODER_ARGS=(--data "$RUN/train" --config "$CONFIG" --eval-data "$RUN/test" --steps "$ENCODER_STEPS"
              --batch-size 32 --lr 5e-4 --warmup 100 --schedule cosine --ema-decay 0.999 "${COMMON[@]}")
if [[ -n "$ENCODER_FROM" ]]; then
    ENCODER_DIR=$ENCODER_FROM
    echo "[encoder] reusing the image encoder of $ENCODER_FROM"
else
    ENCODER_DIR=$RUN/encoder
    stage encoder "$RUN/encoder" "$TF" train encoder --out "$RUN/encoder" "${ENCODER_ARGS[@]}"
fi
if [[ "$PROBE" == 1 ]]; then
    stage probe "$RUN/encoder_random_probe" "$TF" train encoder --out "$RUN/encoder_random_probe" --frozen-backbone \
        "${ENCODER_ARGS[@]}"
fi

# 3. stage 1 (VAE) on the frozen pretrained encoder, then its decoder fine-tuned alone (near-L1 reconstruction on
#    noisy latents: still points stay still); 4. stage 2 (flow, with the words text encoder) on the same latents
VAE_ARGS=(--data "$RUN/train" --config "$CONFIG" --steps "$VAE_STEPS" --batch-size 8 --lr 1e-3 --warmup 50
          --schedule cosine --ema-decay 0.995 "${COMMON[@]}")
FLOW_ARGS=(--data "$RUN/train" --steps "$FLOW_STEPS" --batch-size 16 --lr 8e-4 --warmup 100 --schedule cosine
           --ema-decay 0.999 --latent-draw mean "${COMMON[@]}")
stage vae "$RUN/vae" "$TF" train vae --out "$RUN/vae" --encoder "$ENCODER_DIR" --moving-weight "$MOVING_WEIGHT" \
    "${VAE_ARGS[@]}"
FLOW_VAE=$RUN/vae
if (( DECODER_STEPS > 0 )); then
    stage vae_decoder "$RUN/vae_decoder" "$TF" train vae --out "$RUN/vae_decoder" --init "$RUN/vae" --decoder-only \
        --recon-delta "$DECODER_DELTA" --latent-noise "$DECODER_NOISE" --moving-weight "$MOVING_WEIGHT" \
        --data "$RUN/train" --steps "$DECODER_STEPS" --batch-size 8 --lr 3e-4 --warmup 50 --schedule cosine \
        --ema-decay 0.995 "${COMMON[@]}"
    FLOW_VAE=$RUN/vae_decoder
fi
stage flow "$RUN/flow" "$TF" train flow --out "$RUN/flow" --vae "$FLOW_VAE" "${FLOW_ARGS[@]}"
if [[ "$STOP_AFTER_FLOW" == 1 ]]; then
    echo "[flow] done; stopping before the evaluation (STOP_AFTER_FLOW=1): measure the sampling defaults with"
    echo "       bench/motion_diagnosis.py --model $RUN/flow, then rerun with SAMPLE_STEPS and GUIDANCE_SCALE"
    exit 0
fi

# 4b. (v3, V3=1) the flow fine-tuned from v2's with the instruction as a context token and the instruction contrast
#     on moving tokens (flow_v3); optionally the VAE decoder then fine-tuned alone (vae_decoder_v3; the latent space,
#     hence the flow, is unchanged). The model directory v3_model joins the flow and the decoder.
SHIP_FLOW=$RUN/flow
TEST_DATA=$RUN/test
if [[ "$V3" == 1 ]]; then
    stage flow_v3 "$RUN/flow_v3" "$TF" train flow --out "$RUN/flow_v3" --init "$RUN/flow" --data "$RUN/train" \
        --text-context --moving-weight "$FLOW_MOVING_WEIGHT" --instruction-contrast "$INSTRUCTION_CONTRAST" \
        --contrast-on-motion --crossed-still "$CROSSED_STILL" --time-mean "$FLOW_TIME_MEAN" --steps "$V3_FLOW_STEPS" \
        --batch-size 16 --lr 4e-4 --warmup 100 --schedule cosine --ema-decay 0.999 --latent-draw mean \
        --threads "$V3_THREADS" --seed "$((SEED + 3))" --device cpu --log-every 25 \
        --checkpoint-every "$CHECKPOINT_EVERY"
    ship_flow=$RUN/flow_v3
    if [[ "$V4" == 1 ]]; then
        V4_ARGS=(--data "$RUN/train" --moving-weight "$FLOW_MOVING_WEIGHT" --instruction-contrast "$V4_CONTRAST"
                 --contrast-on-motion --crossed-still "$V4_CROSSED_STILL" --time-mean "$FLOW_TIME_MEAN"
                 --batch-size 16 --lr 3e-4 --warmup 50 --schedule cosine --ema-decay 0.999 --latent-draw mean
                 --device cpu --log-every 25 --checkpoint-every "$CHECKPOINT_EVERY")
        stage flow_v4a "$RUN/flow_v4a" "$TF" train flow --out "$RUN/flow_v4a" --init "$RUN/flow_v3" --text-grounding \
            --steps "$V4A_FLOW_STEPS" --threads "$V4A_THREADS" --seed "$((SEED + 5))" "${V4_ARGS[@]}"
        stage flow_v4 "$RUN/flow_v4" "$TF" train flow --out "$RUN/flow_v4" --init "$RUN/flow_v4a" --word-bag \
            --steps "$V4_FLOW_STEPS" --threads "$V4_THREADS" --seed "$((SEED + 6))" "${V4_ARGS[@]}"
        ship_flow=$RUN/flow_v4
    fi
    ship_vae=$ship_flow/vae.safetensors
    if (( V3_DECODER_STEPS > 0 )); then
        STILL_FLAG=""
        if [[ "$V3_DECODER_STILL_ONLY" == 1 ]]; then STILL_FLAG=--latent-noise-still-only; fi
        stage vae_decoder_v3 "$RUN/vae_decoder_v3" "$TF" train vae --out "$RUN/vae_decoder_v3" --init "$FLOW_VAE" \
            --decoder-only --recon-delta "$DECODER_DELTA" --latent-noise "$V3_DECODER_NOISE" $STILL_FLAG \
            --moving-weight "$MOVING_WEIGHT" --data "$RUN/train" --steps "$V3_DECODER_STEPS" --batch-size 8 \
            --lr 3e-4 --warmup 50 --schedule cosine --ema-decay 0.995 "${COMMON[@]}" --seed "$((SEED + 5))"
        ship_vae=$RUN/vae_decoder_v3/vae.safetensors
    fi
    joined=$RUN/v3_model/.done
    if [[ ! -f "$joined" || "$ship_vae" -nt "$joined" || "$ship_flow/.done" -nt "$joined" \
          || "$(cat "$joined")" != "$ship_flow + $ship_vae" ]]; then
        rm -rf "$RUN/v3_model" && mkdir -p "$RUN/v3_model"
        cp -r "$ship_flow/config.yaml" "$ship_flow/denoiser.safetensors" "$ship_flow/image_encoder" \
            "$ship_flow/text_encoder" "$RUN/v3_model/"
        cp "$ship_vae" "$RUN/v3_model/vae.safetensors"
        echo "$ship_flow + $ship_vae" > "$RUN/v3_model/.done"
    fi
    SHIP_FLOW=$RUN/v3_model
fi

# 5. the deterministic regressor baseline on the same frozen encoder
stage regressor "$RUN/regressor" "$TF" train regressor --data "$RUN/train" --encoder "$RUN/vae" --config "$CONFIG" \
    --out "$RUN/regressor" --steps "$REGRESSOR_STEPS" --batch-size 16 --lr 5e-4 --warmup 50 --schedule cosine \
    --ema-decay 0.995 "${COMMON[@]}"

# 6. evaluation on the held-out split: overall, per task kind and per view (JSON + markdown)
evaluate evaluate "$SHIP_FLOW" "$RUN/eval.json" --figure "$RUN/heldout_figure.png" --vae-bound
# the same without instructions: the marginal over tasks, where the samples should spread over the candidate goals
if [[ "$EVAL_NO_INSTRUCTION" == 1 ]]; then
    evaluate evaluate_no_instruction "$SHIP_FLOW" "$RUN/eval_no_instruction.json" --no-instructions
fi

# optional: the same VAE + flow budget on the random frozen encoder (no --encoder), evaluated the same way
if [[ "$COMPARE_RANDOM" == 1 ]]; then
    stage vae_random "$RUN/vae_random" "$TF" train vae --out "$RUN/vae_random" "${VAE_ARGS[@]}"
    stage flow_random "$RUN/flow_random" "$TF" train flow --out "$RUN/flow_random" --vae "$RUN/vae_random" \
        "${FLOW_ARGS[@]}"
    evaluate evaluate_random "$RUN/flow_random" "$RUN/eval_random_encoder.json"
fi

# 7. ship the model directory (atomically) and check its size
if [[ ! -f "$MODEL_DEST/config.yaml" || "$SHIP_FLOW/.done" -nt "$MODEL_DEST/config.yaml" ]]; then
    staging="$MODEL_DEST.partial"
    rm -rf "$staging"
    mkdir -p "$staging"
    cp -r "$SHIP_FLOW/config.yaml" "$SHIP_FLOW/denoiser.safetensors" "$SHIP_FLOW/vae.safetensors" \
        "$SHIP_FLOW/image_encoder" "$SHIP_FLOW/text_encoder" "$staging/"
    # the sampling defaults chosen from the held-out measurements (docs/results.md: steps curve, guidance)
    .venv/bin/python - "$staging/config.yaml" "$SAMPLE_STEPS" "$GUIDANCE_SCALE" <<'PY'
import sys
from traj_forecast_ros.model.config import ModelConfig
path, steps, guidance = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
config = ModelConfig.load_yaml(path)
config.default_steps, config.guidance_scale = steps, guidance
config.save_yaml(path)
PY
    cp "$RUN/eval.json" "$staging/eval.json"
    cat > "$staging/README.md" <<README
# sim-manipulation

Trained by \`scripts/train_sim.sh\` (RUN=$RUN, seed $SEED; steps: VAE $VAE_STEPS (moving weight $MOVING_WEIGHT) +
decoder $DECODER_STEPS, flow $FLOW_STEPS, regressor $REGRESSOR_STEPS; image encoder: ${ENCODER_FROM:-pretrained here,
$ENCODER_STEPS steps}) on simulated LIBERO-like manipulation clips (docs/sim-manipulation.md). Data:
$TRAIN_SHARDS train + $TEST_SHARDS test shards, $EPISODES_PER_SHARD episodes each, scenes $SCENES, $GOALS_PER_SCENE
distinct goals rolled out from each branch point (frames $BRANCH_FRAMES of the first goal's episode).
Image encoder: a small ViT pretrained on the sim frames' depth and segmentation, frozen. Text encoder: word-level,
trained with the denoiser on the closed instruction set (vocabulary in config.yaml), 10 % of instructions dropped
(the empty one is the unconditional embedding of classifier-free guidance). Sampling defaults: $SAMPLE_STEPS Euler
steps, guidance $GUIDANCE_SCALE. Held-out results: eval.json, docs/results.md.
README
    if [[ "$V3" == 1 ]]; then
        cat >> "$staging/README.md" <<README

v3: that flow then fine-tuned $V3_FLOW_STEPS steps on the same data (lr 4e-4, $V3_THREADS thread(s), seed
$((SEED + 3))) with the instruction also as a cross-attention context token, moving tokens weighted
$FLOW_MOVING_WEIGHT, flow time mean $FLOW_TIME_MEAN, and the instruction contrast (weight $INSTRUCTION_CONTRAST)
on the latent tokens that some branch of a group moves, while the crossed instruction's error on the other tokens
is trained too (weight $CROSSED_STILL). VAE decoder fine-tune after it: $V3_DECODER_STEPS steps.
README
    fi
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
