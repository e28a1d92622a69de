#!/usr/bin/env bash
# On the H200: memtune train on the DeepSeek-R1-Distill-Qwen-1.5B shape (random
# weights) at the seed's lengths, plus configurations that exercise each
# memory term of the estimator, and two other families. Writes
# $OUT/train-1.5b.json as it goes (a timeout keeps what finished).
set -uo pipefail
M="--model deepseek-r1-distill-qwen-1.5b --random-init --data random --no-eval --warmup-steps 2"
python3 benchmarks/run_configs.py --out "$OUT/train-1.5b.json" --steps ${STEPS:-5} --timeout 200 \
  "L1024: $M --seq-len 1024" \
  "L4096: $M --seq-len 4096" \
  "L16384: $M --seq-len 16384" \
  "L16384-int8: $M --seq-len 16384 --quantization int8" \
  "L16384-none: $M --seq-len 16384 --quantization none" \
  "L16384-r64: $M --seq-len 16384 --lora-rank 64" \
  "L16384-alllinear: $M --seq-len 16384 --lora-targets all-linear" \
  "L4096-nockpt: $M --seq-len 4096 --no-gradient-checkpointing" \
  "L4096-fullloss: $M --seq-len 4096 --loss full" \
  "L16384-offload: $M --seq-len 16384 --offload-activations" \
  "L65536: $M --seq-len 65536" \
  "L65536-offload-tiled: $M --seq-len 65536 --offload-activations --tiled-mlp-chunk 8192" \
  "L131072-offload-tiled: $M --seq-len 131072 --offload-activations --tiled-mlp-chunk 8192" \
  "llama1b-L16384: --model llama-3.2-1b --random-init --data random --no-eval --warmup-steps 2 --seq-len 16384" \
  "qwen3-L16384: --model qwen3-1.7b --random-init --data random --no-eval --warmup-steps 2 --seq-len 16384" \
  "$@"
