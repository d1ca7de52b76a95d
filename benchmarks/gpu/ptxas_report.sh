#!/usr/bin/env bash
# CPU-only resource check of the CUDA kernels: compiles each csrc/cuda/*.cu for sm_90 with the
# build's flags plus -Xptxas -v, and prints one line per kernel (registers, spill bytes, stack
# frame, static shared memory). No GPU needed.
#
#   bash benchmarks/gpu/ptxas_report.sh [OUTDIR]     (raw ptxas output in OUTDIR/ptxas_<file>.log)
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
# The toolkit root as nvcc itself reports it (nvcc on the PATH may be a wrapper script).
CUDA_ROOT=$(realpath "$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)")
INCLUDES=$(CUDA_HOME=$CUDA_ROOT python3 - <<'PY'
import glob, os, sys
from torch.utils import cpp_extension
dirs = cpp_extension.include_paths(device_type="cuda")
dirs += sorted(d for p in sys.path if p for d in glob.glob(os.path.join(p, "nvidia", "*", "include"))
               if any(os.path.exists(os.path.join(d, h)) for h in ("cublas_v2.h", "cusparse.h")))
print(" ".join("-I" + d for d in dirs))
PY
)
status=0
for source in csrc/cuda/*.cu; do
  name=$(basename "$source" .cu)
  # shellcheck disable=SC2086  # INCLUDES is a list of flags
  if ! "$NVCC" -c "$source" -o /dev/null -std=c++20 -O3 -lineinfo -arch=sm_90 -Xptxas -v \
      -DDIFFREC_WITH_CUDA -Icsrc -I"$CUDA_ROOT/include" $INCLUDES \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC \
      > "$OUT/ptxas_$name.log" 2>&1; then
    echo "$source: compile failed, see $OUT/ptxas_$name.log"
    status=1
    continue
  fi
  python3 - "$OUT/ptxas_$name.log" "$name" <<'PY'
import re, subprocess, sys
log, name = open(sys.argv[1]).read(), sys.argv[2]
kernel = None
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        kernel = m.group(1)
        frame = spill = None
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and kernel:
        frame, stores, loads = m.groups()
        continue
    m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", line)
    if m and kernel:
        smem = re.search(r"(\d+) bytes smem", line)
        pretty = subprocess.run(["c++filt"], input=kernel, capture_output=True, text=True).stdout.strip()
        pretty = re.sub(r"diffrec::cuda::\(anonymous namespace\)::", "", pretty)
        pretty = re.sub(r"c10::(BFloat16|Half)", r"\1", pretty)
        print(f"| {name} | {pretty[:110]} | {m.group(1)} | {stores}/{loads} | {frame} | "
              f"{smem.group(1) if smem else 0} |")
        kernel = None
PY
done
exit $status
