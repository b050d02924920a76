#!/usr/bin/env bash
# One prepared run on a lent GPU machine (H100/H200) that returns every CUDA figure the README promises.
#
#   bash benchmarks/gpu_session.sh --prepare   # here: fill .carry/ (real_day + pretraining data) under the limit
#   bash benchmarks/gpu_session.sh --dry-run   # here: sizes, file count, timing margins, what would run
#   run(command="bash benchmarks/gpu_session.sh", carry=[".carry", ".whl"], timeout_s=560)   # there
#
# Limits of the remote runner it is written for: at most 8 files come back from $OUT (16 MiB each),
# 64 MiB travel (repository + carry), 10 minutes a command, 15 minutes of machine time in all
# (its start included). So this script:
#   * checks repository + carry against 64 MiB before it starts (and --dry-run does so here);
#   * writes at most 5 files in $OUT: session.log (every line, teed as it is written, so a kill at the
#     limit loses nothing), summary.json and results.tar.gz (both rewritten after every step), and the
#     width-32 pretraining weights + light checkpoint (resumable in a later call);
#   * keeps a margin of MARGIN_S (60 s) before LIMIT_S (540 s = 9 min): every step runs under `timeout`
#     with what is left, pretraining gets exactly the rest (its --time-limit counts from its own start,
#     so its setup time is subtracted here).
# Steps (budgets are caps; time a step does not use goes to pretraining):
#   1 timing    adapt-step timings, shipped dea-net-s, batch 24 x 224^2: bilevel 2-pass, 3-pass, joint,
#               fine-tune; fp32 and bf16; peak memory          (benchmarks/adapt_timing.py)
#   2 adapt     the default `bilalora adapt --objective prior` on real_day (held-out test split kept)
#   3 bench     base vs adapted on that run's held-out split (FADE & co., stretch rows, DCP) and the
#               1080p latency in fp32 and fp16 PyTorch         (bilalora bench --device cuda)
#   4 trt-*     issue 14's GPU checks, one step each: engine build (--refit export), refit with the adapter,
#               INT8 engine, the runtime's engine path -- only when `import tensorrt` works (wheels carried
#               in .whl/); else recorded as skipped
#   5 pretrain  width-32 DEA-Net pretraining for the remaining minutes (resumes from .carry/pretrain/work)
set -uo pipefail

LIMIT_S=${GPU_SESSION_LIMIT_S:-540}      # the command's own limit (run's timeout_s is set a little above)
MARGIN_S=60                               # left unused before LIMIT_S
PACK_S=15                                 # reserved for the last archive
SETUP_S=45                                # device_setup.sh (editable install, imports), measured ~20-40 s
PRETRAIN_SETUP_S=40                       # pretraining's data scan + model build before its clock starts
PRETRAIN_MIN_S=60                         # below this, pretraining is skipped
MAX_FILES=8
MAX_FILE_BYTES=$((16 * 1024 * 1024))
TRAVEL_LIMIT=$((64 * 1024 * 1024))
CARRY=${GPU_SESSION_CARRY:-".carry .whl"}
OUT_FILES=(session.log summary.json results.tar.gz dea-net-w32.safetensors pretrain-last.pt)
# name budget(s) what
STEPS=(
  "timing 70 adapt-step timings (2-pass, 3-pass, joint, fine-tune; fp32 + bf16; peak memory)"
  "adapt 150 default adapt --objective prior on .carry/real_day"
  "bench 60 bench on the held-out split + 1080p fp32/fp16 latency"
  "trt-build 40 TensorRT engine build from a --refit export (needs tensorrt in .whl)"
  "trt-refit 20 refit that engine with the real_day adapter, parity gate"
  "trt-int8 40 INT8 QDQ graph + INT8 engine calibrated on real_day"
  "trt-run 40 bilalora run through the engine path, --precision int8, benchmarks/gpu_runtime_check.py"
)
budget() { local entry name seconds rest; for entry in "${STEPS[@]}"; do
  read -r name seconds rest <<<"$entry"; [ "$name" = "$1" ] && echo "$seconds"; done; }
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  "") ;;
  -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  *) echo "unknown option $1 (use --dry-run or --prepare)"; exit 2 ;;
esac

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# bytes of what travels: tracked + untracked-not-ignored files (here, with git), or the whole copy (there)
repo_bytes() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'
  else
    du -sb --exclude=./.carry --exclude=./.whl . | cut -f1
  fi
}
carry_bytes() {
  local total=0 dir
  for dir in $CARRY; do
    [ -e "$dir" ] && total=$((total + $(du -sbL "$dir" | cut -f1)))
  done
  echo "$total"
}
has_trt_wheels() { ls .whl/tensorrt*.whl >/dev/null 2>&1; }

