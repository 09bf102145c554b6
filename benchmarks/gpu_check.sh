#!/usr/bin/env bash
# GPU verification in one go (docs: /work/shared/gpu.md), from a fresh checkout:
#   1. build the extension for sm_90          4. GPU benchmarks (bf16 + fp32 B0, B4 model)
#   2. GPU parity tests (cuda / triton)       5. JSON + markdown summary under the out folder
#   3. compute-sanitizer memcheck on a small subset (the bench self-check, every GPU backend)
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu-check-out)
# GPU_CHECK_PREBUILT=1 skips the build (an extension built by an earlier run is in place);
# GPU_CHECK_STAGES (e.g. "gpu-tests bench-b4-bf16") runs only the stages named.
# Every stage is time-boxed with `timeout`, and later stages shrink to fit an overall budget
# (GPU_CHECK_BUDGET_S, default 480 s). On a machine without a GPU the GPU stages are skipped,
# with the reason, and a CPU smoke bench rehearses the rest; the script then exits 0.
# Exit status: 0 when every stage that ran passed, 1 otherwise.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./gpu-check-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
export PYTHONUNBUFFERED=1
START=$(date +%s)
STAGES_TSV="$OUT_DIR/stages.tsv"
: > "$STAGES_TSV"
FAILED=0

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES_TSV"; }  # name status secs note

# stage NAME LIMIT_S CMD...: run CMD with a time limit (cut to the budget left), log to
# $OUT_DIR/NAME.log and the terminal, record ok / failed / timeout.
stage() {
  local name=$1 limit=$2; shift 2
  if [[ -n "${GPU_CHECK_STAGES:-}" && " $GPU_CHECK_STAGES " != *" $name "* ]]; then
    record "$name" skipped 0 "not in GPU_CHECK_STAGES"; return 0
  fi
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 15 )); then
    log "skip $name: overall budget of ${BUDGET_S}s spent"
    record "$name" skipped 0 "overall budget of ${BUDGET_S}s spent"; return 0
  fi
  (( limit > left )) && limit=$left
  log "start $name (limit ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then record "$name" ok "$secs" ""; log "ok $name (${secs}s)"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" timeout "$secs" "killed after ${limit}s"; FAILED=1; log "TIMEOUT $name"
  else record "$name" failed "$secs" "exit $rc, see $name.log"; FAILED=1; log "FAILED $name (exit $rc)"
  fi
  return 0
}

skip() { log "skip $1: $2"; record "$1" skipped 0 "$2"; }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  HAVE_GPU=1; nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
else
  HAVE_GPU=0; log "no CUDA GPU visible: GPU stages will be skipped"
fi

# 1. build (sm_90 only: the H200); in place first, pip as the fallback
if (( HAVE_GPU )) && [[ -n "${GPU_CHECK_PREBUILT:-}" ]]; then
  skip build "GPU_CHECK_PREBUILT is set: the extension in effnet_kernels/ was built earlier"
elif (( HAVE_GPU )); then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  build() {
    "$PY" setup.py build_ext --inplace \
      || "$PY" -m pip install --no-build-isolation --no-deps -e .
  }
  export -f build; export PY
  stage build 240 bash -c build
else
  skip build "no GPU: the CUDA build is checked by CI (FORCE_CUDA=1)"
fi
"$PY" -m effnet_kernels info > "$OUT_DIR/info.txt" 2>&1 || true

# 2. GPU parity tests: the parity suites are parametrized over backends
# (one Triton config per kernel: autotuning every shape key would compile and time them all;
# pytest-xdist spreads the Triton and CUDA compiles over the cores when it is installed)
if (( HAVE_GPU )); then
  PARALLEL=(); "$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
  "$PY" -c "import pytest_timeout" 2>/dev/null && PARALLEL+=(--timeout 120)
  stage gpu-tests 170 env EFFNET_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -q \
    -p no:cacheprovider -k "cuda or triton or gpu" -rf --tb=short "${PARALLEL[@]}" \
    --junitxml="$OUT_DIR/gpu-tests.xml"
