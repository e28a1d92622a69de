#!/usr/bin/env bash
# Where the default 16384-token step spends its GPU time now that the MLP is tiled in 8192-token chunks,
# and the rows still missing: about 7 minutes on an H200.
#   1. a profile of one default 16k step (kernels, GPU busy and idle per stream, kernel categories);
#   2. unsloth at 16384 in the same command, the fused loss with today's defaults, and the fused loss with
#      --dequantize-once and 4096-token MLP chunks (the leanest fast combination so far);
#   3. LoRA gradients against seed at 4096 for memtune and --residual-dtype fp32 (cut off last time);
#   4. what the fp32 residual stream costs at 16384.
# Usage: benchmarks/compare_h200_speed.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_speed.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --rows 45 --profile-out "$out/profile-16k-tiled-8192-h200.txt" > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|Error" "$out/profile.log"
sed -n '/^GPU streams/,$p' "$out/profile.log"
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 150 "$@"; }
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks unsloth,fuse-loss,fuse-loss-dq-4096 \
  --variant "fuse-loss=--fuse-loss" \
  --variant "fuse-loss-dq-4096=--fuse-loss --dequantize-once --tiled-mlp-chunk 4096"
compare --grad-check --seq-lens 4096 --stacks seed,memtune,fp32-residual --variant "fp32-residual=--residual-dtype fp32"
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks fp32-residual --variant "fp32-residual=--residual-dtype fp32"
