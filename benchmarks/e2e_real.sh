#!/usr/bin/env bash
# The whole chain on real hazy photos, on whatever machine this is: adapt (CLIP-free prior, default
# schedule, a held-out test split kept) -> export --merge (ONNX fp32/fp16, OpenVINO, INT8) and the base
# -> bench on the held-out split (base vs adapted vs base+stretch vs DCP; FADE & co., PIQE; latency of
# every format at 480x640).
#
#   bash benchmarks/e2e_real.sh [IMAGES] [EXTRA ADAPT FLAGS...]
#   IMAGES defaults to ../shared/data/real_day; e.g. `bash benchmarks/e2e_real.sh ../shared/data/real_night --night`
#   or a reduced schedule on a busy CPU: `bash benchmarks/e2e_real.sh ../shared/data/real_day --steps 60 --search-steps 20`
#
# The bench record is copied to benchmarks/results/e2e_<images folder>_<backbone>.json (image
# names only: the photos, sheet.jpg and metrics.png stay in runs/, they are research-only).
# benchmarks/adapt_eval.py runs the same adapt + held-out scoring for both bases and both sets.
set -euo pipefail
IMAGES=${1:-../shared/data/real_day}
shift || true
BILALORA=${BILALORA:-bilalora}
NAME=e2e-$(basename "$IMAGES")
export HF_HUB_OFFLINE=1
rm -rf "runs/adapt/$NAME"
$BILALORA adapt --images "$IMAGES" --name "$NAME" --objective prior "$@"
RUN=runs/adapt/$NAME
$BILALORA export --adapter "$RUN/adapter.safetensors" --merge --fp16 --openvino --int8 --images "$IMAGES"
$BILALORA export --base --fp16 --openvino --int8 --calib "$IMAGES"
$BILALORA bench --adapter "$RUN/adapter.safetensors" --dcp --iqa piqe --size 480x640 --runs 10 --warmup 2 \
  --threads 2 --sheet 8 --max-side 768
BACKBONE=$(python3 -c "import json;print(json.load(open('$RUN/summary.json'))['backbone'])")
mkdir -p benchmarks/results
cp "$RUN/bench/bench.json" "benchmarks/results/e2e_$(basename "$IMAGES")_${BACKBONE}.json"
echo "saved benchmarks/results/e2e_$(basename "$IMAGES")_${BACKBONE}.json"
echo "contact sheet: $RUN/bench/sheet.jpg; metrics figure: $RUN/bench/metrics.png"
