#!/usr/bin/env bash
# What is still unmeasured with today's defaults, in one device call (about 9 minutes on an H200;
# split it if the device call is shorter), most wanted first:
#   1. 131072 tokens under a 16 GiB cap (last run before compiled RoPE and the short 4-bit path went
#      on: 7.63 GB allocated, 10.75 GB reserved; the short path raised reserved memory at 65536
#      from 7.84 to 9.62 GB);
#   2. a profile of one 16384-token step with the idle split: where the host still makes the GPU wait;
#   3. unsloth's LoRA gradients against seed at 4096 (1.9e-1 on 2026-11-28, not re-measured since).
# Usage: benchmarks/compare_h200_todo.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_todo.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 240 "$@"; }
compare --steps 4 --warmup 2 --seq-lens 131072 --gpu-memory 16GiB --stacks memtune
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --rows 45 --profile-out "$out/profile-16k-defaults-h200.txt" > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|Error" "$out/profile.log"
sed -n '/^GPU streams/,$p' "$out/profile.log"
compare --grad-check --seq-lens 4096 --stacks seed,unsloth
