"""The training log: DIR/log.jsonl (one line per optimizer step), TensorBoard events, DIR/loss.png.

Each line is written and flushed as its step ends, so a killed run's log is good
up to its last step. A resumed run first cuts the log back to the checkpoint it
resumes from (rewritten atomically), so the log never holds the steps that
were lost and done again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memtune.config import RunConfig, write_text_atomic
from memtune.errors import UserError

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def require_sink(cfg: RunConfig) -> None:
    """Fail before anything is built when the log asked for needs a package that is missing."""
    if cfg.log == "tensorboard":
        try:
            import tensorboard  # noqa: F401 - SummaryWriter needs it
        except ImportError:
            raise UserError("log: tensorboard needs the tensorboard package "
                            "(pip install 'memtune[tensorboard]'); or leave --log at jsonl") from None


class TrainLog:
    """Appends one record per step to DIR/log.jsonl (and TensorBoard with cfg.log tensorboard)."""

    def __init__(self, out_dir: Path, cfg: RunConfig, start_step: int = 0):
        self.path = out_dir / LOG_FILE
        _cut_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if cfg.log == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the checkpoint, written before a kill, are dropped
            self._writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value,
                                            record["step"])

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _cut_after(path: Path, step: int) -> None:
    """Keep the lines of steps 1..step (a resume); a fresh run (step 0) starts an empty log."""
    if not path.exists():
        return
    kept = []
    if step:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a line cut short by a kill: nothing after it was written
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def peak_so_far_bytes(device: torch.device) -> int:
    """The peak memory of the run so far, read without ending the measurement."""
    from memtune import measure

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    tracker = getattr(measure, "_tracker", None)  # the CPU tensor tracker, when one runs
    return int(tracker.peak) if tracker is not None else measure.peak_rss_bytes()


def plot_losses(out_dir: Path, losses: list[float], val_losses: list[dict[str, float]]) -> Path:
    """DIR/loss.png: the training loss per step and the validation loss where it was computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="train", linewidth=1)
    if val_losses:
        ax.plot([v["step"] for v in val_losses], [v["loss"] for v in val_losses], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
