"""`memtune report DIR`: the seed's tables and plots from a results database.

Reads `DIR/results.sqlite` (see `memtune.store`) and writes, into DIR (or --out):

* `report.md`: a header (GPU, package versions, git commit, date, notes such as
  the CPU scaling), then one table per experiment of each study, in the
  seed's shape: memory tables (peak memory, trainable params, step time,
  tokens/s, and the estimate with its error % where the run has one), the
  checkpointing table (OK / OOM with memory), accuracy tables (before and after
  fine-tuning); then failed runs with their messages, and every run.
* `tables/<study>__<experiment>.csv`: the same tables as CSV (memory in GiB,
  two decimals; counts as integers).
* `plots/*.png`: peak memory and tokens/s vs sequence length per quantization,
  and the memory breakdown of each memory run as stacked bars.

Memory is shown in GiB with two decimals; the database keeps bytes.
`--export rows.json|rows.csv` writes every stored row (config and metrics
included) for other tools.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from memtune.config import write_text_atomic
from memtune.errors import UserError
from memtune.findings import accuracy_line, fmt_bytes, measured_peak, memory_findings, trend_table
from memtune.store import DB_NAME, STATUSES, ResultStore

GIB = 2**30
AXIS_NAMES = {
    "seq_len": "Sequence length",
    "lora_rank": "LoRA rank",
    "quantization": "Quantization",
    "gradient_checkpointing": "Gradient checkpointing",
    "lora": "LoRA",
    "offload_activations": "Activation offload",
    "tiled_mlp_chunk": "Tiled MLP chunk",
    "loss": "Loss",
    "optimizer": "Optimizer",
    "batch_size": "Batch size",
    "model": "Model",
}
QUANT_NAMES = {"nf4": "4-bit (nf4)", "fp4": "4-bit (fp4)", "int8": "8-bit", "none": "none (16-bit)"}


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------
def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def gib(value: Any) -> float | None:
    """Bytes -> GiB rounded to two decimals (None stays None)."""
    return round(value / GIB, 2) if _num(value) else None


def fmt_gib(value: Any) -> str:
    return f"{value / GIB:.2f}" if _num(value) else "-"


def fmt_count(value: Any) -> str:
    if not _num(value):
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= div:
            return f"{value / div:.2f}{suffix}"
    return str(int(value))


def fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}" if _num(v) else "-"


def fmt_value(key: str, value: Any) -> str:
    if key == "quantization":
        return QUANT_NAMES.get(value, str(value))
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
@dataclass
class Column:
    header: str
    value: Callable[[dict], Any]               # row -> raw value (CSV)
    fmt: Callable[[Any], str] = str            # raw -> markdown cell


@dataclass
class Table:
    study: str
    experiment: str
    title: str
    kind: str
    description: str
    headers: list[str]
    cells: list[list[str]]                     # markdown cells
    raw: list[list[Any]]                       # CSV values
    hashes: list[str]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in self.cells]
        return "\n".join(lines)

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.headers)
        for row in self.raw:
            writer.writerow(["" if v is None else v for v in row])
        return buf.getvalue()


def _metric(name: str) -> Callable[[dict], Any]:
    return lambda r: r.get(name)


def _peak_gpu(row: dict) -> Any:
    return row.get("peak_allocated_bytes")


def mib(value: Any) -> float | None:
    """Bytes -> MiB rounded to two decimals: a CPU run's tensor memory (the tiny model's are a few MiB)."""
    return round(value / 2**20, 2) if _num(value) else None


def estimate_error_pct(row: dict) -> float | None:
    """(estimate - measured) / measured, for a finished run (an OOM's peak is not its need).

    Measured: the GPU's peak allocated, or on a CPU the peak of live tensor bytes (the process
    RSS is not what the estimate predicts)."""
    est = row.get("estimate_total_bytes")
    measured = row.get("peak_allocated_bytes")
    if not _num(measured):
        measured = row.get("peak_tensor_bytes")
    if row.get("status") != "ok" or not (_num(est) and _num(measured)) or measured == 0:
        return None
    return round((est - measured) / measured * 100, 1)


def _status_cell(row: dict) -> str:
    return row.get("status") or "pending"


def _result_cell(row: dict) -> str:
    status = row.get("status")
    if status is None:
        return "pending"
    label = {"ok": "OK", "oom": "OOM", "error": "ERROR", "timeout": "TIMEOUT"}[status]
    peak = measured_peak(row)
    return f"{label} ({fmt_bytes(peak)})" if _num(peak) and status in ("ok", "oom") else label


def _memory_columns(gpu: bool, with_estimate: bool) -> list[Column]:
    cols = []
    error = Column("Estimate error %", estimate_error_pct, lambda v: f"{v:+.1f}" if _num(v) else "-")
    if gpu:
        cols += [Column("Peak allocated (GiB)", lambda r: gib(r.get("peak_allocated_bytes")), _fmt_g),
                 Column("Peak reserved (GiB)", lambda r: gib(r.get("peak_reserved_bytes")), _fmt_g)]
        if with_estimate:
            cols += [Column("Estimate (GiB)", lambda r: gib(r.get("estimate_total_bytes")), _fmt_g), error]
        return cols
    cols += [Column("Peak tensor memory (CPU, MiB)", lambda r: mib(r.get("peak_tensor_bytes")), _fmt_g)]
    if with_estimate:
        cols += [Column("Estimate (MiB)", lambda r: mib(r.get("estimate_total_bytes")), _fmt_g), error]
    cols += [Column("Peak RSS (GiB)", lambda r: gib(r.get("peak_rss_bytes")), _fmt_g)]
    return cols


def _fmt_g(value: Any) -> str:
    return f"{value:.2f}" if _num(value) else "-"


_SPEED = [Column("Step time (s)", _metric("step_time_s"), fmt_float(3)),
          Column("Tokens/s", _metric("tokens_per_s"), fmt_float(1))]
_PARAMS = Column("Trainable params", _metric("trainable_params"), fmt_count)


def _columns(kind: str, gpu: bool, with_estimate: bool) -> list[Column]:
    if kind == "result":
        # the estimate too: an OOM row shows none, a finished one its error (every CPU row has one)
        return [Column("Result", _result_cell), *_memory_columns(gpu, with_estimate), *_SPEED]
    if kind == "accuracy":
        return [Column("Status", _status_cell),
                Column("Acc. before FT", _metric("accuracy_before"), fmt_float(3)),
                Column("Acc. after FT", _metric("accuracy_after"), fmt_float(3)),
                Column("Eval examples", _metric("eval_examples"), lambda v: str(v) if _num(v) else "-"),
                _PARAMS, Column("Loss first -> last", lambda r: _loss_text(r)), *_SPEED]
    return [Column("Status", _status_cell), *_memory_columns(gpu, with_estimate), _PARAMS, *_SPEED]


def _prediction_columns(predictions: dict[str, dict], entries: list[dict]) -> list[Column]:
    """Beside a shrunk CPU row: the estimator's GPU prediction for the study's model at full size."""
    known = [predictions[e["config_hash"]] for e in entries if e["config_hash"] in predictions]
    if not known:
        return []
    model = known[0]["model"]

    def get(key: str) -> Callable[[dict], Any]:
        return lambda r: (predictions.get(r.get("config_hash", "")) or {}).get(key)

    return [Column("Full-size seq_len", get("seq_len"), lambda v: str(v) if _num(v) else "-"),
            Column(f"Predicted for {model}, full size (GPU GiB)", lambda r: gib(get("total_bytes")(r)), _fmt_g)]


def _loss_text(row: dict) -> str:
    a, b = row.get("loss_first"), row.get("loss_last")
    return f"{a:.3f} -> {b:.3f}" if _num(a) and _num(b) else "-"


def _axis_cell(key: str, value: Any, row: dict) -> tuple[str, Any]:
    text = fmt_value(key, value)
    if key == "seq_len" and _num(row.get("seq_len")) and row.get("seq_len") != value:
        text += f" (ran {row['seq_len']})"  # capped by the data or the model
    return text, value


def build_tables(store: ResultStore, study: dict[str, Any]) -> list[Table]:
    name = study["name"]
    runs = {r["config_hash"]: r for r in store.runs(name)}
    plan = store.plan(name)
    gpu = any(_num(r.get("peak_allocated_bytes")) for r in runs.values())
    tables = []
    for exp in study["spec"].get("experiments", []):
        entries = sorted((e for e in plan if e["experiment"] == exp["name"]), key=lambda e: e["position"])
        if not entries:
            continue
        rows = [runs.get(e["config_hash"], {}) for e in entries]
        with_estimate = any(_num(r.get("estimate_total_bytes")) for r in rows)
        has_labels = bool(exp.get("variants")) and any(v.get("label") for v in exp["variants"])
        axis_keys = list(exp.get("grid", {})) if has_labels else \
            list(dict.fromkeys(k for e in entries for k in e["axes"]))
        headers = (["Setting"] if has_labels else []) + [AXIS_NAMES.get(k, k) for k in axis_keys]
        cols = _columns(exp.get("kind", "memory"), gpu, with_estimate)
        if exp.get("kind", "memory") in ("memory", "result"):
            cols += _prediction_columns(study["spec"].get("full_size_predictions") or {}, entries)
        headers += [c.header for c in cols]
        cells, raw = [], []
        for entry, row in zip(entries, rows):
            c_row: list[str] = []
            r_row: list[Any] = []
            if has_labels:
                c_row.append(entry["label"])
                r_row.append(entry["label"])
            for key in axis_keys:
                text, value = _axis_cell(key, entry["axes"].get(key), row)
                c_row.append(text)
                r_row.append(value)
            for col in cols:
                value = col.value(row) if row else None
                c_row.append(col.fmt(value) if value is not None else ("pending" if not row and col is cols[0]
                                                                        else "-"))
                r_row.append(value if value is not None else ("pending" if not row and col is cols[0] else None))
            cells.append(c_row)
            raw.append(r_row)
        tables.append(Table(study=name, experiment=exp["name"], title=exp.get("title") or exp["name"],
                            kind=exp.get("kind", "memory"), description=exp.get("description", ""),
                            headers=headers, cells=cells, raw=raw, hashes=[e["config_hash"] for e in entries]))
    return tables


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------
_PLOT_IGNORE = {"out", "seq_len", "quantization", "data", "eval"}


def ordered_plan(store: ResultStore, study: dict[str, Any]) -> list[dict]:
    """The study's plan rows, experiments in the study's order."""
    order = {e["name"]: i for i, e in enumerate(study["spec"].get("experiments", []))}
    return sorted(store.plan(study["name"]), key=lambda p: (order.get(p["experiment"], len(order)),
                                                            p["experiment"], p["position"]))


def _memory_rows(store: ResultStore, study: dict[str, Any]) -> list[dict]:
    plan = ordered_plan(store, study)
    kinds = {e["name"]: e.get("kind", "memory") for e in study["spec"].get("experiments", [])}
    hashes = {p["config_hash"] for p in plan if kinds.get(p["experiment"]) in ("memory", "result")}
    label = {}
    for p in plan:
        label.setdefault(p["config_hash"], f"{p['experiment']}: {p['label']}")
    rows = []
    for r in store.runs(study["name"]):
        if r["config_hash"] in hashes and r["status"] == "ok":
            rows.append({**r, "label": label.get(r["config_hash"], r["config_hash"])})
    return rows


def _closest(rows: list[dict], reference: dict[str, Any]) -> dict:
    def distance(row: dict) -> int:
        cfg = row["config"]
        return sum(1 for k, v in cfg.items() if k not in _PLOT_IGNORE and k in reference and reference[k] != v)
    return min(rows, key=distance)


def write_plots(store: ResultStore, study: dict[str, Any], plot_dir: Path) -> list[tuple[str, Path]]:
    """PNG plots for the study; returns (caption, path) pairs. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = _memory_rows(store, study)
    if not rows:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    reference = study["spec"].get("reference") or study["spec"].get("base") or {}
    gpu = any(_num(r.get("peak_allocated_bytes")) for r in rows)
    tensor = not gpu and any(_num(r.get("peak_tensor_bytes")) for r in rows)
    mem_label = ("peak allocated GPU memory (GiB)" if gpu else "peak tensor memory, CPU (MiB)" if tensor
                 else "peak process RSS (GiB)")
    mem_scale, unit = (2**20, "MiB") if tensor else (GIB, "GiB")
    out: list[tuple[str, Path]] = []

    series: dict[str, dict[int, dict]] = {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        length = r.get("seq_len") or r["config"].get("seq_len")
        groups.setdefault((r["config"].get("quantization"), int(length)), []).append(r)
    for (quant, length), members in groups.items():
        series.setdefault(quant, {})[length] = _closest(members, reference)

    for metric, ylabel, fname, caption in (
        (measured_peak, mem_label, "memory_vs_seq_len.png", "Peak memory vs sequence length, per quantization"),
        (lambda r: r.get("tokens_per_s"), "tokens/s", "tokens_per_s_vs_seq_len.png",
         "Training throughput vs sequence length, per quantization"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = False
        order = list(QUANT_NAMES)
        for quant, points in sorted(series.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                                   else len(order), str(kv[0]))):
            xs = sorted(points)
            ys = [metric(points[x]) for x in xs]
            pairs = [(x, y) for x, y in zip(xs, ys) if _num(y)]
            if not pairs:
                continue
            scale = mem_scale if metric is measured_peak else 1
            ax.plot([p[0] for p in pairs], [p[1] / scale for p in pairs], marker="o",
                    label=QUANT_NAMES.get(quant, str(quant)))
            drawn = True
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{study['name']}: {caption.lower()}")
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = plot_dir / f"{study['name']}__{fname}"
            fig.savefig(path, dpi=110)
            out.append((caption, path))
        plt.close(fig)

    bars = [r for r in rows if isinstance(r["metrics"].get("memory_breakdown"), dict)][:40]
    if bars:
        components: list[str] = []
        for r in bars:
            components += [k for k in r["metrics"]["memory_breakdown"] if k not in components]
        fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(bars) + 2), 4.8))
        bottom = [0.0] * len(bars)
        for comp in components:
            values = [(r["metrics"]["memory_breakdown"].get(comp) or 0) / mem_scale for r in bars]
            ax.bar(range(len(bars)), values, bottom=bottom, label=comp.removesuffix("_bytes"))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([r["label"] for r in bars], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"{study['name']}: memory breakdown per run")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"{study['name']}__memory_breakdown.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(("Memory breakdown per run (stacked)", path))
    return out


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------
def _distinct(values: list[Any]) -> list[Any]:
    return [v for v in dict.fromkeys(v for v in values if v)]


