# Threads of one rank on one GPU: the runtime's E-step throughput with --j 1 2 (4), in the tree
# in _base and in this one (an A/B of any change to the worker); SHAPES (";"-separated parallel_scaling.py shapes)
export OUT PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH CUPY_CACHE_DIR=$PWD/.cupy_cache
[ -n "${TESTS:-}" ] && TEST_PATHS="tests/parallel" STEP_TIMEOUT_tests=120 bash benchmarks/gpu_session.sh tests
IFS=';' read -ra shapes <<< "${SHAPES:---n 20000 --box 64 --K 50}"
for shape in "${shapes[@]}"; do
 for tree in _base .; do
  echo "=== $tree $shape"
  tag=$(echo $shape | tr -d ' -')
  PYTHONPATH=/tmp/site:$(realpath $tree) timeout ${LIMIT:-140} python3 $tree/benchmarks/parallel_scaling.py \
    --gpu '' $shape --workers 1 --threads ${THREADS:-1 2 4} --io preread --iter 3 --offset_range 5 \
    --data /tmp/sc_$tag --json $OUT/scaling_$(basename $(realpath $tree))_$tag.json 2>&1 \
    | grep -v "^rank\|^[0-9] \|warning" | tail -8
 done
done
