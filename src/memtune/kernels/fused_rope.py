"""Rotary position embedding of q and k compiled into one kernel (torch.compile), per attention instance.

transformers applies RoPE as `q * cos + rotate_half(q) * sin` (and the same
for k), where `rotate_half` slices, negates and concatenates: about ten
kernels over q and k in each forward, and as many again in backward. For the
1.5B shape at 16384 tokens the H200 profile of one default step
(`benchmarks/results/profile-16k-tiled-8192-h200.txt`) shows about 112 `cat`
calls (7 ms), 167 `neg` (3 ms) and a share of the 506 `mul` and 985 `add`
calls (14 ms each): RoPE, run in the forward and in each layer's recompute.
Compiled, the rotation of q and k is one kernel each way.

The function is looked up as a module global inside the attention's forward,
so it cannot be replaced per instance. Instead the attention *instance* gets
its own forward with the same steps as transformers' (projections, RoPE,
the registered attention function, o_proj) for the classes whose forward is
known (`_KNOWN`). It defers to the original forward whenever a KV cache is
passed (generation), so the cache logic stays transformers'.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from memtune.kernels._common import base_model, restore_forwards, swap_forwards
from memtune.kernels.fused import pick_compiled

__all__ = ["enable_fused_rope", "disable_fused_rope", "rope_reference"]

_ATTR = "_memtune_fused_rope"
# Attention classes whose forward is: q/k/v projections viewed as [B, L, heads, head_dim]
# (Qwen3: then its q_norm / k_norm over each head), transposed, apply_rotary_pos_emb(q, k, cos,
# sin), the configured attention function with dropout/scaling and the class's sliding_window,
# reshape, o_proj. The value says where that window comes from: the module's own attribute
# (Qwen2/Qwen3: None on full-attention layers), the config (Mistral), or nowhere (Llama).
# Gemma and Phi-3 attention differ in more than that (memtune.families says how) and keep theirs.
_KNOWN = {"LlamaAttention": None, "Qwen2Attention": "module", "Qwen3Attention": "module",
          "MistralAttention": "config"}
_QK_NORM = frozenset({"Qwen3Attention"})
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1), as one function to compile."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2
    q_rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    k_rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return q * cos + q_rot * sin, k * cos + k_rot * sin


def rope_training(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_reference under its own code object: compiled for the training step's exact shapes."""
    return rope_reference(q, k, cos, sin)


def _attention_function(module: nn.Module, eager: Callable | None) -> Callable | None:
    """The attention function the module's own forward would call now (the registry may be wrapped;
    `eager` is the modeling module's own eager_attention_forward)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(module.config, "_attn_implementation", None) or "eager"
    if impl == "eager":
        return eager
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None


def _make_forward(module: nn.Module, original: Callable, compile_fn: bool, static_training: bool) -> Callable:
    # dynamic shapes: one kernel for every sequence length; static in training if asked (fused.py)
    rope_any, rope_training_mode = pick_compiled(rope_reference, rope_training, compile_fn, static_training)
    window_from = _KNOWN[type(module).__name__]
    qk_norm = type(module).__name__ in _QK_NORM
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)

    def forward(hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args: Any,
                **kwargs: Any):
        attention = _attention_function(module, eager)
        if args or position_embeddings is None or attention is None \
                or any(kwargs.get(name) is not None for name in _CACHE_KWARGS):
            return original(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        for name in _CACHE_KWARGS:
            kwargs.pop(name, None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, module.head_dim)
        q = module.q_proj(hidden_states).view(hidden_shape)
        k = module.k_proj(hidden_states).view(hidden_shape)
        if qk_norm:  # Qwen3: each head of q and k normalized before RoPE
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = (rope_training_mode if module.training else rope_any)(q, k, cos, sin)
        if window_from == "module":
            kwargs["sliding_window"] = module.sliding_window
        elif window_from == "config":
            kwargs["sliding_window"] = getattr(module.config, "sliding_window", None)
        out, weights = attention(module, q, k, v, attention_mask,
                                 dropout=module.attention_dropout if module.training else 0.0,
                                 scaling=module.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return module.o_proj(out), weights

    return forward


def _is_known_attention(module: nn.Module) -> bool:
    qk_norm = ("q_norm", "k_norm") if type(module).__name__ in _QK_NORM else ()
    return (type(module).__name__ in _KNOWN
            and all(isinstance(getattr(module, n, None), nn.Module)
                    for n in ("q_proj", "k_proj", "v_proj", "o_proj", *qk_norm))
            and all(hasattr(module, n) for n in ("head_dim", "scaling", "attention_dropout", "config")))


def enable_fused_rope(model: nn.Module, compile_fn: bool = True, static_training: bool = False) -> int:
    """Give every known attention module of `model` the compiled RoPE; returns how many. Idempotent.

    compile_fn=False installs the same forward with the uncompiled function (for testing it anywhere).
    static_training: in training mode, a kernel compiled for the exact shapes (compile_static_shapes).
    """
    modules = [m for m in base_model(model).modules() if _is_known_attention(m)]
    return swap_forwards(modules, _ATTR, lambda m, original: _make_forward(m, original, compile_fn, static_training))


def disable_fused_rope(model: nn.Module) -> int:
    """Undo `enable_fused_rope`; returns the number of modules restored."""
    return restore_forwards(base_model(model).modules(), _ATTR)
