#!/usr/bin/env bash
# What is still unmeasured, in one device call (about 10 minutes on an H200; split it if the device call is shorter), most wanted first:
#   1. where the default 16384-token step still waits on the host: a profile whose idle summary
#      splits the compute stream's idle time into late launches (by the host range they came from)
#      and dependency waits;
#   2. --fuse-rope (compiled RoPE, off until measured) against the defaults and unsloth at 16384;
#   3. memtune's defaults and unsloth at 65536 in the same command (so far measured in separate ones);
#   4. LoRA on all linear layers at 16384, where the adapters' sum moved into the GEMM epilogue
#      (25,679 tok/s before that change, unsloth 29,333);
#   5. unsloth's LoRA gradients against seed at 4096 with today's comparison code (1.9e-1 on 2026-11-28).
# Usage: benchmarks/compare_h200_todo.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_todo.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --rows 45 --profile-out "$out/profile-16k-idle-h200.txt" > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|Error" "$out/profile.log"
sed -n '/^GPU streams/,$p' "$out/profile.log"
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 170 "$@"; }
compare --steps 8 --warmup 3 --seq-lens 16384 --stacks memtune,fused-rope,unsloth --variant "fused-rope=--fuse-rope"
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks memtune,unsloth
compare --steps 6 --warmup 2 --seq-lens 16384 --lora-targets all --stacks memtune
compare --grad-check --seq-lens 4096 --stacks seed,unsloth
