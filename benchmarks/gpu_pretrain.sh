#!/usr/bin/env bash
# Pretrain the width-32 DEA-Net (issue: shipped default weights) on a lent GPU, one call of at most
# ~9 minutes; resumable across calls. Results under $OUT; evaluate and ship on the CPU afterwards.
#
# Prepare here:  python benchmarks/prepare_gpu_pretrain.py [--resume-from PREVIOUS_OUT/work/last.pt]
# Run:           run(command="bash benchmarks/gpu_pretrain.sh", carry=[".carry"], timeout_s=570)
# After:         python benchmarks/pretrain_eval.py --weights OUT/dea-net.safetensors --real ../shared/data/real_day
#                (50 synth_test pairs vs DCP); if it beats DCP by 6 dB copy it and its card to bilalora/weights/.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/work"
source benchmarks/device_setup.sh
DATA=.carry/pretrain
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
RESUME=()
if [ -f "$DATA/work/last.pt" ]; then cp "$DATA/work/last.pt" "$OUT/work/last.pt"; RESUME=(--resume); fi
python3 -m bilalora.cli.app pretrain --backbone dea-net \
  --pairs "$DATA/synth_train" --clear "$DATA/clean_outdoor" --synthesize --synth-ratio 0.3 \
  --val "$DATA/val" --val-every 1000 --steps 10000 --batch 16 --crop 256 --lr 1e-4 --lr-min 1e-6 \
  --device cuda --workers 8 --light-checkpoints --ckpt-minutes 2 --time-limit 8.5 --dtype fp32 --select last \
  --work-dir "$OUT/work" --out "$OUT/dea-net.safetensors" \
  --note "synth_train/synth_test: RESIDE SOTS-indoor (scenes split), research use only; clean_outdoor: see ../shared/data/SOURCES.md" \
  "${RESUME[@]}" 2>&1 | tail -60 | tee "$OUT/pretrain.log"
ls -la "$OUT" "$OUT/work"