def _header(store: ResultStore, studies: list[dict], runs: list[dict]) -> list[str]:
    gpus = _distinct([r.get("gpu_name") for r in runs])
    devices = _distinct([r.get("device") for r in runs])
    commits = _distinct([r.get("git_commit") for r in runs])
    versions: dict[str, list[str]] = {}
    for r in runs:
        for k, v in (r.get("versions") or {}).items():
            if v and str(v) not in versions.setdefault(k, []):
                versions[k].append(str(v))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"- Generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Results: `{store.path}`",
        _model_line(runs),
        f"- GPU: {', '.join(gpus) if gpus else 'none (' + (', '.join(devices) or 'cpu') + ')'}",
        "- Versions: " + (", ".join(f"{k} {'/'.join(v)}" for k, v in versions.items()) or "-"),
        f"- Git commit: {', '.join(c[:12] for c in commits) if commits else '-'}",
        f"- Runs: {len(runs)} (" + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s)) + ")",
    ]
    if runs:
        lines.append(f"- Run dates: {min(r['started_at'] for r in runs)} .. {max(r['finished_at'] for r in runs)}")
    for study in studies:
        for note in study.get("notes", []):
            lines.append(f"- Note ({study['name']}): {note}")
    return lines


def _model_line(runs: list[dict]) -> str:
    """Which model the rows ran: the header must not claim another."""
    models: dict[str, list[dict]] = {}
    for r in runs:
        cfg = r.get("config") or {}
        name = str(cfg.get("model", "?")) + (" (random weights)" if cfg.get("random_init") else "")
        models.setdefault(name, []).append(r)
    parts = []
    for name, rows in models.items():
        # the model's own parameters: a LoRA row's total counts its adapters too
        sizes = _distinct([r["total_params"] - (r.get("trainable_params") or 0 if (r.get("config") or {}).get("lora")
                                                else 0) for r in rows if _num(r.get("total_params"))])
        size = f", {fmt_count(sizes[0])} params" if len(sizes) == 1 else ""
        parts.append(f"{name}{size}: {'every row' if len(models) == 1 else f'{len(rows)} runs'}")
    return "- Model that ran: " + ("; ".join(parts) if parts else "-")


