"""The seed's findings said in words, from the measured rows of a study (never written by hand).

The seed's memory results come down to four claims (its "Overall Memory Trend" and
its checkpointing table): memory grows with the sequence length, the LoRA rank
barely matters, 4-bit < 8-bit < 16-bit, and checkpointing off needs more than on.
Each `Finding` here states one claim, the numbers the study measured for it, and
whether those numbers bear it out; change a row and the sentence changes.

Rows are the store's run dicts (`memtune.store.ResultStore.runs`), each with the
axis values of its table row. An experiment is matched by its one axis
(seq_len, lora_rank, quantization, gradient_checkpointing), not by its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 2**30
MIB = 2**20
# "Barely matters": the peak moves by less than this fraction over the whole rank axis.
BARELY = 0.10
QUANT_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "none": 16}

Point = tuple[dict[str, Any], dict[str, Any]]  # (axis values, stored run)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def measured_peak(row: dict) -> Any:
    """The peak a memory row reports: GPU allocated, else a CPU run's live tensor bytes, else its RSS."""
    for key in ("peak_allocated_bytes", "peak_tensor_bytes", "peak_rss_bytes"):
        value = row.get(key)
        if value is None:
            value = (row.get("metrics") or {}).get(key)
        if _num(value):
            return value
    return None


def fmt_bytes(value: Any) -> str:
    """MiB below a GiB (CPU rows of the tiny model), GiB above; two decimals."""
    if not _num(value):
        return "-"
    return f"{value / GIB:.2f} GiB" if abs(value) >= GIB else f"{value / MIB:.2f} MiB"


def _breakdown(row: dict, key: str) -> Any:
    return ((row.get("metrics") or {}).get("memory_breakdown") or {}).get(key)


def _count(value: Any) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if _num(value) and abs(value) >= div:
            return f"{value / div:.2f}{suffix}"
    return str(int(value)) if _num(value) else "-"


@dataclass(frozen=True)
class Finding:
    component: str   # what goes up (the seed's Overall Memory Trend, first column)
    impact: str      # what the seed says goes up with it
    measured: str    # the numbers behind it, from the rows
    holds: bool      # whether the rows bear the claim out
    sentence: str


def _ok(points: list[Point]) -> list[Point]:
    return [(axes, row) for axes, row in points if row.get("status") == "ok" and _num(measured_peak(row))]


def _seq_len(points: list[Point]) -> Finding | None:
    pts = sorted(_ok(points), key=lambda p: p[1].get("seq_len") or p[0]["seq_len"])
    if len(pts) < 2:
        return None
    lengths = [p[1].get("seq_len") or p[0]["seq_len"] for p in pts]
    peaks = [measured_peak(p[1]) for p in pts]
    acts = [_breakdown(p[1], "activations_and_rest_bytes") for p in pts]
    grows = all(b > a for a, b in zip(peaks, peaks[1:]))
    measured = (f"{' → '.join(map(str, lengths))} tokens: {' → '.join(fmt_bytes(p) for p in peaks)}"
                + (f" (activations and the rest {fmt_bytes(acts[0])} → {fmt_bytes(acts[-1])})"
                   if _num(acts[0]) and _num(acts[-1]) else ""))
    sentence = ("Memory grows with the sequence length: " if grows
                else "Memory did not grow at every step of the sequence length: ") + measured + "."
    return Finding("↑ sequence length", "↑ activation memory", measured, grows, sentence)


def _lora_rank(points: list[Point]) -> Finding | None:
    pts = sorted(_ok(points), key=lambda p: p[0]["lora_rank"])
    if len(pts) < 2:
        return None
    (a_axes, a), (b_axes, b) = pts[0], pts[-1]
    pa, pb = measured_peak(a), measured_peak(b)
    change = (pb - pa) / pa if pa else float("inf")
    ta, tb = a.get("trainable_params"), b.get("trainable_params")
    params = (f"trainable params {_count(ta)} → {_count(tb)} (×{tb / ta:.1f}), " if _num(ta) and _num(tb) and ta
              else "")
    measured = (f"rank {a_axes['lora_rank']} → {b_axes['lora_rank']}: {params}peak {fmt_bytes(pa)} → "
                f"{fmt_bytes(pb)} ({change:+.1%})")
    barely = abs(change) < BARELY
    sentence = (f"The LoRA rank barely matters (under {BARELY:.0%}): " if barely
                else f"The LoRA rank mattered (by {BARELY:.0%} or more): ") + measured + "."
    return Finding("↑ LoRA rank", "↑ trainable params (memory barely)", measured, barely, sentence)


