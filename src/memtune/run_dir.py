"""Where a run writes: output paths checked before anything loads, and a run directory that never lies.

A directory holds at most one run's files. `metrics.json` is the run's result
and is written last; a directory without it is not a result. Before a new run
writes anything into a directory that holds another run's files, those files
(only the names memtune train writes, `RUN_FILES`) are moved into
`DIR/.previous-<time>/`, metrics.json first, so that a run killed at any
moment leaves no directory whose config and result disagree. Nothing is
deleted, and files memtune did not write are left where they are.

- A finished run (metrics.json) or an unfinished one with checkpoints is
  refused unless `--overwrite` (move it aside) or `--resume` (continue it).
- An unfinished run without checkpoints (failed, interrupted, killed before
  its first checkpoint) has nothing to keep or resume: it is moved aside
  with a line saying so, so a retry in the same directory just works.
- `--resume` needs `checkpoints/`; the old result of a finished run being
  extended (metrics.json, report.md) is moved aside first, since the run
  that follows changes it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from memtune.errors import UserError

# Every name `memtune train` writes in its run directory, the result first: moved aside in this
# order, a directory never holds a result without the files it describes.
RESULT_FILES = ("metrics.json", "report.md")
RUN_FILES = (*RESULT_FILES, "config.yaml", "adapter", "model", "predictions_before.jsonl",
             "predictions_after.jsonl", "log.jsonl", "loss.png", "tensorboard", "checkpoints")
CHECKPOINTS = "checkpoints"
ASIDE_PREFIX = ".previous-"
LOCK_NAME = ".memtune.lock"

_held_locks: dict[Path, object] = {}  # run directories this process writes, each kept locked until exit
_created: set[Path] = set()  # the ones prepare() created: removed again if the run writes nothing there


@dataclass(frozen=True)
class RunDirState:
    """What a run directory holds before a run starts in it."""

    path: Path
    status: str | None  # metrics.json's status ("ok", "oom", ...): a finished result; None = none
    checkpoints: bool  # checkpoints/ holds at least one entry
    run_files: tuple[str, ...]  # the names of RUN_FILES present (temporary `.NAME.tmp` ones included)


def check_dir_target(path: Path, field: str) -> None:
    """`path` can be a directory memtune creates or writes into: not a file, nor below one, and writable."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{field}: {path} is a file; expected a directory (a new one, or a run directory)")
    _check_creatable(path, field)


def check_file_target(path: Path, field: str) -> None:
    """`path` can be written as a file: not a directory, its parent not a file, and writable."""
    if path.is_dir():
        raise UserError(f"{field}: {path} is a directory; expected a file path")
    _check_creatable(path.parent, field, shown=path)


def _check_creatable(path: Path, field: str, shown: Path | None = None) -> None:
    """The nearest existing ancestor of `path` (itself included) is a writable directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{field}: cannot create {shown or path}: {existing} is a file, not a directory")
    try:  # a real probe: permissions, a read-only file system, /proc; nothing stays behind
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{field}: cannot write into {existing} ({exc.strerror or exc})") from None


def inspect(path: Path) -> RunDirState:
    """What `path` holds (a missing directory holds nothing)."""
    check_dir_target(path, "out")
    if not path.is_dir():
        return RunDirState(path, None, False, ())
    present = tuple(name for name in RUN_FILES
                    if (path / name).exists() or (path / f".{name}.tmp").exists())
    checkpoints = (path / CHECKPOINTS).is_dir() and any((path / CHECKPOINTS).iterdir())
    return RunDirState(path, _result_status(path / "metrics.json"), checkpoints, present)


def _result_status(metrics: Path) -> str | None:
    if not metrics.is_file():
        return None
    try:
        data = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable"  # still someone's result file: refused like any other
    status = data.get("status") if isinstance(data, dict) else None
    return str(status) if status else "unknown"


def check(path: Path, overwrite: bool = False, resume: bool = False) -> RunDirState:
    """Refuse (UserError, one line) a run that would mix its files with another run's; read-only."""
    if overwrite and resume:
        raise UserError("overwrite: --overwrite starts a new run and --resume continues one; choose one")
    state = inspect(path)
    if resume:
        if not state.checkpoints:
            raise UserError(f"resume: {path} has no checkpoints to resume from "
                            f"(expected {path / CHECKPOINTS}/step-N/); run without --resume to start a new run")
        return state
    if overwrite:
        return state
    continue_hint = "use --resume to continue it, " if state.checkpoints else ""
    if state.status is not None:
        raise UserError(f"out: {path} holds a finished run (metrics.json, status {state.status}); "
                        f"{continue_hint}choose another --out, or add --overwrite to move it aside")
    if state.checkpoints:
        raise UserError(f"out: {path} holds an unfinished run with checkpoints; {continue_hint}"
                        f"choose another --out, or add --overwrite to move it aside")
    return state