def _experiment_points(store: ResultStore, study: dict[str, Any]) -> list[tuple[dict, list[dict], list[dict]]]:
    """(experiment, plan entries, stored rows) in the study's order."""
    runs = {r["config_hash"]: r for r in store.runs(study["name"])}
    plan = store.plan(study["name"])
    out = []
    for exp in study["spec"].get("experiments", []):
        entries = sorted((e for e in plan if e["experiment"] == exp["name"]), key=lambda e: e["position"])
        out.append((exp, entries, [runs.get(e["config_hash"], {}) for e in entries]))
    return out


def findings_section(store: ResultStore, study: dict[str, Any]) -> list[str]:
    """The first lines of a study's report: its findings in words, with the numbers, from its rows."""
    points = _experiment_points(store, study)
    memory = memory_findings([(exp.get("kind", "memory"), [(e["axes"], r) for e, r in zip(entries, rows)])
                              for exp, entries, rows in points])
    accuracy = [accuracy_line(exp.get("title") or exp["name"], [(e["label"], r) for e, r in zip(entries, rows)])
                for exp, entries, rows in points if exp.get("kind") == "accuracy"]
    accuracy = [line for line in accuracy if line]
    if not memory and not accuracy:
        return []
    cpu = any(_num(r.get("peak_tensor_bytes")) for _, _, rows in points for r in rows)
    lines = ["## What this study found", ""]
    if memory:
        lines += [f"- {f.sentence}" for f in memory]
        lines += ["", "Overall memory trend (the seed's table; measured: "
                  + ("peak live tensor memory on the CPU" if cpu else "peak allocated GPU memory") + "):", ""]
        lines += trend_table(memory)
        lines.append("")
    if accuracy:
        lines += ["Accuracy before → after fine-tuning:", ""] + [f"- {line}" for line in accuracy] + [""]
    return lines


