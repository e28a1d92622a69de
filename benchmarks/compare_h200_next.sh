#!/usr/bin/env bash
# The measurements still missing from benchmarks/results/compare-h200.json, in two device calls
# (part 1 about 7 minutes on an H200, part 2 about 5), most wanted first:
#   - the short frozen 4-bit path (--dequantize-once, off by default until this runs) at 16384 with the
#     MLP tiled in 8192- and 4096-token chunks: does it take the host-bound 4096 step back to GPU speed?
#   - today's defaults (MLP tiled in 8192-token chunks) at 65536 and at 131072 under a 16 GiB cap,
#     so far measured with 4096-token chunks only; the optional fused loss with today's defaults;
#   - LoRA gradients against seed at 4096, seed-autocast and --residual-dtype fp32 included (on a CPU
#     at the model's depth they give 8.6e-3 and 8.7e-3 against memtune's default 1.06e-2), and what
#     the fp32 residual stream costs at 16384;
#   - LoRA on all linear layers with today's defaults, and memtune's longest length within 24 GiB.
# Usage: benchmarks/compare_h200_next.sh OUT_DIR PART   (PART 1 or 2; OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_next.sh OUT_DIR PART}
part=${2:?usage: compare_h200_next.sh OUT_DIR PART}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 170 "$@"; }

if [ "$part" = 1 ]; then
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks memtune,dequantize-once,tiled-4096-dequantize-once \
  --variant "dequantize-once=--dequantize-once" \
  --variant "tiled-4096-dequantize-once=--tiled-mlp-chunk 4096 --dequantize-once"
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune,dequantize-once --variant "dequantize-once=--dequantize-once"
compare --steps 5 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
compare --grad-check --seq-lens 4096 --stacks seed,seed-autocast,liger,memtune,fp32-residual \
  --variant "fp32-residual=--residual-dtype fp32"
else
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks fp32-residual --variant "fp32-residual=--residual-dtype fp32"
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks fuse-loss --variant "fuse-loss=--fuse-loss"
compare --steps 8 --warmup 3 --seq-lens 16384 --lora-targets all --stacks memtune
compare --max-length-search --gpu-memory 24GiB --search-start 131072 --stacks memtune
fi
