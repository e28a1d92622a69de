"""Time one loss chunk's softmax + gradient: torch.compile (any length, exact shape) against the Triton kernel.

    python benchmarks/loss_kernel_bench.py [--rows 512] [--vocab 151936] [--repeat 50]

Prints microseconds a chunk and the bandwidth that implies for the least traffic a chunk needs
(two reads of the bf16 logits and one write of the gradient). CUDA only.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from memtune.kernels.cross_entropy import chunk_loss_and_grad, chunk_loss_and_grad_full
from memtune.kernels.cross_entropy_triton import chunk_loss_and_grad_triton


def _time_us(fn, make_logits, repeat: int) -> float:
    times = []
    for i in range(repeat + 3):
        logits = make_logits()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(logits)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:  # the first calls compile or autotune
            times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16) * 3
    labels = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    inv_n = torch.full((), 1.0 / 16384, device="cuda")
    kernels = {
        "compiled (any length)": torch.compile(chunk_loss_and_grad, dynamic=True),
        "compiled (exact shape)": torch.compile(chunk_loss_and_grad_full, dynamic=False),
        "triton (in place)": chunk_loss_and_grad_triton,
    }
    ref_sum, ref_grad = chunk_loss_and_grad(source.clone(), labels, inv_n)
    least_bytes = 3 * source.numel() * source.element_size()
    print(f"chunk {args.rows} x {args.vocab} bf16; least traffic {least_bytes / 1e6:.0f} MB")
    for name, fn in kernels.items():
        loss_sum, grad = fn(source.clone(), labels, inv_n)
        err = (grad.float() - ref_grad.float()).abs().max().item()
        us = _time_us(lambda z: fn(z, labels, inv_n), source.clone, args.repeat)
        print(f"{name:24s} {us:8.1f} us  {least_bytes / us / 1e6:5.2f} TB/s  "
              f"loss diff {abs(loss_sum.item() - ref_sum.item()):.2e}  grad max diff {err:.2e}")


if __name__ == "__main__":
    main()
