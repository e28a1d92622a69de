"""transformers + peft + bitsandbytes as users write it (the seed study's stack).

  seed            prepare_model_for_kbit_training, gradient_checkpointing_enable, the model's own
                  loss via labels, no autocast
  seed-autocast   the same, forward under torch.autocast(bf16)
  seed-fp32       the same model in fp32 throughout (bnb_4bit_compute_dtype fp32, fp32 weights
                  outside the 4-bit linears): the full-precision reference of --grad-check
"""

from __future__ import annotations

from typing import Any

from .common import lora_settings

VARIANTS = ("seed", "seed-autocast", "seed-fp32")


def build(variant: str, spec: dict, targets: list[str], device) -> tuple[Any, bool]:
    """The model and whether its forward runs under bf16 autocast."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown seed variant {variant!r}")
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from memtune.families import attention_implementation

    precision = torch.float32 if variant == "seed-fp32" else torch.bfloat16
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision)
    # SDPA, except where it cannot express the family's attention (Gemma 2's softcapped scores): then
    # flex_attention on a GPU or eager, as memtune's families table picks for memtune itself
    attention, _note = attention_implementation(
        transformers.AutoConfig.from_pretrained(spec["model_dir"]), "auto", device.type)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], quantization_config=quant, dtype=precision, attn_implementation=attention,
        device_map={"": device.index if device.type == "cuda" else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = lora_settings(spec)
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
        bias="none", task_type="CAUSAL_LM"))
    return model, variant == "seed-autocast"
