"""The report's first lines are derived from the measured rows: change a row, the sentence changes."""

from __future__ import annotations

import csv
import sqlite3

from memtune.findings import memory_findings, trend_table
from memtune.report import export_rows, render_report
from memtune.store import PlanEntry, ResultStore, RunRecord

MIB = 2**20


def _row(peak: int, trainable: int = 1000, weights: int = MIB, status: str = "ok", **extra) -> dict:
    breakdown = {"frozen_weights_bytes": weights, "activations_and_rest_bytes": peak - weights}
    return {"status": status, "peak_tensor_bytes": peak, "trainable_params": trainable,
            "metrics": {"memory_breakdown": breakdown}, **extra}


def _experiments(seq_peaks=(1, 2, 4), rank_peaks=(3.0, 3.1), quant_peaks=(3, 4, 5), ckpt=(8, 3)):
    return [
        ("memory", [({"seq_len": n}, _row(int(p * MIB), seq_len=n)) for n, p in zip((16, 64, 256), seq_peaks)]),
        ("memory", [({"lora_rank": r}, _row(int(p * MIB), trainable=r * 1000)) for r, p in zip((1, 8), rank_peaks)]),
        ("memory", [({"quantization": q}, _row(int(p * MIB), weights=int(w * MIB)))
                    for q, p, w in zip(("nf4", "int8", "none"), quant_peaks, (0.5, 1, 2))]),
        ("result", [({"gradient_checkpointing": False}, _row(ckpt[0] * MIB)),
                    ({"gradient_checkpointing": True}, _row(ckpt[1] * MIB))]),
    ]


def test_four_findings_with_their_numbers():
    found = memory_findings(_experiments())
    assert [f.component for f in found] == ["↑ sequence length", "↑ LoRA rank", "↑ bit precision",
                                           "checkpointing off"]
    assert all(f.holds for f in found)
    seq, rank, quant, ckpt = (f.sentence for f in found)
    assert seq.startswith("Memory grows with the sequence length: 16 → 64 → 256 tokens: "
                          "1.00 MiB → 2.00 MiB → 4.00 MiB")
    assert "rank 1 → 8" in rank and "×8.0" in rank and "+3.3%" in rank and rank.startswith("The LoRA rank barely")
    assert quant.startswith("4-bit < 8-bit < 16-bit in memory: 4-bit 3.00 MiB, 8-bit 4.00 MiB, 16-bit 5.00 MiB")
    assert ckpt == "Checkpointing off needs more memory than on: off 8.00 MiB, on 3.00 MiB (×2.67)."
    table = trend_table(found)
    assert table[2].startswith("| ↑ sequence length | ↑ activation memory | 16 → 64 → 256 tokens") and \
        table[2].endswith("| yes |")


def test_a_changed_row_changes_the_sentence():
    found = memory_findings(_experiments(seq_peaks=(1, 3, 2), rank_peaks=(3.0, 4.0), quant_peaks=(3, 6, 5),
                                         ckpt=(3, 4)))
    assert not any(f.holds for f in found)
    seq, rank, quant, ckpt = (f.sentence for f in found)
    assert seq.startswith("Memory did not grow at every step") and "1.00 MiB → 3.00 MiB → 2.00 MiB" in seq
    assert rank.startswith("The LoRA rank mattered") and "+33.3%" in rank
    assert quant.startswith("The order 4-bit < 8-bit < 16-bit did not hold: 4-bit 3.00 MiB, 8-bit 6.00 MiB")
    assert ckpt.startswith("Checkpointing off did not need more memory")
    assert trend_table(found)[2].endswith("| no |")


def test_oom_with_checkpointing_off_is_the_seeds_finding():
    experiments = _experiments()
    experiments[3] = ("result", [({"gradient_checkpointing": False}, {"status": "oom"}),
                                 ({"gradient_checkpointing": True}, _row(3 * MIB))])
    ckpt = memory_findings(experiments)[-1]
    assert ckpt.holds and ckpt.measured == "off: out of memory; on: 3.00 MiB"