check_travel() {  # prints the accounting; returns 1 over the limit
  local repo carry total
  repo=$(repo_bytes); carry=$(carry_bytes); total=$((repo + carry))
  echo "travels: repository $(mib "$repo") + carry ($CARRY) $(mib "$carry") = $(mib "$total") of $(mib $TRAVEL_LIMIT)"
  if [ "$total" -gt "$TRAVEL_LIMIT" ]; then
    echo "FAIL: over the 64 MiB the runner carries; shrink .carry (bash $0 --prepare fits it) or drop wheels"
    return 1
  fi
}

if [ "$MODE" = prepare ]; then
  SHARED=${SHARED_DATA:-../shared/data}
  [ -d "$SHARED/real_day" ] || { echo "no $SHARED/real_day (set SHARED_DATA)"; exit 2; }
  mkdir -p .carry && rm -rf .carry/real_day && cp -r "$SHARED/real_day" .carry/real_day
  rm -rf .carry/pretrain
  # what is left under the limit (1 MiB slack) goes to the pretraining data
  left=$(( TRAVEL_LIMIT - $(repo_bytes) - $(carry_bytes) - 1048576 ))
  python3 benchmarks/prepare_gpu_pretrain.py --shared "$SHARED" --budget-mib $((left / 1048576)) \
    ${RESUME_FROM:+--resume-from "$RESUME_FROM"} || exit 1
  check_travel; exit $?
fi

if [ "$MODE" = dry ]; then
  status=0
  echo "gpu_session dry run: limit ${LIMIT_S}s, margin ${MARGIN_S}s, at most $MAX_FILES files back"
  check_travel || status=1
  echo "files in \$OUT: ${#OUT_FILES[@]} (${OUT_FILES[*]}) of at most $MAX_FILES"
  [ "${#OUT_FILES[@]}" -le "$MAX_FILES" ] || { echo "FAIL: more than $MAX_FILES files"; status=1; }
  # a width-32 DEA-Net holds 3.65 M parameters: 13.9 MiB in fp32 safetensors, ~7 MiB as a light (fp16) checkpoint
  echo "largest file expected: dea-net-w32.safetensors 13.9 MiB (3.65 M fp32 parameters; limit $(mib $MAX_FILE_BYTES) each)"
  clock=$SETUP_S
  echo "plan (cumulative seconds from the command's start):"
  printf '  %-9s %4ss  %4s-%4ss  %s\n' setup "$SETUP_S" 0 "$clock" "benchmarks/device_setup.sh"
  for entry in "${STEPS[@]}"; do
    read -r name budget what <<<"$entry"
    note=""
    if [ "$name" = adapt ] && [ ! -d .carry/real_day ]; then note=" [NOT READY: no .carry/real_day; --prepare]"; fi
    if [ "${name#trt}" != "$name" ] && ! has_trt_wheels; then
      note=" [would be skipped: no tensorrt wheels in .whl/ (TensorRT for CUDA 13 is ~1 GB, over the carry limit)]"
      budget=0
    fi
    printf '  %-9s %4ss  %4s-%4ss  %s%s\n' "$name" "$budget" "$clock" $((clock + budget)) "$what" "$note"
    clock=$((clock + budget))
  done
  pretrain=$((LIMIT_S - MARGIN_S - PACK_S - clock))
  if [ "$pretrain" -lt 0 ]; then
    echo "FAIL: the measurement steps alone overrun the limit by $((-pretrain))s (lower their budgets)"; status=1; pretrain=0
  fi
  note=""; [ -d .carry/pretrain ] || note=" [NOT READY: no .carry/pretrain; --prepare]"
  [ -f .carry/pretrain/work/last.pt ] && note="$note (resumes from .carry/pretrain/work/last.pt)"
  if [ "$pretrain" -lt "$PRETRAIN_MIN_S" ]; then
    note=" [would be skipped: under ${PRETRAIN_MIN_S}s left unless earlier steps finish early]"
  fi
  printf '  %-9s %4ss  %4s-%4ss  %s%s\n' pretrain "$pretrain" "$clock" $((clock + pretrain)) \
    "width-32 pretraining, --time-limit $(( (pretrain - PRETRAIN_SETUP_S) ))s after its setup (at least: unused budgets add to it)" "$note"
  clock=$((clock + pretrain))
  printf '  %-9s %4ss  %4s-%4ss  %s\n' pack "$PACK_S" "$clock" $((clock + PACK_S)) "results.tar.gz, summary.json"
  clock=$((clock + PACK_S))
  echo "ends by ${clock}s; margin $((LIMIT_S - clock))s before the ${LIMIT_S}s limit"
  if [ $((LIMIT_S - clock)) -lt 60 ]; then echo "FAIL: margin under 60 s"; status=1; fi
  if [ "$LIMIT_S" -gt 540 ]; then echo "FAIL: a command may run 10 min; keep LIMIT_S <= 540 (9 min)"; status=1; fi
  echo "call: run(command=\"bash benchmarks/gpu_session.sh\", carry=[$(printf '"%s", ' $CARRY | sed 's/, $//')], timeout_s=$((LIMIT_S + 20)))"
  [ $status -eq 0 ] && echo "dry run: OK" || echo "dry run: FAILED"
  exit $status
