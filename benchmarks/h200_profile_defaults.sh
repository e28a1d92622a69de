#!/usr/bin/env bash
# Why memtune's default 16k step varies (0.66-0.77 s where Unsloth's holds at 0.55 s), and what
# keeping attention from the forward (save_attention) buys: about 5 minutes on an H200.
#   1. the saved-attention tests on the GPU (side-stream copies, rebuilt storages);
#   2. a profile of one default 16k step after six timed ones (kernel table, GPU busy vs wall,
#      host-side operators, a Chrome trace);
#   3. 8-step runs at 16384 of the defaults and of each suspect switched off, and the defaults at 65536.
# Usage: benchmarks/h200_profile_defaults.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: h200_profile_defaults.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 -m pytest -q -p no:cacheprovider "$here/../tests/test_kernels.py" -k saved_attention 2>&1 | tail -15
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --profile-out "$out/profile-16k-defaults.txt" --trace-out "$out/trace-16k-defaults.json.gz" \
  > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|save_attention|Error" "$out/profile.log"
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 150 --steps 8 --warmup 3 "$@"; }
compare --seq-lens 16384 --stacks memtune,recompute-attention,untiled,unfused,no-host-emb-untiled \
  --variant "recompute-attention=--no-save-attention" --variant "untiled=--tiled-mlp-chunk 0" \
  --variant "unfused=--no-fuse-elementwise" \
  --variant "no-host-emb-untiled=--no-embeddings-on-host --tiled-mlp-chunk 0"
compare --seq-lens 65536 --stacks memtune
