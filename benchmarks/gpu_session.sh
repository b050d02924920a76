#!/usr/bin/env bash
# One prepared script for a lent GPU (H100/H200): everything the method issue asks to
# measure on CUDA, in one call, results under $OUT (copied to benchmarks/results/ after).
#
# Prepare here (git-ignored, named in `carry`):
#   .whl/   open_clip_torch + ftfy + wcwidth wheels (see the device tool's README)
#   .carry/real_day/  a copy of ../shared/data/real_day
# Run:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".carry"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. step timings, prior objective: bilevel 2-pass vs the release's 3-pass, joint, stage B; peak memory
timeout 120 python3 benchmarks/adapt_timing.py --backbone dea-net --objective prior --device cuda \
  --out "$OUT/adapt_timing_prior.json" 2>&1 | tee "$OUT/timing_prior.log"

# 2. the H2C path with a randomly initialised ViT-B-32 saved to a file (no CLIP weights exist there)
python3 - <<'PY'
import open_clip, torch
model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
torch.save(model.state_dict(), "/tmp/vit_b32_random.pt")
PY
timeout 150 python3 benchmarks/adapt_timing.py --backbone dea-net --objective h2c \
  --clip-pretrained /tmp/vit_b32_random.pt --device cuda --out "$OUT/adapt_timing_h2c.json" 2>&1 | tee "$OUT/timing_h2c.log"

# 3. the default schedule on real_day with the prior objective (30 epochs, 5 search)
timeout 240 python3 -m bilalora.cli.app adapt --images .carry/real_day --objective prior --device cuda \
  --out "$OUT/run_prior" 2>&1 | tail -40 | tee "$OUT/adapt_prior.log"
cp "$OUT/run_prior/summary.json" "$OUT/adapt_prior_summary.json" 2>/dev/null || true
rm -rf "$OUT/run_prior/checkpoints"
