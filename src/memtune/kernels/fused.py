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
`variance_epsilon` (Llama/Qwen2/Qwen3/Mistral/Phi-3), Gemma's (1 + weight)
RMSNorms (weight applied in fp32 before the cast back, as Gemma does), gated
MLPs whose activation is SiLU or GELU-tanh (Gemma), with separate gate/up
projections or Phi-3's fused gate_up_proj. Everything else keeps its forward.
Qwen3's q/k norms run their own compiled functions: sharing the layer norms'
code object, their other rank and requires_grad recompiled it past torch's
limit ("tensor 'hidden' requires_grad mismatch").
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtune.kernels._common import base_model, restore_forwards, swap_forward

__all__ = ["enable_fused_elementwise", "disable_fused_elementwise", "rms_norm_reference", "silu_mul_reference",
           "one_plus_rms_norm_reference", "gelu_tanh_mul_reference", "is_rms_norm", "is_one_plus_rms_norm"]

_ATTR = "_memtune_fused"


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm/Qwen2RMSNorm forward, as one function to compile."""
    dtype = hidden.dtype
    h32 = hidden.to(torch.float32)
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(dtype)


def one_plus_rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Gemma2RMSNorm/Gemma3RMSNorm forward: (1 + weight) applied in fp32, then the cast."""
    h32 = hidden.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return (h32 * (1.0 + weight.float())).type_as(hidden)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu_tanh_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gemma's MLP product: ACT2FN["gelu_pytorch_tanh"] is F.gelu(approximate="tanh")."""
    return F.gelu(gate, approximate="tanh") * up


