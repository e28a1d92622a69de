"""The comparison's markdown table and PNG, regenerated from all records after every run."""

from __future__ import annotations

import os
from pathlib import Path

from compare_records import (DEFAULT_GRAD_REFERENCE, fmt, gb, latest_records, load_records, loss_agreement,
                             ratio_section, search_summary)
from memtune.config import write_text_atomic
from stacks import BUILTIN_STACKS
from stacks.memtune_stack import is_memtune_row


def _rounds(row: dict) -> str:
    """' (median of 33,220 / 35,856)' for a row merged from rounds, else ''."""
    runs = row.get("tokens_per_s_runs") or []
    return f" (median of {' / '.join(format(v, ',.0f') for v in runs)})" if len(runs) > 1 else ""


def write_reports(out: Path, preset: str, tolerance: float) -> tuple[Path, Path | None]:
    records = load_records(out)
    rows = latest_records([r for r in records if r.get("mode", "fixed") == "fixed"], preset)
    md = out.with_suffix(".md")
    lines = [f"# memtune vs LoRA/QLoRA stacks ({preset})", ""]
    gpu = next((r.get("gpu_name") for r in reversed(rows) if r.get("gpu_name")), None)
    versions = next((r.get("versions") for r in reversed(rows) if r.get("versions")), None)
    lines.append(f"GPU: {gpu or 'none (CPU)'}; versions: "
                 + (", ".join(f"{k} {v}" for k, v in versions.items() if v) if versions else "-"))
    ranks = sorted({int(r.get("lora_rank") or 8) for r in rows}) or [8]
    lora = ", ".join(f"r={k} alpha={2 * k}" for k in ranks)
    lines += ["", f"NF4 double-quant, bf16 compute, LoRA {lora} dropout 0, batch 1, AdamW; "
              "peak memory over the training steps (model included); tokens/s and step time are "
              "medians after warm-up; the newest record per row (a row run in several rounds, "
              "`--repeat`: the median of its rounds' tokens/s and their highest peaks).", ""]
    lines.append("| targets | cap | seq_len | stack | status | peak alloc GB | peak reserved GB | host RSS GB "
                 "| tokens/s | step s | loss step 1 |")
    lines.append("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        status = r.get("status", "?")
        if status != "ok" and r.get("error"):
            status += f" ({str(r['error'])[:60].replace('|', '/')})"
        if r.get("note"):
            status += " (note)"
        lines.append(
            f"| {r.get('lora_targets')} | {r.get('gpu_memory_cap') or '-'} | {r['seq_len']} | {r['stack']} | {status} "
            f"| {gb(r.get('peak_allocated_bytes'))} | {gb(r.get('peak_reserved_bytes'))} "
            f"| {gb(r.get('peak_host_rss_bytes'))} | {fmt(r.get('tokens_per_s'), ',.0f')}{_rounds(r)} "
            f"| {fmt(r.get('step_time_s'), '.3f')} | {fmt(r.get('loss_step1'), '.4f')} |")
    noted = [r for r in rows if r.get("note")]
    if noted:
        lines += [""] + [f"(note) {r['stack']} @ {r['seq_len']}: {r['note']}" for r in noted]
    variants = {}
    for r in records:
        if is_memtune_row(r) and r.get("preset", "r1-1.5b") == preset:
            variants[r["stack"]] = (r.get("stack_args") or "", r.get("date", "")[:16])
    if variants:
        lines += ["", "memtune rows: `memtune train` with the defaults of the code at the row's date, plus:", ""]
        lines += [f"- `{name}` (last run {date}): `{flags or '(no extra flags)'}`"
                  for name, (flags, date) in sorted(variants.items())]
    lines += ratio_section(rows)
    problems = loss_agreement(rows, tolerance)
    lines += ["", "## First-step loss agreement", ""]
    lines += [f"- MISMATCH: {p}" for p in problems] or [f"All stacks agree within {tolerance} at every length."]
    checks = latest_records([r for r in records if r.get("mode") == "grad"], preset)
    if checks:
        lines += ["", "## LoRA gradients against a reference stack (one step from common LoRA weights)", "",
                  "seed runs its 4-bit matmuls in bf16; seed-fp32 is the same model in fp32 throughout.", "",
                  "| targets | seq_len | reference | stack | status | relative error (all LoRA tensors) "
                  "| worst tensor | loss |",
                  "|---|---:|---|---|---|---:|---:|---:|"]
        for r in checks:
            lines.append(f"| {r.get('lora_targets')} | {r['seq_len']} | {r.get('grad_reference', DEFAULT_GRAD_REFERENCE)} "
                         f"| {r['stack']} | {r.get('status')} "
                         f"| {fmt(r.get('grad_rel_error'), '.2e')} | {fmt(r.get('grad_worst_tensor_rel_error'), '.2e')} "
                         f"| {fmt(r.get('loss_step1'), '.4f')} |")
    found = search_summary(records, preset)
    if found:
        lines += ["", "## Longest trainable length (search)", "",
                  "| targets | cap | stack | longest ok | shortest failing |", "|---|---|---|---:|---:|"]
        for (targets, cap, stack), entry in sorted(found.items(), key=lambda kv: str(kv[0])):
            lines.append(f"| {targets} | {cap or '-'} | {stack} | {entry['max_ok'] or 'none'} "
                         f"| {entry['min_fail'] or '-'} |")
    write_text_atomic(md, "\n".join(lines) + "\n")
    png = _plot(out.with_suffix(".png"), rows, preset)
    return md, png


def _plot(path: Path, rows: list[dict], preset: str) -> Path | None:
    """Memory and speed by length for the stacks themselves (memtune's defaults included), and a bar
    chart of every memtune variant at the most measured length: one figure, legend outside the data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    series: dict[tuple, list[dict]] = {}
    for r in ok:
        if r["stack"] in BUILTIN_STACKS:
            series.setdefault((r["stack"], r.get("lora_targets"), r.get("gpu_memory_cap")), []).append(r)
    variants = _variant_rows(ok)
    if not series and not variants:  # only gradient checks (or failures): nothing to draw
        return None
    fig, (ax_mem, ax_tps, ax_var) = plt.subplots(1, 3, figsize=(18, 5.5))
    on_gpu = any(r.get("peak_allocated_bytes") is not None for r in rows)
    markers = "osD^v<>ph*"
    for i, ((stack, targets, cap), group) in enumerate(sorted(series.items(), key=lambda kv: str(kv[0]))):
        group.sort(key=lambda r: r["seq_len"])
        label = f"{stack} ({targets}{', cap ' + cap if cap else ''})"
        xs = [r["seq_len"] for r in group]
        mem = [(r.get("peak_allocated_bytes") or r.get("peak_host_rss_bytes") or 0) / 1e9 for r in group]
        style = dict(marker=markers[i % len(markers)], label=label, linewidth=2.5 if stack == "memtune" else 1.2)
        ax_mem.plot(xs, mem, **style)
        ax_tps.plot(xs, [r["tokens_per_s"] for r in group], **style)
    mem_title, mem_label = ("peak GPU memory", "GB allocated") if on_gpu else ("peak host memory (CPU run)", "GB RSS")
    for ax, title, ylabel in ((ax_mem, mem_title, mem_label), (ax_tps, "throughput", "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({preset})")
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_yscale("log")
    ax_mem.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_mem.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if v in (2, 3, 5, 20, 30, 50) else ""))
    if series:
        ax_tps.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.15), ncol=2, frameon=False)
    _plot_variants(ax_var, variants, mem_label)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write the figure whole or not at all (a temporary file renamed over the old one), and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _variant_rows(ok: list[dict]) -> list[dict]:
    """memtune's rows (defaults and variants), q/v, no cap, at the length with the most of them."""
    rows = [r for r in ok if is_memtune_row(r) and r.get("lora_targets") == "qv" and not r.get("gpu_memory_cap")]
    if not rows:
        return []
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["seq_len"]] = counts.get(r["seq_len"], 0) + 1
    length = max(counts, key=lambda n: (counts[n], -n))
    return sorted((r for r in rows if r["seq_len"] == length), key=lambda r: r["tokens_per_s"])


def _plot_variants(ax, variants: list[dict], mem_label: str) -> None:
    if not variants:
        ax.axis("off")
        return
    names = [r["stack"] + (" *" if r.get("note") else "") for r in variants]
    ax.barh(names, [r["tokens_per_s"] for r in variants], color="tab:blue")
    for y, r in enumerate(variants):
        mem = (r.get("peak_allocated_bytes") or r.get("peak_host_rss_bytes") or 0) / 1e9
        ax.text(r["tokens_per_s"], y, f" {mem:.2f} GB", va="center", fontsize=8)
    ax.set_xlabel(f"tokens / s (labels: {mem_label})")
    ax.set_title(f"memtune rows at {variants[0]['seq_len']} tokens (* memory not valid)", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
