#!/usr/bin/env bash
# memtune's defaults (attention kept from the forward) against Unsloth in the same command, about
# 7 minutes on an H200: 16384 (plus the MLP tiled in 8192-token chunks instead of 4096), 65536,
# 131072 under a 16 GiB cap, and LoRA on all linear layers at 16384.
# Usage: benchmarks/compare_h200_final.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_final.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 170 "$@"; }

compare --steps 8 --warmup 3 --seq-lens 16384 --stacks memtune,tiled-8192,unsloth \
  --variant "tiled-8192=--tiled-mlp-chunk 8192"
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune,unsloth
compare --steps 5 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
compare --steps 8 --warmup 3 --seq-lens 16384 --lora-targets all --stacks memtune
