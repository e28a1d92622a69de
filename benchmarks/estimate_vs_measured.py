"""Estimated vs measured peak allocated memory on the H200, written to a markdown table.

Sources (all committed under benchmarks/results/):
- h200-study-uncapped.log: the `h200-memory` study without a cap. Its results
  database was lost to a command time-out, so the measured peak is read from
  the study's progress lines (GiB with two decimals: +-0.005 GiB). The
  configuration of each line is recovered by expanding the same study file.
- h200-study-capped/results.sqlite: the same study under a 24 GiB cap (exact
  bytes; OOM rows have no finished peak and are listed without an error).

The estimates are recomputed with the current estimator from each run's
configuration, so the table shows how well today's model predicts those runs.

    python benchmarks/estimate_vs_measured.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memtune.estimate import compare_to_measurements  # noqa: E402
from memtune.store import ResultStore  # noqa: E402
from memtune.study import expand, load_study  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STUDY = ROOT / "benchmarks" / "studies" / "h200-memory.yaml"
LINE = re.compile(r"^\[\d+/\d+ [\d:]+\] (?P<label>.+?) \.\.\. ok [\d.]+s peak (?P<gib>[\d.]+) GiB")
ONLY = ["seq_len", "lora_rank", "quantization", "checkpointing", "techniques", "families"]


def uncapped_rows() -> list[dict]:
    plan = expand(load_study(str(STUDY)), {"random_init": True}, only=ONLY)
    by_label = {run.label: run.config for run in plan.runs}
    rows = []
    for line in (RESULTS / "h200-study-uncapped.log").read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        cfg = by_label[match["label"]]
        rows.append({"config": cfg.to_dict(), "measured_bytes": float(match["gib"]) * 2**30,
                     "label": match["label"]})
    return rows


def capped_rows() -> list[dict]:
    store = ResultStore(RESULTS / "h200-study-capped" / "results.sqlite")
    rows = []
    for run in store.runs():
        metrics = run.get("metrics") or {}
        rows.append({"config": run["config"], "measured_bytes": metrics.get("peak_allocated_bytes")
                     if run["status"] == "ok" else None, "status": run["status"]})
    return rows


def main() -> int:
    parts = [
        "# Estimated vs measured peak allocated memory (H200)",
        "",
        "NVIDIA H200, torch 2.11.0, transformers 5.17.0, peft 0.21.0, bitsandbytes 0.50.2; 2026-11-28;",
        "random weights; 5 steps per run. Estimates from `memtune estimate` (`memtune.estimate`),",
        "recomputed by `benchmarks/estimate_vs_measured.py` from each run's configuration.",
        "",
        "## h200-memory study, no cap (measured peak from the study log, 0.01 GiB resolution)",
        "",
        compare_to_measurements(uncapped_rows()),
        "",
        "## h200-memory study, 24 GiB cap (exact bytes from results.sqlite)",
        "",
        compare_to_measurements(capped_rows()),
        "",
    ]
    out = RESULTS / "estimate-vs-measured-h200.md"
    out.write_text("\n".join(parts))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
