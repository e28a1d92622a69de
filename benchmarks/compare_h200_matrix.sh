#!/usr/bin/env bash
# The cells of the comparison matrix not yet measured with today's build, about 9 minutes on an H200:
#   1. 4096 tokens, all five stacks;
#   2. 32768 tokens, all five stacks (seed ran out of the H200's 141 GB there before: its record says so);
#   3. 131072 tokens under a 16 GiB cap with today's defaults (last measured before static shapes and
#      the Triton loss: 7.72 GB, 14.37 GB reserved, 11,001 tok/s, compare-h200-17.log).
# Usage: benchmarks/compare_h200_matrix.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_matrix.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 "$@"; }
compare --steps 8 --warmup 3 --seq-lens 4096 --stacks seed,seed-autocast,liger,unsloth,memtune
compare --steps 5 --warmup 2 --seq-lens 32768 --stacks memtune,unsloth,liger,seed-autocast,seed
compare --steps 4 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
