#!/usr/bin/env bash
# After the prepared batch stopped being held through backward (compare-h200-16.log: +0.05 GB at
# 16384 in one round, +0.4 GB at 131072), about 3.5 minutes on an H200:
#   1. 131072 tokens under a 16 GiB cap;
#   2. 16384 tokens, memtune and unsloth.
# Usage: benchmarks/compare_h200_check.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_check.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 150 "$@"; }
compare --steps 4 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,unsloth
