"""Where one memtune training step spends its GPU time: the top kernels by self CUDA time.

    python benchmarks/profile_step.py --model deepseek-r1-distill-qwen-1.5b --random-init \
        --data random --seq-len 16384 --no-eval [any memtune train flag] [--profile-out FILE]

Builds the run exactly as `memtune train` does (same config flags), runs
three warm-up steps, times --timed-steps more one by one (to show whether
step times vary, and by how much), profiles one with torch.profiler and
prints the table of GPU kernels, the step's wall time against its GPU busy
time, and the top host-side operators (written to --profile-out when given;
--trace-out also saves a Chrome trace, gzipped). Memory is not measured here.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import time
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
    own.add_argument("--timed-steps", type=int, default=6)
    own.add_argument("--trace-out", type=Path, default=None, help="a .json.gz Chrome trace of the profiled step")
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
    times = []
    for _ in range(mine.timed_steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    lines = [f"step times (s): {' '.join(f'{t:.3f}' for t in times)}"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    lines.append(f"profiled step: {wall * 1e3:.0f} ms wall (with profiler overhead), "
                 f"{busy_us / 1e3:.0f} ms of GPU kernels")
    lines.append(events.table(sort_by="self_cuda_time_total", row_limit=mine.rows, max_name_column_width=70))
    lines.append("host side, by self CPU time:")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    text = "\n".join(lines)
    print(text)
    if mine.profile_out:
        mine.profile_out.parent.mkdir(parents=True, exist_ok=True)
        mine.profile_out.write_text(text + "\n")
    if mine.trace_out:
        raw = mine.trace_out.with_suffix("")  # name.json.gz -> name.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(mine.trace_out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
