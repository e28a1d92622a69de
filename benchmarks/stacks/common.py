"""The training settings every stack of the comparison shares."""

from __future__ import annotations

TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Phi-3 projects q/k/v with one qkv_proj and gate/up with one gate_up_proj: "all" is its four linears
# ("qv" has no meaning there: the fused qkv_proj is the nearest, and is what peft would adapt)
FAMILY_TARGETS = {"phi3": {"qv": ["qkv_proj"], "all": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 1.0


def lora_targets(name: str, model_type: str | None = None) -> list[str]:
    """The module names LoRA adapts for a --lora-targets choice on this family."""
    return FAMILY_TARGETS.get(model_type or "", TARGETS)[name]


def lora_settings(spec: dict) -> dict:
    """r, alpha (2r, as the defaults' 8/16) and dropout for this run's spec (its lora_rank, else the default)."""
    rank = int(spec.get("lora_rank") or LORA["r"])
    return {"r": rank, "alpha": 2 * rank, "dropout": LORA["dropout"]}