def _quantization(points: list[Point]) -> Finding | None:
    pts = sorted((p for p in _ok(points) if p[0]["quantization"] in QUANT_BITS),
                 key=lambda p: QUANT_BITS[p[0]["quantization"]])
    if len(pts) < 2:
        return None
    bits = [QUANT_BITS[p[0]["quantization"]] for p in pts]
    peaks = [measured_peak(p[1]) for p in pts]
    weights = [_breakdown(p[1], "frozen_weights_bytes") for p in pts]
    ordered = all(b > a for a, b in zip(peaks, peaks[1:]))
    text = " < ".join(f"{n}-bit" for n in bits)
    measured = (", ".join(f"{n}-bit {fmt_bytes(p)}" for n, p in zip(bits, peaks))
                + (" (weights " + ", ".join(fmt_bytes(w) for w in weights) + ")" if all(map(_num, weights)) else ""))
    sentence = (f"{text} in memory: " if ordered else f"The order {text} did not hold: ") + measured + "."
    return Finding("↑ bit precision", "↑ weight size", measured, ordered, sentence)


def _checkpointing(points: list[Point]) -> Finding | None:
    by = {bool(axes["gradient_checkpointing"]): row for axes, row in points if row.get("status") in ("ok", "oom")}
    off, on = by.get(False), by.get(True)
    if off is None or on is None or on.get("status") != "ok" or not _num(measured_peak(on)):
        return None
    if off.get("status") == "oom":
        measured = f"off: out of memory; on: {fmt_bytes(measured_peak(on))}"
        return Finding("checkpointing off", "↑ activation memory (the seed: OOM)", measured, True,
                       f"Checkpointing off ran out of memory where on fit: {measured}.")
    p_off, p_on = measured_peak(off), measured_peak(on)
    if not _num(p_off):
        return None
    more = p_off > p_on
    measured = f"off {fmt_bytes(p_off)}, on {fmt_bytes(p_on)} (×{p_off / p_on:.2f})"
    sentence = ("Checkpointing off needs more memory than on: " if more
                else "Checkpointing off did not need more memory than on: ") + measured + "."
    return Finding("checkpointing off", "↑ activation memory (the seed: OOM)", measured, more, sentence)


_BY_AXIS = {"seq_len": _seq_len, "lora_rank": _lora_rank, "quantization": _quantization,
            "gradient_checkpointing": _checkpointing}


def memory_findings(experiments: list[tuple[str, list[Point]]]) -> list[Finding]:
    """One finding per claim, from the first memory experiment whose only axis is the claim's."""
    found: dict[str, Finding] = {}
    for _kind, points in experiments:
        axes = {k for axes, _ in points for k in axes}
        if len(axes) != 1 or _kind not in ("memory", "result"):
            continue
        key = axes.pop()
        if key in _BY_AXIS and key not in found:
            finding = _BY_AXIS[key](points)
            if finding is not None:
                found[key] = finding
    return [found[k] for k in _BY_AXIS if k in found]


def accuracy_line(title: str, points: list[tuple[str, dict[str, Any]]]) -> str | None:
    """'title: label a → b, label a → b' over the rows that finished with both accuracies."""
    parts = [f"{label} {row['accuracy_before']:.3f} → {row['accuracy_after']:.3f}" for label, row in points
             if row.get("status") == "ok" and _num(row.get("accuracy_before")) and _num(row.get("accuracy_after"))]
    return f"{title}: {'; '.join(parts)}" if parts else None


def trend_table(findings: list[Finding]) -> list[str]:
    """The seed's Overall Memory Trend table, with what this study measured beside each claim."""
    lines = ["| Component | Impact (the seed) | Measured here | Holds |", "|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f.component} | {f.impact} | {f.measured} | {'yes' if f.holds else 'no'} |")
    return lines