def prepare(path: Path, overwrite: bool = False, resume: bool = False,
            log: Callable[[str], None] = print) -> Path | None:
    """Check, lock and clear `path` for one run; return where the previous run's files went (or None).

    Call it once the run's inputs are known good and before the run writes anything.
    """
    check(path, overwrite=overwrite, resume=resume)  # nothing created for a directory refused anyway
    if not path.exists():
        path.mkdir(parents=True)
        _created.add(path.resolve())
    try:
        lock(path)
        # again under the lock: a run that was finishing meanwhile has its result now
        state = check(path, overwrite=overwrite, resume=resume)
    except UserError:
        unlock(path)
        raise
    if resume:
        names = tuple(name for name in RESULT_FILES if name in state.run_files)
    else:
        names = state.run_files
    if not names:
        return None
    aside = move_aside(path, names)
    what = "result" if resume else ("run" if state.status or state.checkpoints else "unfinished run")
    log(f"moved the previous {what}'s files ({', '.join(names)}) to {aside}/")
    return aside


def set_aside(path: Path) -> Path | None:
    """Move every run file in `path` aside, whatever state it is in; None when there was none.

    For a caller that owns the directory and starts the run in it again (`memtune study` retrying a
    run that failed, timed out or was killed): the new run finds it empty, the old attempt is kept.
    """
    present = inspect(path).run_files
    return move_aside(path, present) if present else None


def move_aside(path: Path, names: tuple[str, ...]) -> Path:
    """Move `names` (and their `.NAME.tmp` leftovers) from `path` into a new `path/.previous-<time>/`."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = path / f"{ASIDE_PREFIX}{stamp}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = path / f"{ASIDE_PREFIX}{stamp}-{suffix}"
    aside.mkdir()
    for name in names:  # RUN_FILES order: metrics.json leaves first
        for entry in (name, f".{name}.tmp"):
            if (path / entry).exists():
                os.replace(path / entry, aside / entry)
    return aside


def lock(path: Path) -> None:
    """Hold `path/.memtune.lock` until this process exits: a second run into the same directory is refused.

    The kernel releases the lock when the process dies, so a killed run never leaves it held.
    """
    import fcntl

    key = path.resolve()
    if key in _held_locks:
        return
    handle = open(path / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"out: another run is writing {path} (pid {holder}); wait for it or choose another --out") \
            from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _held_locks[key] = handle


def unlock(path: Path) -> None:
    """Release the lock `lock(path)` took; a directory prepare() created and the run left empty (it
    failed before writing, on a user's mistake) goes too: a mistake leaves no run directory behind."""
    key = path.resolve()
    handle = _held_locks.pop(key, None)
    if handle is not None:
        handle.close()
    if key in _created:
        _created.discard(key)
        if [p.name for p in path.iterdir()] == [LOCK_NAME]:
            (path / LOCK_NAME).unlink()
            path.rmdir()