def render_report(store: ResultStore, out_dir: Path, study: str | None = None,
                  plots: bool = True) -> tuple[str, list[Table]]:
    studies = store.studies()
    if study is not None:
        studies = [s for s in studies if s["name"] == study]
        if not studies:
            known = ", ".join(s["name"] for s in store.studies()) or "none"
            raise UserError(f"--study: no study {study!r} in {store.path} (studies: {known})")
    runs = store.runs(study) if study else store.runs()
    title = f"memtune study: {', '.join(s['name'] for s in studies)}" if studies else "memtune results"
    lines = [f"# {title}", ""] + _header(store, studies, runs) + [""]
    all_tables: list[Table] = []
    for s in studies:
        if len(studies) > 1:
            lines += [f"## Study {s['name']}", ""]
        lines += findings_section(store, s)
        if s["spec"].get("description"):
            lines += [s["spec"]["description"], ""]
        tables = build_tables(store, s)
        all_tables += tables
        for t in tables:
            lines += [f"### {t.title}", ""]
            if t.description:
                lines += [t.description.strip(), ""]
            lines += [t.markdown(), ""]
            lines += [f"CSV: `tables/{_csv_name(t)}`", ""]
        if plots:
            pictures = write_plots(store, s, out_dir / "plots")
            if pictures:
                lines += ["### Plots", ""]
                for caption, path in pictures:
                    lines += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]
    lines += _failed_section(runs)
    lines += _all_runs_section(store, runs, studies)
    return "\n".join(lines).rstrip() + "\n", all_tables


