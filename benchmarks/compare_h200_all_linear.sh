#!/usr/bin/env bash
# LoRA on all linear layers at 16384 with today's defaults, against --no-dequantize-graph and unsloth,
# twice over, interleaved: about 6 minutes on an H200. An unpaired run of the build with the dequantize
# graphs made 25,608 tok/s (compare-h200-16.log) where the build before made 29,565 beside unsloth's
# 29,761 (compare-h200-13.log); this run says whether the graphs or the day's machine did it.
# Usage: benchmarks/compare_h200_all_linear.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_all_linear.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 --steps 8 --warmup 3 --seq-lens 16384 \
  --lora-targets all --stacks memtune,no-dequantize-graph,unsloth --repeat 2 \
  --variant "no-dequantize-graph=--no-dequantize-graph"
