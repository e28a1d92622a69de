"""Frozen int8 linears whose backward keeps nothing but the weight.

bitsandbytes' MatMul8bitLt keeps its input for backward as `ctx.tensors`, an
attribute rather than `save_for_backward`. Gradient checkpointing frees only
what goes through `save_for_backward`, so with int8 weights every linear of
every layer keeps its bf16 input alive for the whole step: for the 1.5B shape
at 16384 tokens that is 2 bytes x (3 x 1536 + 1536 + 8960 + 2 x 1536 ...) per
token per layer, about 12 GiB, more than the unquantized model needs.

With frozen weights (LoRA), backward needs only dL/dx = dL/dy @ W, and W is
already stored (int8 codes + one fp32 scale per output row). So this runs
bitsandbytes' forward without autograd and computes dL/dx from the stored
weight: nothing per token is saved, and checkpointing works again.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memtune.kernels._common import restore_forwards, swap_forwards

_ATTR = "_memtune_int8_forward"


def _dequantized_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W = int8 codes x (row absmax / 127), the same arithmetic as bitsandbytes' own backward."""
    # bitsandbytes moves the scales from the parameter to layer.state on the first forward.
    scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
    codes = layer.state.CB if getattr(layer.state, "CB", None) is not None else layer.weight.data
    scale = scb.to(torch.float32).mul(1.0 / 127.0).unsqueeze(1)
    return (codes.to(torch.float32) * scale).to(dtype)


class _FrozenInt8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, original: Callable) -> torch.Tensor:
        ctx.layer = layer  # a module reference, not a per-token tensor
        with torch.no_grad():
            return original(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = _dequantized_weight(ctx.layer, grad_out.dtype)  # [out, in], one layer's worth
        return grad_out @ weight, None, None


def _make_forward(layer: nn.Module, original: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad) or layer.weight.requires_grad:
            return original(x)
        return _FrozenInt8Linear.apply(x, layer, original)

    return forward


def int8_linears(model: nn.Module) -> list[nn.Module]:
    """The model's bitsandbytes int8 linears (none where bitsandbytes is not installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]


def enable_frozen_int8_backward(model: nn.Module) -> int:
    """Swap the forward of every bitsandbytes Linear8bitLt instance; return how many. Idempotent."""
    return swap_forwards(int8_linears(model), _ATTR, _make_forward)


def disable_frozen_int8_backward(model: nn.Module) -> int:
    """Undo `enable_frozen_int8_backward`; returns the number of layers restored."""
    return restore_forwards(int8_linears(model), _ATTR)
