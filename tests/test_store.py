"""The SQLite results store: one row per config hash, whole rows only, clear errors."""

from __future__ import annotations

import sqlite3

import pytest

from memtune.errors import UserError
from memtune.store import DB_NAME, PlanEntry, ResultStore, RunRecord


def _record(digest: str = "h1", status: str = "ok", **metrics) -> RunRecord:
    m = {"status": status, "peak_allocated_bytes": 3 * 2**30, "peak_reserved_bytes": 4 * 2**30,
         "peak_rss_bytes": 2**30, "step_time_s": 1.5, "tokens_per_s": 1000.0, "trainable_params": 1_089_536,
         "accuracy_before": 0.12, "accuracy_after": 0.3, "estimate": {"total_bytes": 3 * 2**30 + 5,
                                                                    "breakdown": {}},
         "gpu_name": "GPU X", "device": "cuda", "versions": {"torch": "2.x"}, "git_commit": "abc", **metrics}
    return RunRecord(config_hash=digest, study="s", experiments=["e1", "e2"], status=status,
                     config={"lora_rank": 8, "seq_len": 1024}, started_at="t0", finished_at="t1",
                     metrics=m if status in ("ok", "oom") else None,
                     error=None if status == "ok" else "boom\nlast line", elapsed_s=2.0,
                     versions={"python": "3.x"}, git_commit="fallback")


def test_round_trip_key_columns_and_json(tmp_path):
    with ResultStore(tmp_path) as store:
        assert store.path == tmp_path / DB_NAME
        store.record_run(_record())
        row = store.get_run("h1")
    assert row["status"] == "ok" and row["experiments"] == ["e1", "e2"]
    assert row["peak_allocated_bytes"] == 3 * 2**30 and row["peak_reserved_bytes"] == 4 * 2**30
    assert row["peak_rss_bytes"] == 2**30 and row["step_time_s"] == 1.5 and row["tokens_per_s"] == 1000.0
    assert row["trainable_params"] == 1_089_536
    assert row["accuracy_before"] == 0.12 and row["accuracy_after"] == 0.3
    assert row["estimate_total_bytes"] == 3 * 2**30 + 5
    assert row["gpu_name"] == "GPU X" and row["versions"] == {"torch": "2.x"} and row["git_commit"] == "abc"
    assert row["config"] == {"lora_rank": 8, "seq_len": 1024}
    assert row["metrics"]["estimate"]["total_bytes"] == 3 * 2**30 + 5
    assert row["started_at"] == "t0" and row["finished_at"] == "t1" and row["attempts"] == 1


def test_wal_mode_and_unique_hash(tmp_path):
    with ResultStore(tmp_path) as store:
        store.record_run(_record(status="error"))
        store.record_run(_record(status="error"))
        store.record_run(_record(status="ok"))
        assert store.count() == 1
        row = store.get_run("h1")
        assert row["status"] == "ok" and row["attempts"] == 3 and row["error"] is None
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO runs(config_hash, study, experiments, status, config_json, started_at, "
                     "finished_at) VALUES ('h1', 's', '[]', 'ok', '{}', 't', 't')")
    conn.close()


def test_failed_run_falls_back_to_study_versions(tmp_path):
    with ResultStore(tmp_path) as store:
        store.record_run(_record("h2", status="error"))
        row = store.get_run("h2")
    assert row["metrics"] == {} and row["versions"] == {"python": "3.x"} and row["git_commit"] == "fallback"
    assert row["error"].endswith("last line") and row["peak_allocated_bytes"] is None


def test_plan_and_studies(tmp_path):
    with ResultStore(tmp_path) as store:
        store.save_study("s", {"experiments": []}, ["a note"], "now")
        store.save_plan("s", [PlanEntry("s", "e1", 0, "h1", "rank=8", {"lora_rank": 8}),
                              PlanEntry("s", "e2", 0, "h1", "q=nf4", {"quantization": "nf4"})])
        store.save_plan("s", [PlanEntry("s", "e1", 0, "h1", "rank=8", {"lora_rank": 8})])  # replaced
        store.record_run(_record())
        assert [p["experiment"] for p in store.plan("s")] == ["e1"]
        assert store.plan("s")[0]["axes"] == {"lora_rank": 8}
        assert store.studies()[0]["notes"] == ["a note"]
        assert [r["config_hash"] for r in store.runs("s")] == ["h1"]
        assert store.statuses() == {"h1": "ok"}


def test_not_a_database_is_refused_and_kept(tmp_path):
    path = tmp_path / DB_NAME
    content = b"these are somebody's notes, not SQLite" * 10
    path.write_bytes(content)
    with pytest.raises(UserError, match="not an SQLite database.*will not replace it"):
        ResultStore(tmp_path)
    assert path.read_bytes() == content


def test_corrupt_database_is_refused_and_kept(tmp_path):
    with ResultStore(tmp_path) as store:
        for i in range(200):
            store.record_run(_record(f"h{i}"))
    path = tmp_path / DB_NAME
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(page * 2, min(len(data), page * 6)):
        data[offset] = 0xA5  # scribble over b-tree pages, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt.*will not replace it"):
        with ResultStore(tmp_path) as store:
            store.runs()
    assert path.read_bytes() == bytes(data)


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(UserError, match="not memtune results"):
        ResultStore(path)


def test_locked_database_is_a_clear_user_error(tmp_path):
    with ResultStore(tmp_path) as store:
        store.record_run(_record())
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with ResultStore(tmp_path, timeout=0.2) as store:
            store.record_run(_record("h9"))
    except UserError as exc:
        assert "locked by another process" in str(exc)
    else:
        pytest.fail("expected a UserError for a locked database")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with ResultStore(tmp_path) as store:  # nothing was replaced or lost
        assert store.statuses() == {"h1": "ok"}


def test_missing_database_without_create(tmp_path):
    with pytest.raises(UserError, match="results database not found"):
        ResultStore(tmp_path / "nowhere", create=False)


def test_git_commit_says_when_the_source_differs_from_head(monkeypatch):
    from memtune import provenance

    answers = {"rev-parse": "abc123\n", "status": ""}
    monkeypatch.setattr(provenance, "_git", lambda repo, *args: answers[args[0]])
    assert provenance.git_commit() == "abc123"
    answers["status"] = " M src/memtune/train.py\n?? src/memtune/new_module.py\n"
    assert provenance.git_commit() == "abc123+dirty"
    answers["rev-parse"] = None  # not a git checkout
    assert provenance.git_commit() is None
