"""Study results in SQLite: one row per run, written once, never half.

Layout of `DIR/results.sqlite` (WAL mode):

* `runs`: one row per configuration, keyed by its config hash (UNIQUE). The
  resolved config and all metrics as JSON, plus the key numbers as columns
  (peak memory, step time, tokens/s, trainable params, accuracy, estimate).
  A row is written in one transaction after the run's process has exited
  (and, for ok/oom, after its metrics.json exists), so a study killed at any
  moment leaves either the whole row or none.
* `plan`: which experiment of which study uses which config hash, in order,
  with the axis values that label it. Written when a study starts; the report
  builds its tables from it.
* `studies`: the resolved study (JSON) and the notes it printed (e.g. the CPU
  scaling), for the report's header.

Statuses: `ok`, `oom` (final: a rerun of the study skips them), `error` and
`timeout` (retried by the next run of the study, replacing the row).

A database that is locked, corrupt, or not a memtune database raises a
UserError naming the file; it is never replaced or repaired silently.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from memtune.errors import UserError

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite"
FINAL_STATUSES = ("ok", "oom")
STATUSES = ("ok", "oom", "error", "timeout")

# metrics.json key -> column (numbers worth querying without JSON).
METRIC_COLUMNS = {
    "peak_allocated_bytes": "INTEGER",
    "peak_reserved_bytes": "INTEGER",
    "peak_rss_bytes": "INTEGER",
    "peak_tensor_bytes": "INTEGER",     # a CPU run's peak of live tensor bytes (memtune.measure)
    "step_time_s": "REAL",
    "tokens_per_s": "REAL",
    "tokens_per_step": "INTEGER",
    "trainable_params": "INTEGER",
    "total_params": "INTEGER",
    "accuracy_before": "REAL",
    "accuracy_after": "REAL",
    "eval_examples": "INTEGER",
    "seq_len": "INTEGER",
    "loss_first": "REAL",
    "loss_last": "REAL",
    "wall_time_s": "REAL",
}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL UNIQUE,
    study TEXT NOT NULL,
    experiments TEXT NOT NULL,          -- JSON list of experiment names
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    error TEXT,                         -- message (stderr tail) for error/timeout/oom
    config_json TEXT NOT NULL,
    metrics_json TEXT,                  -- metrics.json as written by `memtune train`
    {", ".join(f"{name} {typ}" for name, typ in METRIC_COLUMNS.items())},
    estimate_total_bytes INTEGER,
    gpu_name TEXT,
    device TEXT,
    versions_json TEXT,
    git_commit TEXT,
    run_dir TEXT,
    exit_code INTEGER,
    attempts INTEGER NOT NULL DEFAULT 1,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    elapsed_s REAL
);
CREATE TABLE IF NOT EXISTS plan (
    study TEXT NOT NULL,
    experiment TEXT NOT NULL,
    position INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    label TEXT NOT NULL,
    axes_json TEXT NOT NULL,            -- {{axis key: value}} of this run in this experiment
    PRIMARY KEY (study, experiment, config_hash)
);
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,            -- the resolved study: base, experiments, options
    notes_json TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


@dataclass
class RunRecord:
    """Everything one finished run contributes: becomes one `runs` row."""

    config_hash: str
    study: str
    experiments: list[str]
    status: str
    config: dict[str, Any]
    started_at: str
    finished_at: str
    metrics: dict[str, Any] | None = None
    error: str | None = None
    run_dir: str | None = None
    exit_code: int | None = None
    elapsed_s: float | None = None
    # Fallbacks when metrics.json lacks them (e.g. the run crashed).
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None


@dataclass
class PlanEntry:
    study: str
    experiment: str
    position: int
    config_hash: str
    label: str
    axes: dict[str, Any]


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class ResultStore:
    """The results database of one study directory (or any path)."""

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 10.0):
        self.path = Path(path)
        # A directory (existing, or new without a database suffix) holds DIR/results.sqlite.
        if self.path.is_dir() or (not self.path.exists() and self.path.suffix not in (".sqlite", ".sqlite3", ".db")):
            self.path = self.path / DB_NAME
        if not self.path.exists():
            if not create:
                raise UserError(f"results database not found: {self.path} (run `memtune study` first)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.stat().st_size > 0:
            with open(self.path, "rb") as fh:
                header = fh.read(16)
            if header != b"SQLite format 3\x00":
                raise UserError(
                    f"{self.path}: not an SQLite database (corrupt or another file); memtune will not "
                    f"replace it: move it away or choose another --out"
                )
        self._timeout = timeout
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise UserError(f"{self.path}: cannot open the results database ({exc})") from None
        self.conn.row_factory = sqlite3.Row
        try:
            self._setup(create)
        except BaseException:
            self.conn.close()
            raise

    # -- setup -------------------------------------------------------------
    def _setup(self, create: bool) -> None:
        with self._errors("open"):
            self.conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            status = self.conn.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise UserError(
                    f"{self.path}: the results database is corrupt ({status}); memtune will not replace "
                    f"it: move it away or choose another --out"
                )
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "runs" not in tables:
                raise UserError(
                    f"{self.path}: an SQLite database but not memtune results (tables: "
                    f"{', '.join(sorted(tables))}); choose another --out"
                )
            if tables:
                row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
                    if "meta" in tables else None
                if row is None or int(row[0]) != SCHEMA_VERSION:
                    found = row[0] if row else "none"
                    raise UserError(
                        f"{self.path}: results schema version {found}; this memtune reads version "
                        f"{SCHEMA_VERSION}; choose another --out"
                    )
            if tables and create:  # a writer adds them; a reader (memtune report) leaves the file as it is
                self._add_missing_columns()
            if self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if not tables:
                if not create:
                    raise UserError(f"{self.path}: empty results database")
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise

    def _add_missing_columns(self) -> None:
        """A database written before a metric got its column gains it (NULL for the old rows)."""
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
        missing = [(name, typ) for name, typ in METRIC_COLUMNS.items() if name not in have]
        for name, typ in missing:
            self.conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {typ}")

    class _ErrorContext:
        def __init__(self, store: "ResultStore", action: str):
            self.store, self.action = store, action

        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            if exc is None or not isinstance(exc, sqlite3.Error):
                return False
            path = self.store.path
            if isinstance(exc, sqlite3.OperationalError) and _is_lock_error(exc):
                raise UserError(
                    f"{path}: the results database is locked by another process (another study or "
                    f"report writing to it?); wait for it to finish or choose another --out"
                ) from None
            corrupt = not isinstance(exc, sqlite3.OperationalError) and isinstance(exc, sqlite3.DatabaseError)
            if corrupt or "malformed" in str(exc) or "not a database" in str(exc):
                raise UserError(
                    f"{path}: the results database is corrupt ({exc}); memtune will not replace it: "
                    f"move it away or choose another --out"
                ) from None
            raise UserError(f"{path}: cannot {self.action} the results database ({exc})") from None

    def _errors(self, action: str) -> "ResultStore._ErrorContext":
        return ResultStore._ErrorContext(self, action)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _transaction(self, statements: Iterable[tuple[str, tuple]]) -> None:
        with self._errors("write"):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self.conn.execute(sql, params)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    # -- writes ------------------------------------------------------------
    def save_study(self, name: str, spec: dict[str, Any], notes: list[str], when: str) -> None:
        self._transaction([(
            "INSERT INTO studies(name, spec_json, notes_json, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET spec_json=excluded.spec_json, notes_json=excluded.notes_json, "
            "updated_at=excluded.updated_at",
            (name, json.dumps(spec, sort_keys=True), json.dumps(notes), when),
        )])

    def save_plan(self, study: str, entries: list[PlanEntry], experiments: list[str] | None = None) -> None:
        """Replace the study's plan (its tables' rows), or only these experiments', in one transaction."""
        if experiments is None:
            statements: list[tuple[str, tuple]] = [("DELETE FROM plan WHERE study = ?", (study,))]
        else:
            statements = [("DELETE FROM plan WHERE study = ? AND experiment = ?", (study, name))
                          for name in experiments]
        for e in entries:
            statements.append((
                "INSERT OR REPLACE INTO plan(study, experiment, position, config_hash, label, axes_json) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (e.study, e.experiment, e.position, e.config_hash, e.label, json.dumps(e.axes, sort_keys=True)),
            ))
        self._transaction(statements)

    def record_run(self, rec: RunRecord) -> None:
        """Insert (or replace a failed attempt of) one run, in one transaction."""
        if rec.status not in STATUSES:
            raise ValueError(f"status {rec.status!r} not in {STATUSES}")
        m = rec.metrics or {}
        estimate = m.get("estimate")
        est_total = estimate.get("total_bytes") if isinstance(estimate, dict) else None
        versions = m.get("versions") or rec.versions
        values: dict[str, Any] = {
            "config_hash": rec.config_hash,
            "study": rec.study,
            "experiments": json.dumps(rec.experiments),
            "status": rec.status,
            "error": rec.error,
            "config_json": json.dumps(rec.config, sort_keys=True),
            "metrics_json": json.dumps(m, sort_keys=True) if rec.metrics is not None else None,
            **{name: _number(m.get(name)) for name in METRIC_COLUMNS},
            "estimate_total_bytes": _number(est_total),
            "gpu_name": m.get("gpu_name"),
            "device": m.get("device"),
            "versions_json": json.dumps(versions, sort_keys=True) if versions else None,
            "git_commit": m.get("git_commit") or rec.git_commit,
            "run_dir": rec.run_dir,
            "exit_code": rec.exit_code,
            "started_at": rec.started_at,
            "finished_at": rec.finished_at,
            "elapsed_s": rec.elapsed_s,
        }
        cols = list(values)
        updates = ", ".join(f"{c}=excluded.{c}" for c in cols if c != "config_hash")
        sql = (
            f"INSERT INTO runs({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
            f"ON CONFLICT(config_hash) DO UPDATE SET {updates}, attempts = runs.attempts + 1"
        )
        self._transaction([(sql, tuple(values[c] for c in cols))])

    # -- reads -------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._errors("read"):
            return self.conn.execute(sql, params).fetchall()

    def statuses(self) -> dict[str, str]:
        """config hash -> status of every stored run."""
        return {r["config_hash"]: r["status"] for r in self._query("SELECT config_hash, status FROM runs")}

    def get_run(self, config_hash: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM runs WHERE config_hash = ?", (config_hash,))
        return _row_dict(rows[0]) if rows else None

    def runs(self, study: str | None = None) -> list[dict[str, Any]]:
        """Stored runs (all, or those in a study's plan), with config/metrics parsed."""
        if study is None:
            rows = self._query("SELECT * FROM runs ORDER BY id")
        else:
            rows = self._query(
                "SELECT * FROM runs WHERE config_hash IN (SELECT config_hash FROM plan WHERE study = ?) "
                "OR (study = ? AND config_hash NOT IN (SELECT config_hash FROM plan)) ORDER BY id",
                (study, study),
            )
        return [_row_dict(r) for r in rows]

    def plan(self, study: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM plan WHERE study = ? ORDER BY experiment, position", (study,))
        out = []
        for r in rows:
            d = dict(r)
            d["axes"] = json.loads(d.pop("axes_json"))
            out.append(d)
        return out

    def studies(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM studies ORDER BY updated_at")
        return [
            {"name": r["name"], "spec": json.loads(r["spec_json"]), "notes": json.loads(r["notes_json"]),
             "updated_at": r["updated_at"]}
            for r in rows
        ]

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM runs")[0][0]


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _row_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["config"] = json.loads(d.pop("config_json"))
    metrics = d.pop("metrics_json")
    d["metrics"] = json.loads(metrics) if metrics else {}
    d["experiments"] = json.loads(d["experiments"])
    versions = d.pop("versions_json")
    d["versions"] = json.loads(versions) if versions else {}
    return d
