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


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    import memtune

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["memtune"] = versions["memtune"] or memtune.__version__
    torch = sys.modules.get("torch")  # the CUDA build, when a run has loaded torch
    if torch is not None:
        versions["cuda"] = torch.version.cuda
    return versions


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
