"""LoRA matmuls in the activations' dtype (bf16), with the fp32 adapter weights kept as master copies.

peft keeps LoRA weights in fp32 (autocast_adapter_dtype) and, outside autocast,
casts each adapted layer's *input* to fp32 before `lora_B(lora_A(dropout(x)))`.
That cast is saved for backward: one fp32 copy of the input per adapted
module, e.g. for the 1.5B shape at 65k tokens 403 MB per q/k/v/o/gate/up input
and 2.3 GB for down_proj's [tokens, 8960] input, in every layer being
backpropagated. Casting the (tiny) adapter weights down instead keeps only the
bf16 input, which the frozen base layer's matmul shares (q, k and v even share
one), and runs the adapter matmuls at bf16 speed. Gradients still land in the
fp32 parameters (the weight cast is differentiable); the adapter output is
rounded to bf16 as peft's own result is.

Only the plain case is replaced (one active adapter, not merged, no DoRA or
other variant, no mixed-adapter batch, a bf16/fp16 input with fp32 adapter
weights); everything else calls peft's forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtune.kernels._common import base_model, restore_forwards, swap_forwards

__all__ = ["enable_compute_dtype_lora", "disable_compute_dtype_lora"]

_ATTR = "_memtune_lora"
_LOW = (torch.bfloat16, torch.float16)


def _lora_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [m for m in base_model(model).modules()
            if isinstance(m, LoraLayer) and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and hasattr(m, "base_layer") and isinstance(getattr(m, "base_layer"), nn.Module)]


def _plain_adapter(module: nn.Module, x: torch.Tensor, kwargs: dict) -> str | None:
    """The one adapter to apply in the fast path, or None to defer to peft."""
    if x.dtype not in _LOW or module.disable_adapters or module.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if getattr(module, "lora_variant", {}).get(name) is not None or getattr(module, "use_dora", {}).get(name):
        return None
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None \
            or lora_b.bias is not None:
        return None
    return name


def _adds_in_place(result: torch.Tensor, xa: torch.Tensor) -> bool:
    """Whether the adapter's product (one GEMM already possible) can be added into the base output in place."""
    return (result.dim() in (2, 3) and result.dim() == xa.dim() and not result._is_view()
            and not (result.is_leaf and result.requires_grad))


def _make_forward(module: nn.Module, original: Callable) -> Callable:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = _plain_adapter(module, x, kwargs) if isinstance(x, torch.Tensor) else None
        if name is None:
            return original(x, *args, **kwargs)
        result = module.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        a = module.lora_A[name].weight.to(dtype)
        b = module.lora_B[name].weight.to(dtype)
        xa = F.linear(module.lora_dropout[name](x), a)  # [tokens, r]
        scaling = module.scaling[name]
        one_gemm = result.dtype == dtype and result.is_contiguous() and isinstance(scaling, (int, float))
        if one_gemm and _adds_in_place(result, xa):
            # result += scaling * (xa @ b.T) as one GEMM whose epilogue reads and writes result
            # in place: the [tokens, out] product is never written and read back, the scale
            # and sum cost no launches, and no copy of result is made (an out-of-place addmm
            # copies it first). The base layer's output is not saved by its own backward
            # (a frozen linear needs only its weight), so autograd allows the update.
            # With LoRA on all seven linears of the 1.5B shape at 16384 tokens that is four
            # fewer passes over 755 MB a layer, each forward pass.
            if result.dim() == 2:
                return result.addmm_(xa, b.t(), alpha=scaling)
            return result.baddbmm_(xa, b.t().expand(result.shape[0], -1, -1), alpha=scaling)
        if one_gemm:
            # a view (a linear with a bias may return one): the same GEMM, out of place
            out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(),
                              alpha=scaling)
            return out.view(result.shape)
        return result + (F.linear(xa, b) * scaling).to(result.dtype)

    return forward


def enable_compute_dtype_lora(model: nn.Module) -> int:
    """Run every plain LoRA adapter of `model` in its input's dtype; returns the number of modules. Idempotent."""
    return swap_forwards(_lora_modules(model), _ATTR, _make_forward)


def disable_compute_dtype_lora(model: nn.Module) -> int:
    """Undo `enable_compute_dtype_lora`; returns the number of modules restored."""
    return restore_forwards(_lora_modules(model), _ATTR)