else
  skip gpu-tests "no GPU"
fi

# 3. memcheck: the bench self-check runs every GPU backend of every op on small shapes
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
if (( ! HAVE_GPU )); then
  skip memcheck "no GPU"
elif [[ -z "$SANITIZER" ]]; then
  skip memcheck "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"
else
  stage memcheck 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 EFFNET_KERNELS_TRITON_AUTOTUNE=0 \
    "$SANITIZER" --tool memcheck \
    --error-exitcode 1 --print-limit 20 "$PY" -c '
import sys, torch
from effnet_kernels.bench.selfcheck import run_selfcheck
rows = run_selfcheck(torch.device("cuda"))
bad = [r for r in rows if r.get("ok") is False]
for r in rows:
    print(r["op"], r.get("backend"), r.get("case"), r.get("mode"), "ok" if r.get("ok") else r)
sys.exit(1 if bad else 0)'
fi

# 4. benchmarks, most wanted first (a stage that does not fit the budget is skipped):
#    host cost per B0 step (time and ATen dispatches at a tiny input, eager vs converted);
#    B0 bf16: the ops (autotuned Triton) + end to end vs eager and torch.compile;
#    B4 bf16 end to end; B0 fp32 ops in both memory formats (Triton: first config only).
if (( HAVE_GPU )); then
  stage host-overhead 60 "$PY" benchmarks/bench_host_overhead.py --device cuda
  stage bench-b0-bf16 200 "$PY" -m effnet_kernels bench --quick --device cuda --dtype bfloat16 \
    --compile-budget 30 --e2e-providers eager,converted,compile --out "$OUT_DIR/bench-b0-bf16"
  stage bench-b4-bf16 150 "$PY" -m effnet_kernels bench --quick --device cuda --dtype bfloat16 \
    --model efficientnet_b4 --ops depthwise --compile-budget 0 --skip-selfcheck \
    --e2e-batch 48 --e2e-providers eager,converted,compile --out "$OUT_DIR/bench-b4-bf16"
  stage bench-b0-fp32 90 env EFFNET_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m effnet_kernels bench \
    --quick --device cuda --dtype float32 --formats channels_last,nchw --compile-budget 15 \
    --skip-e2e --skip-selfcheck --out "$OUT_DIR/bench-b0-fp32"
else
  skip bench-gpu "no GPU"
  stage host-overhead-cpu 120 "$PY" benchmarks/bench_host_overhead.py --device cpu --rounds 3
  stage bench-cpu-smoke 240 "$PY" -m effnet_kernels bench --smoke --device cpu \
    --out "$OUT_DIR/bench-cpu-smoke"
fi

# 5. summary: stages.json + summary.md (stage table, then each bench's own report.md)
"$PY" - "$OUT_DIR" "$HAVE_GPU" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, os, sys
out, have_gpu, total = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
stages = []
with open(os.path.join(out, "stages.tsv")) as f:
    for line in f:
        name, status, secs, note = line.rstrip("\n").split("\t")
        stages.append({"stage": name, "status": status, "seconds": int(secs), "note": note})
benches = sorted(d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "report.md")))
json.dump({"gpu": have_gpu, "total_seconds": total, "stages": stages, "benches": benches},
          open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
lines = [f"# gpu_check ({'GPU' if have_gpu else 'no GPU: GPU stages skipped'}, {total} s)", "",
         "| stage | status | s | note |", "|---|---|---|---|"]
lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in stages]
for b in benches:
    text = open(os.path.join(out, b, "report.md")).read()
    lines += ["", "#" + text if text.startswith("# ") else text]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:len(stages) + 4]))
PYEOF
log "wrote $OUT_DIR/summary.md and $OUT_DIR/gpu_check.json"
exit $FAILED
