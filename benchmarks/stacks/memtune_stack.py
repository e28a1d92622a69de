"""memtune's rows: `python -m memtune train` with its defaults, plus a variant's flags.

A memtune row trains through the CLI (so it measures what a user of `memtune train` gets) and
its record is filled from the run's metrics.json. The gradient check builds the same
configuration in-process instead (`build_for_gradients`), to read the LoRA gradients.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Callable

from .common import LEARNING_RATE, MAX_GRAD_NORM, lora_settings, lora_targets

# metrics.json keys copied into a compare record as they are
METRIC_KEYS = ("gpu_name", "versions", "peak_allocated_bytes", "peak_reserved_bytes", "trainable_params",
               "losses", "step_times_s", "step_time_s", "tokens_per_s", "memory_breakdown", "git_commit")


def train_args(args, model_dir: Path, seq_len: int, out_dir: Path, extra: str) -> list[str]:
    """The flags of `memtune train` for one memtune row (the same settings as the other stacks, plus `extra`)."""
    targets = ",".join(lora_targets(args.lora_targets, args.model_type))
    lora = lora_settings({"lora_rank": args.lora_rank})
    cmd = ["--model", str(model_dir) if args.memtune_model == "dir" else args.memtune_model,
           "--data", "random", "--seq-len", str(seq_len), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup), "--no-eval", "--out", str(out_dir),
           "--batch-size", "1", "--seed", str(args.seed), "--lora-rank", str(lora["r"]),
           "--lora-alpha", str(lora["alpha"]), "--lora-dropout", "0", "--lora-targets", targets,
           "--learning-rate", str(LEARNING_RATE), "--max-grad-norm", str(MAX_GRAD_NORM)]
    if args.memtune_model != "dir":
        cmd.append("--random-init")
    if args.gpu_memory:
        cmd += ["--gpu-memory", args.gpu_memory]
    return cmd + shlex.split(extra)


def build_for_gradients(argv: list[str], batch: dict) -> tuple[Any, Callable[[], Any]]:
    """The model `memtune train argv` builds, and a function returning its training loss on `batch`."""
    from memtune.cli import build_verb_parser, config_from_args
    from memtune.models import build_model
    from memtune.train import forward_loss

    parser, _module = build_verb_parser("train")
    cfg = config_from_args(parser.parse_args(argv))
    model = build_model(cfg).model
    model.train()
    return model, lambda: forward_loss(model, batch, cfg)


def fill_record(record: dict, metrics_path: Path, code: int | None, log_tail: str) -> None:
    """The record of one memtune row from its run directory's metrics.json."""
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        metrics = None
    if metrics is None:
        record["status"] = "oom" if code == 3 or "out of memory" in log_tail.lower() else "error"
        record["error"] = f"memtune train exited {code} without metrics.json"
        return
    status = metrics.get("status", "error")
    record["status"] = status if status in ("ok", "oom") else "error"
    if record["status"] != "ok":
        record["error"] = str(metrics.get("error") or metrics.get("message") or f"memtune status {status}")
    record.update({key: metrics[key] for key in METRIC_KEYS if key in metrics})
    record["memtune_peak_rss_bytes"] = metrics.get("peak_rss_bytes")
    estimate = metrics.get("estimate") or {}
    record["estimate_bytes"] = estimate.get("total_bytes")  # memtune's own prediction of its peak
    if record["status"] == "ok":
        record["loss_step1"] = metrics.get("loss_first", (metrics.get("losses") or [None])[0])
        if metrics.get("seq_len") and metrics["seq_len"] != record["seq_len"]:
            record["note"] = f"memtune trained {metrics['seq_len']} tokens (capped)"


def is_memtune_row(record: dict) -> bool:
    """memtune's own stack or one of its --variant stacks (any name), by the command that ran it."""
    return record.get("stack", "").startswith("memtune") or " -m memtune train " in record.get("command", "")
