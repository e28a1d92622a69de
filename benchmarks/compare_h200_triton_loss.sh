#!/usr/bin/env bash
# The loss chunks on the hand-written Triton kernel (--loss-kernel triton) against the compiled one,
# about 6 minutes on an H200. The compiled kernel took 286 us a 512 x 151936 chunk in the profiled
# 16384-token step (32 chunks, 9.2 ms a step); the traffic alone takes about 120 us.
#   1. the kernel's tests on the GPU, and one chunk timed alone (loss_kernel_bench.py);
#   2. 16384 tokens: the defaults against --loss-kernel triton and unsloth, twice over, interleaved.
# Usage: benchmarks/compare_h200_triton_loss.sh OUT_DIR   (OUT_DIR/compare-h200.json is appended to)
set -uo pipefail
out=${1:?usage: compare_h200_triton_loss.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 -m pytest -q -p no:cacheprovider "$here/../tests/test_cross_entropy_triton.py" 2>&1 | tail -3
python3 "$here/loss_kernel_bench.py"
python3 "$here/compare.py" --out "$out/compare-h200.json" --timeout 200 --steps 10 --warmup 3 --seq-lens 16384 \
  --stacks memtune,triton-loss,unsloth --repeat 2 --variant "triton-loss=--loss-kernel triton"
