#!/usr/bin/env bash
# Whole iterations of two versions of cryonb on RELION 5's shape (10,000 x 128 px, K=20,
# psi 10, offsets 5/2, one rank, --j 1, GPU 0), in turns (A, B, A, B), each in a fresh process:
# benchmarks/class2d_gpu.py --skip_estep --threads 1 with that version's tree first on
# PYTHONPATH. Prints seconds per iteration and the runtime's stage totals of each run.
#   git archive <commit> cryonb benchmarks | tar -x -C _base
#   OUT=/tmp/out bash benchmarks/iter_ab.sh _base .
# On the GPU machine after `bash benchmarks/gpu_session.sh` (its wheels in /tmp/site).
set -uo pipefail
OUT=${OUT:-/tmp/out}
for round in 1 2; do
  for tree in "$1" "$2"; do
    t=$(realpath "$tree"); name=$(basename "$t"); dir="$OUT/it_${name}_$round"
    PYTHONPATH=/tmp/site:$t timeout 150 python3 "$t/benchmarks/class2d_gpu.py" --skip_estep \
      --threads 1 --out "$dir" 2>&1 | grep -E "per iteration|rror" | sed "s|^|$name round $round: |"
    python3 -c "import json; r = json.load(open('$dir/class2d_gpu.json'))['iterations'][0]; \
print('   ', r.get('per_iteration_s'), {k: round(v, 2) for k, v in r.get('stages_s', {}).items()})"
  done
done
