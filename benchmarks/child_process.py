"""One measured child process: memtune's run environment, its own process group, a timeout,
and the child's peak host RSS from the kernel (wait4)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from memtune.cli import set_run_environment

SRC = Path(__file__).resolve().parent.parent / "src"


def child_env() -> dict[str, str]:
    """memtune's offline, allocator environment, src/ on the path; Unsloth sends no statistics."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    set_run_environment(env)
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    return env


def run_logged(cmd: list[str], cwd: Path, log: Path, timeout: float) -> tuple[int | None, int]:
    """Run `cmd` with its output in `log`; (exit status or None on timeout, the child's peak RSS in bytes)."""
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=child_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return wait_with_rss(proc, timeout)


def wait_with_rss(proc: subprocess.Popen, timeout: float) -> tuple[int | None, int]:
    """Wait for the child with os.wait4: (exit status or None on timeout, its peak RSS in bytes)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, int(usage.ru_maxrss) * 1024
        if time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
            except ProcessLookupError:
                pass
            pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, int(usage.ru_maxrss) * 1024
        time.sleep(0.5)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""
