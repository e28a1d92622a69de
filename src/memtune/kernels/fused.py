"""RMSNorm and the SiLU-gated product compiled into fused kernels (torch.compile), per module instance.

A profile of one 16k-token step of the 1.5B shape (`benchmarks/profile_step.py`)
puts about 165 ms of the 567 ms in elementwise kernels: transformers' RMSNorm
is six of them (cast to fp32, square, mean, rsqrt, multiply, cast back, times
the weight) and the gated MLP two more ([tokens, 8960] each), all run in the
forward, the checkpoint recompute and the backward. torch.compile turns each
function below into one kernel forward and about one backward, with the same
math as transformers' modules (the fp32 upcast included), so losses and
gradients agree to rounding.

Only modules whose math is known are swapped: RMSNorms with a `weight` and
`variance_epsilon` (Llama/Qwen2/Qwen3/Mistral) and gated MLPs whose `act_fn`
is SiLU. Everything else keeps its forward.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtune.kernels._common import base_model, restore_forwards, swap_forward

__all__ = ["enable_fused_elementwise", "disable_fused_elementwise", "rms_norm_reference", "silu_mul_reference"]

_ATTR = "_memtune_fused"


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm/Qwen2RMSNorm forward, as one function to compile."""
    dtype = hidden.dtype
    h32 = hidden.to(torch.float32)
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(dtype)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rms_norm_training(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference under its own code object: compiled for the training step's exact shapes."""
    return rms_norm_reference(hidden, weight, eps)


def silu_mul_training(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu_mul_reference under its own code object: compiled for the training step's exact shapes."""
    return silu_mul_reference(gate, up)


@functools.cache
def _compiled(fn: Callable, static: bool = False) -> Callable:
    # dynamic: one kernel for every sequence length (generation changes it every token).
    # static: one kernel per shape, for the training step's fixed shapes (memtune.compile_shapes)
    return torch.compile(fn, dynamic=not static)


# Distinct training shapes a static-shape function compiles for; calls of any further shape take the
# any-length kernel. Packed and random data give one shape a step (two with the tiled MLP's last
# chunk); unpacked data pads each batch to its longest example, which would otherwise compile anew
# for every new length (seconds each) and then hit torch's recompile limit.
STATIC_SHAPES_PER_FUNCTION = 4


@functools.cache
def _static_then_general(static_fn: Callable, general_fn: Callable) -> Callable:
    """static_fn for the first STATIC_SHAPES_PER_FUNCTION argument shapes seen, general_fn after."""
    shapes: set[tuple] = set()

    def run(*args):
        key = tuple(a.shape for a in args if isinstance(a, torch.Tensor))
        if key not in shapes and len(shapes) >= STATIC_SHAPES_PER_FUNCTION:
            return general_fn(*args)
        shapes.add(key)
        return static_fn(*args)

    run.shapes = shapes  # for tests
    return run


def pick_compiled(fn: Callable, training_fn: Callable, compile_fn: bool,
                  static_training: bool) -> tuple[Callable, Callable]:
    """(the function for eval and generation, the one for training mode)."""
    general = _compiled(fn) if compile_fn else fn
    if not static_training:
        return general, general
    return general, _static_then_general(_compiled(training_fn, static=True) if compile_fn else training_fn, general)


# torch's and transformers' own SiLU modules (ACT2FN["silu"] is the latter in transformers 5)
_SILU_CLASSES = frozenset({"SiLU", "SiLUActivation"})


def is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_silu_gated_mlp(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in _SILU_CLASSES and not hasattr(module, "experts"))


def _norm_forward(module: nn.Module, compile_fn: bool, static_training: bool) -> Callable:
    fn, training_fn = pick_compiled(rms_norm_reference, rms_norm_training, compile_fn, static_training)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return (training_fn if module.training else fn)(hidden, module.weight, module.variance_epsilon)

    return forward


def _mlp_forward(module: nn.Module, compile_fn: bool, static_training: bool) -> Callable:
    fn, training_fn = pick_compiled(silu_mul_reference, silu_mul_training, compile_fn, static_training)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gated = (training_fn if module.training else fn)(module.gate_proj(x), module.up_proj(x))
        return module.down_proj(gated)

    return forward


def enable_fused_elementwise(model: nn.Module, compile_fn: bool = True, static_training: bool = False) -> int:
    """Swap the forward of every known RMSNorm and SiLU-gated MLP; returns how many modules. Idempotent.

    compile_fn=False installs the same functions uncompiled (for testing the math on any machine).
    static_training: in training mode, kernels compiled for the exact shapes (compile_static_shapes).
    """
    count = 0
    for module in base_model(model).modules():
        if is_rms_norm(module):
            make = _norm_forward
        elif _is_silu_gated_mlp(module):
            make = _mlp_forward
        else:
            continue
        swap_forward(module, _ATTR, lambda m, _original, make=make: make(m, compile_fn, static_training))
        count += 1
    return count


def disable_fused_elementwise(model: nn.Module) -> int:
    return restore_forwards(base_model(model).modules(), _ATTR)
