#!/usr/bin/env bash
# The dequantize graphs (one CUDA graph replay a layer and pass for the frozen 4-bit weights) and the
# first forward's frozen linears without an autograd Function, about 8 minutes on an H200:
#   1. 16384 tokens: memtune's defaults against --no-dequantize-graph and unsloth, twice over,
#      interleaved (single runs of this host-bound step vary by about 5%);
#   2. 65536 tokens with the defaults (unsloth in compare-h200-11.log: 8.54 GB, 16,053 tok/s);
#   3. a profile of one 16384-token step with the idle split: what still makes the GPU wait.
# Usage: benchmarks/compare_h200_graph.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_graph.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 "$@"; }
compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,no-dequantize-graph,unsloth --repeat 2 \
  --variant "no-dequantize-graph=--no-dequantize-graph"
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --rows 45 --profile-out "$out/profile-16k-graph-h200.txt" > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|dequantize_graph|Error" "$out/profile.log"
sed -n '/^GPU streams/,$p' "$out/profile.log"
