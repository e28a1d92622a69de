"""seed-autocast with Liger-Kernel's Qwen2 kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)."""

from __future__ import annotations

from typing import Any

from . import seed_stack


def build(spec: dict, targets: list[str], device) -> tuple[Any, bool]:
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    apply_liger_kernel_to_qwen2()
    return seed_stack.build("seed-autocast", spec, targets, device)
