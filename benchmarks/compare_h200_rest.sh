#!/usr/bin/env bash
# The rest of the side-by-side matrix of benchmarks/compare.py on one H200, in one command:
# LoRA gradients against seed at 4096, 131072 tokens under a 16 GiB cap, fused-elementwise
# variants at 16384, the longest length within 24 GiB, and all-linear LoRA at 16384.
# Usage: benchmarks/compare_h200_rest.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_rest.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
lean="--offload-activations --tiled-mlp-chunk 4096 --embeddings-on-host --loss-chunk-tokens 512"
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 170 "$@"; }

compare --grad-check --seq-lens 4096 --stacks seed,unsloth,memtune,memtune-lean --variant "memtune-lean=$lean"
compare --seq-lens 131072 --gpu-memory 16GiB --stacks memtune-lean --variant "memtune-lean=$lean"
compare --seq-lens 16384 --stacks memtune-fused,memtune-lean-fused \
  --variant "memtune-fused=--fuse-elementwise" --variant "memtune-lean-fused=$lean --fuse-elementwise"
compare --max-length-search --gpu-memory 24GiB --search-start 131072 --stacks unsloth
compare --seq-lens 16384 --lora-targets all --stacks unsloth,memtune-lean --variant "memtune-lean=$lean"
compare --max-length-search --gpu-memory 24GiB --search-start 131072 --stacks memtune-lean --variant "memtune-lean=$lean"
