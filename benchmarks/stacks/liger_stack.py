"""seed-autocast with Liger-Kernel's kernels for the model's family (RoPE, RMSNorm, SwiGLU/GeGLU,
fused linear cross-entropy), through Liger's own per-model_type apply table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import seed_stack


def build(spec: dict, targets: list[str], device) -> tuple[Any, bool]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = json.loads((Path(spec["model_dir"]) / "config.json").read_text())["model_type"]
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"Liger-Kernel has no kernels for model_type {model_type!r}")
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]()
    return seed_stack.build("seed-autocast", spec, targets, device)
