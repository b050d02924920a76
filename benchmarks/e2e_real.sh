#!/usr/bin/env bash
# The whole chain on real hazy photos, on whatever machine this is: adapt (CLIP-free prior) ->
# export --merge (and the base) -> bench (base vs adapted, DCP, FADE & co., PIQE, latency).
#
#   bash benchmarks/e2e_real.sh [IMAGES] [EXTRA ADAPT FLAGS...]
#   IMAGES defaults to ../shared/data/real_day; e.g. `bash benchmarks/e2e_real.sh ../shared/data/real_day --epochs 6`
#
# The bench record is copied to benchmarks/results/e2e_<images folder>_<backbone>.json (image
# names only: the photos and sheet.jpg stay in runs/, they are research-only).
set -euo pipefail
IMAGES=${1:-../shared/data/real_day}
shift || true
BILALORA=${BILALORA:-bilalora}
NAME=e2e-$(basename "$IMAGES")
export HF_HUB_OFFLINE=1
rm -rf "runs/adapt/$NAME"
$BILALORA adapt --images "$IMAGES" --name "$NAME" --objective prior --epochs 6 --search-epochs 2 --batch 8 \
  --crop 128 --max-side 1024 "$@"
RUN=runs/adapt/$NAME
$BILALORA export --adapter "$RUN/adapter.safetensors" --merge --fp16 --images "$IMAGES"
$BILALORA export --base --fp16
$BILALORA bench --adapter "$RUN/adapter.safetensors" --dcp --iqa piqe --size 480x640 --runs 10 --warmup 2 --threads 2 --sheet 8
BACKBONE=$(python3 -c "import json;print(json.load(open('$RUN/summary.json'))['backbone'])")
mkdir -p benchmarks/results
cp "$RUN/bench/bench.json" "benchmarks/results/e2e_$(basename "$IMAGES")_${BACKBONE}.json"
echo "saved benchmarks/results/e2e_$(basename "$IMAGES")_${BACKBONE}.json; contact sheet: $RUN/bench/sheet.jpg"
