"""Unsloth: FastLanguageModel (load_in_4bit) + get_peft_model(use_gradient_checkpointing="unsloth").

The forward runs under autocast(bf16), as Unsloth's trainer runs it. `unsloth` must be imported
before transformers and peft (it patches them at import): the registry's `preload` does that.
"""

from __future__ import annotations

from typing import Any

from .common import LORA, lora_settings


def load(model_dir: str, seq_len: int, targets: list[str], seed: int, lora: dict | None = None):
    """The 4-bit model with LoRA, as Unsloth's users load it (also used by the trainer comparison)."""
    import torch
    from unsloth import FastLanguageModel

    lora = lora or LORA
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=seq_len, dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
        bias="none", use_gradient_checkpointing="unsloth", random_state=seed, max_seq_length=seq_len)
    for_training = getattr(FastLanguageModel, "for_training", None)
    if callable(for_training):
        for_training(model)
    return model, tokenizer


def build(spec: dict, targets: list[str], device) -> tuple[Any, bool]:
    model, _tokenizer = load(spec["model_dir"], spec["seq_len"], targets, spec["seed"], lora_settings(spec))
    return model, True
