#!/usr/bin/env bash
# LoRA on all linear layers at 16384 with today's defaults (MLP tiled in 8192-token chunks, fused loss),
# with and without --dequantize-once: about 2.5 minutes on an H200.
# Usage: benchmarks/compare_h200_all_linear.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_all_linear.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 100 --steps 6 --warmup 2 --seq-lens 16384 \
  --lora-targets all --stacks memtune,dequantize-once --variant "dequantize-once=--dequantize-once"
