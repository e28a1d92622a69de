"""The comparison's records: a JSON list appended to after every run, and the rows the reports show.

Earlier records are never dropped; the reports take the newest record per row (the rounds of a
`--repeat` run count as one row, with their median speed and highest peaks).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from memtune.config import write_text_atomic
from stacks.memtune_stack import is_memtune_row

# what --grad-check compares against unless told, and what its records before --grad-reference had
DEFAULT_GRAD_REFERENCE = "seed"


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str))


def load_records(path: Path) -> list[dict]:
    """Earlier records; a file that is not a JSON list is moved aside, never overwritten."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return data
        raise ValueError("not a JSON list")
    except (ValueError, UnicodeDecodeError) as exc:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        path.rename(aside)
        print(f"compare: {path} was unreadable ({exc}); moved to {aside}", file=sys.stderr)
        return []


def append_record(path: Path, record: dict) -> None:
    records = load_records(path)  # re-read: another invocation may have appended meanwhile
    records.append(record)
    write_json_atomic(path, records)


def finish_record(record: dict, code: int | None, log: Path, timeout: float, out: Path, who: str) -> dict:
    """A run's record after its child exited (`code` None: killed at `timeout`): appended to `out`, one line printed."""
    from child_process import tail

    if code is None:
        record.update(status="timeout", error=f"killed after {timeout:.0f}s")
    if record["status"] != "ok":
        record.setdefault("log_tail", tail(log))
    record["log"] = str(log)
    append_record(out, record)
    print(f"{who}: {record['stack']} @ {record['seq_len']}: {summary_line(record)}", flush=True)
    return record


def check_rounds(parser, args) -> None:
    """--steps, --warmup and --repeat as both comparisons take them."""
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")


def median_after_warmup(times: list[float], warmup: int) -> float | None:
    if not times:
        return None
    kept = times[min(warmup, len(times) - 1):]
    return statistics.median(kept)


def summary_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {str(r.get('error', ''))[:200]}"
    return (f"peak {gb(r.get('peak_allocated_bytes'))} GB allocated, {gb(r.get('peak_reserved_bytes'))} GB reserved, "
            f"{fmt(r.get('tokens_per_s'), '.0f')} tok/s, loss1 {fmt(r.get('loss_step1'), '.4f')}")


def gb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _key(r: dict) -> tuple:
    return (r.get("preset"), r.get("mode", "fixed"), r.get("lora_targets"), r.get("lora_rank"), r.get("gpu_memory_cap"),
            r.get("stack"),
            r.get("seq_len"), r.get("grad_reference", DEFAULT_GRAD_REFERENCE) if r.get("mode") == "grad" else None)


def merge_rounds(rounds: list[dict]) -> dict:
    """One row for the rounds of a `--repeat` run: the newest record with the median speed and the highest peaks."""
    row = dict(rounds[-1])
    ok = [r for r in rounds if r.get("status") == "ok" and r.get("tokens_per_s")]
    row["runs"] = len(rounds)
    if len(ok) != len(rounds):
        row["status"] = next(r.get("status") for r in rounds if r.get("status") != "ok")
    if ok:
        row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in ok]
        row["tokens_per_s"] = statistics.median(row["tokens_per_s_runs"])
        steps = [r["step_time_s"] for r in ok if r.get("step_time_s")]
        row["step_time_s"] = statistics.median(steps) if steps else row.get("step_time_s")
        for field in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_host_rss_bytes"):
            values = [r[field] for r in ok if r.get(field) is not None]
            if values:
                row[field] = max(values)
    return row


def latest_records(records: list[dict], preset: str) -> list[dict]:
    """The newest row per (targets, cap, stack, seq_len) for this preset; the rounds of a `--repeat`
    run count as one row (`merge_rounds`)."""
    latest: dict[tuple, dict | tuple] = {}  # a record, or the key of its rounds in `rounds`
    rounds: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("preset", "r1-1.5b") == preset and r.get("stack") and r.get("seq_len"):
            if r.get("repeat_group"):
                group = (_key(r), r["repeat_group"])
                rounds.setdefault(group, []).append(r)
                latest[_key(r)] = group
            else:
                latest[_key(r)] = r
    rows = [merge_rounds(rounds[row]) if isinstance(row, tuple) else row for row in latest.values()]
    return sorted(rows, key=lambda r: (str(r.get("lora_targets")), str(r.get("gpu_memory_cap")), r["seq_len"],
                                       r["stack"]))


def loss_agreement(records: list[dict], tolerance: float) -> list[str]:
    """Stacks whose first-step loss differs from the median of the others at the same length."""
    problems = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("loss_step1") is not None:
            groups.setdefault((r.get("lora_targets"), r.get("gpu_memory_cap"), r["seq_len"]), []).append(r)
    for (targets, cap, seq_len), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(group) < 2:
            continue
        median = statistics.median(r["loss_step1"] for r in group)
        for r in group:
            if abs(r["loss_step1"] - median) > tolerance:
                problems.append(f"{r['stack']} @ {seq_len} ({targets}, cap {cap}): first-step loss "
                                f"{r['loss_step1']:.4f} vs median {median:.4f} (tolerance {tolerance})")
    return problems


def ratio_section(rows: list[dict]) -> list[str]:
    """Each memtune row against the leanest and the fastest other stack at the same length, cap and targets."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("peak_allocated_bytes") and r.get("tokens_per_s"):
            groups.setdefault((r.get("lora_targets"), r.get("gpu_memory_cap"), r["seq_len"]), []).append(r)
    out = []
    for (targets, cap, seq_len), group in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2])):
        others = [r for r in group if not is_memtune_row(r)]
        ours = [r for r in group if is_memtune_row(r)]
        if not others or not ours:
            continue
        lean = min(others, key=lambda r: r["peak_allocated_bytes"])
        fast = max(others, key=lambda r: r["tokens_per_s"])
        for r in sorted(ours, key=lambda r: r["stack"]):
            out.append(f"| {targets} | {cap or '-'} | {seq_len} | {r['stack']} "
                       f"| {r['peak_allocated_bytes'] / lean['peak_allocated_bytes']:.2f}x ({lean['stack']}) "
                       f"| {r['tokens_per_s'] / fast['tokens_per_s']:.2f}x ({fast['stack']}) |")
    if not out:
        return []
    return ["", "## memtune against the other stacks", "",
            "Peak allocated memory as a multiple of the leanest other stack's, tokens/s as a multiple of the "
            "fastest other stack's, at the same length, cap and LoRA targets.", "",
            "| targets | cap | seq_len | memtune row | memory vs leanest other | speed vs fastest other |",
            "|---|---|---:|---|---:|---:|"] + out


def search_summary(records: list[dict], preset: str) -> dict[tuple, dict]:
    """Longest ok length (and shortest failing one) per (targets, cap, stack) over search records."""
    out: dict[tuple, dict] = {}
    for r in records:
        if r.get("mode") != "search" or r.get("preset", "r1-1.5b") != preset:
            continue
        key = (r.get("lora_targets"), r.get("gpu_memory_cap"), r["stack"])
        entry = out.setdefault(key, {"max_ok": 0, "min_fail": None})
        if r.get("status") == "ok":
            entry["max_ok"] = max(entry["max_ok"], r["seq_len"])
        elif entry["min_fail"] is None or r["seq_len"] < entry["min_fail"]:
            entry["min_fail"] = r["seq_len"]
    return out
