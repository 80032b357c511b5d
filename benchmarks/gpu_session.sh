#!/usr/bin/env bash
# One call on the GPU machine: install carried wheels, run the GPU tests, then the benchmarks.
#   bash benchmarks/gpu_session.sh tests|bench|all
# Logs and results go to $OUT (the device tool brings them back).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$PWD/.cupy_cache} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
what=${1:-all}
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/fourier tests/kernels \
    tests/em 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout ${BENCH_TIMEOUT:-520} python3 benchmarks/class2d_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/class2d_gpu.log" | tail -40
fi
