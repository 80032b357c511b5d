export OUT; TEST_PATHS="tests/parallel" STEP_TIMEOUT_tests=120 bash benchmarks/gpu_session.sh tests
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH CUPY_CACHE_DIR=$PWD/.cupy_cache OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for shape in "--n 20000 --box 64 --K 50" "--n 8000 --box 128 --K 200"; do
 for tree in _base .; do
  echo "=== $tree $shape"
  PYTHONPATH=/tmp/site:$(realpath $tree) timeout 140 python3 $tree/benchmarks/parallel_scaling.py --gpu '' $shape --workers 1 --threads 1 2 4 --io preread --iter 3 --offset_range 5 --data /tmp/sc_$(echo $shape | tr -d ' -') --json $OUT/scaling_$(basename $(realpath $tree))_$(echo $shape | tr -d ' -').json 2>&1 | grep -v "^rank\|^[0-9] \|warning" | tail -8
 done
done
