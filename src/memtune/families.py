"""What each model family needs honoured, in one table, and the decisions that follow from it.

A technique that swaps a module's forward (a fused norm, a compiled RoPE, an
embedding table in host memory, a chunked loss) reproduces the steps of the
family's own forward. Families differ in those steps:

    family        norm          MLP                 attention                 embeddings     logits
    llama         w * x         silu(gate) * up     q/k/v, RoPE               plain          plain
    qwen2         w * x         silu(gate) * up     q/k/v (+bias), RoPE       plain          plain
    mistral       w * x         silu(gate) * up     q/k/v, RoPE, window       plain          plain
    qwen3         w * x         silu(gate) * up     q/k/v, QK-norm, RoPE      plain          plain
    gemma2        (1 + w) * x   gelu_tanh(g) * up   softcapped scores, window x sqrt(H)      softcapped
    gemma3_text   (1 + w) * x   gelu_tanh(g) * up   QK-norm, local/global     x sqrt(H)      (softcap)
    phi3          w * x         fused gate_up_proj  fused qkv_proj, RoPE      plain          plain

`technique_skip_reason(field, config)` answers, for a RunConfig field that
names a technique, why it cannot run on this family (None: it runs, exactly);
`attention_implementation(config, requested)` picks the attention kernel.
Both read a transformers config object or a config.json dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memtune.errors import UserError

__all__ = ["Family", "Features", "FAMILIES", "features", "family_of", "attention_implementation",
           "final_logit_softcap", "technique_skip_reason", "TECHNIQUES"]


@dataclass(frozen=True)
class Family:
    """What a model_type's modeling code does, fixed by transformers' classes (not by config values)."""

    model_type: str
    label: str
    one_plus_norm: bool = False  # RMSNorm computes (1 + weight) * x in fp32, then casts (Gemma)
    scaled_embeddings: bool = False  # the embedding output is multiplied by sqrt(hidden_size) (Gemma)
    qk_norm: bool = False  # an RMSNorm over each head of q and k, before RoPE (Qwen3, Gemma 3)
    fused_qkv: bool = False  # one qkv_proj linear instead of q/k/v (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj linear instead of gate/up (Phi-3)
    activation_field: str = "hidden_act"  # the config field naming the MLP's activation
    # why fuse_rope's forward is not this family's attention forward (None: it is, step for step)
    rope_skip: str | None = None


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama"),
    Family("qwen2", "Qwen2"),
    Family("mistral", "Mistral"),
    Family("qwen3", "Qwen3", qk_norm=True),
    Family("gemma2", "Gemma 2", one_plus_norm=True, scaled_embeddings=True, activation_field="hidden_activation",
           rope_skip="Gemma 2's attention softcaps its scores and scales queries by query_pre_attn_scalar"),
    Family("gemma3_text", "Gemma 3", one_plus_norm=True, scaled_embeddings=True, qk_norm=True,
           activation_field="hidden_activation",
           rope_skip="Gemma 3's attention normalizes q and k with (1 + weight) norms and uses two RoPE tables"),
    Family("phi3", "Phi-3", fused_qkv=True, fused_gate_up=True,
           rope_skip="Phi-3 projects q, k and v with one fused qkv_proj and may rotate only part of each head"),
)}


@dataclass(frozen=True)
class Features:
    """The family plus what this config switches on."""

    family: Family | None  # None: a model_type memtune has no entry for
    model_type: str
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: int | None  # set when some layer attends within a window
    tied_embeddings: bool
    activation: str


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _text_config(config: Any) -> Any:
    """The language model's own config of a multimodal wrapper (Gemma 3's text_config), or `config`."""
    if _get(config, "model_type") in FAMILIES:
        return config
    text = _get(config, "text_config")
    return text if text is not None and _get(text, "model_type") in FAMILIES else config


def _positive_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _sliding_window(config: Any) -> int | None:
    window = _get(config, "sliding_window")
    if not isinstance(window, int) or window <= 0:
        return None
    if _get(config, "use_sliding_window") is False:  # Qwen2/Qwen3 carry a window they do not use
        return None
    layer_types = _get(config, "layer_types")
    if isinstance(layer_types, (list, tuple)) and "sliding_attention" not in layer_types:
        return None
    return window


def family_of(config: Any) -> Family | None:
    return FAMILIES.get(_get(_text_config(config), "model_type"))


def features(config: Any) -> Features:
    """What `config` (a transformers config or a config.json dict) needs honoured."""
    config = _text_config(config)
    family = FAMILIES.get(_get(config, "model_type"))
    field = family.activation_field if family else "hidden_act"
    activation = _get(config, field) or _get(config, "hidden_act") or ""
    tied = _get(config, "tie_word_embeddings")
    if tied is None:  # the transformers default of the family (Gemma ties, the others here do not)
        tied = bool(family and family.scaled_embeddings)
    return Features(
        family=family,
        model_type=str(_get(config, "model_type") or ""),
        attn_softcap=_positive_float(_get(config, "attn_logit_softcapping")),
        final_softcap=_positive_float(_get(config, "final_logit_softcapping")),
        sliding_window=_sliding_window(config),
        tied_embeddings=bool(tied),
        activation=str(activation),
    )


def final_logit_softcap(config: Any) -> float | None:
    """The cap c of logits = c * tanh(logits / c), or None (Gemma 2: 30)."""
    return features(config).final_softcap


# torch's flex_attention kernel refuses smaller heads ("NYI: embedding dimension of the query, key, and
# value must be at least 16", torch 2.11 on the H200): tiny test shapes take eager instead.
_FLEX_MIN_HEAD_DIM = 16


def feats_head_dim(config: Any) -> int:
    text = _text_config(config)
    head_dim = _get(text, "head_dim")
    if not head_dim:
        head_dim = (_get(text, "hidden_size") or 0) // max(1, _get(text, "num_attention_heads") or 1)
    return int(head_dim)


def attention_implementation(config: Any, requested: str, device_type: str = "cuda",
                             compile_reason: str | None = None) -> tuple[str, str | None]:
    """(attn_implementation for transformers, a note or None) for `requested` ("auto" or a name).

    SDPA cannot express attention-logit softcapping (Gemma 2: scores = 50 * tanh(scores / 50)).
    For such a config "auto" picks flex_attention where torch.compile's GPU kernels are usable
    (`compile_reason` None on a CUDA device: it takes the softcap as a score modifier, keeps
    O(L) memory, and transformers' Gemma 2 supports it) and eager otherwise: eager is exact on
    every device, but holds the [heads, L, L] scores. flex_attention cannot train on a CPU
    (torch 2.13: "FlexAttention does not support backward on CPU"). An explicit "sdpa" for such a
    config, or "flex_attention" off CUDA, is a UserError (the first would train a different
    model, the second fail at the first backward); any other explicit choice is kept.
    """
    feats = features(config)
    needs_score_mod = feats.attn_softcap is not None
    label = feats.family.label if feats.family else feats.model_type
    if requested == "auto":
        if not needs_score_mod:
            # SDPA picks the flash or memory-efficient kernel: O(L) memory, no [L, L] scores.
            return "sdpa", None
        if device_type == "cuda" and compile_reason is None and feats_head_dim(config) >= _FLEX_MIN_HEAD_DIM:
            return "flex_attention", (f"attention: flex_attention, which applies {label}'s attention-logit "
                                      f"softcapping ({feats.attn_softcap:g}) that SDPA cannot express")
        why = compile_reason or ("flex_attention needs torch.compile's GPU kernels" if device_type != "cuda" else
                                 f"flex_attention's GPU kernel needs a head_dim of at least {_FLEX_MIN_HEAD_DIM}")
        return "eager", (f"attention: eager ({why}; SDPA cannot express {label}'s attention-logit "
                         f"softcapping {feats.attn_softcap:g}): exact, but it holds the [heads, L, L] scores")
    if requested == "sdpa" and needs_score_mod:
        raise UserError(f"attention: sdpa cannot express {label}'s attention-logit softcapping "
                        f"(attn_logit_softcapping {feats.attn_softcap:g}); use auto, eager or flex_attention")
    if requested == "flex_attention" and device_type != "cuda":
        raise UserError("attention: flex_attention has no backward on a CPU in this torch; use auto or eager")
    return requested, None


# RunConfig fields that name a technique (and the technique registry's names for them).
TECHNIQUES = ("fuse_elementwise", "fuse_rope", "embeddings_on_host", "tiled_mlp_chunk", "offload_activations",
              "save_attention", "dequantize_once", "dequantize_graph", "fuse_loss", "loss", "lora_matmul",
              "compile_static_shapes", "int8_backward", "residual_dtype", "gradient_checkpointing")


def technique_skip_reason(technique: str, config: Any, attn_implementation: str | None = None) -> str | None:
    """Why `technique` (a RunConfig field name) cannot run on this family exactly; None when it can.

    `attn_implementation`: the attention the model runs (config._attn_implementation when None).
    Device conditions (CUDA, Triton) are not this function's business: only the family's. A name
    not in TECHNIQUES is a technique this table has nothing to say about: None.
    """
    feats = features(config)
    family = feats.family
    label = family.label if family else f"model_type '{feats.model_type}'"
    if technique == "fuse_rope":
        if family is None:
            return f"{label} has no attention forward memtune reproduces"
        return family.rope_skip
    if technique == "embeddings_on_host":
        if feats.tied_embeddings:
            return "the input embeddings are tied to the lm_head, which needs them on the GPU"
        if family is not None and family.scaled_embeddings:
            return f"{label} scales its embeddings by sqrt(hidden_size) inside the embedding module"
        return None
    if technique == "save_attention":
        impl = attn_implementation or _get(config, "_attn_implementation")
        if impl not in (None, "sdpa"):
            return f"the model's attention is {impl!r}, and attention is kept from the forward for SDPA only"
        return None
    if technique == "fuse_elementwise":
        if family is not None and feats.activation not in _FUSED_ACTIVATIONS:
            return f"{label}'s MLP activation {feats.activation!r} has no fused kernel"
        return None
    # The rest act on every family alike: decoder linears (dequantize_*, lora_matmul, int8_backward),
    # whole layers (offload_activations, gradient_checkpointing, residual_dtype), per-token MLPs
    # (tiled_mlp_chunk), and the loss, which applies final_logit_softcap itself (fuse_loss, loss);
    # compile_static_shapes only changes how the fused kernels compile.
    return None


# Activations kernels/fused.py computes with the same function as transformers' module.
_FUSED_ACTIVATIONS = frozenset({"silu", "swish", "gelu_pytorch_tanh"})
