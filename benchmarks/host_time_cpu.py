"""Host-side time of a training step, measured where compute is negligible: the tiny-deep-test
shape (28 layers like the 1.5B model, hidden 64) on a CPU, one thread, NF4, 1024 tokens.

What is left of a step there is mostly per-call work (Python, dispatch, bitsandbytes' layers),
the part that made the 16384-token H200 step wait on the host. It compares the MLP untiled
and tiled in 4 chunks, each with and without --dequantize-once: the median of 7 step times after
3 (noisy on a shared 2-core machine: +-15% between runs) and the Python function calls of one
more step (cProfile; the same in every run).

    python benchmarks/host_time_cpu.py [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = (["--tiled-mlp-chunk", "256"], ["--tiled-mlp-chunk", "256", "--dequantize-once"],
            ["--tiled-mlp-chunk", "0"], ["--tiled-mlp-chunk", "0", "--dequantize-once"])


def step_times(model_dir: Path, flags: list[str], steps: int = 10) -> tuple[list[float], int]:
    from memtune.cli import build_verb_parser, config_from_args
    from memtune.data import iterate_batches
    from memtune.train import setup, train_step

    parser, _module = build_verb_parser("train")
    cfg = config_from_args(parser.parse_args(["--model", str(model_dir), "--data", "random", "--seq-len", "1024",
                                              "--no-eval", "--batch-size", "1", "--lora-dropout", "0", *flags]))
    session = setup(cfg, log=lambda line: None)
    batches = iterate_batches(session.bundle, session.cfg, 0)
    session.built.model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(session, batches)
        session.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.enable()
    train_step(session, batches)
    profiler.disable()
    session.optimizer.zero_grad(set_to_none=True)
    return times, pstats.Stats(profiler).total_calls


def main(argv: list[str] | None = None) -> int:
    import torch

    from shared_model import prepare_model_dir
    from memtune.provenance import now_iso

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model_dir = prepare_model_dir("tiny-deep-test", Path(tempfile.gettempdir()) / "memtune-compare")
    lines = [f"# host time per step, tiny-deep-test (28 layers, hidden 64), NF4, 1024 tokens, 1 CPU thread, "
             f"{now_iso()[:10]}", "", "| flags | median step s | Python calls a step | steps after warm-up |", "|---|---:|---:|---|"]
    for flags in VARIANTS:
        times, calls = step_times(model_dir, flags)
        times = times[3:]
        lines.append(f"| `{' '.join(flags)}` | {statistics.median(times):.3f} | {calls:,d} "
                     f"| {' '.join(f'{t:.3f}' for t in times)} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
