#!/usr/bin/env bash
# The fused loss without its per-chunk synchronization, against the defaults and unsloth in the same command,
# and where one 16k step still makes the host wait: about 6 minutes on an H200.
#   1. a profile of one 16k step with --fuse-loss: synchronizing calls, GPU busy and idle per stream;
#   2. 16384: memtune's defaults, --fuse-loss, --fuse-loss --dequantize-once --tiled-mlp-chunk 4096, unsloth;
#   3. 65536: --fuse-loss.
# Usage: benchmarks/compare_h200_fused_loss.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_fused_loss.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --fuse-loss --rows 45 --profile-out "$out/profile-16k-fuse-loss-h200.txt" \
  > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|Error" "$out/profile.log"
sed -n '/^synchronizing calls/,/^profiled step/p' "$out/profile.log" | head -18
sed -n '/^GPU streams/,$p' "$out/profile.log"
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 150 "$@"; }
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks memtune,fuse-loss,fuse-loss-dq-4096,unsloth \
  --variant "fuse-loss=--fuse-loss" \
  --variant "fuse-loss-dq-4096=--fuse-loss --dequantize-once --tiled-mlp-chunk 4096"
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks fuse-loss --variant "fuse-loss=--fuse-loss"
