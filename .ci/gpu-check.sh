#!/usr/bin/env bash
# One-shot GPU check of fastbound (issue 13), run from anywhere in the repository on a machine
# with a GPU, in at most GPU_CHECK_BUDGET seconds (default 480):
#   1. builds the extension with CUDA for this card (TORCH_CUDA_ARCH_LIST = its capability)
#      and fails unless the CUDA kernels were built;
#   2. runs the GPU-marked tests (cuda or triton) with FASTBOUND_REQUIRE_CUDA=1, so a skip fails;
#   3. runs the GPU probes the CPU suite cannot (.ci/gpu_check.py);
#   4. runs the benchmark grid on the GPU and writes benchmarks/results/gpu.md (card name,
#      fraction of HBM bandwidth; benchmarks/gpu_report.py). GPU_CHECK_COMPILE=1 adds the
#      torch.compile provider (slow to build: off by default to fit the budget).
# Each stage gets a time limit (cut to what is left of the budget), logs to $GPU_CHECK_LOG
# (default $TMPDIR/fastbound-gpu-check), and the script goes on after a failure; the exit status is 1 if
# any stage failed.
#
#   .ci/gpu-check.sh --dry-run
# runs every part that works without a GPU (CI does, tests/test_gpu_readiness.py): no build,
# the CUDA-kernel query, the probes' code at tiny sizes on CPU (Triton in its interpreter),
# and the report writer on a one-round CPU benchmark, into $GPU_CHECK_LOG only.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
BUDGET=${GPU_CHECK_BUDGET:-480}
LOG=${GPU_CHECK_LOG:-${TMPDIR:-/tmp}/fastbound-gpu-check}
mkdir -p "$LOG"
START=$SECONDS
REPORT_RESERVE=20  # seconds kept for the last stage (the report), which runs with STAGE_END=$BUDGET
FAILED=()

# stage NAME LIMIT_S COMMAND...: runs COMMAND with the smaller of LIMIT_S and the budget left.
# STAGE_SIGNAL (default TERM) stops it at the limit; with PARTIAL_OK=1 a stage stopped at its
# limit counts as partial, not failed (the benchmarks: pytest writes the JSON of what ran on SIGINT).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((${STAGE_END:-$((BUDGET - REPORT_RESERVE))} - (SECONDS - START)))
  ((left < limit)) && limit=$left
  if ((limit <= 0)); then
    echo "FAIL $name: the ${BUDGET}s budget is spent"
    FAILED+=("$name")
    return
  fi
  echo "== $name (at most ${limit}s; log $LOG/$name.log)"
  local begin=$SECONDS
  timeout --signal="${STAGE_SIGNAL:-TERM}" --kill-after=15 "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$LOG/$name.log"
  local cut=0
  ((rc == 124 || rc == 137)) && cut=1
  if ((cut && ${PARTIAL_OK:-0})); then
    echo "PARTIAL $name (stopped at its ${limit}s limit)"
  elif ((rc != 0)); then
    ((cut)) && echo "   (stopped at its ${limit}s limit)"
    echo "FAIL $name (exit $rc, $((SECONDS - begin))s)"
    FAILED+=("$name")
  else
    echo "PASS $name ($((SECONDS - begin))s)"
  fi
}

has_cuda_kernels='import torch, fastbound
built = torch._C._dispatch_has_kernel_for_dispatch_key("fastbound::dse_forward", "CUDA")
print("CUDA kernels built:", built)
raise SystemExit(0 if built or DRY_RUN else "fastbound was built WITHOUT CUDA kernels: every CUDA test would skip")'

if ((DRY_RUN)); then
  echo "dry run: no GPU needed; skipping the build and the GPU tests"
  stage cuda-kernels 60 python -c "DRY_RUN = True
$has_cuda_kernels"
  stage probes 900 python .ci/gpu_check.py --dry-run
  stage bench 300 python -m pytest benchmarks --smoke --bench-device cpu -q -p no:cacheprovider \
    -k "test_dce_loss and fwd_bwd and not compile" --benchmark-json "$LOG/bench.json"
  STAGE_END=$BUDGET stage report 60 python -m benchmarks.gpu_report "$LOG/bench.json" "$LOG/gpu.md"
else
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
    echo "FAIL: torch sees no CUDA device"
    exit 1
  }
  echo "card capability $ARCH; torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
  stage build 180 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" python setup.py build_ext --inplace
  stage cuda-kernels 30 python -c "DRY_RUN = False
$has_cuda_kernels"
  stage gpu-tests 140 env FASTBOUND_REQUIRE_CUDA=1 python -m pytest tests -m "cuda or triton" -q -rfE \
    -p no:cacheprovider --maxfail=30
  stage probes 100 python .ci/gpu_check.py
  bench_filter="not compile"
  [[ "${GPU_CHECK_COMPILE:-0}" == 1 ]] && bench_filter=""
  PARTIAL_OK=1 STAGE_SIGNAL=INT stage bench 120 python -m pytest benchmarks --bench-device cuda --bench-seconds 0.2 -q -p no:cacheprovider \
    ${bench_filter:+-k "$bench_filter"} --benchmark-json "$LOG/bench.json"
  STAGE_END=$BUDGET stage report 20 python -m benchmarks.gpu_report "$LOG/bench.json" benchmarks/results/gpu.md
fi

echo "== gpu-check: $((SECONDS - START))s of ${BUDGET}s; ${#FAILED[@]} stage(s) failed${FAILED[*]:+: ${FAILED[*]}}"
((${#FAILED[@]} == 0))
