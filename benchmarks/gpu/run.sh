#!/usr/bin/env bash
# The prepared GPU run of issue 14, for one H100/H200 with no network, in one call of at most
# 9 minutes (DIFFREC_GPU_RUN_LIMIT_S, default 520 s, the build included). Stages, in this order,
# each under `timeout`, each recorded in run.log the moment it ends:
#   1. preflight  nvcc and its version, CUDA_HOME (derived from nvcc when unset), compute-sanitizer
#                 and its kernel filter, python/torch/CUDA/driver versions, nvidia-smi
#   2. build      TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16, in place; the built diffrec_ext/_C*.so is
#                 copied to OUTDIR. Skipped when a build is given: DIFFREC_PREBUILT=path (a _C*.so
#                 or a folder holding one; relative to the repository root) or OUTDIR/_C*.so from
#                 an earlier run; it is copied into diffrec_ext/ (the in-place layout) instead.
#   3. bench      the headline benchmarks first, on a fixed budget (bench_ops.py: GEMM floor and
#                 seed_topk bf16 V=1M, catalog_xent V=1M, tile sweep, V=4M, fp32; then the rest)
#   4. tests      the CUDA tests, with a per-test timeout when pytest-timeout is there
#   5. memcheck   compute-sanitizer memcheck on the extension's kernels only, at sizes that cross
#                 catalog tiles and user groups (DIFFREC_CUDA_TILE_MIB=1)
#   6. racecheck  one racecheck of the same script (fewer cases)
# A stage that fails is recorded and the next one runs (all but preflight need the build).
#
#   bash benchmarks/gpu/run.sh OUTDIR
#
# OUTDIR: run.log (everything below in order), preflight.txt, build.log, _C*.so, bench.log,
# gpu_results.json/.md (rewritten after every benchmark), pytest.log, junit.xml, memcheck.log,
# racecheck.log.
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: bash benchmarks/gpu/run.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
: > "$LOG"
started=$(date +%s)
LIMIT=${DIFFREC_GPU_RUN_LIMIT_S:-520}
BENCH_BUDGET=${DIFFREC_GPU_BENCH_BUDGET_S:-130}

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( LIMIT - ($(date +%s) - started) )); }

# stage NAME CAP_S LOGFILE COMMAND...: runs it under timeout, at most CAP_S and never past the
# run's limit; records rc and seconds in run.log. rc 124/137: stopped at its limit.
stage() {
  local name=$1 cap=$2 logfile=$3; shift 3
  local limit begin rc
  limit=$(left)
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then
    say "stage $name: skipped (${limit}s left of ${LIMIT}s)"
    return 99
  fi
  begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$logfile" 2>&1
  rc=$?
  say "stage $name: rc=$rc ($(( $(date +%s) - begin ))s, limit ${limit}s, $(( $(date +%s) - started ))s total)"
  return $rc
}

# ------------------------------------------------------------------ 1. preflight
{
  echo "== diffrec-ext GPU run $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null) (plus the working tree), limit ${LIMIT}s"
  NVCC=$(command -v nvcc || true)
  for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    [[ -z $NVCC && -x $candidate ]] && NVCC=$candidate
  done
  if [[ -n $NVCC ]]; then
    echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo 'version unreadable'))"
    if [[ -z ${CUDA_HOME:-} ]]; then
      # The toolkit root as nvcc reports it (an nvcc on the PATH may be a wrapper script).
      CUDA_HOME=$(realpath "$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)")
      echo "CUDA_HOME: $CUDA_HOME (derived from nvcc)"
    else
      echo "CUDA_HOME: $CUDA_HOME (given)"
    fi
  else
    echo "nvcc: NOT FOUND (the build will fail; give DIFFREC_PREBUILT)"
  fi
  SANITIZER=$(command -v compute-sanitizer || true)
  for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    [[ -z $SANITIZER && -x $candidate ]] && SANITIZER=$candidate
  done
  # Only the extension's kernels (their names hold "diffrec"), so cuBLAS and ATen run at speed.
  KERNEL_FILTER=()
  if [[ -n $SANITIZER ]]; then
    help=$("$SANITIZER" --help 2>&1)
    if grep -q -- '--kernel-name ' <<< "$help"; then
      KERNEL_FILTER=(--kernel-name kns=diffrec)
    elif grep -q -- '--filter ' <<< "$help"; then
      KERNEL_FILTER=(--filter kns=diffrec)
    fi
    echo "compute-sanitizer: $SANITIZER ($("$SANITIZER" --version 2>&1 | grep -io 'version [0-9.]*' | head -1)), kernel filter: ${KERNEL_FILTER[*]:-none}"
  else
    echo "compute-sanitizer: NOT FOUND (memcheck and racecheck will fail)"
  fi
  python3 - <<'PY' 2>&1
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}", flush=True)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
try:
    import pytest_timeout  # noqa: F401
    print("pytest-timeout: present")
