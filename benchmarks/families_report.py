"""The families comparison's table and plot: one row per preset, memtune against the other stack.

The other stack is Unsloth where it trained the family, else transformers + peft + bitsandbytes +
Liger Kernel (`liger`), else plain `seed-autocast`; every row says which. The targets (memtune's peak
allocated at most 0.8x the other's, tokens/s at least 1.1x, memtune's estimate within 5% of its
measured peak) are checked per row and the misses named.
"""

from __future__ import annotations

from pathlib import Path

from compare_records import fmt, gb, latest_records, load_records
from compare_report import save_figure
from memtune.config import write_text_atomic

OTHER_STACKS = ("unsloth", "liger", "seed-autocast")  # in order of preference
MEMORY_TARGET, SPEED_TARGET, ESTIMATE_TARGET = 0.8, 1.1, 0.05


def family_rows(records: list[dict]) -> list[dict]:
    """Per (preset, targets, rank, cap, seq_len): memtune's row, the other stack's row and the ratios."""
    fixed = [r for r in records if r.get("mode", "fixed") == "fixed"]
    out = []
    for preset in dict.fromkeys(r.get("preset") for r in fixed):
        rows = latest_records(fixed, preset)
        keys = dict.fromkeys((r.get("lora_targets"), r.get("lora_rank"), r.get("gpu_memory_cap"), r["seq_len"])
                             for r in rows)
        for key in keys:
            same = {r["stack"]: r for r in rows
                    if (r.get("lora_targets"), r.get("lora_rank"), r.get("gpu_memory_cap"), r["seq_len"]) == key}
            mine = same.get("memtune")
            if mine is None:
                continue
            tried = [same[s] for s in OTHER_STACKS if s in same]
            other = next((r for r in tried if r.get("status") == "ok"), tried[0] if tried else None)
            out.append(_compare(mine, other, [r for r in tried if r is not other]))
    return out


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def _compare(mine: dict, other: dict | None, failed: list[dict]) -> dict:
    ok = mine.get("status") == "ok" and other is not None and other.get("status") == "ok"
    memory = _ratio(mine.get("peak_allocated_bytes"), other.get("peak_allocated_bytes")) if ok else None
    speed = _ratio(mine.get("tokens_per_s"), other.get("tokens_per_s")) if ok else None
    estimate = mine.get("estimate_bytes")
    measured = mine.get("peak_allocated_bytes")
    error = (estimate - measured) / measured if estimate and measured and mine.get("status") == "ok" else None
    misses = []
    if memory is not None and memory > MEMORY_TARGET:
        misses.append(f"memory {memory:.2f}x > {MEMORY_TARGET}x")
    if speed is not None and speed < SPEED_TARGET:
        misses.append(f"speed {speed:.2f}x < {SPEED_TARGET}x")
    if error is not None and abs(error) > ESTIMATE_TARGET:
        misses.append(f"estimate {error:+.1%}")
    if not ok:
        why = [f"{r['stack']} {r.get('status')}" for r in (mine, other) if r and r.get("status") != "ok"]
        misses.append(f"not compared ({', '.join(why) or 'no record of another stack'})")
    return {"family": mine.get("family"), "preset": mine.get("preset"), "seq_len": mine["seq_len"],
            "lora_targets": mine.get("lora_targets"), "lora_rank": mine.get("lora_rank"),
            "gpu_memory_cap": mine.get("gpu_memory_cap"), "memtune": mine, "other": other,
            "other_failed": [f"{r['stack']}: {r.get('status')} ({str(r.get('error', ''))[:80]})" for r in failed],
            "memory_ratio": memory, "speed_ratio": speed, "estimate_error": error, "misses": misses}


def write_reports(out: Path) -> tuple[Path, Path | None]:
    rows = family_rows(load_records(out))
    gpu = next((r["memtune"].get("gpu_name") for r in rows if r["memtune"].get("gpu_name")), None)
    versions = next((r["memtune"].get("versions") for r in rows if r["memtune"].get("versions")), None)
    lines = ["# memtune on every family, against the other stack", "",
             f"GPU: {gpu or 'none (CPU)'}; versions: "
             + (", ".join(f"{k} {v}" for k, v in versions.items() if v) if versions else "-"), "",
             "NF4 double-quant, bf16 compute, LoRA alpha = 2 x rank, dropout 0, batch 1, AdamW, the same saved "
             "random weights and tokens for both stacks; peaks over the training steps, tokens/s the median after "
             f"warm-up. Targets: memory <= {MEMORY_TARGET}x, speed >= {SPEED_TARGET}x, memtune's estimate within "
             f"{ESTIMATE_TARGET:.0%} of its measured peak.", "",
             "| family | preset | tokens | LoRA | other stack | memtune GB alloc / reserved | other GB alloc / "
             "reserved | memory | memtune tok/s | other tok/s | speed | estimate GB | error | misses |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m, o = r["memtune"], r["other"] or {}
        lines.append(
            f"| {r['family']} | {r['preset']} | {r['seq_len']} | {r['lora_targets']} r={r['lora_rank']} "
            f"| {o.get('stack', '-')} | {gb(m.get('peak_allocated_bytes'))} / {gb(m.get('peak_reserved_bytes'))} "
            f"| {gb(o.get('peak_allocated_bytes'))} / {gb(o.get('peak_reserved_bytes'))} "
            f"| {fmt(r['memory_ratio'], '.2f')}x | {fmt(m.get('tokens_per_s'), ',.0f')} "
            f"| {fmt(o.get('tokens_per_s'), ',.0f')} | {fmt(r['speed_ratio'], '.2f')}x "
            f"| {gb(m.get('estimate_bytes'))} | {fmt(r['estimate_error'], '+.1%')} "
            f"| {'; '.join(r['misses']) or 'none'} |")
    failed = [f"- {r['preset']}: {note}" for r in rows for note in r["other_failed"]]
    if failed:
        lines += ["", "Stacks that did not train the family (the row compares against the next one):", "", *failed]
    md = out.with_suffix(".md")
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md, _plot(out.with_suffix(".png"), rows)


def _plot(path: Path, rows: list[dict]) -> Path | None:
    """Memory and speed ratios per family, the targets drawn as lines."""
    rows = [r for r in rows if r["memory_ratio"] is not None]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [f"{r['preset']}\nvs {r['other']['stack']}" for r in rows]
    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, target, title in ((ax_mem, "memory_ratio", MEMORY_TARGET, "peak allocated, memtune / other"),
                                   (ax_tps, "speed_ratio", SPEED_TARGET, "tokens/s, memtune / other")):
        values = [r[key] for r in rows]
        good = [(v <= target) if key == "memory_ratio" else (v >= target) for v in values]
        ax.bar(names, values, color=["tab:green" if g else "tab:red" for g in good])
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}x")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)
