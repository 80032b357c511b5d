#!/usr/bin/env bash
# Whole runs (class2d_gpu.py --runs) of this tree and another one, in turns, in one device
# call: the fraction of the complex TF32 ceiling moves by 5-10% from machine to machine,
# so a change is only measured against the code before it on the same card.
#   bash benchmarks/runs_ab.sh OLD_TREE CASE [CASE ...]      (CASE: box:K:psi, e.g. 256:100:10)
# OLD_TREE: the other version's tree (git archive <commit> | tar -x -C _head; carry it).
# Environment: PARTICLES (class2d_gpu.py --particles, default 256:16000), RUNS (iterations,
# default 25), SIM_TIMEOUT and RUN_TIMEOUT (seconds per step, default 150 each: on an H200
# host a 256 px, K=100 run of 16,000 particles took 93 s), KERNELS_AT (iterations profiled
# in this tree's runs, default 23: device busy and idle time by host stage; "" for none).
# EXTRA_TREES: more trees run in the same turns (space-separated folders; each profiled like
# this one), logged as <case>_<folder name>.
# Logs and JSON go to $OUT/<case>_{new,old}/; the runs' table rows are printed at the end.
# Run after benchmarks/gpu_session.sh has installed the carried wheels (its "runsab" step
# does both: AB_OLD, the other tree, default _head; AB_CASES, default 256:50:10 256:100:10).
set -uo pipefail
OUT=${OUT:-/tmp/out}
old=$(realpath "$1"); shift
new=$(realpath .)
particles=${PARTICLES:-256:16000}
common=(--particles "$particles" --runs "${RUNS:-25}" --skip_iterations)
first=${1:-256:50:10}
# the simulated set (shared by every K >= 50 of a box) once, before the timed steps
PYTHONPATH=/tmp/site:$new timeout "${SIM_TIMEOUT:-150}" python3 "$new/benchmarks/class2d_gpu.py" \
  --cases "$first" --particles "$particles" --simulate_only --out "$OUT/sim" > "$OUT/sim.log" 2>&1
echo "simulate: rc=$?"
for case in "$@"; do
  tag=${case//:/_}
  for version in new old ${EXTRA_TREES:-}; do
    tree=$new; extra=()
    if [ "$version" = old ]; then tree=$old; elif [ "$version" != new ]; then
      tree=$(realpath "$version"); version=$(basename "$tree"); fi
    if [ "$version" != old ] && [ -n "${KERNELS_AT-23}" ]; then extra=(--kernels_at ${KERNELS_AT-23}); fi
    PYTHONPATH=/tmp/site:$tree timeout "${RUN_TIMEOUT:-150}" python3 "$tree/benchmarks/class2d_gpu.py" \
      "${common[@]}" --cases "$case" "${extra[@]}" --out "$OUT/${tag}_$version" \
      > "$OUT/${tag}_$version.log" 2>&1
    echo "$case $version: rc=$?"
  done
done
for f in "$OUT"/[0-9]*_*.log; do
  [ -f "$f" ] && grep -H "^| [0-9]" "$f"
done
exit 0
