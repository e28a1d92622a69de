"""Estimated vs measured peak allocated memory on the H200, written to a markdown table.

Sources (all committed under benchmarks/results/):
- h200-study-uncapped/results.sqlite: the `h200-memory` study without a cap.
- h200-study-capped/results.sqlite: the same study under a 24 GiB cap (OOM rows
  have no finished peak and are listed without an error).
- compare-h200.json: memtune's rows (and its variants') of the side-by-side
  comparison measured from 2026-11-28T23:00Z on (bf16 LoRA matmuls and later).
  Their configuration is rebuilt from the recorded command line over the
  defaults of that time (`COMPARE_DEFAULTS_SINCE`), with the preset of the same
  shape as the model.

Stored configurations that predate a field are read with the value the run
had (`memtune.config.from_stored_dict`). The estimates are recomputed with the
current estimator, so the table shows how well today's model predicts them.

    python benchmarks/estimate_vs_measured.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memtune.config import FIELD_NAMES as FIELDS  # noqa: E402
from memtune.estimate import compare_to_measurements  # noqa: E402
from memtune.store import ResultStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def study_rows(name: str) -> list[dict]:
    store = ResultStore(RESULTS / name / "results.sqlite")
    rows = []
    for run in store.runs():
        metrics = run.get("metrics") or {}
        rows.append({"config": run["config"], "measured_bytes": metrics.get("peak_allocated_bytes")
                     if run["status"] == "ok" else None, "status": run["status"]})
    return rows


# memtune's defaults at the time each compare row was measured: flags on its command line
# override them. Each entry changes the defaults of the one before it. Rows measured
# 2026-11-29T00:36-00:46 are left out (None): their build kept every layer's saved attention on
# the GPU until the end of backward (fixed before the next run).
_DEFAULT_CHANGES: list[tuple[str, dict | None]] = [
    # before the memory techniques were switched on by default
    ("2026-11-28T23:00", {"offload_activations": False, "tiled_mlp_chunk": 0, "embeddings_on_host": False,
                          "fuse_elementwise": False, "loss_chunk_tokens": 4096, "lora_matmul": "compute",
                          "fuse_loss": False, "fuse_rope": False, "dequantize_once": False,
                          "dequantize_graph": False, "compile_static_shapes": False, "loss_kernel": "compiled"}),
    ("2026-11-29T00:00", {"offload_activations": True, "tiled_mlp_chunk": 4096, "embeddings_on_host": True,
                          "fuse_elementwise": True, "loss_chunk_tokens": 512, "save_attention": False}),
    ("2026-11-29T00:36", None),
    ("2026-11-29T00:47", {"save_attention": True}),
    ("2026-11-29T01:10", {"tiled_mlp_chunk": 8192}),
    ("2026-11-29T02:40", {"fuse_loss": True}),
    ("2026-11-29T03:45", {"fuse_rope": True}),
    ("2026-11-29T03:55", {"dequantize_once": True}),
    ("2026-11-29T04:40", {"dequantize_graph": True}),
    ("2026-11-29T05:46", {"compile_static_shapes": True}),
    ("2026-11-29T06:00", {"loss_kernel": "triton"}),
]


def _accumulated(changes: list[tuple[str, dict | None]]) -> list[tuple[str, dict | None]]:
    """(since, the whole defaults then) for each change; None stays None and changes nothing."""
    whole, current = [], {}
    for since, change in changes:
        if change is not None:
            current = {**current, **change}
        whole.append((since, None if change is None else current))
    return whole


COMPARE_DEFAULTS_SINCE = _accumulated(_DEFAULT_CHANGES)


def defaults_at(date: str) -> dict | None:
    found = None
    for since, defaults in COMPARE_DEFAULTS_SINCE:
        if date >= since:
            found = defaults
    return found


def compare_rows() -> list[dict]:
    import json
    import shlex

    from memtune.cli import build_verb_parser

    parser, _module = build_verb_parser("train")
    rows = []
    for record in json.loads((RESULTS / "compare-h200.json").read_text()):
        defaults = defaults_at(record.get("date", ""))
        if (not record.get("command", "").split(" train ")[0].endswith("memtune")
                or record.get("mode", "fixed") == "grad" or defaults is None):
            continue
        argv = shlex.split(record["command"])[4:]  # after: python -m memtune train
        flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if k in FIELDS}
        config = {**defaults, **flags, "model": "deepseek-r1-distill-qwen-1.5b", "out": "", "eval": False}
        config.pop("gpu_memory", None)
        rows.append({"config": config, "status": record.get("status"),
                     "measured_bytes": record.get("peak_allocated_bytes") if record.get("status") == "ok" else None,
                     "label": f"{record['stack']} {record['seq_len']}"})
    return rows


def main() -> int:
    parts = [
        "# Estimated vs measured peak allocated memory (H200)",
        "",
        "NVIDIA H200, torch 2.11.0, transformers 5.17.0, peft 0.21.0, bitsandbytes 0.50.2; 2026-11-28 and 29;",
        "random weights; 4-8 steps per run. Estimates from `memtune estimate` (`memtune.estimate`),",
        "recomputed by `benchmarks/estimate_vs_measured.py` from each run's configuration.",
        "",
        "## h200-memory study, no cap (h200-study-uncapped/results.sqlite)",
        "",
        compare_to_measurements(study_rows("h200-study-uncapped")),
        "",
        "## h200-memory study, 24 GiB cap (h200-study-capped/results.sqlite)",
        "",
        compare_to_measurements(study_rows("h200-study-capped")),
        "",
        "## memtune rows of the side-by-side comparison (compare-h200.json)",
        "",
        compare_to_measurements(compare_rows()),
        "",
    ]
    out = RESULTS / "estimate-vs-measured-h200.md"
    out.write_text("\n".join(parts))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
