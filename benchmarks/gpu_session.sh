#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, then run the named steps in order.
#   bash benchmarks/gpu_session.sh STEP [STEP ...]
# Steps: tests (every GPU-marked test), picktests (those of tests/pick with the map carried in
#        .gpudata/), profile (E-step per stage), bench (class2d_gpu.py grid; $BENCH_TREE: the
#        tree it measures, default this one; $BENCH_ARGS),
#        runsab (benchmarks/runs_ab.sh: whole runs of this tree and $AB_OLD in turns),
#        ab (class2d_gpu_ab.py: the tree in $AB_BASE, default _base/, against this one, in
#        turns; $AB_NEW: version B's tree, default this one; $AB_ARGS; carry _base), ab2 (a
#        second comparison: $AB2_BASE, $AB2_NEW, $AB2_ARGS), parallel (parallel_gpu_check.py),
#        scaling (parallel_scaling.py --gpu, $SCALING_ARGS), panel (panel_gpu_check.py),
#        autopick (benchmarks/autopick.py GPU and CPU rows), fftcb (fft_callback_probe.py:
#        the masking as a cuFFT load callback; $FFTCB_ARGS), notebooks (notebooks on the GPU),
#        agree (class2d_cpu_gpu.py's GPU runs on the sets carried in .agree/; $AGREE_ARGS, e.g.
#        "--out .agree2 --sets noise05b,noise05c": a call carries at most 64 MiB, so two
#        16 MB sets with .whl and .cupy_cache; carry a single set as .agree2/noise05c).
# TEST_PATHS: the tests step's folders (default: fourier kernels em pick parallel).
# Each step has its own time limit (STEP_TIMEOUT_<step>, seconds). Logs and results go to $OUT
# (the device tool brings them back); CuPy's kernel cache is kept in .cupy_cache (carry it to
# skip compiling on a fresh machine) and copied to $OUT/cupy_cache.tgz at the end; where more
# than 7 other files are left, they come back packed in $OUT/outputs.tgz. A profiled E-step's
# trace (class2d_gpu.py --kernels_at, CRYONB_TRACE_DIR) reads with trace_timeline.py.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$PWD/.cupy_cache} PYTHONUNBUFFERED=1 CI=
export CRYONB_TRACE_DIR=${CRYONB_TRACE_DIR:-$OUT/trace}  # profiled E-steps keep their traces
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$CUPY_CACHE_DIR"
if [ ! -f /tmp/site/.cryonb_wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
  touch /tmp/site/.cryonb_wheels
fi
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
t_start=$(date +%s)
step() {  # step NAME DEFAULT_TIMEOUT COMMAND...
  local name=$1 limit=$2; shift 2
  local var="STEP_TIMEOUT_${name}"; limit=${!var:-$limit}
  echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - t_start ))s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-30}" "$OUT/$name.log"
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
}
for what in "$@"; do
  case $what in
    tests) step tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 240 \
             ${TEST_PATHS:-tests/fourier tests/kernels tests/em tests/pick tests/parallel} ;;
    picktests) CRYONB_SHARED_DATA=$PWD/.gpudata step picktests 150 python3 -m pytest -q -m gpu \
                 -p no:cacheprovider --timeout 140 tests/pick ;;
    profile) step profile 120 python3 benchmarks/estep_profile.py --gpu ${PROFILE_ARGS:---n 4000 --box 128 --K 50} ;;
    bench) ( t=$(realpath "${BENCH_TREE:-.}"); export PYTHONPATH=/tmp/site:$t
             step bench 420 python3 "$t/benchmarks/class2d_gpu.py" --out "$OUT" ${BENCH_ARGS:-} ) ;;
    ab) step ab 420 python3 benchmarks/class2d_gpu_ab.py --base "${AB_BASE:-_base}" --out "$OUT" \
          --new "${AB_NEW:-.}" ${AB_ARGS:-} ;;
    runsab) step runs_ab 580 bash benchmarks/runs_ab.sh "${AB_OLD:-_head}" \
              ${AB_CASES:-256:50:10 256:100:10} ;;
    ab2) step ab2 420 python3 benchmarks/class2d_gpu_ab.py --base "${AB2_BASE:-_base}" \
           --new "${AB2_NEW:-.}" --out "$OUT" --json class2d_gpu_ab2.json ${AB2_ARGS:-} ;;
    agree) rm -rf /tmp/agree_runs  # the runs' folders are too deep to come back: a tarball does
           step agree 500 python3 benchmarks/class2d_cpu_gpu.py gpu --out .agree \
             --runs /tmp/agree_runs ${AGREE_ARGS:-}
           tar czf "$OUT/agree_runs.tgz" -C /tmp agree_runs ;;
    parallel) step parallel_check 200 python3 benchmarks/parallel_gpu_check.py ;;
    scaling) step scaling 300 python3 benchmarks/parallel_scaling.py --gpu '' \
               ${SCALING_ARGS:---n 20000 --box 128 --K 50 --workers 1 2 --threads 1 2 4} \
               --json "$OUT/parallel_scaling.json" ;;
    panel) step panel 200 python3 benchmarks/panel_gpu_check.py ;;
    fftcb) step fft_callback 120 python3 benchmarks/fft_callback_probe.py \
             --json "$OUT/fft_callback.json" ${FFTCB_ARGS:-} ;;
    autopick) step autopick 240 python3 benchmarks/autopick.py --no_relion --cpu_rows 1x1 16x1 \
                --json "$OUT/autopick.json" ;;
    notebooks) step notebooks 300 python3 -m pytest -q -m gpu -p no:cacheprovider ${NB_ARGS:-} tests/test_notebooks.py ;;
    *) echo "unknown step $what" ;;
  esac
done
tar czf "$OUT/cupy_cache.tgz" -C "$CUPY_CACHE_DIR" . 2>/dev/null && du -h "$OUT/cupy_cache.tgz"
# a call brings back at most 8 files, two folders down: past that, everything but the kernel
# cache goes back as one tarball (runs_ab's simulated set, $OUT/sim, is left out)
rm -rf "$OUT/sim"
if [ "$(find "$OUT" -type f -not -name cupy_cache.tgz | wc -l)" -gt 7 ]; then
  ( cd "$OUT" && tar czf /tmp/outputs.tgz --exclude=./cupy_cache.tgz . \
      && find . -mindepth 1 -maxdepth 1 -not -name cupy_cache.tgz -exec rm -rf {} + \
      && mv /tmp/outputs.tgz . && echo "outputs packed into outputs.tgz" )
fi
echo "total $(( $(date +%s) - t_start ))s"