def _csv_name(table: Table) -> str:
    return f"{table.study}__{table.experiment}.csv"


def _failed_section(runs: list[dict]) -> list[str]:
    failed = [r for r in runs if r["status"] in ("error", "timeout", "oom") and r.get("error")]
    if not failed:
        return []
    lines = ["## Runs that did not finish", ""]
    for r in failed:
        message = r["error"].strip().splitlines()
        lines.append(f"- `{r['config_hash']}` ({', '.join(r['experiments'])}): **{r['status']}**: "
                     f"{_md_escape(message[-1][:300]) if message else ''}")
    return lines + [""]


def _all_runs_section(store: ResultStore, runs: list[dict], studies: list[dict]) -> list[str]:
    labels: dict[str, str] = {}
    for s in studies:
        for p in ordered_plan(store, s):
            labels.setdefault(p["config_hash"], f"{p['experiment']}: {p['label']}")
    headers = ["Run", "Config hash", "Status", "Peak memory", "Step time (s)", "Tokens/s", "Elapsed (s)",
               "Attempts"]
    lines = ["## All runs", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in runs:
        cells = [labels.get(r["config_hash"], ", ".join(r["experiments"])), f"`{r['config_hash']}`", r["status"],
                 fmt_bytes(measured_peak(r)), fmt_float(3)(r.get("step_time_s")), fmt_float(1)(r.get("tokens_per_s")),
                 fmt_float(1)(r.get("elapsed_s")), str(r.get("attempts", 1))]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return lines + [""]


def write_report(store: ResultStore, out_dir: str | Path, study: str | None = None, plots: bool = True) -> Path:
    """Write report.md, tables/*.csv and plots/*.png into out_dir; return report.md's path."""
    out_dir = Path(out_dir)
    text, tables = render_report(store, out_dir, study=study, plots=plots)
    for table in tables:
        write_text_atomic(out_dir / "tables" / _csv_name(table), table.csv_text())
    path = out_dir / "report.md"
    write_text_atomic(path, text)
    return path


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
EXPORT_SCALARS = ("config_hash", "study", "status", "error", "peak_allocated_bytes", "peak_reserved_bytes",
                  "peak_rss_bytes", "peak_tensor_bytes", "step_time_s", "tokens_per_s", "tokens_per_step", "trainable_params",
                  "total_params", "accuracy_before", "accuracy_after", "eval_examples", "seq_len", "loss_first",
                  "loss_last", "estimate_total_bytes", "gpu_name", "device", "git_commit", "run_dir", "exit_code",
                  "attempts", "started_at", "finished_at", "elapsed_s", "wall_time_s")


def export_rows(store: ResultStore, path: str | Path, study: str | None = None) -> int:
    path = Path(path)
    rows = store.runs(study) if study else store.runs()
    if path.suffix.lower() == ".json":
        write_text_atomic(path, json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    elif path.suffix.lower() == ".csv":
        config_keys = list(dict.fromkeys(k for r in rows for k in r["config"]))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*EXPORT_SCALARS, "experiments", *(f"config.{k}" for k in config_keys), "versions",
                         "metrics"])
        for r in rows:
            cfg = r["config"]
            writer.writerow([*("" if r.get(k) is None else r.get(k) for k in EXPORT_SCALARS),
                             json.dumps(r["experiments"]),
                             *(json.dumps(cfg[k]) if isinstance(cfg.get(k), (list, dict)) else cfg.get(k, "")
                               for k in config_keys),
                             json.dumps(r["versions"], sort_keys=True), json.dumps(r["metrics"], sort_keys=True)])
        write_text_atomic(path, buf.getvalue())
    else:
        raise UserError(f"--export: expected a file name ending in .json or .csv; got {str(path)!r}")
    return len(rows)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="DIR_OR_DB",
                        help=f"a study directory (with {DB_NAME}) or the database file itself")
    parser.add_argument("--study", help="only this study (default: every study in the database)")
    parser.add_argument("--out", metavar="DIR", help="where report.md, tables/ and plots/ go "
                                                     "(default: next to the database)")
    parser.add_argument("--export", metavar="FILE", help="also write every stored row to FILE (.json or .csv)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")


def run(args: argparse.Namespace) -> int:
    source = Path(args.results)
    if not source.exists():
        raise UserError(f"{source}: not found (expected a study directory or {DB_NAME})")
    with ResultStore(source, create=False) as store:
        out_dir = Path(args.out) if args.out else store.path.parent
        path = write_report(store, out_dir, study=args.study, plots=not args.no_plots)
        print(f"report: {path}")
        if args.export:
            n = export_rows(store, args.export, study=args.study)
            print(f"exported {n} rows: {args.export}")
    return 0
