#!/usr/bin/env bash
# One lease of a GPU machine, in as few calls as possible: build ltdd_fast in place with its CUDA kernels, then
# run the stages named on the command line, each under its own time limit so that the results of the others
# still come back. Stages: test (the whole suite on the GPU), gputest (its Triton and CUDA tests), ops (`ltdd bench
# ops` for triton and native), e2e, e2e-cifar, e2e-imagenet (`ltdd bench e2e`), e2e-compile (cifar with --compile
# reduce-overhead; give it its own call), memory (`ltdd bench memory`).
# Usage, repository root of the GPU machine: bash bench/gpu_session.sh test ops
# Everything lands in $OUT/work (default bench/results/gpu-out/work), packed into $OUT/results.tgz at the end.
set -u
OUT=${OUT:-bench/results/gpu-out}
W="$OUT/work"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET
PY=${PY:-python3}
DATE=$(date +%F)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/^nvidia-//')

pack() { tar -czf "$OUT/results.tgz" -C "$W" . ; }
trap pack EXIT

step() {  # step NAME SECONDS COMMAND...: output to $W/NAME.log, a summary line and the log's tail here
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s (limit $limit s)"
    tail -n "${TAIL:-6}" "$W/$name.log" | cut -c1-220
    pack  # after every step, so that a call cut off at its limit still brings back what finished
    return $rc
}

echo "== $GPU $DATE; $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
step build "${BUILD_LIMIT:-300}" $PY -m pip install --no-deps --no-index --no-build-isolation -e . || exit 1
$PY - <<'PY' || exit 1
import torch
from ltdd_fast import ops
ops = ops.dispatch.has("native")
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ltdd_fast::{o}", "CUDA")]
print("CUDA kernels:", "all built" if not missing else f"MISSING {missing}")
raise SystemExit(1 if missing else 0)
PY
LTDD="$PY -m ltdd_fast.cli"

e2e() { local tag=$1 preset=$2 limit=$3; shift 3
        TAIL=12 step e2e-$tag "$limit" $LTDD bench e2e --preset $preset --device cuda "$@" \
            --json "$W/$GPU-e2e-$tag-$DATE.json"; }

for stage in "$@"; do
  case $stage in
    test)
      OMP_NUM_THREADS=1 TAIL=25 step test "${TEST_LIMIT:-300}" $PY -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
          --timeout 300 -rfE tests ;;
    ops)
      for b in triton native; do
        TAIL=30 step ops-$b "${OPS_LIMIT:-120}" $LTDD bench ops --device cuda --backend $b --json "$W/$GPU-ops-$b-$DATE.json"
      done ;;
    e2e|e2e-cifar|e2e-imagenet)
      if [ $stage != e2e-imagenet ]; then
        e2e cifar10-lt-ipc10-exact cifar10-lt-ipc10 100 --iterations 3 --profile 20
        e2e cifar10-lt-ipc10-fd cifar10-lt-ipc10 100 --iterations 3 --second-pass fd
      fi
      if [ $stage != e2e-cifar ]; then
        e2e imagenet-lt-ipc10-exact imagenet-lt-ipc10 80 --iterations 1
        e2e imagenet-lt-ipc50-exact imagenet-lt-ipc50 80 --iterations 1
      fi ;;
    e2e-compile)  # the student steps under torch.compile and CUDA graphs: the first iteration compiles (4 graphs
                  # for exact, 6 for fd); the second run reuses the first's Triton kernels
      # COMPILE_PASSES="fd" runs one of them; COMPILE_ARGS adds options, COMPILE_TAG names the runs that have them
      for pass2 in ${COMPILE_PASSES:-exact fd}; do
        e2e cifar10-lt-ipc10-$pass2-graphs${COMPILE_TAG:-} cifar10-lt-ipc10 "${COMPILE_LIMIT:-240}" --iterations 3 \
            --second-pass $pass2 --compile reduce-overhead --profile 25 ${COMPILE_ARGS:-}
      done ;;
    gputest)  # the tests that run kernels on the GPU (Triton and CUDA), one thread per worker. The tests that make
              # a C++ kernel throw are left out: on the 2026-11 image any exception thrown from an extension's
              # kernel segfaulted (a one-function extension too), which kills an xdist worker each time.
      OMP_NUM_THREADS=1 TAIL=25 step gputest "${TEST_LIMIT:-240}" $PY -m pytest -q -p no:cacheprovider \
          -n "${TEST_WORKERS:-8}" --timeout 200 -rfE -k "${TEST_K:-(triton or cuda) and not bad_input and not rejects}" tests ;;
    memory)
      for p in ${MEMORY_PRESETS:-cifar10-lt-ipc10 imagenet-lt-ipc50}; do
        # MEMORY_ARGS adds options (e.g. "--compile reduce-overhead"), MEMORY_TAG names the files that have them
        TAIL=12 step memory-$p${MEMORY_TAG:-} "${MEMORY_LIMIT:-120}" $LTDD bench memory --preset $p --device cuda \
            --syn-steps 10 80 ${MEMORY_ARGS:-} --json "$W/$GPU-memory-$p${MEMORY_TAG:-}-$DATE.json"
      done ;;
    *) echo "unknown stage $stage (expected test, gputest, ops, e2e, e2e-cifar, e2e-imagenet, e2e-compile, memory)"
       exit 2 ;;
  esac
done
