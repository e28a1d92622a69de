"""`memtune train`: fine-tune one configuration, measure it, write its run directory."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import traceback
from pathlib import Path

from memtune.cli import add_config_flags, config_from_args
from memtune.config import RunConfig, save_yaml, write_text_atomic
from memtune.errors import EXIT_OOM, UserError, is_out_of_memory
from memtune.estimate import gib
from memtune.stop import Stopped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars (training and evaluation)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out that holds another run; that run's files are moved "
                             "to DIR/.previous-<time>/ first (nothing is deleted)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out DIR from its newest complete checkpoint, with its config; "
                             "options given too may change only steps, epochs, checkpoint_every, "
                             "checkpoint_keep, log and val_every")


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    model = Path(cfg.model).name.replace("/", "_")
    return Path("runs") / f"{stamp}-{model}-{cfg.quantization}-r{cfg.lora_rank}-L{cfg.seq_len}"


def run(args: argparse.Namespace) -> int:
    from memtune import bounds, run_dir, train

    cfg = config_from_args(args)
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    overwrite, resume = bool(getattr(args, "overwrite", False)), bool(getattr(args, "resume", False))
    if resume and not cfg.out:  # not a new default directory, which has nothing to resume
        raise UserError("resume: expected --out DIR, the run directory to continue")
    # torchrun's ranks but 0 neither check, lock nor write the run directory (rank 0 does)
    main = _launched_rank() == 0
    # Everything a user can get wrong about where the run goes or how big it is, before anything loads.
    if main:
        run_dir.check(out_dir, overwrite=overwrite, resume=resume)
    resume_from = None
    if resume:
        from memtune.resume import resume_run

        cfg, resume_from = resume_run(args, out_dir)
    bounds.check_lora_rank(cfg)
    try:
        if main:
            run_dir.prepare(out_dir, overwrite=overwrite, resume=resume)
        metrics = train.run(cfg, out_dir, progress=not args.quiet, resume_from=resume_from)
    except Stopped as stop:
        where = f"checkpoint {stop.checkpoint}; " if stop.checkpoint else ""
        print(f"memtune train: {stop}; {where}resume with: memtune train --out {out_dir} --resume",
              file=sys.stderr)
        return stop.exit_code
    except FloatingPointError as exc:  # the loss diverged: the run's settings, not a bug
        raise UserError(_diverged(str(exc).splitlines()[0], cfg)) from None
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        if main:
            _record_failure(out_dir, cfg, "oom", exc)
        print(f"memtune train: out of memory: {_first_line(exc)}", file=sys.stderr)
        return EXIT_OOM
    finally:
        if main:
            run_dir.unlock(out_dir)
    if not main:
        return 0
    print_summary(metrics)
    print(f"wrote {out_dir}/ (config.yaml, metrics.json, {'adapter' if cfg.lora else 'model'}/, report.md)")
    return 0


def _launched_rank() -> int:
    """This process's rank under torchrun (RANK), 0 outside it."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _record_failure(out_dir: Path, cfg: RunConfig, status: str, exc: BaseException) -> None:
    """An out-of-memory is a result: record it (with the peak reached) rather than crash."""
    import torch

    from memtune import measure, provenance

    if not (out_dir / "config.yaml").is_file():  # out of memory before the run wrote its config: the result
        save_yaml(cfg, out_dir / "config.yaml")   # must still say what ran, and the config comes first
    metrics = {"status": status, "error": _first_line(exc)[:500], "config_hash": cfg.config_hash(),
               "finished_at": provenance.now_iso(), "versions": provenance.package_versions(),
               "git_commit": provenance.git_commit()}
    # the peak reached before the allocation failed, on the GPU or (a CPU run) the process's
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    metrics.update(measure.device_info(device))
    metrics.update(measure.peak_memory(device))
    metrics["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))


# LoRA's update is scaled by lora_alpha / lora_rank; peft's and memtune's defaults give 2. Far above
# it the adapter's first steps blow up the loss at any learning rate, so the message names alpha too.
_LARGE_LORA_SCALE = 64


def _diverged(message: str, cfg: RunConfig) -> str:
    scale = cfg.lora_alpha / cfg.lora_rank
    if cfg.lora and scale > _LARGE_LORA_SCALE:
        return (f"{message} (now {cfg.learning_rate:g}), or lora_alpha: lora_alpha / lora_rank = {scale:g} scales "
                f"the adapter's update (the defaults give 2)")
    return f"{message} (now {cfg.learning_rate:g})"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def print_summary(metrics: dict) -> None:
    from memtune.findings import fmt_bytes

    print()
    print("== memtune train ==")
    if "peak_allocated_bytes" in metrics:
        print(f"peak allocated:  {gib(metrics['peak_allocated_bytes'])}")
        print(f"peak reserved:   {gib(metrics['peak_reserved_bytes'])}")
    else:
        if "peak_tensor_bytes" in metrics:
            print(f"peak tensor memory (CPU): {fmt_bytes(metrics['peak_tensor_bytes'])}")
        print(f"peak RSS (CPU process, whole training): {gib(metrics['peak_rss_bytes'])}")
    if metrics.get("ranks"):  # --strategy: each rank's peak, and the group's total
        key = "peak_allocated_bytes" if "peak_allocated_bytes" in metrics else "peak_rss_bytes"
        peaks = ", ".join(gib(r[key]) for r in metrics["ranks"])
        print(f"{metrics['world_size']} ranks ({metrics.get('strategy')}), {key.removesuffix('_bytes')} per rank: "
              f"{peaks}; total {gib(sum(r[key] for r in metrics['ranks']))}")
    show = gib if "peak_allocated_bytes" in metrics else fmt_bytes  # a CPU run's few MiB, not 0.00 GiB
    print("memory breakdown:")
    for name, value in metrics["memory_breakdown"].items():
        print(f"  {name.removesuffix('_bytes'):<24} {show(value)}")
    if metrics.get("estimate"):
        where = "peak allocated (GPU)" if "peak_allocated_bytes" in metrics else "tensor memory (CPU)"
        print(f"estimated {where}: {show(metrics['estimate']['total_bytes'])}")
    print(f"median step time: {metrics['step_time_s']:.3f} s   tokens/s: {metrics['tokens_per_s']:,.0f}"
          + (f"   MFU: {metrics['mfu']:.1%}" if metrics.get("mfu") else ""))
    print(f"loss: {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}")
    if "val_loss" in metrics:
        print(f"validation loss: {metrics['val_losses'][0]['loss']:.4f} (step {metrics['val_losses'][0]['step']}) "
              f"-> {metrics['val_loss']:.4f} (step {metrics['val_losses'][-1]['step']})")
    if "accuracy_before" in metrics:
        print(f"accuracy: {metrics['accuracy_before']:.3f} -> {metrics['accuracy_after']:.3f} "
              f"({metrics['eval_examples']} held-out examples)")