except ImportError:
    print("pytest-timeout: absent (the tests stage relies on its overall timeout)")
PY
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv 2>&1 || echo "nvidia-smi failed"
} > "$OUT/preflight.txt" 2>&1
tee -a "$LOG" < "$OUT/preflight.txt"
# The variables the later stages need (set inside the block above, which ran in this shell).
[[ -n ${CUDA_HOME:-} ]] && export CUDA_HOME

# ------------------------------------------------------------------ 2. build (or a given one)
first_module() {  # first_module DIR: the first DIR/_C*.so, or nothing
  local module
  for module in "$1"/_C*.so; do
    [[ -f $module ]] && { echo "$module"; return; }
  done
}
PREBUILT=${DIFFREC_PREBUILT:-}
[[ -d $PREBUILT ]] && PREBUILT=$(first_module "$PREBUILT")
[[ -z $PREBUILT ]] && PREBUILT=$(first_module "$OUT")
if [[ -n $PREBUILT && -f $PREBUILT ]]; then
  rm -f diffrec_ext/_C*.so
  cp "$PREBUILT" diffrec_ext/
  say "stage build: skipped, installed $PREBUILT into diffrec_ext/"
else
  stage build 240 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DIFFREC_EXT_CUDA=1 \
    python3 setup.py build_ext --inplace
  cp diffrec_ext/_C*.so "$OUT/" 2>/dev/null && say "built module copied to $OUT/ (rerun with DIFFREC_PREBUILT=<it>)"
fi
if ! python3 -c "
import diffrec_ext, diffrec_ext.ops as o
print('module:', diffrec_ext.__file__, o.BUILD_INFO)
assert o.BUILD_INFO['with_cuda'], 'built without CUDA'" >> "$LOG" 2>&1; then
  say "the extension is missing or was built without CUDA; build.log ends:"
  tail -40 "$OUT/build.log" 2>/dev/null | tee -a "$LOG"
  say "total: $(( $(date +%s) - started ))s"
  exit 1
fi
tail -1 "$LOG"

# ------------------------------------------------------------------ 3. headline benchmarks
# bench_ops.py stops starting benchmarks after --budget-s and rewrites its results after each.
stage bench $(( BENCH_BUDGET + 45 )) "$OUT/bench.log" \
  python3 benchmarks/gpu/bench_ops.py "$OUT" --budget-s "$BENCH_BUDGET"
grep -v '^{' "$OUT/bench.log" | tail -25 | tee -a "$LOG"

# ------------------------------------------------------------------ 4. CUDA tests
PYTEST_ARGS=(-q -rfE -p no:cacheprovider --junitxml="$OUT/junit.xml")
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=60)
stage tests 150 "$OUT/pytest.log" python3 -m pytest tests/test_cuda_ops.py tests/test_cuda_edges.py \
  "${PYTEST_ARGS[@]}"
tail -15 "$OUT/pytest.log" | tee -a "$LOG"

# ------------------------------------------------------------------ 5-6. compute-sanitizer
# Without the caching allocator every tensor is its own allocation, so memcheck sees overruns;
# 1 MiB tiles make every op cross tile (and, for the sorted top-k, user-group) boundaries.
if [[ -n ${SANITIZER:-} ]]; then
  stage memcheck 75 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 DIFFREC_CUDA_TILE_MIB=1 \
    "$SANITIZER" --tool memcheck "${KERNEL_FILTER[@]}" --error-exitcode 3 \
    python3 benchmarks/gpu/sanitizer_smoke.py
  tail -4 "$OUT/memcheck.log" | tee -a "$LOG"
  stage racecheck 60 "$OUT/racecheck.log" env DIFFREC_CUDA_TILE_MIB=1 \
    "$SANITIZER" --tool racecheck "${KERNEL_FILTER[@]}" --error-exitcode 3 \
    python3 benchmarks/gpu/sanitizer_smoke.py --quick
  tail -4 "$OUT/racecheck.log" | tee -a "$LOG"
else
  say "stage memcheck: skipped (no compute-sanitizer)"
  say "stage racecheck: skipped (no compute-sanitizer)"
fi

# The benchmark table last, where the end of the output shows it.
[[ -f $OUT/gpu_results.md ]] && tee -a "$LOG" < "$OUT/gpu_results.md"
say "total: $(( $(date +%s) - started ))s"