fi

# ------------------------------------------------------------------ the run itself (on the GPU machine)
STARTED=$(date +%s)
DEADLINE=$((STARTED + LIMIT_S - MARGIN_S))
OUT=${OUT:-/tmp/gpu_session_out}
WORK=${GPU_SESSION_WORK:-/tmp/gpu_session}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/session.log") 2>&1
echo "gpu_session started $(date -u +%FT%TZ); limit ${LIMIT_S}s, margin ${MARGIN_S}s"
check_travel || exit 3
: >"$WORK/steps.tsv"

record() {  # name rc seconds note -> steps.tsv and summary.json in $OUT
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/steps.tsv"
  python3 - "$WORK/steps.tsv" "$OUT/summary.json" "$STARTED" "$LIMIT_S" <<'PY'
import json, sys, time
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": r[0], "rc": int(r[1]) if r[1].lstrip("-").isdigit() else None, "seconds": int(r[2]),
          "status": ("ok" if r[1] == "0" else "timed out" if r[1] in ("124", "137") else
                     r[3] if r[1] == "skip" else f"failed (rc {r[1]})"), "note": r[3]} for r in rows]
record = {"started": int(sys.argv[3]), "elapsed_s": int(time.time()) - int(sys.argv[3]), "limit_s": int(sys.argv[4]),
          "steps": steps}
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as handle:
    json.dump(record, handle, indent=2)
import os; os.replace(tmp, sys.argv[2])
PY
}

pack() {  # small results (JSON, logs, adapter, bench record, sheets) -> $OUT/results.tar.gz, atomically
  (cd "$WORK" && find . -type f -size -8M ! -name '*.pt' ! -name 'dea-net-w32.safetensors' -print0 \
     | tar --null -czf "$OUT/.results.tar.gz" -T - 2>/dev/null) && mv "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
}

left_s() { echo $((DEADLINE - PACK_S - $(date +%s))); }

step() {  # name budget command... : run under timeout (the smaller of budget and what is left), record, pack
  local name=$1 budget=$2; shift 2
  local left; left=$(left_s)
  local limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt 10 ]; then echo "=== $name: skipped, ${left}s left"; record "$name" skip 0 "no time left"; return; fi
  echo "=== $name (up to ${limit}s; $(($(date +%s) - STARTED))s elapsed)"
  local begin; begin=$(date +%s)
  timeout -k 10 -s INT "$limit" "$@"
  local rc=$?
  record "$name" "$rc" $(($(date +%s) - begin)) "budget ${limit}s"
  pack
}

