#!/usr/bin/env bash
# Why a memtune run with --compute-dtype fp32 did not finish a one-step gradient check at 4096 tokens
# within 100 s on the H200 (compare-h200-21.log) where a bf16 one takes 16: three short fp32 runs, each
# with one of the CUDA-only pieces off, step times printed; then the gradient check itself.
# Usage: benchmarks/h200_fp32_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: h200_fp32_check.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
train() {
  local name=$1; shift
  echo "== fp32 $name"
  timeout 150 python3 -m memtune train --model deepseek-r1-distill-qwen-1.5b --random-init --data random \
    --seq-len 4096 --steps 4 --warmup-steps 1 --no-eval --lora-dropout 0 --compute-dtype fp32 \
    --out "$out/fp32-$name" "$@" > "$out/fp32-$name.log" 2>&1
  echo "rc=$? after ${SECONDS}s"; tail -12 "$out/fp32-$name.log"
}
train defaults
train no-graph --no-dequantize-graph
train no-compile --no-fuse-elementwise --no-fuse-rope --no-fuse-loss
python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 --grad-check --seq-lens 4096 \
  --grad-reference seed-fp32 --stacks seed-fp32,fp32-compute --variant "fp32-compute=--compute-dtype fp32"