def _store_with_cpu_rows(tmp_path, peaks: dict[int, int]):
    store = ResultStore(tmp_path)
    spec = {"name": "s", "description": "", "base": {}, "experiments": [
        {"name": "seq_len", "title": "Sequence length", "kind": "memory", "grid": {"seq_len": [16, 64]}},
        {"name": "acc", "title": "Accuracy", "kind": "accuracy", "variants": [{"label": "LoRA"}]}],
        "full_size_predictions": {f"h{n}": {"model": "deepseek-r1-distill-qwen-1.5b", "seq_len": n * 64,
                                            "total_bytes": n * 2**28} for n in peaks}}
    store.save_study("s", spec, [], "t")
    entries = [PlanEntry("s", "seq_len", i, f"h{n}", f"seq_len={n}", {"seq_len": n}) for i, n in enumerate(peaks)]
    entries.append(PlanEntry("s", "acc", 0, "hacc", "LoRA", {}))
    store.save_plan("s", entries)
    for n, peak in peaks.items():
        store.record_run(RunRecord(
            config_hash=f"h{n}", study="s", experiments=["seq_len"], status="ok",
            config={"model": "tiny", "seq_len": n}, started_at="t0", finished_at="t1", elapsed_s=1.0,
            metrics={"status": "ok", "device": "cpu", "seq_len": n, "peak_tensor_bytes": peak,
                     "peak_rss_bytes": 2**29, "total_params": 862_336, "estimate": {"total_bytes": int(peak * 1.05)}}))
    store.record_run(RunRecord(
        config_hash="hacc", study="s", experiments=["acc"], status="ok", config={"model": "tiny"},
        started_at="t0", finished_at="t1", elapsed_s=1.0,
        metrics={"status": "ok", "device": "cpu", "accuracy_before": 0.02, "accuracy_after": 0.68,
                 "total_params": 862_336}))
    return store


def test_report_opens_with_the_findings_names_the_model_and_shows_the_prediction(tmp_path):
    with _store_with_cpu_rows(tmp_path / "a", {16: 1 * MIB, 64: 2 * MIB}) as store:
        text, tables = render_report(store, tmp_path / "a", plots=False)
        export_rows(store, tmp_path / "rows.csv")
    assert "- Model that ran: tiny, 862.34K params: every row" in text
    found = text.index("## What this study found")
    assert found < text.index("### Sequence length")
    assert "- Memory grows with the sequence length: 16 → 64 tokens: 1.00 MiB → 2.00 MiB." in text
    assert "- Accuracy: LoRA 0.020 → 0.680" in text
    table = tables[0]
    assert table.headers[1:5] == ["Status", "Peak tensor memory (CPU, MiB)", "Estimate (MiB)", "Estimate error %"]
    assert table.headers[-2:] == ["Full-size seq_len", "Predicted for deepseek-r1-distill-qwen-1.5b, full size (GPU GiB)"]
    assert table.raw[1][2] == 2.0 and table.raw[1][4] == 5.0 and table.raw[1][-2:] == [4096, 16.0]
    rows = {r["config_hash"]: r for r in csv.DictReader((tmp_path / "rows.csv").open())}
    assert rows["h64"]["peak_tensor_bytes"] == str(2 * MIB)
    assert rows["h64"]["estimate_total_bytes"] == str(int(2 * MIB * 1.05))

    with _store_with_cpu_rows(tmp_path / "b", {16: 3 * MIB, 64: 2 * MIB}) as store:
        text, _ = render_report(store, tmp_path / "b", plots=False)
    assert "- Memory did not grow at every step of the sequence length: 16 → 64 tokens: 3.00 MiB → 2.00 MiB." in text


def test_a_database_from_before_the_tensor_column_gains_it(tmp_path):
    with ResultStore(tmp_path) as store:
        pass
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN peak_tensor_bytes")
    with _store_with_cpu_rows(tmp_path, {16: MIB}) as store:
        assert store.get_run("h16")["peak_tensor_bytes"] == MIB
