"""report.md of one run: what was trained, what it cost, what it bought."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memtune.config import RunConfig, write_text_atomic
from memtune.estimate import gib
from memtune.findings import fmt_bytes


def _memory_lines(metrics: dict[str, Any]) -> list[str]:
    lines = ["| what | memory |", "|---|---|"]
    if "peak_allocated_bytes" in metrics:
        lines.append(f"| peak allocated (GPU) | {gib(metrics['peak_allocated_bytes'])} |")
        lines.append(f"| peak reserved (GPU) | {gib(metrics['peak_reserved_bytes'])} |")
    else:
        if "peak_tensor_bytes" in metrics:
            lines.append(f"| peak tensor memory (CPU) | {fmt_bytes(metrics['peak_tensor_bytes'])} |")
        lines.append(f"| peak RSS (CPU process, during training) | {gib(metrics['peak_rss_bytes'])} |")
    small = "peak_allocated_bytes" not in metrics  # a CPU run of the tiny model: MiB, not 0.00 GiB
    show = fmt_bytes if small else gib
    for name, value in metrics.get("memory_breakdown", {}).items():
        lines.append(f"| {name.removesuffix('_bytes').replace('_', ' ')} | {show(value)} |")
    estimate = metrics.get("estimate")
    if estimate:
        where = "CPU tensor memory" if small else "peak allocated (GPU)"
        lines.append(f"| estimated {where} | {show(estimate['total_bytes'])} |")
    return lines


def write_run_report(out_dir: Path, cfg: RunConfig, metrics: dict[str, Any]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in metrics.get("versions", {}).items() if v)
    lines = [
        f"# memtune run: {cfg.model}",
        "",
        f"- {cfg.quantization} quantization{' (double)' if cfg.double_quant and cfg.quantization in ('nf4', 'fp4') else ''}, "
        + (f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {cfg.lora_targets}" if cfg.lora else "full fine-tuning")
        + f", gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
        f"{metrics['seq_len']} tokens x batch {cfg.batch_size} x accumulation {cfg.grad_accum}, {cfg.steps} steps",
        f"- device: {metrics.get('gpu_name') or metrics.get('device')}; {versions}; commit {metrics.get('git_commit')}",
        f"- trainable params: {metrics['trainable_params']:,} of {metrics['total_params']:,} "
        f"({metrics['trainable_percent']:.4f}%)",
        "",
        "## Memory",
        "",
        *_memory_lines(metrics),
        "",
        "## Time",
        "",
        f"- median step time {metrics['step_time_s']:.3f} s, {metrics['tokens_per_s']:,.0f} tokens/s"
        + (f", MFU {metrics['mfu']:.1%}" if metrics.get("mfu") else ""),
        f"- loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}",
    ]
    if "accuracy_before" in metrics:
        lines += ["", "## Accuracy", "",
                  f"- before fine-tuning: {metrics['accuracy_before']:.3f}",
                  f"- after fine-tuning: {metrics['accuracy_after']:.3f} ({metrics['eval_examples']} held-out examples)"]
    write_text_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
