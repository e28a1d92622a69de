"""memtune from Python: the same build, techniques, estimate and planner as the CLI.

    model, tokenizer = memtune.load_model("deepseek-r1-distill-qwen-1.5b", random_init=True, lora_rank=16)
    report = memtune.apply(my_model)            # a model built with transformers (+ bitsandbytes, + peft)
    print(report)                               # one line per technique: applied, or skipped and why
    memtune.estimate(model="llama-3.1-8b", seq_len=32768).total_bytes
    memtune.fit(gpu_memory="24GiB", model="llama-3.1-8b").fits[0].cfg

Options are the configuration keys of `memtune train` (`lora_rank=16`, `offload_activations=False`,
...), flat or grouped by section (`memory={"tiled_mlp_chunk": 0}`). A wrong name or value raises one
ValueError (memtune.errors.UserError) naming it and what is allowed. One code path serves the CLI
and this module: `load_model` is `memtune train`'s build, `apply` walks the same technique registry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memtune.config import RunConfig, flatten_sections, from_dict
from memtune.errors import UserError
from memtune.techniques import BY_NAME, ApplyReport, Target, apply_techniques

# The fields memtune.apply reads: the techniques' own switches and the settings they take. What the
# build decides (quantization, LoRA, the weights) is read off the model itself.
APPLY_OPTIONS: frozenset[str] = frozenset(
    {name for t in BY_NAME.values() for name in (t.name, *t.fields)} - {"int8_backward"} | {"compute_dtype"})


def _config(options: dict[str, Any], source: str) -> RunConfig:
    return from_dict(flatten_sections(options, source), source=source)


def load_model(model: str = "tiny", **options: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) built as `memtune train` builds them: a preset, a local directory or a cached
    hub id; quantized, with LoRA, and with every memory technique the options leave on."""
    from memtune.models import build_model

    built = build_model(_config({"model": model, **options}, "memtune.load_model"))
    built.model._memtune_report = built.techniques  # the techniques applied and skipped, for the curious
    return built.model, built.tokenizer


def apply(model: nn.Module, **options: Any) -> ApplyReport:
    """Apply memtune's memory techniques to a model the user built (transformers, bitsandbytes, peft).

    After it, `model(input_ids, labels=labels)` in training mode returns memtune's chunked loss and no
    logits, so a Hugging Face Trainer (or any loop) trains with the same savings as `memtune train`.
    Returns what was applied and, for each technique skipped, why."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected a torch.nn.Module (a transformers causal LM); got {type(model).__name__}")
    flat = flatten_sections(options, "memtune.apply")
    unknown = sorted(set(flat) - APPLY_OPTIONS)
    if unknown:
        from memtune.config import FIELD_NAMES

        what = ("is not a technique option (the build and the training loop are the caller's)"
                if unknown[0] in FIELD_NAMES else "is not an option")
        raise UserError(f"memtune.apply: '{unknown[0]}' {what}; the options are {', '.join(sorted(APPLY_OPTIONS))}")
    cfg = _config({**_built_as(model), **flat}, "memtune.apply")
    device = _device_of(model)
    dtype = _DTYPES.get(cfg.compute_dtype) or _compute_dtype_of(model)  # auto: what the model computes in
    return apply_techniques(Target(model, cfg, device, dtype))


def estimate(**options: Any):
    """The predicted peak GPU memory of `memtune train` with these options (memtune.estimate.Estimate)."""
    from memtune.estimate import estimate_memory

    return estimate_memory(_config(options, "memtune.estimate"))


def fit(gpu_memory: str | int, host_memory: str | int | None = None, **options: Any):
    """The configurations that fit `gpu_memory` (e.g. "24GiB"), ranked (memtune.fit.FitResult). Options
    given here are held fixed; the others are searched."""
    from memtune.config import parse_memory_size
    from memtune.fit import fit_configurations

    def size(name: str, value: str | int) -> int:
        try:
            return int(value) if isinstance(value, int) else parse_memory_size(value)
        except ValueError as exc:
            raise UserError(f"{name}: {exc}") from None

    flat = flatten_sections(options, "memtune.fit")
    cfg = _config({**flat, "gpu_memory": str(gpu_memory)}, "memtune.fit")
    return fit_configurations(cfg, size("gpu_memory", gpu_memory), set(flat),
                              host_budget_bytes=None if host_memory is None else size("host_memory", host_memory))


# --- what a user-built model already is ------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _built_as(model: nn.Module) -> dict[str, Any]:
    """The build-time fields, read off the model: its quantization and whether it carries LoRA."""
    from memtune.kernels.frozen_4bit import four_bit_linears
    from memtune.kernels.int8_backward import int8_linears
    from memtune.kernels.lora import _lora_modules

    four_bit = four_bit_linears(model)
    if four_bit:
        quant_type = getattr(four_bit[0].weight, "quant_type", "nf4")
        quantization = quant_type if quant_type in ("nf4", "fp4") else "nf4"
    else:
        quantization = "int8" if int8_linears(model) else "none"
    lora = bool(_lora_modules(model))
    trains_all = not lora and all(p.requires_grad for p in model.parameters())
    return {"quantization": quantization, "lora": lora or not trains_all}


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its input embeddings' (what the residual stream starts as)."""
    from memtune.kernels._common import base_model

    embed = base_model(model).get_input_embeddings()
    weight = getattr(embed, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
