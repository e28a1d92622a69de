#!/usr/bin/env bash
# Training-mode kernels (fused RMSNorm, SiLU product, RoPE, the loss's full chunks) compiled for the
# step's exact shapes (--compile-static-shapes), about 8 minutes on an H200. The 16384-token step is
# bound by the GPU (profile-16k-graph-h200.txt: 406 ms of kernels in a 425 ms span) and its compiled
# kernels moved 0.7-2.8 TB/s, as kernels compiled for symbolic shapes may without vectorized loads;
# compiled for the exact shapes they should move more.
#   1. 16384 tokens: the defaults against --compile-static-shapes and unsloth, twice over, interleaved;
#   2. --compile-static-shapes at 65536 (the defaults there: 4.52 GB, 19,099 tok/s, compare-h200-15.log);
#   3. a profile of one 16384-token step with it: the compiled kernels' times.
# Usage: benchmarks/compare_h200_static.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_static.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
compare() { python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 "$@"; }
static=(--variant "static-shapes=--compile-static-shapes")
compare --steps 10 --warmup 3 --seq-lens 16384 --stacks memtune,static-shapes,unsloth --repeat 2 "${static[@]}"
compare --steps 6 --warmup 2 --seq-lens 65536 --stacks static-shapes "${static[@]}"
python3 "$here/profile_step.py" --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 16384 \
  --no-eval --lora-dropout 0 --rows 45 --compile-static-shapes --profile-out "$out/profile-16k-static-h200.txt" \
  > "$out/profile.log" 2>&1
grep -E "^step times|^profiled step|fuse_|Error" "$out/profile.log"
sed -n '/^GPU streams/,$p' "$out/profile.log"
