#!/usr/bin/env bash
# Width-32 DEA-Net pretraining alone on a lent GPU, one call of at most 9 minutes; resumable across calls.
# (benchmarks/gpu_session.sh runs the same pretraining after its measurements, with what time is left.)
#
# Prepare here:  python benchmarks/prepare_gpu_pretrain.py [--resume-from PREVIOUS_OUT/pretrain-last.pt]
# Run:           run(command="bash benchmarks/gpu_pretrain.sh", carry=[".carry"], timeout_s=560)
# After:         python benchmarks/pretrain_eval.py --weights OUT/dea-net-w32.safetensors --real ../shared/data/real_day
#
# $OUT gets 3 files: pretrain.log (teed as written: a kill at the limit loses nothing), dea-net-w32.safetensors
# and pretrain-last.pt (light fp16 checkpoint, the next call's --resume-from). The time limit counts from this
# script's start: LIMIT_S (540) - MARGIN_S (60) - the pretraining's own setup (40 s) - copying (10 s).
set -uo pipefail
LIMIT_S=${GPU_SESSION_LIMIT_S:-540}; MARGIN_S=60; SETUP_S=40; COPY_S=10
STARTED=$(date +%s)
OUT=${OUT:-/tmp/gpu_pretrain_out}; WORK=/tmp/gpu_pretrain; mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/pretrain.log") 2>&1
source benchmarks/device_setup.sh || exit 3
DATA=.carry/pretrain
[ -d "$DATA" ] || { echo "no $DATA: run python benchmarks/prepare_gpu_pretrain.py first"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
RESUME=()
if [ -f "$DATA/work/last.pt" ]; then cp "$DATA/work/last.pt" "$WORK/last.pt"; RESUME=(--resume); fi
left=$((STARTED + LIMIT_S - MARGIN_S - COPY_S - $(date +%s)))
minutes=$(awk -v s=$((left - SETUP_S)) 'BEGIN { printf "%.2f", s / 60 }')
echo "pretraining for ${minutes} min after its setup (${left}s left before the margin)"
timeout -k 10 -s INT "$left" python3 -m bilalora.cli.app pretrain --backbone dea-net \
  --pairs "$DATA/synth_train" --clear "$DATA/clean_outdoor" --synthesize --synth-ratio 0.3 \
  --val "$DATA/val" --val-every 1000 --steps 10000 --batch 16 --crop 256 --lr 1e-4 --lr-min 1e-6 \
  --device cuda --workers 8 --light-checkpoints --ckpt-minutes 1 --time-limit "$minutes" --dtype fp32 --select last \
  --work-dir "$WORK" --out "$WORK/dea-net-w32.safetensors" \
  --note "synth_train/synth_test: RESIDE SOTS-indoor (scenes split), research use only; clean_outdoor: see the data's SOURCES.md" \
  "${RESUME[@]}"
echo "pretrain exit code $?"
[ -f "$WORK/dea-net-w32.safetensors" ] && cp "$WORK/dea-net-w32.safetensors" "$OUT/"
[ -f "$WORK/last.pt" ] && cp "$WORK/last.pt" "$OUT/pretrain-last.pt"
ls -la "$OUT"
