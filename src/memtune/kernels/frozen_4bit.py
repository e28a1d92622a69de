"""Frozen 4-bit linears on a short path, each weight dequantized once per tiled-MLP pass.

A profile of one 16384-token H200 step of the 1.5B shape
(`benchmarks/results/profile-16k-saved-attention-h200.txt`) shows the host
as the bottleneck when the MLP is tiled in 4096-token chunks: about 100 ms
of host time go to bitsandbytes' Python layers (Linear4bit.forward,
matmul_4bit, the MatMul4Bit autograd function, the gemm_4bit custom op), and
a tiled MLP calls each of them once per chunk, forward and backward, each
call dequantizing the same weight again.

For a frozen weight (LoRA) the arithmetic is short: y = x @ W.T + b with
W = dequantize(codes), and dL/dx = dL/dy @ W. `_Frozen4bitLinear` does just
that, with bitsandbytes' own `dequantize_4bit`, and keeps nothing per token.
Inside `dequantized_once(module)` each W is dequantized on first use and reused:
an offloaded checkpoint's recompute and backward open one (the layer's seven
weights, dequantized once instead of twice: 77 MB in bf16 for the 1.5B
shape, 436 MB for Llama-3.1-8B, held for that layer's backward), and so does
a tiled MLP's chunk loop (its three weights, once for all chunks instead of
once per chunk). Outside a scope the path dequantizes per call, as
bitsandbytes does.

Only the plain case takes the path: training mode, a weight that does not
train, the input already in the layer's compute dtype, a bias (if any) of
that dtype that does not train, and a weight in bitsandbytes' standard
layout. Everything else calls the layer's own forward.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from memtune.kernels._common import restore_forwards, swap_forwards

__all__ = ["enable_frozen_4bit_linears", "disable_frozen_4bit_linears", "dequantized_once", "frozen_4bit_weight",
           "takes_short_path", "has_frozen_4bit_weight", "four_bit_linears", "on_short_path"]

_ATTR = "_memtune_frozen_4bit"
# On each 4-bit linear inside an open `dequantized_once` scope: the scope's {id(linear): W}. Kept on the
# instance (not in a thread local): an offloaded layer's backward may run on another thread.
_SCOPE_ATTR = "_memtune_weight_scope"
# On a decoder layer: an object whose .weights() gives its frozen 4-bit weights by id(linear), written
# now, or None (kernels/dequantize_graph.py installs it; this module only reads it).
WEIGHT_SOURCE_ATTR = "_memtune_dequantize_graph"
_LINEARS_ATTR = "_memtune_4bit_linears"  # a module's 4-bit linears, found once


def _scope_linears(module: nn.Module) -> list[nn.Module]:
    linears = module.__dict__.get(_LINEARS_ATTR)
    if linears is None:
        linears = module.__dict__[_LINEARS_ATTR] = four_bit_linears(module)
    return linears


@contextlib.contextmanager
def dequantized_once(module: nn.Module) -> Iterator[None]:
    """Within this block each frozen 4-bit linear of `module` dequantizes its weight once (nested: the
    outer block rules). module: a decoder layer (whose pass this is) or an MLP; a decoder layer with a
    dequantize graph (dequantize_graph.py) has all its weights written at the start, by one replay."""
    linears = [lin for lin in _scope_linears(module) if lin.__dict__.get(_SCOPE_ATTR) is None]
    if not linears:
        yield
        return
    source = module.__dict__.get(WEIGHT_SOURCE_ATTR)
    cache = (source.weights() if source is not None else None) or {}
    for lin in linears:
        lin.__dict__[_SCOPE_ATTR] = cache
    try:
        yield
    finally:
        for lin in linears:
            lin.__dict__.pop(_SCOPE_ATTR, None)


def frozen_4bit_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in `dtype`: from the scope's cache, or dequantized now (and cached in a scope)."""
    import bitsandbytes.functional as bnbf

    cache = layer.__dict__.get(_SCOPE_ATTR)
    weight = cache.get(id(layer)) if cache is not None else None
    if weight is None or weight.dtype != dtype:
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        if cache is not None:
            cache[id(layer)] = weight
    return weight


class _Frozen4bitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer  # a module reference: nothing per token is kept
        return F.linear(x, frozen_4bit_weight(layer, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return torch.matmul(grad_out, frozen_4bit_weight(ctx.layer, grad_out.dtype)), None, None


def has_frozen_4bit_weight(layer: nn.Module) -> bool:
    """A weight that does not train, in bitsandbytes' standard 4-bit layout (what the short path dequantizes)."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    return state is not None and not weight.requires_grad and not getattr(state, "packing_format_for_cpu", False)


def takes_short_path(layer: nn.Module, x: torch.Tensor) -> bool:
    bias = layer.bias
    return (layer.training and isinstance(x, torch.Tensor) and has_frozen_4bit_weight(layer)
            and getattr(layer, "compute_dtype", None) == x.dtype and x.numel() > x.shape[-1]
            and (bias is None or (bias.dtype == x.dtype and not bias.requires_grad)))


def _make_forward(layer: nn.Module, original: Callable) -> Callable:
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not takes_short_path(layer, x):
            return original(x, *args, **kwargs)
        if not torch.is_grad_enabled():  # an offloaded layer's first forward: no autograd Function to set up
            return F.linear(x, frozen_4bit_weight(layer, x.dtype), layer.bias)
        return _Frozen4bitLinear.apply(x, layer, layer.bias)

    return forward


def four_bit_linears(model: nn.Module) -> list[nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def on_short_path(layer: nn.Module) -> bool:
    """Whether `layer` was given the short path (enable_frozen_4bit_linears)."""
    return layer.__dict__.get(_ATTR) is not None


def enable_frozen_4bit_linears(model: nn.Module) -> int:
    """Give every bitsandbytes Linear4bit of `model` the short frozen-weight path; returns how many. Idempotent."""
    return swap_forwards(four_bit_linears(model), _ATTR, _make_forward)


def disable_frozen_4bit_linears(model: nn.Module) -> int:
    """Undo `enable_frozen_4bit_linears`; returns the number of layers restored."""
    return restore_forwards(four_bit_linears(model), _ATTR)
