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
import bisect
import gzip
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


# kernel name -> what it is, first match wins (cuBLAS/cuDNN/Triton/ATen/bitsandbytes names on Hopper)
_CATEGORIES = (
    ("attention", re.compile(r"sdpa|flash|fmha|attention", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|sm90_xmma|wgmma|splitK", re.I)),
    ("dequantize", re.compile(r"dequant", re.I)),
    ("compiled (triton)", re.compile(r"^triton", re.I)),
    ("copy / cast", re.compile(r"copy|cat_|CatArray|direct_copy", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("elementwise", re.compile(r"elementwise", re.I)),
)


def stream_summary(trace_path: Path) -> str:
    """GPU time per stream from a Chrome trace: busy, idle gaps on the compute stream, kernel categories.

    The compute stream is the one with the most kernel time; its idle time between the step's first
    and last kernel is time the GPU waited on the host (or on a copy it had to wait for).
    """
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return "no GPU events in the trace"
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for event in kernels:
        by_stream[int(event.get("args", {}).get("stream", -1))].append(event)
    lines = ["GPU streams (ms): stream, kernels, busy, first-to-last span, idle inside the span"]
    compute = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s] if e["cat"] == "kernel"))
    for stream, items in sorted(by_stream.items()):
        items.sort(key=lambda e: e["ts"])
        busy, end = 0.0, None
        for e in items:  # union of intervals
            start, stop = e["ts"], e["ts"] + e["dur"]
            if end is None or start >= end:
                busy += stop - start
                end = stop
            elif stop > end:
                busy += stop - end
                end = stop
        span = items[-1]["ts"] + items[-1]["dur"] - items[0]["ts"]
        mark = "  <- compute" if stream == compute else ""
        lines.append(f"  {stream:>4} {len(items):>6} {busy / 1e3:9.1f} {span / 1e3:9.1f} {(span - busy) / 1e3:9.1f}{mark}")
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in by_stream[compute]:
        name = e.get("name", "")
        category = "memcpy" if e["cat"] != "kernel" else next(
            (label for label, pattern in _CATEGORIES if pattern.search(name)), "other")
        totals[category][0] += e["dur"]
        totals[category][1] += 1
    lines.append("compute-stream kernels by category (ms, count):")
    for label, (dur, count) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {label:<20} {dur / 1e3:8.1f} {count:>6}")
    try:  # a trace format this parser does not know must not cost the rest of the profile
        lines.append(idle_summary(events, by_stream[compute]))  # sorted by time in the loop above
    except (KeyError, TypeError, ValueError) as err:
        lines.append(f"compute-stream idle: not read from this trace ({type(err).__name__}: {err})")
    return "\n".join(lines)


# host-side ranges that name a phase of the step (autograd Functions, modules, the optimizer)
_PHASE = re.compile(r"Offloaded|TiledMLP|CrossEntropy|Optimizer|clip_grad|Frozen4bit|MatMul4Bit|"
                    r"evaluate_function|nn\.Module", re.I)


def idle_summary(events: list[dict], compute: list[dict], min_gap_us: float = 5.0) -> str:
    """Why the compute stream sat idle: each gap before a kernel is put on the host when the kernel
    was launched after the previous one had finished (the GPU ran out of queued work), else on a wait
    (an event or another stream the kernel depended on). Host gaps are grouped by the innermost
    phase-naming host range around the late launch.
    """
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")
                     and "dur" in e and _PHASE.search(e.get("name", ""))), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ranges]
    host: dict[str, float] = defaultdict(float)
    waited = 0.0
    for prev, kernel in zip(compute, compute[1:]):
        gap = kernel["ts"] - (prev["ts"] + prev["dur"])
        if gap < min_gap_us:
            continue
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None or launch["ts"] + launch.get("dur", 0) < prev["ts"] + prev["dur"]:
            waited += gap  # queued in time: it waited on something
            continue
        phase = "(no phase range)"
        last = bisect.bisect_right(starts, launch["ts"]) - 1
        for i in range(last, max(-1, last - 5000), -1):  # innermost first; bounded, for long traces
            r = ranges[i]
            if r.get("tid") == launch.get("tid") and r["ts"] + r["dur"] >= launch["ts"]:
                phase = r["name"][:70]
                break
        host[phase] += gap
    lines = [f"compute-stream idle (ms): host launched late {sum(host.values()) / 1e3:.1f}, "
             f"waited on a dependency {waited / 1e3:.1f}; host-late idle by the range it was launched in:"]
    lines += [f"  {ms / 1e3:8.1f}  {name}" for name, ms in sorted(host.items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(lines)


def sync_report(step) -> str:
    """Where one step makes the host wait for the GPU: call sites of synchronizing CUDA calls, by count.

    torch's sync debug mode warns at every synchronizing call (an `.item()`, a copy from pageable
    memory, a `nonzero`); each one drains the GPU's queue, which then idles while the host launches
    the next kernels. The innermost frame outside torch names the caller; warnings raised on the
    autograd engine's thread reach Python at the end of backward, so they name that call instead.
    """
    import traceback
    import warnings

    import torch

    sites: dict[str, int] = defaultdict(int)

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "/warnings.py" not in f.filename]
        where = f"{frames[-1].filename.split('/src/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        sites[where] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lines = [f"synchronizing calls in one step: {sum(sites.values())}"]
    lines += [f"  {count:>5}  {where}" for where, count in sorted(sites.items(), key=lambda kv: -kv[1])[:15]]
    return "\n".join(lines)


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
    lines.append(sync_report(step))
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
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        lines.append(stream_summary(raw))
        if mine.trace_out:
            mine.trace_out.parent.mkdir(parents=True, exist_ok=True)
            with open(raw, "rb") as src, gzip.open(mine.trace_out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    text = "\n".join(lines)
    print(text)
    if mine.profile_out:
        mine.profile_out.parent.mkdir(parents=True, exist_ok=True)
        mine.profile_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
