"""`memtune study`: YAML schema, validation before any run, the run loop, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import memtune
from memtune.cli import main
from memtune.errors import UserError
from memtune.store import ResultStore
from memtune.study import Runner, _DirLock, builtin_studies, expand, load_study, parse_set, run_study
from studyfakes import expected_peak, write_fake_train, write_small_study

SRC = str(Path(memtune.__file__).resolve().parent.parent)


def _study_cli(tmp_path: Path, *extra: str) -> list[str]:
    fake = write_fake_train(tmp_path)
    return ["study", str(write_small_study(tmp_path)), "--out", str(tmp_path / "out"),
            "--train-command", " ".join(fake), "--scale", "none", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("memtune study: error: ")
    return err[0]


# -- schema and expansion ----------------------------------------------------
def test_builtin_seed_expands_and_dedups_across_experiments():
    assert {"seed", "seed-full"} <= set(builtin_studies())
    study = load_study("seed")
    names = [e.name for e in study.experiments]
    assert names[:4] == ["seq_len", "lora_rank", "quantization", "checkpointing"]
    assert any(n.startswith("accuracy") for n in names)
    plan = expand(study)
    hashes = [r.config_hash for r in plan.runs]
    assert len(hashes) == len(set(hashes))
    # seq_len=16384 (4-bit, r=8, checkpointing on) is one run shared by four memory experiments
    shared = [r for r in plan.runs if {"seq_len", "lora_rank", "quantization", "checkpointing"} <= set(r.experiments)]
    assert len(shared) == 1 and shared[0].config.seq_len == 16384 and shared[0].config.lora_rank == 8
    assert len(plan.entries) > len(plan.runs)
    for run in plan.runs:
        memory = any(e in ("seq_len", "lora_rank", "quantization", "checkpointing", "memtune_defaults")
                     for e in run.experiments)
        if memory:
            assert run.config.data == "random" and run.config.eval is False
        else:
            assert run.config.data == "builtin" and run.config.eval is True
    seq = sorted(r.config.seq_len for r in plan.runs if "seq_len" in r.experiments)
    assert seq == [1024, 4096, 16384]
    quant = {r.config.quantization for r in plan.runs if "quantization" in r.experiments}
    assert quant == {"nf4", "int8", "none"}
    # the seed's experiments run the seed's stack; memtune's own techniques have their own table
    seed_runs = [r for r in plan.runs if "memtune_defaults" not in r.experiments]
    assert not any(r.config.offload_activations or r.config.tiled_mlp_chunk for r in seed_runs)
    ours = [r.config for r in plan.runs if "memtune_defaults" in r.experiments]
    assert len(ours) == 2 and all(c.offloads_checkpoints or not c.gradient_checkpointing for c in ours)
    assert {c.gradient_checkpointing for c in ours} == {True, False}


def test_seed_full_extends_seed_with_wider_axes():
    full = expand(load_study("seed-full"))
    ranks = {r.config.lora_rank for r in full.runs if "lora_rank" in r.experiments}
    lengths = {r.config.seq_len for r in full.runs if "seq_len" in r.experiments}
    assert ranks == {1, 4, 8, 16, 32, 64}
    assert {32768, 65536} <= lengths
    assert "accuracy_overall" in [e.name for e in full.study.experiments]


def test_cpu_scale_shrinks_and_says_so():
    plan = expand(load_study("seed"), {"model": "tiny"}, scale=True)
    assert plan.notes and plan.notes[0].startswith("cpu scale:")
    # tiny allows 256 positions: 16384 -> 256
    assert "divided by 64" in plan.notes[0] and "the model allows 256" in plan.notes[0]
    assert max(r.config.seq_len for r in plan.runs) <= 256
    # memory runs take two steps; accuracy runs keep enough steps to show a lift
    assert all(r.config.steps <= 2 and r.config.warmup_steps <= 1 for r in plan.runs if not r.config.eval)
    assert all(r.config.steps == 160 and r.config.warmup_steps <= 1 for r in plan.runs if r.config.eval)
    assert "accuracy runs' steps 400 -> 160" in plan.notes[0]
    assert all(r.config.eval_examples <= 100 for r in plan.runs)
    assert all(r.config.model == "tiny" for r in plan.runs)
    mem = sorted(r.config.seq_len for r in plan.runs if "seq_len" in r.experiments)
    assert mem == [16, 64, 256]
    # runs on real data keep room for their examples; short vs long stays two runs
    assert sorted(r.config.seq_len for r in plan.runs if "accuracy_seq_len" in r.experiments) == [192, 256]
    # the plan's axis values are those that ran
    assert sorted(e.axes["seq_len"] for e in plan.entries if e.experiment == "seq_len") == [16, 64, 256]


def test_cpu_scale_of_a_long_context_model_stops_at_512():
    plan = expand(load_study("seed"), scale=True)  # the 1.5B preset allows 131072 positions
    assert "divided by 32" in plan.notes[0]
    assert sorted(r.config.seq_len for r in plan.runs if "seq_len" in r.experiments) == [32, 128, 512]
    assert expand(load_study("seed"), scale=False).notes == []


def test_overrides_gpu_memory_and_only():
    study = load_study("seed")
    plan = expand(study, parse_set(["steps=2", "lora_alpha=32", "lora_rank=4"]), gpu_memory="24GiB",
                  only=["lora_rank"])
    assert {r.config.lora_rank for r in plan.runs} == {1, 4, 8}  # the axis wins over --set
    assert all(r.config.steps == 2 and r.config.lora_alpha == 32 and r.config.gpu_memory == "24GiB"
               for r in plan.runs)
    assert any("lora_rank" in n and "axis" in n for n in plan.notes)
    with pytest.raises(UserError, match="--only: unknown experiment 'nope'"):
        expand(study, only=["nope"])
    with pytest.raises(UserError, match="--set: unknown key 'lora_rnk'.*did you mean 'lora_rank'"):
        parse_set(["lora_rnk=4"])
    with pytest.raises(UserError, match="--gpu-memory"):
        expand(study, gpu_memory="lots")


def test_extends_replaces_experiments_by_name(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({
        "extends": "seed", "base": {"steps": 5},
        "experiments": [{"name": "lora_rank", "set": {"data": "random", "eval": False},
                         "grid": {"lora_rank": [2, 3]}},
                        {"name": "extra", "set": {"data": "random", "eval": False},
                         "grid": {"offload_activations": [True]}}],
    }))
    study = load_study(str(child))
    assert study.name == "child" and study.base["steps"] == 5 and study.base["quantization"] == "nf4"
    names = [e.name for e in study.experiments]
    assert names.index("lora_rank") == 1 and names[-1] == "extra"
    assert study.experiments[1].grid == {"lora_rank": [2, 3]}


# -- bad input: one line naming the key and what is allowed, before any run -----
@pytest.mark.parametrize("text, expected", [
    ("experiments:\n  - {name: a, grid: {lora_rnk: [1, 2]}}\n",
     "experiment 'a': grid: unknown key 'lora_rnk' (did you mean 'lora_rank'?); allowed: the `memtune train` keys"),
    ("experiments:\n  - {name: a, grid: {seq_len: []}}\n", "experiment 'a': grid.seq_len: empty list"),
    ("experiments:\n  - {name: a, grid: {seq_len: 1024}}\n", "grid.seq_len: expected a list of values"),
    ("experiments:\n  - {name: a, grid: {lora_rank: [4, 0]}}\n",
     "experiment 'a' (lora_rank=0): lora_rank: expected an integer >= 1; got 0"),
    ("experiments:\n  - {name: a, grid: {quantization: [nf4, int3]}}\n",
     "quantization: expected one of nf4, fp4, int8, none; got 'int3'"),
    ("base: {lora: false}\nexperiments:\n  - {name: a, grid: {seq_len: [8]}}\n", "lora: full fine-tuning"),
    ("experiment:\n  - {name: a}\n", "unknown key 'experiment' (did you mean 'experiments'?); allowed: name,"),
    ("experiments:\n  - {name: a, grid: {seq_len: [8]}, kind: speed}\n", "kind: expected one of memory, result, accuracy"),
    ("experiments:\n  - {name: a}\n", "experiment 'a': needs a grid"),
    ("experiments:\n  - {name: a, grid: {out: [x]}}\n", "key 'out' is set by the study"),
    ("experiments: [\n  {name: a, grid: {\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a YAML mapping"),
    ("experiments: []\n", "experiments: expected a non-empty list"),
    ("experiments:\n  - {name: a, grid: {seq_len: [8]}}\n  - {name: a, grid: {seq_len: [9]}}\n", "used twice"),
])
def test_bad_study_is_one_line_and_nothing_runs(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    fake = write_fake_train(tmp_path)
    code = main(["study", str(path), "--out", str(tmp_path / "out"), "--train-command", " ".join(fake),
                 "--scale", "none"])
    assert code == 2
    line = _one_error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "out" / "results.sqlite").exists()


def test_unknown_study_name_lists_the_builtins(capsys):
    assert main(["study", "no-such-study", "--dry-run"]) == 2
    line = _one_error_line(capsys)
    assert "unknown study 'no-such-study'" in line and "seed" in line


def test_dry_run_validates_and_runs_nothing(tmp_path, capsys):
    assert main(["study", "seed", "--model", "tiny", "--dry-run", "--scale", "cpu",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "cpu scale:" in out and "[1/16]" in out and "nothing run" in out
    assert not (tmp_path / "o").exists()


# -- the run loop ---------------------------------------------------------------
def test_oom_and_error_recorded_others_complete_then_resume(tmp_path, capsys):
    study_path = write_small_study(tmp_path, extra_rank=13)  # rank 13 -> OOM
    text = study_path.read_text().replace("lora_rank: 2}", "lora_rank: 7}")  # rank 7 -> crash
    study_path.write_text(text)
    fake = write_fake_train(tmp_path)
    out = tmp_path / "out"
    args = ["study", str(study_path), "--out", str(out), "--train-command", " ".join(fake), "--scale", "none"]
    assert main(args) == 1  # a run failed: exit 1, but the study went on
    printed = capsys.readouterr().out
    assert "[1/" in printed and " ok " in printed and " oom " in printed and " error " in printed
    assert "simulated crash" in printed
    with ResultStore(out, create=False) as store:
        rows = {r["config_hash"]: r for r in store.runs()}
        plan = expand(load_study(str(study_path)))
        assert set(rows) == {r.config_hash for r in plan.runs}
        by_rank = {}
        for r in rows.values():
            by_rank.setdefault(r["config"]["lora_rank"], []).append(r)
        assert [r["status"] for r in by_rank[13]] == ["oom"]
        assert "out of memory" in by_rank[13][0]["error"]
        assert [r["status"] for r in by_rank[7]] == ["error"]
        assert "RuntimeError: simulated crash" in by_rank[7][0]["error"]
        assert by_rank[7][0]["metrics"] == {} and by_rank[7][0]["versions"]  # versions from the study
        ok = [r for r in rows.values() if r["status"] == "ok"]
        assert len(ok) == len(rows) - 2
        for r in ok:
            cfg = r["config"]
            assert r["peak_allocated_bytes"] == expected_peak(cfg["seq_len"], cfg["lora_rank"],
                                                              cfg["gradient_checkpointing"])
            assert r["gpu_name"] == "Fake GPU 24GB" and r["study"] == "small"
            assert Path(r["run_dir"], "metrics.json").is_file()
    assert (out / "report.md").is_file()

    # Again: ok and oom are kept, the error is retried (and fails again), nothing duplicates.
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert printed.count("(stored, skipped)") == len(rows) - 1
    with ResultStore(out, create=False) as store:
        again = store.runs()
        assert len(again) == len(rows)
        crashed = [r for r in again if r["status"] == "error"]
        assert len(crashed) == 1 and crashed[0]["attempts"] == 2
    # --skip-failed keeps it
    assert main(args + ["--skip-failed"]) == 1
    assert capsys.readouterr().out.count("(stored, skipped)") == len(rows)


def test_run_timeout_is_recorded(tmp_path, capsys):
    study_path = write_small_study(tmp_path, extra_rank=11)  # rank 11 hangs
    fake = write_fake_train(tmp_path)
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = main(["study", str(study_path), "--out", str(out), "--train-command", " ".join(fake),
                 "--scale", "none", "--only", "rank", "--run-timeout", "3", "--no-report"])
    assert code == 1
    assert time.monotonic() - t0 < 60
    with ResultStore(out, create=False) as store:
        statuses = {r["config"]["lora_rank"]: r["status"] for r in store.runs()}
    assert statuses == {4: "ok", 8: "ok", 11: "timeout"}
    assert "timeout" in capsys.readouterr().out


def test_directory_lock_refuses_a_second_study(tmp_path):
    with _DirLock(tmp_path):
        with pytest.raises(UserError, match="a study is already running there"):
            with _DirLock(tmp_path):
                pass
    with _DirLock(tmp_path):  # released
        pass


def test_missing_train_command_is_a_user_error(tmp_path):
    plan = expand(load_study(str(write_small_study(tmp_path))), only=["ckpt"])
    with pytest.raises(UserError, match="cannot start the train command"):
        run_study(plan, tmp_path / "out", Runner([str(tmp_path / "no-such-binary")]), report=False)


def _count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_sigkill_mid_study_then_resume_keeps_every_run_once(tmp_path):
    args = _study_cli(tmp_path, "--no-report")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "FAKE_SLEEP": "0.4"}
    db = tmp_path / "out" / "results.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "memtune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while _count_rows(db) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    time.sleep(0.2)  # somewhere inside the next run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _count_rows(db)
    plan = expand(load_study(str(tmp_path / "small.yaml")))
    assert 3 <= killed_at < len(plan.runs)

    # the orphaned run died with the study (PR_SET_PDEATHSIG): nothing writes later
    time.sleep(1.0)
    assert _count_rows(db) == killed_at

    done = subprocess.run([sys.executable, "-m", "memtune", *args], env={**env, "FAKE_SLEEP": "0"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("(stored, skipped)") == killed_at
    with ResultStore(db, create=False) as store:
        rows = store.runs()
        assert len(rows) == len(plan.runs)
        assert sorted(r["config_hash"] for r in rows) == sorted(r.config_hash for r in plan.runs)
        by_hash = {r["config_hash"]: r for r in rows}
        for run in plan.runs:
            row = by_hash[run.config_hash]
            assert row["status"] == ("oom" if run.config.lora_rank == 13 else "ok")
            assert row["attempts"] == 1
            assert row["config"] == run.config.to_dict()
        # the plan rows are there exactly once per (experiment, run)
        assert len(store.plan("small")) == len(plan.entries)


# -- end to end with the real `memtune train` ------------------------------------
@pytest.mark.slow
def test_tiny_study_end_to_end_with_real_train(tmp_path, capsys):
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump({
        "name": "e2e",
        "base": {"model": "tiny", "steps": 2, "warmup_steps": 1, "seq_len": 64, "quantization": "none",
                 "data": "random", "eval": False},
        "experiments": [
            {"name": "seq_len", "grid": {"seq_len": [32, 64]}},
            {"name": "rank", "grid": {"lora_rank": [2, 8]}},
            {"name": "bad", "kind": "result", "variants": [{"label": "missing data file",
                                                             "data": str(tmp_path / "nope.jsonl")}]},
        ],
    }))
    out = tmp_path / "out"
    code = main(["study", str(path), "--out", str(out), "--scale", "none"])
    printed = capsys.readouterr().out
    assert code == 1, printed  # the run on a missing data file fails; the others complete
    with ResultStore(out, create=False) as store:
        rows = store.runs()
    assert len(rows) == 4  # seq_len 64 and rank 8 are the same configuration
    status = {(r["config"]["seq_len"], r["config"]["lora_rank"], r["config"]["data"]): r["status"] for r in rows}
    assert sum(1 for s in status.values() if s == "ok") == 3, (status, printed)
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 1 and "nope.jsonl" in bad[0]["error"]
    for r in rows:
        if r["status"] == "ok":
            assert r["peak_rss_bytes"] > 0 and r["trainable_params"] > 0 and r["tokens_per_s"] > 0
            assert r["metrics"]["config_hash"] == r["config_hash"]
    report = (out / "report.md").read_text()
    assert "### seq_len" in report and "### rank" in report


def test_only_keeps_the_other_experiments_plan(tmp_path, capsys):
    args = _study_cli(tmp_path, "--no-report")
    assert main(args) == 0
    with ResultStore(tmp_path / "out", create=False) as store:
        full = len(store.plan("small"))
    assert main(args + ["--only", "seq_len"]) == 0
    out = capsys.readouterr().out
    assert "3 runs in 1 experiment, 3 already stored" in out
    with ResultStore(tmp_path / "out", create=False) as store:
        assert len(store.plan("small")) == full
