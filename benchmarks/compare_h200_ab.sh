#!/usr/bin/env bash
# A/B of the 16384-token step, repeated because single runs of a host-bound step vary by +-5-10%
# (memtune's defaults measured 31,849 and 28,875 tok/s in two commands of the same day), about
# 8 minutes on an H200:
#   1. memtune's defaults (compiled RoPE on, frozen down_proj without its product in the tiled
#      backward, labels read on the host, long-lived objects frozen for the garbage collector)
#      against --dequantize-once and unsloth, twice over, interleaved;
#   2. the defaults at 65536 (unsloth there: 16,053 tok/s, compare-h200-11.log);
#   3. LoRA on all linear layers at 16384, defaults and --dequantize-once.
# Usage: benchmarks/compare_h200_ab.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_ab.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 170 "$@"; }
dq=(--variant "dequantize-once=--dequantize-once")
for round in 1 2; do
  echo "round $round"
  compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,dequantize-once,unsloth "${dq[@]}"
done
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune
compare --steps 8 --warmup 3 --seq-lens 16384 --lora-targets all --stacks memtune,dequantize-once "${dq[@]}"
