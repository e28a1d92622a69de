"""What every result records so numbers can be compared: package versions, git commit, time.

No torch import here: the study process records these for runs that wrote
nothing, without paying for a framework it does not use.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import sys
from pathlib import Path

_PACKAGES = ("memtune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """memtune's packages' versions, plus those of `extra` (a benchmark's other stacks: unsloth, trl)."""
    from importlib import metadata

    import memtune

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*_PACKAGES, *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["memtune"] = versions["memtune"] or memtune.__version__
    torch = sys.modules.get("torch")  # the CUDA build, when a run has loaded torch
    if torch is not None:
        versions["cuda"] = torch.version.cuda
    return versions


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD, with "+dirty" when the package's source differs from it (edited or new files under src/).

    A copy of the tree whose git metadata is older than its files would otherwise record a commit
    that did not run (the H200 results of 2026-11-29 04:44-05:07 did: their records say 8dbd0d2)."""
    repo = Path(__file__).resolve().parents[2]
    head = (_git(repo, "rev-parse", "HEAD") or "").strip()
    if not head:
        return None
    changed = _git(repo, "status", "--porcelain", "--", "src")
    return head + "+dirty" if changed else head


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
