#!/usr/bin/env bash
# The prepared GPU check of issue 4, for an H100/H200 with no network: builds the extension with
# CUDA, runs the CUDA tests, runs compute-sanitizer memcheck over every op on small inputs, then
# the benchmarks. Meant to finish in under 6 minutes on an H200.
#
#   bash benchmarks/gpu/run.sh OUTDIR
#
# OUTDIR gets at most 7 files: run.log (stages, GPU, benchmark output), build.log, pytest.log,
# junit.xml, memcheck.log, gpu_results.json, gpu_results.md. A failing stage is recorded in
# run.log and the next one still runs (the benchmarks need the build, nothing else).
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: bash benchmarks/gpu/run.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
: > "$LOG"
started=$(date +%s)

stage() {  # stage NAME TIMEOUT_S LOGFILE COMMAND...: runs it, records rc and seconds in run.log
  local name=$1 limit=$2 logfile=$3; shift 3
  local begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1
  local rc=$?
  echo "stage $name: rc=$rc ($(( $(date +%s) - begin ))s, limit ${limit}s)" | tee -a "$LOG"
  return $rc
}

{
  echo "repo commit: $(git rev-parse --short HEAD 2>/dev/null) (plus the working tree)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >> "$LOG" 2>&1

stage build 240 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DIFFREC_EXT_CUDA=1 \
  python3 -m pip install --no-build-isolation --no-deps -e .
if ! python3 -c "import diffrec_ext.ops as o; assert o.BUILD_INFO['with_cuda'], o.BUILD_INFO" >> "$LOG" 2>&1; then
  echo "the extension did not build with CUDA; see build.log" | tee -a "$LOG"
  tail -40 "$OUT/build.log" >> "$LOG"
  exit 1
fi

stage tests 120 "$OUT/pytest.log" python3 -m pytest tests/test_cuda_ops.py -q -rfE \
  --junitxml="$OUT/junit.xml" -p no:cacheprovider
tail -5 "$OUT/pytest.log" >> "$LOG"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
stage memcheck 75 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool memcheck --error-exitcode 3 python3 benchmarks/gpu/sanitizer_smoke.py
tail -3 "$OUT/memcheck.log" >> "$LOG"

# The benchmarks stop starting new measurements after --budget-s and write results as they go.
left=$(( 350 - ($(date +%s) - started) ))
budget=$(( left > 200 ? 170 : (left > 40 ? left - 30 : 10) ))
stage bench $(( budget + 60 )) "$OUT/bench.log" python3 benchmarks/gpu/bench_ops.py "$OUT" --budget-s "$budget"
cat "$OUT/bench.log" >> "$LOG"
rm -f "$OUT/bench.log"
echo "total: $(( $(date +%s) - started ))s" | tee -a "$LOG"
