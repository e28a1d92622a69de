"""Where one memtune training step spends its GPU time: the top kernels by self CUDA time.

    python benchmarks/profile_step.py --model deepseek-r1-distill-qwen-1.5b --random-init \
        --data random --seq-len 16384 --no-eval [any memtune train flag] [--profile-out FILE]

Builds the run exactly as `memtune train` does (same config flags), runs
three warm-up steps, profiles one with torch.profiler and prints the table
(also written to --profile-out when given). Memory is not measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from memtune.cli import build_verb_parser, config_from_args
    from memtune.data import iterate_batches
    from memtune.train import setup, train_step

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--profile-out", type=Path, default=None)
    own.add_argument("--rows", type=int, default=30)
    mine, rest = own.parse_known_args(argv)
    parser, _module = build_verb_parser("train")
    cfg = config_from_args(parser.parse_args(rest))
    session = setup(cfg, log=lambda line: print(line, flush=True))
    session.built.model.train()
    batches = iterate_batches(session.bundle, session.cfg, session.cfg.seed)

    def step() -> None:
        train_step(session, batches)
        session.optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=mine.rows, max_name_column_width=70)
    print(table)
    if mine.profile_out:
        mine.profile_out.parent.mkdir(parents=True, exist_ok=True)
        mine.profile_out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
