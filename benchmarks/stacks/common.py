"""The training settings every stack of the comparison shares."""

from __future__ import annotations

TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 1.0