def rms_norm_training(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference under its own code object: compiled for the training step's exact shapes."""
    return rms_norm_reference(hidden, weight, eps)


def silu_mul_training(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu_mul_reference under its own code object: compiled for the training step's exact shapes."""
    return silu_mul_reference(gate, up)


# Each function below is a code object of its own, so each compiles (and counts recompiles) apart.
def one_plus_rms_norm_training(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return one_plus_rms_norm_reference(hidden, weight, eps)


def gelu_tanh_mul_training(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gelu_tanh_mul_reference(gate, up)


def rms_norm_heads(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference for the per-head q/k norms (Qwen3): [B, L, heads, head_dim] inputs."""
    return rms_norm_reference(hidden, weight, eps)


def rms_norm_heads_training(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(hidden, weight, eps)


def one_plus_rms_norm_heads(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return one_plus_rms_norm_reference(hidden, weight, eps)


def one_plus_rms_norm_heads_training(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return one_plus_rms_norm_reference(hidden, weight, eps)


# (eval/generation function, training function) per kind of module, by name: looked up when a
# module is swapped, so the module's functions are the ones in force then
_NORM_FUNCTIONS = {
    (False, False): ("rms_norm_reference", "rms_norm_training"),  # (one_plus, heads)
    (False, True): ("rms_norm_heads", "rms_norm_heads_training"),
    (True, False): ("one_plus_rms_norm_reference", "one_plus_rms_norm_training"),
    (True, True): ("one_plus_rms_norm_heads", "one_plus_rms_norm_heads_training"),
}
_GATE_FUNCTIONS = {"silu": ("silu_mul_reference", "silu_mul_training"),
                   "gelu_tanh": ("gelu_tanh_mul_reference", "gelu_tanh_mul_training")}


def _functions(names: tuple[str, str]) -> tuple[Callable, Callable]:
    return globals()[names[0]], globals()[names[1]]


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
        # requires_grad and grad mode are guards of the compiled kernel as much as shapes are: a key
        # without them let one "shape" compile several times and reach torch's recompile limit
        key = (torch.is_grad_enabled(),
               *((a.shape, a.requires_grad, a.dtype) for a in args if isinstance(a, torch.Tensor)))
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
# transformers' GELUTanh (ACT2FN["gelu_pytorch_tanh"]; PytorchGELUTanh is the same class)
_GELU_TANH_CLASSES = frozenset({"GELUTanh", "PytorchGELUTanh"})
# Gemma's norms: (1 + weight) * x, weight applied in fp32 (their class and `eps` attribute)
_ONE_PLUS_NORM_CLASSES = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


def is_rms_norm(module: nn.Module) -> bool:
    """A Llama-style RMSNorm: weight * x.to(dtype) (Llama/Qwen2/Qwen3/Mistral/Phi-3)."""
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def is_one_plus_rms_norm(module: nn.Module) -> bool:
    """Gemma's RMSNorm: ((1 + weight) * x) in fp32, then cast to the input's dtype."""
    return (type(module).__name__ in _ONE_PLUS_NORM_CLASSES and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "eps", None), float))


def gate_kind(act: Any) -> str | None:
    """"silu" or "gelu_tanh" when `act` computes exactly that function; None otherwise."""
    name = type(act).__name__
    if name in _SILU_CLASSES:
        return "silu"
    inner = getattr(act, "act", None)  # GELUTanh holds F.gelu(approximate="tanh") or a Python variant
    if (name in _GELU_TANH_CLASSES and isinstance(inner, functools.partial) and inner.func is F.gelu
            and inner.keywords == {"approximate": "tanh"} and not inner.args):
        return "gelu_tanh"
    return None


def _gated_mlp_kind(module: nn.Module) -> tuple[str, str] | None:
    """(layout, gate kind) of a gated MLP whose forward is known: "separate" (gate_proj, up_proj, act_fn)
    or "fused" (Phi-3: gate_up_proj, activation_fn, gate first); None for anything else."""
    if hasattr(module, "experts") or not isinstance(getattr(module, "down_proj", None), nn.Module):
        return None
    if all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj")):
        kind = gate_kind(getattr(module, "act_fn", None))
        return ("separate", kind) if kind else None
    if type(module).__name__ == "Phi3MLP" and isinstance(getattr(module, "gate_up_proj", None), nn.Module):
        kind = gate_kind(getattr(module, "activation_fn", None))
        return ("fused", kind) if kind else None
    return None


def _is_silu_gated_mlp(module: nn.Module) -> bool:
    return _gated_mlp_kind(module) == ("separate", "silu")


def _norm_forward(module: nn.Module, compile_fn: bool, static_training: bool, heads: bool = False) -> Callable:
    one_plus = is_one_plus_rms_norm(module)
    fn, training_fn = pick_compiled(*_functions(_NORM_FUNCTIONS[one_plus, heads]), compile_fn, static_training)
    eps = module.eps if one_plus else module.variance_epsilon

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return (training_fn if module.training else fn)(hidden, module.weight, eps)

    return forward


def _mlp_forward(module: nn.Module, compile_fn: bool, static_training: bool) -> Callable:
    layout, kind = _gated_mlp_kind(module)
    fn, training_fn = pick_compiled(*_functions(_GATE_FUNCTIONS[kind]), compile_fn, static_training)

    if layout == "fused":
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            gate, up = module.gate_up_proj(x).chunk(2, dim=-1)  # Phi3MLP: gate first, then up
            return module.down_proj((training_fn if module.training else fn)(gate, up))

        return forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gated = (training_fn if module.training else fn)(module.gate_proj(x), module.up_proj(x))
        return module.down_proj(gated)

    return forward


def _is_head_norm(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("q_norm", "k_norm")


def enable_fused_elementwise(model: nn.Module, compile_fn: bool = True, static_training: bool = False) -> int:
    """Swap the forward of every known RMSNorm and SiLU-gated MLP; returns how many modules. Idempotent.

    compile_fn=False installs the same functions uncompiled (for testing the math on any machine).
    static_training: in training mode, kernels compiled for the exact shapes (compile_static_shapes).
    """
    count = 0
    for name, module in base_model(model).named_modules():
        if is_rms_norm(module) or is_one_plus_rms_norm(module):
            make = functools.partial(_norm_forward, heads=_is_head_norm(name))
        elif _gated_mlp_kind(module) is not None:
            make = _mlp_forward
        else:
            continue
        swap_forward(module, _ATTR, lambda m, _original, make=make: make(m, compile_fn, static_training))
        count += 1
    return count


def disable_fused_elementwise(model: nn.Module) -> int:
    return restore_forwards(base_model(model).modules(), _ATTR)
