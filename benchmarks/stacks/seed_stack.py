"""transformers + peft + bitsandbytes as users write it (the seed study's stack).

  seed            prepare_model_for_kbit_training, gradient_checkpointing_enable, the model's own
                  loss via labels, no autocast
  seed-autocast   the same, forward under torch.autocast(bf16)
  seed-fp32       the same model in fp32 throughout (bnb_4bit_compute_dtype fp32, fp32 weights
                  outside the 4-bit linears): the full-precision reference of --grad-check
"""

from __future__ import annotations

from typing import Any

from .common import LORA

VARIANTS = ("seed", "seed-autocast", "seed-fp32")


def build(variant: str, spec: dict, targets: list[str], device) -> tuple[Any, bool]:
    """The model and whether its forward runs under bf16 autocast."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown seed variant {variant!r}")
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    precision = torch.float32 if variant == "seed-fp32" else torch.bfloat16
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], quantization_config=quant, dtype=precision, attn_implementation="sdpa",
        device_map={"": device.index if device.type == "cuda" else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=targets,
        bias="none", task_type="CAUSAL_LM"))
    return model, variant == "seed-autocast"
