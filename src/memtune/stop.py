"""SIGINT and SIGTERM during training: finish the step, write a checkpoint, stop with 130 / 143.

A scheduler preempting a job sends SIGTERM and waits a while before SIGKILL; Ctrl-C
sends SIGINT. Either one only sets a flag: the loop sees it after the current
step, checkpoints and raises `Stopped`. A second signal acts at once (Ctrl-C
twice is an ordinary KeyboardInterrupt); a checkpoint cut short by it is left
as a temporary directory that no resume reads.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator


class Stopped(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended: 130, 143


class StopRequest:
    """Set by the first SIGINT / SIGTERM; the loop reads `signum` after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM request a stop instead of ending the process."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        request.signum = signum
        for sig, old in previous.items():  # the second signal gets the usual behaviour
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
