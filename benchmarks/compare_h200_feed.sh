#!/usr/bin/env bash
# memtune's defaults with the dequantize graphs and each micro-batch prepared during the previous
# backward, about 9 minutes on an H200, most wanted first:
#   1. 16384 tokens against unsloth, three rounds, interleaved (single runs vary by a few percent);
#   2. 131072 tokens under a 16 GiB cap (7.73 GB allocated, 13.75 GB reserved before the graphs);
#   3. LoRA on all linear layers at 16384, memtune and unsloth in the same command.
# Usage: benchmarks/compare_h200_feed.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_feed.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 "$@"; }
compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,unsloth --repeat 3
compare --steps 4 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
compare --steps 8 --warmup 3 --seq-lens 16384 --lora-targets all --stacks memtune,unsloth
