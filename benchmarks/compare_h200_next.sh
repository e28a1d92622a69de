#!/usr/bin/env bash
# The measurements still missing from benchmarks/results/compare-h200.json, in one command
# (about 9 minutes on an H200): memtune's current defaults at 16384 and 65536, what each
# default technique costs or buys at 16384 (one switched off at a time, plus the optional
# fused loss), LoRA on all linear layers, memtune's longest length within 24 GiB, and a
# profile of one default step.
# Usage: benchmarks/compare_h200_next.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_next.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 170 "$@"; }

compare --seq-lens 16384,65536 --stacks memtune
compare --seq-lens 16384 --stacks no-offload,untiled,embed-on-gpu,loss-chunk-4096,unfused,fuse-loss \
  --variant "no-offload=--no-offload-activations" --variant "untiled=--tiled-mlp-chunk 0" \
  --variant "embed-on-gpu=--no-embeddings-on-host" --variant "loss-chunk-4096=--loss-chunk-tokens 4096" \
  --variant "unfused=--no-fuse-elementwise" --variant "fuse-loss=--fuse-loss"
compare --seq-lens 16384 --lora-targets all --stacks unsloth,memtune
compare --grad-check --seq-lens 4096 --stacks seed,seed-autocast,liger,memtune  # is 1e-2 reachable in bf16 at all?
compare --max-length-search --gpu-memory 24GiB --search-start 131072 --stacks memtune
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --profile-out "$out/profile-16k-defaults.txt" > "$out/profile.log" 2>&1