begin=$(date +%s)
source benchmarks/device_setup.sh
rc=$?
record setup "$rc" $(($(date +%s) - begin)) "device_setup.sh"
[ "$rc" -eq 0 ] || { echo "setup failed; nothing else can run"; pack; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"

# 1. step timings
step timing "$(budget timing)" python3 benchmarks/adapt_timing.py --backbone dea-net-s --objective prior \
  --device cuda --precisions fp32,bf16 --batch 24 --crop 224 --steps 10 --warmup 3 --out "$WORK/adapt_timing_prior.json"

# 2. the default adapt run on real_day (the CUDA default precision; held-out test split kept by adapt)
step adapt "$(budget adapt)" python3 -m bilalora.cli.app adapt --images .carry/real_day --objective prior --device cuda \
  --out "$WORK/runs/adapt/real-day"
rm -rf "$WORK/runs/adapt/real-day/checkpoints"

# 3. bench: held-out split on the GPU, 1080p fp32 / fp16 PyTorch latency
if [ -f "$WORK/runs/adapt/real-day/adapter.safetensors" ]; then
  SUBJECT=(--adapter "$WORK/runs/adapt/real-day/adapter.safetensors")
else
  SUBJECT=(--backbone dea-net-s --images .carry/real_day --max-images 12)
fi
step bench "$(budget bench)" python3 -m bilalora.cli.app bench "${SUBJECT[@]}" --device cuda --size 1080x1920 \
  --backends torch,torch-fp16 --runs 20 --warmup 5 --dcp --sheet 6 --report "$WORK/bench"

# 4. TensorRT checks (issue 14), only with TensorRT importable; independent steps, each with its own gate
if python3 -c "import tensorrt" >/dev/null 2>&1; then
  ADAPTER="$WORK/runs/adapt/real-day/adapter.safetensors"
  mkdir -p "$WORK/frames" && ls .carry/real_day | head -4 | while read -r f; do cp ".carry/real_day/$f" "$WORK/frames/"; done
  step trt-build "$(budget trt-build)" python3 -m bilalora.cli.app export --base --backbone dea-net-s --trt --refit --out "$WORK/export-base"
  if [ -f "$ADAPTER" ] && [ -f "$WORK/export-base/model.engine" ]; then
    step trt-refit "$(budget trt-refit)" python3 -m bilalora.cli.app export --refit-engine "$WORK/export-base/model.engine" \
      --adapter "$ADAPTER" --out "$WORK/export-refit"
  else
    record trt-refit skip 0 "skipped: no adapter or no engine to refit"
  fi
  step trt-int8 "$(budget trt-int8)" python3 -m bilalora.cli.app export --base --backbone dea-net-s --trt --int8 \
    --calib .carry/real_day --calib-images 8 --int8-min-psnr 25 --out "$WORK/export-int8"
  # (dea-net-s's INT8 graph reaches ~30 dB on the CPU, under the 35 dB default gate: lowered here, on the record)
  run_engine() {
    python3 -m bilalora.cli.app run -i "$WORK/frames" -o "$WORK/run-engine" --model "$WORK/export-base" --prefer engine &&
    python3 -m bilalora.cli.app run -i "$WORK/frames" -o "$WORK/run-int8" --model "$WORK/export-int8" --precision int8 &&
    python3 benchmarks/gpu_runtime_check.py --model "$WORK/export-base" --out "$WORK/gpu_runtime_check.json"
    local rc=$?
    find "$WORK/run-engine" "$WORK/run-int8" -type f ! -name '*.json' -delete 2>/dev/null  # keep run.json only
    return $rc
  }
  step trt-run "$(budget trt-run)" bash -c "$(declare -f run_engine); WORK='$WORK'; run_engine"
  for folder in export-base export-refit export-int8; do  # the records come back, the engines do not
    [ -f "$WORK/$folder/model.json" ] && cp "$WORK/$folder/model.json" "$WORK/${folder}_model.json"
    rm -rf "${WORK:?}/$folder"
  done
  pack
else
  echo "=== trt: skipped (tensorrt is not importable: its CUDA 13 wheels, ~1 GB, do not fit the 64 MiB carry)"
  record trt skip 0 "skipped: tensorrt not importable (wheels ~1 GB > 64 MiB carry)"
fi

# 5. width-32 pretraining with whatever is left (resumable: light checkpoint back in $OUT)
DATA=.carry/pretrain
left=$(left_s)
if [ ! -d "$DATA" ]; then
  record pretrain skip 0 "skipped: no .carry/pretrain (bash benchmarks/gpu_session.sh --prepare)"
elif [ "$left" -lt "$PRETRAIN_MIN_S" ]; then
  record pretrain skip 0 "skipped: ${left}s left"
else
  mkdir -p "$WORK/pretrain"
  RESUME=()
  if [ -f "$DATA/work/last.pt" ]; then cp "$DATA/work/last.pt" "$WORK/pretrain/last.pt"; RESUME=(--resume); fi
  minutes=$(awk -v s=$((left - PRETRAIN_SETUP_S)) 'BEGIN { printf "%.2f", s / 60 }')
  step pretrain "$left" python3 -m bilalora.cli.app pretrain --backbone dea-net \
    --pairs "$DATA/synth_train" --clear "$DATA/clean_outdoor" --synthesize --synth-ratio 0.3 \
    --val "$DATA/val" --val-every 1000 --steps 10000 --batch 16 --crop 256 --lr 1e-4 --lr-min 1e-6 \
    --device cuda --workers 8 --light-checkpoints --ckpt-minutes 1 --time-limit "$minutes" --dtype fp32 \
    --select last --work-dir "$WORK/pretrain" --out "$WORK/pretrain/dea-net-w32.safetensors" \
    --note "synth_train/synth_test: RESIDE SOTS-indoor (scenes split), research use only; clean_outdoor: see the data's SOURCES.md" \
    "${RESUME[@]}"
  for file in dea-net-w32.safetensors last.pt; do
    [ -f "$WORK/pretrain/$file" ] || continue
    target="$OUT/$file"; [ "$file" = last.pt ] && target="$OUT/pretrain-last.pt"
    if [ "$(stat -c %s "$WORK/pretrain/$file")" -le "$MAX_FILE_BYTES" ]; then cp "$WORK/pretrain/$file" "$target"
    else echo "warning: $file is over 16 MiB and would not come back; not copied"; fi
  done
fi
pack
record done 0 $(($(date +%s) - STARTED)) "files in \$OUT: $(ls "$OUT" | grep -vc '^\.')"
ls -la "$OUT"
