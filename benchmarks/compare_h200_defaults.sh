#!/usr/bin/env bash
# Today's defaults (static-shape training kernels, the Triton loss kernel) against Unsloth, about 9
# minutes on an H200, most important first (each run's record is appended as it ends):
#   1. 16384 tokens, memtune and unsloth, twice over, interleaved;
#   2. LoRA gradients at 4096 tokens against the full-precision reference (seed-fp32), with seed,
#      seed-autocast and memtune beside it: how far each is from fp32, not from seed's own bf16 rounding;
#   3. 65536 tokens, memtune and unsloth;
#   4. LoRA on all linear layers at 16384, memtune and unsloth.
# Usage: benchmarks/compare_h200_defaults.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_defaults.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 "$@"; }
compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,unsloth --repeat 2
compare --grad-check --seq-lens 4096 --grad-reference seed-fp32 --stacks seed-fp32,seed,seed-autocast,memtune
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune,unsloth
compare --steps 8 --warmup 3 --seq-lens 16384 --lora-targets all --stacks memtune,unsloth
