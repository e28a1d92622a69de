"""Run a list of `memtune train` configurations, each in its own process, and collect their metrics.

    python benchmarks/run_configs.py --out results.json --steps 6 \
        "L1024: --model deepseek-r1-distill-qwen-1.5b --random-init --data random --seq-len 1024" ...

Each argument is `NAME: FLAGS`. Every run gets a fresh process (clean peaks);
a failure or out-of-memory is recorded and the next run goes on. Prints a
short table last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
KEEP = ("status", "seq_len", "trainable_params", "total_params", "peak_allocated_bytes", "peak_reserved_bytes",
        "peak_rss_bytes", "step_time_s", "tokens_per_s", "mfu", "loss_first", "loss_last", "memory_breakdown",
        "estimate", "gpu_name", "versions", "git_commit", "finished_at", "error")


def run_one(name: str, flags: str, steps: int, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "memtune", "train", *shlex.split(flags), "--steps", str(steps),
               "--quiet", "--out", tmp]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": name, "flags": flags, "status": "timeout", "wall_s": timeout}
        metrics_file = Path(tmp) / "metrics.json"
        record = {"name": name, "flags": flags, "exit_code": proc.returncode,
                  "wall_s": round(time.perf_counter() - start, 1)}
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            record.update({k: metrics[k] for k in KEEP if k in metrics})
        else:
            record.update(status="error", error=proc.stderr.strip().splitlines()[-5:])
        return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="NAME: FLAGS")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args()
    records = []
    for i, spec in enumerate(args.runs, 1):
        name, _, flags = spec.partition(":")
        record = run_one(name.strip(), flags.strip(), args.steps, args.timeout)
        records.append(record)
        Path(args.out).write_text(json.dumps(records, indent=1))
        alloc = record.get("peak_allocated_bytes")
        est = (record.get("estimate") or {}).get("total_bytes")
        print(f"[{i}/{len(args.runs)}] {name:<24} {record['status']:<7} "
              f"alloc {alloc / GIB if alloc else float('nan'):6.2f} GiB  est {est / GIB if est else float('nan'):6.2f} GiB  "
              f"{record.get('tokens_per_s', float('nan')):9.0f} tok/s  {record.get('wall_s')}s", flush=True)
        if record["status"] not in ("ok", "oom"):
            print("   ", record.get("error"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
