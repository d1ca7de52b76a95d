#!/usr/bin/env bash
# The prepared GPU run of issue 6 (paper reproduction), for one H100/H200 with no network:
# builds the extension with CUDA, then runs benchmarks/reproduce.py. Finishes in under 10 minutes
# (REPRODUCE_LIMIT_S, default 570 s, the build included).
#
#   bash benchmarks/gpu/reproduce.sh OUTDIR                 # main table: DiffRec + SASRec-CE, ML-1M and Beauty, seeds 0 1 2
#   bash benchmarks/gpu/reproduce.sh OUTDIR analyses [NAME ...]  # analyses on ML-1M (default: all six)
#
# Data: $DIFFREC_DATA, else ../shared/data (beside the repository): ml-1m/ml-1m.txt.gz,
# ml-1m/movies.dat, beauty/Beauty.txt.
# OUTDIR gets run.log (stages, GPU, timings), build.log, reproduce.log (the script's output), and
# reproduce_<dataset>.json/.md (main) or analysis_<name>.json (analyses; the PNGs are drawn too
# when matplotlib is there, else later with `python benchmarks/reproduce.py --replot OUTDIR`).
# The training budget is what is left of the limit after the build, shared by all runs
# (--total-minutes): each run stops after the epoch past which the next one would not fit.
# For a dry run of this script's logic: REPRODUCE_SKIP_BUILD=1, REPRODUCE_EXTRA_ARGS="--device cpu --dim 8 ..."
# (appended to reproduce.py's arguments), REPRODUCE_LIMIT_S.
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: bash benchmarks/gpu/reproduce.sh OUTDIR [main|analyses [NAME ...]]}")
MODE=${2:-main}
shift $(( $# >= 2 ? 2 : $# ))
NAMES=${*:-all}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
: > "$LOG"
started=$(date +%s)
LIMIT=${REPRODUCE_LIMIT_S:-570}
DATA=${DIFFREC_DATA:-../shared/data}

elapsed() { echo $(( $(date +%s) - started )); }

{
  echo "mode: $MODE ${NAMES}; limit ${LIMIT}s; data $DATA"
  echo "repo commit: $(git rev-parse --short HEAD 2>/dev/null) (plus the working tree)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  ls -l "$DATA/ml-1m/ml-1m.txt.gz" "$DATA/beauty/Beauty.txt" "$DATA/ml-1m/movies.dat"
} >> "$LOG" 2>&1

begin=$(date +%s)
[ -n "${REPRODUCE_SKIP_BUILD:-}" ] && echo "build skipped (REPRODUCE_SKIP_BUILD)" | tee -a "$LOG" "$OUT/build.log" || \
timeout --kill-after=10 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DIFFREC_EXT_CUDA=1 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "stage build: rc=$? ($(( $(date +%s) - begin ))s)" | tee -a "$LOG"
if ! python3 -c "import diffrec_ext.ops as o; assert o.HAVE_EXTENSION and o.BUILD_INFO['with_cuda'], o.BUILD_INFO; print(o.BUILD_INFO)" >> "$LOG" 2>&1; then
  # the PyTorch twins of the ops still run on the GPU (slower): go on, and say so
  echo "WARNING: the extension did not build with CUDA (see build.log); the PyTorch twins run instead" | tee -a "$LOG"
  tail -20 "$OUT/build.log" >> "$LOG"
fi

run() {  # run BF16_FLAG: reproduce.py with the time that is left
  local left=$(( LIMIT - $(elapsed) - 45 ))  # 45 s: python start, data loading, the last test evaluation
  local minutes
  minutes=$(python3 -c "print(round(max(0.5, min(8.5, $left / 60)), 2))")
  echo "stage $MODE: --total-minutes $minutes $1 (at $(elapsed)s)" | tee -a "$LOG"
  local begin=$(date +%s)
  if [ "$MODE" = analyses ]; then
    timeout --kill-after=10 $(( left + 40 )) python3 benchmarks/reproduce.py $1 \
      --data "$DATA/ml-1m/ml-1m.txt.gz" --movies "$DATA/ml-1m/movies.dat" --analysis $NAMES \
      --seeds 0 --total-minutes "$minutes" --prefix-samples 50000 --out "$OUT" ${REPRODUCE_EXTRA_ARGS:-} >> "$OUT/reproduce.log" 2>&1
  else
    timeout --kill-after=10 $(( left + 40 )) python3 benchmarks/reproduce.py $1 \
      --data "$DATA/ml-1m/ml-1m.txt.gz" "$DATA/beauty/Beauty.txt" \
      --seeds 0 1 2 --input-scale 1.0 0.2 --total-minutes "$minutes" --out "$OUT" ${REPRODUCE_EXTRA_ARGS:-} >> "$OUT/reproduce.log" 2>&1
  fi
  local rc=$?
  echo "stage $MODE: rc=$rc ($(( $(date +%s) - begin ))s)" | tee -a "$LOG"
  return $rc
}

run "--bf16 on"
rc=$?
if [ $rc -ne 0 ] && ! ls "$OUT"/reproduce_*.json "$OUT"/analysis_*.json > /dev/null 2>&1 \
   && [ $(( LIMIT - $(elapsed) )) -gt 150 ]; then
  echo "retrying without bf16 autocast" | tee -a "$LOG"
  tail -30 "$OUT/reproduce.log" >> "$LOG"
  run "--bf16 off"
  rc=$?
fi
grep -E "^(dataset|   .*: best epoch|   .*chosen|   S = |     seed|wrote|total)" "$OUT/reproduce.log" >> "$LOG"
for f in "$OUT"/reproduce_*.md; do [ -f "$f" ] && cat "$f" >> "$LOG"; done
echo "total: $(elapsed)s" | tee -a "$LOG"
exit $rc
