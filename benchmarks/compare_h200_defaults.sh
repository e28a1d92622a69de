#!/usr/bin/env bash
# memtune's defaults after compiled RoPE and the frozen 4-bit short path (--dequantize-once) went
# on, with the adapter's product added into the base output in place, about 8 minutes on an H200:
#   1. 16384 tokens against unsloth, twice over, interleaved (single runs vary by +-5%);
#   2. LoRA on all linear layers at 16384, memtune and unsloth in the same command;
#   3. 65536 tokens (unsloth in compare-h200-11.log: 8.54 GB, 16,053 tok/s);
#   4. 131072 tokens under a 16 GiB cap.
# Usage: benchmarks/compare_h200_defaults.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_defaults.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 "$@"; }
for round in 1 2; do
  echo "round $round"
  compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,unsloth
done
compare --steps 8 --warmup 3 --seq-lens 16384 --lora-targets all --stacks memtune,unsloth
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune
compare --steps 4 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
