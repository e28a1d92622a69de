"""`memtune report`: tables in the seed's shape that match the stored rows, CSV, plots, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from memtune.cli import main
from memtune.store import ResultStore
from memtune.study import Runner, expand, load_study, run_study
from studyfakes import expected_peak, write_fake_train, write_small_study

GIB = 2**30


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    plan = expand(load_study(str(write_small_study(tmp, extra_rank=13))))
    out = tmp / "out"
    code = run_study(plan, out, Runner(write_fake_train(tmp)), report=True)
    assert code == 0  # ok and oom only
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _rows(study_dir: Path) -> dict[str, dict]:
    with ResultStore(study_dir, create=False) as store:
        plan = store.plan("small")
        runs = {r["config_hash"]: r for r in store.runs()}
    return {f"{p['experiment']}/{p['label']}": runs[p["config_hash"]] for p in plan}


def test_memory_tables_match_stored_rows(study_dir):
    rows = _rows(study_dir)
    table = _csv(study_dir / "tables" / "small__seq_len.csv")
    assert [r["Sequence length"] for r in table] == ["64", "128", "256"]
    for line in table:
        stored = rows[f"seq_len/seq_len={line['Sequence length']}"]
        assert float(line["Peak allocated (GiB)"]) == round(stored["peak_allocated_bytes"] / GIB, 2)
        assert float(line["Peak reserved (GiB)"]) == round(stored["peak_reserved_bytes"] / GIB, 2)
        assert int(line["Trainable params"]) == stored["trainable_params"]
        assert float(line["Step time (s)"]) == stored["step_time_s"]
        assert float(line["Tokens/s"]) == stored["tokens_per_s"]
        assert float(line["Estimate (GiB)"]) == round(stored["estimate_total_bytes"] / GIB, 2)
        error = (stored["estimate_total_bytes"] - stored["peak_allocated_bytes"]) / stored["peak_allocated_bytes"]
        assert float(line["Estimate error %"]) == round(error * 100, 1)
        assert line["Status"] == "ok"
        assert stored["peak_allocated_bytes"] == expected_peak(int(line["Sequence length"]), 8)

    report = (study_dir / "report.md").read_text()
    # the same numbers, two decimals, in the markdown
    md = [ln for ln in report.splitlines() if ln.startswith("| 128 |")]
    assert md and f"| {expected_peak(128, 8) / GIB:.2f} |" in md[0]


def test_rank_table_shows_trainable_params_and_oom(study_dir):
    table = _csv(study_dir / "tables" / "small__rank.csv")
    by_rank = {r["LoRA rank"]: r for r in table}
    assert by_rank["13"]["Status"] == "oom" and by_rank["13"]["Tokens/s"] == ""
    assert by_rank["13"]["Estimate error %"] == ""  # an OOM peak is not what the run needed
    assert int(by_rank["4"]["Trainable params"]) == 4 * 136192
    report = (study_dir / "report.md").read_text()
    assert "| 4 | ok |" in report and "544.77K" in report
    assert "**oom**: CUDA out of memory" in report


def test_checkpointing_table_is_ok_or_oom_with_memory(study_dir):
    table = _csv(study_dir / "tables" / "small__ckpt.csv")
    assert [r["Gradient checkpointing"] for r in table] == ["False", "True"]
    off = expected_peak(256, 8, checkpointing=False) / GIB
    assert table[0]["Result"] == f"OK ({off:.2f} GiB)"
    report = (study_dir / "report.md").read_text()
    assert f"| off | OK ({off:.2f} GiB) |" in report


def test_accuracy_table_before_and_after(study_dir):
    rows = _rows(study_dir)
    table = _csv(study_dir / "tables" / "small__acc.csv")
    assert [r["Setting"] for r in table] == ["with LoRA", "rank 2"]
    for line in table:
        stored = rows[f"acc/{line['Setting']}"]
        assert float(line["Acc. before FT"]) == stored["accuracy_before"]
        assert float(line["Acc. after FT"]) == stored["accuracy_after"]
        assert int(line["Eval examples"]) == stored["eval_examples"]
    report = (study_dir / "report.md").read_text()
    assert "| with LoRA | ok | 0.100 | 0.280 |" in report


def test_header_plots_and_every_run(study_dir):
    report = (study_dir / "report.md").read_text()
    assert report.startswith("# memtune study: small")
    for needle in ("- GPU: Fake GPU 24GB", "- Versions: ", "torch 0.0-fake", "- Git commit: deadbeefdead",
                   "- Generated: ", "- Runs: 8 (7 ok, 1 oom)", "## All runs"):
        assert needle in report, needle
    for name in ("memory_vs_seq_len", "tokens_per_s_vs_seq_len", "memory_breakdown"):
        png = study_dir / "plots" / f"small__{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/small__{name}.png)" in report
    assert report.count("` | ") >= 8  # one line per run with its hash


def test_pending_rows_and_report_cli_export(study_dir, tmp_path, capsys):
    export_json, export_csv = tmp_path / "rows.json", tmp_path / "rows.csv"
    assert main(["report", str(study_dir), "--out", str(tmp_path / "r"), "--export", str(export_json)]) == 0
    assert main(["report", str(study_dir / "results.sqlite"), "--out", str(tmp_path / "r"), "--no-plots",
                 "--export", str(export_csv)]) == 0
    assert "exported 8 rows" in capsys.readouterr().out
    rows = json.loads(export_json.read_text())
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok", "oom"}
    assert all("config" in r and "metrics" in r for r in rows)
    flat = _csv(export_csv)
    assert len(flat) == 8 and "config.lora_rank" in flat[0]
    assert sorted(r["config_hash"] for r in flat) == sorted(r["config_hash"] for r in rows)
    assert (tmp_path / "r" / "report.md").is_file()

    assert main(["report", str(study_dir), "--export", str(tmp_path / "rows.txt")]) == 2
    assert "--export: expected a file name ending in .json or .csv" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert main(["report", str(study_dir), "--study", "other"]) == 2
    assert "no study 'other'" in capsys.readouterr().err


def test_planned_but_not_run_rows_show_as_pending(tmp_path):
    study = load_study(str(write_small_study(tmp_path)))
    plan = expand(study, only=["seq_len"])
    with ResultStore(tmp_path / "out") as store:
        store.save_study("small", {**study.to_dict(), "reference": plan.reference}, [], "now")
        store.save_plan("small", plan.entries)
        from memtune.report import write_report

        write_report(store, tmp_path / "out", plots=True)
    table = _csv(tmp_path / "out" / "tables" / "small__seq_len.csv")
    assert [r["Status"] for r in table] == ["pending"] * 3
    assert "| 64 | pending |" in (tmp_path / "out" / "report.md").read_text()
