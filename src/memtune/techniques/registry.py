"""The memory techniques, as data: one ordered list, one entry each.

Each entry names the config field that switches it, says whether a model can
take it (`supports(target) -> None | reason`), installs it on a model instance
(`enable(target) -> note`) and takes it off again (`disable(model)`). Everything
that builds or reports a model walks this list: `models.build_model` (after
quantization and LoRA), `memtune.apply` (a model the user built), the
estimator's term names, the stored-config defaults and the technique docs.

The order is the order of installation, and it matters where one technique
wraps a module another one swaps:
- the fused norm/MLP kernels go before the tiled MLP, which wraps the MLP's
  forward (the tiles then run the fused kernel);
- checkpointing goes after the kernels that change what a layer computes, so
  the recompute runs the same code as the forward;
- host embeddings and dequantize graphs go last: the graphs read every weight
  by address, so nothing may move after them.

Patches act on module instances only (kernels/_common.swap_forward); a model
built next to this one, or the classes of transformers, are never touched.

Adding a technique: one kernel module under `memtune/kernels/`, one entry
below, its field in `config.RunConfig` and a section in docs/techniques.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from memtune import kernels
from memtune.config import RunConfig
from memtune.errors import UserError
from memtune.families import technique_skip_reason
from memtune.kernels._common import base_model
from memtune.kernels.frozen_4bit import four_bit_linears, on_short_path
from memtune.kernels.int8_backward import (disable_frozen_int8_backward, enable_frozen_int8_backward,
                                           int8_linears)
from memtune.kernels.lora import _lora_modules
from memtune.kernels.norm_dtype import disable_norm_output_dtype, enable_norm_output_dtype
from memtune.kernels.offload import keep_layer_activations, release_kept_layers
from memtune.loss import (chunked_loss_skip_reason, compile_unavailable_reason, install_chunked_loss_forward,
                          loss_chunk_kernel, remove_chunked_loss_forward)


@dataclass
class Target:
    """The model a list of techniques is applied to, and what they need to know about it."""

    model: nn.Module
    cfg: RunConfig
    device: torch.device
    compute_dtype: torch.dtype


@dataclass(frozen=True)
class Technique:
    name: str  # the config field that switches it (and its name in reports)
    summary: str  # one line: what it does
    wanted: Callable[[RunConfig], bool]  # whether the configuration asks for it
    supports: Callable[[Target], str | None]  # None, or why this model/device cannot take it
    enable: Callable[[Target], str]  # installs it; returns a one-line note
    disable: Callable[[nn.Module], Any]  # takes it off the model again
    # the estimator's breakdown / host terms that exist because of this technique (memtune.estimate)
    estimate_terms: tuple[str, ...] = ()
    # the value a stored config from before this technique existed meant (what actually ran)
    legacy_value: Any = None
    cuda_only: bool = False
    fields: tuple[str, ...] = field(default=())  # further config fields it reads

    def skip_reason(self, target: Target) -> str | None:
        if self.cuda_only and target.device.type != "cuda":
            return "needs a CUDA GPU"
        family = _family_reason(self.name, target.model)
        return family if family is not None else self.supports(target)


def _family_reason(name: str, model: nn.Module) -> str | None:
    """What the model's architecture says about this technique (memtune.families)."""
    config = getattr(base_model(model), "config", None)
    return technique_skip_reason(name, config) if config is not None else None


# --- helpers shared by the entries ---------------------------------------------------------

def _count_note(name: str, count: int, what: str) -> str:
    return f"{name}: {count} {what}" if count else f"{name}: skipped, no {what}"


def _compile_reason(target: Target) -> str | None:
    return compile_unavailable_reason(target.device)


def _has_modules(kind: Callable[[nn.Module], list], what: str) -> Callable[[Target], str | None]:
    def supports(target: Target) -> str | None:
        return None if kind(target.model) else f"the model has no {what}"
    return supports


# --- the entries, in order of installation -------------------------------------------------

def _enable_int8(target: Target) -> str:
    return _count_note("int8_backward", enable_frozen_int8_backward(target.model),
                       "int8 linears keep no input for backward")


def _enable_dequantize_once(target: Target) -> str:
    return _count_note("dequantize_once", kernels.enable_frozen_4bit_linears(target.model),
                       "frozen 4-bit linears on memtune's short path")


def _enable_lora_matmul(target: Target) -> str:
    return _count_note("lora_matmul", kernels.enable_compute_dtype_lora(target.model),
                       "LoRA modules run their matmuls in the compute dtype")


def _enable_fused_elementwise(target: Target) -> str:
    count = kernels.enable_fused_elementwise(target.model, static_training=target.cfg.compile_static_shapes)
    return _count_note("fuse_elementwise", count, "RMSNorm/MLP modules compiled (the first steps compile)")


def _enable_fused_rope(target: Target) -> str:
    count = kernels.enable_fused_rope(target.model, static_training=target.cfg.compile_static_shapes)
    return _count_note("fuse_rope", count, "attention modules with compiled RoPE")


def _enable_residual_fp32(target: Target) -> str:
    count = enable_norm_output_dtype(target.model, target.compute_dtype)
    return _count_note("residual_dtype", count, "RMSNorms hand the matmuls the compute dtype (fp32 residual)")


def _residual_fp32_supported(target: Target) -> str | None:
    return "the compute dtype is fp32 already" if target.compute_dtype == torch.float32 else None


def _enable_offload(target: Target) -> str:
    cfg = target.cfg
    reason = kernels.saved_attention_skip_reason(target.model) if cfg.saves_attention else None
    kernels.enable_offloaded_checkpointing(target.model, save_attention=cfg.saves_attention and reason is None)
    _cache_off(target.model)
    note = "offload_activations: memtune's checkpointing, layer inputs offloaded to host memory"
    if cfg.saves_attention:
        note += "; save_attention: " + ("attention outputs kept in host memory, not recomputed"
                                        if reason is None else f"off, {reason}")
    return note + _keep_layers(target)


def _keep_layers(target: Target) -> str:
    """keep_layers, a field of either checkpointing: the last N layers are not checkpointed."""
    count = target.cfg.keep_layers
    if not count:
        return ""
    try:
        keep_layer_activations(target.model, count)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return f"; keep_layers: the last {count} decoder layers keep their activations (not recomputed)"


def _enable_hf_checkpointing(target: Target) -> str:
    # Non-reentrant checkpointing needs no input that requires grad, so the frozen embeddings
    # need no hook (peft's enable_input_require_grads). transformers renamed the method in 5.2x.
    base = base_model(target.model)
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _cache_off(target.model)
    return "gradient_checkpointing: transformers' own (non-reentrant)" + _keep_layers(target)


def _disable_hf_checkpointing(model: nn.Module) -> None:
    release_kept_layers(model)
    base = base_model(model)
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()


def _hf_checkpointing_supported(target: Target) -> str | None:
    base = base_model(target.model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        return f"{type(base).__name__} does not support gradient checkpointing"
    return None


def _cache_off(model: nn.Module) -> None:
    base_model(model).config.use_cache = False  # a checkpointed training forward must not fill a KV cache


def _enable_tiled_mlp(target: Target) -> str:
    count = kernels.enable_tiled_mlp(target.model, target.cfg.tiled_mlp_chunk)
    return _count_note("tiled_mlp_chunk", count, f"MLPs run over {target.cfg.tiled_mlp_chunk}-token chunks")


def _enable_host_embeddings(target: Target) -> str:
    reason = kernels.enable_host_embeddings(target.model)
    return ("embeddings_on_host: the input-embedding table is in host memory" if reason is None
            else f"embeddings_on_host: kept on the device, {reason}")


def _enable_dequantize_graphs(target: Target) -> str:
    try:
        count = kernels.enable_dequantize_graphs(target.model)
    except (RuntimeError, ValueError) as exc:  # a capture the driver or a kernel refuses: the ordinary way
        kernels.disable_dequantize_graphs(target.model)
        return f"dequantize_graph: skipped, the capture failed ({str(exc).splitlines()[0][:120]})"
    return _count_note("dequantize_graph", count,
                       "decoder layers dequantize their frozen 4-bit weights by one CUDA graph replay")


def _dequantize_graphs_supported(target: Target) -> str | None:
    if not any(on_short_path(m) for m in four_bit_linears(target.model)):
        return "no frozen 4-bit linears on the short path (dequantize_once)"
    if not kernels.is_offloaded_checkpointing(target.model):
        return "the layers are not on memtune's offloaded checkpointing"
    return None


def _enable_chunked_loss(target: Target) -> str:
    install_chunked_loss_forward(target.model, target.cfg)
    kernel = {"triton": "triton", True: "compiled", False: "unfused"}[loss_chunk_kernel(target.cfg, target.device)]
    return (f"loss: chunked ({target.cfg.loss_chunk_tokens}-token chunks, {kernel} kernel); "
            "model(input_ids, labels=...) in training mode returns it without logits")


TECHNIQUES: tuple[Technique, ...] = (
    Technique("int8_backward", "int8 linears keep no copy of their input for backward",
              wanted=lambda cfg: cfg.quantization == "int8",
              supports=_has_modules(int8_linears, "bitsandbytes int8 linears"),
              enable=_enable_int8, disable=disable_frozen_int8_backward, legacy_value=None),
    Technique("dequantize_once", "frozen 4-bit linears on a short path, each weight dequantized once a pass",
              wanted=lambda cfg: cfg.dequantize_once and cfg.quantization in ("nf4", "fp4"),
              supports=_has_modules(four_bit_linears, "bitsandbytes 4-bit linears"),
              enable=_enable_dequantize_once, disable=kernels.disable_frozen_4bit_linears,
              estimate_terms=("dequantized_weights",), legacy_value=False),
    Technique("lora_matmul", "LoRA matmuls in the compute dtype from fp32 master weights",
              wanted=lambda cfg: cfg.lora and cfg.lora_matmul == "compute",
              supports=_has_modules(_lora_modules, "peft LoRA modules"),
              enable=_enable_lora_matmul, disable=kernels.disable_compute_dtype_lora, legacy_value="fp32"),
    Technique("fuse_elementwise", "RMSNorm and silu(gate) * up as compiled kernels",
              wanted=lambda cfg: cfg.fuse_elementwise, supports=_compile_reason,
              enable=_enable_fused_elementwise, disable=kernels.disable_fused_elementwise,
              cuda_only=True, legacy_value=False, fields=("compile_static_shapes",)),
    Technique("fuse_rope", "the rotary embedding of q and k as one compiled kernel each way",
              wanted=lambda cfg: cfg.fuse_rope, supports=_compile_reason,
              enable=_enable_fused_rope, disable=kernels.disable_fused_rope,
              cuda_only=True, legacy_value=False, fields=("compile_static_shapes",)),
    Technique("residual_dtype", "an fp32 residual stream, the matmuls and attention in the compute dtype",
              wanted=lambda cfg: cfg.residual_dtype == "fp32", supports=_residual_fp32_supported,
              enable=_enable_residual_fp32, disable=disable_norm_output_dtype,
              estimate_terms=("checkpoints", "rope_cache"), legacy_value="compute"),
    Technique("offload_activations", "per-layer checkpoints (and saved attention) in pinned host memory",
              wanted=lambda cfg: cfg.offloads_checkpoints, supports=lambda target: None,
              enable=_enable_offload, disable=kernels.disable_offloaded_checkpointing,
              estimate_terms=("offloaded_checkpoints", "saved_attention", "kept_layer_activations"),
              legacy_value=None, fields=("gradient_checkpointing", "save_attention", "keep_layers")),
    Technique("gradient_checkpointing", "transformers' own gradient checkpointing (checkpoints on the device)",
              wanted=lambda cfg: cfg.gradient_checkpointing and not cfg.offloads_checkpoints,
              supports=_hf_checkpointing_supported,
              enable=_enable_hf_checkpointing, disable=_disable_hf_checkpointing,
              estimate_terms=("checkpoints", "kept_layer_activations"), legacy_value=None,
              fields=("keep_layers",)),
    Technique("tiled_mlp_chunk", "the MLP over chunks of the sequence",
              wanted=lambda cfg: cfg.tiled_mlp_chunk > 0, supports=lambda target: None,
              enable=_enable_tiled_mlp, disable=kernels.disable_tiled_mlp,
              estimate_terms=("backward_workspace",), legacy_value=None),
    Technique("embeddings_on_host", "the frozen input-embedding table in pinned host memory",
              wanted=lambda cfg: cfg.embeddings_on_host, supports=lambda target: kernels.host_embeddings_skip_reason(target.model),
              enable=_enable_host_embeddings, disable=kernels.disable_host_embeddings,
              estimate_terms=("embeddings",), cuda_only=True, legacy_value=False),
    Technique("dequantize_graph", "each layer's frozen 4-bit dequantizes replayed as one CUDA graph",
              wanted=lambda cfg: cfg.dequantizes_by_graph, supports=_dequantize_graphs_supported,
              enable=_enable_dequantize_graphs, disable=kernels.disable_dequantize_graphs,
              estimate_terms=("dequantize_graph_buffer",), cuda_only=True, legacy_value=False),
    Technique("loss", "the loss a chunk of tokens at a time: the [tokens, vocab] logits never exist",
              wanted=lambda cfg: cfg.loss == "chunked", supports=lambda target: chunked_loss_skip_reason(target.model),
              enable=_enable_chunked_loss, disable=remove_chunked_loss_forward,
              estimate_terms=("logits_and_loss",), legacy_value=None,
              fields=("loss_chunk_tokens", "fuse_loss", "loss_kernel", "compile_static_shapes")),
)

BY_NAME: dict[str, Technique] = {t.name: t for t in TECHNIQUES}


@dataclass
class ApplyReport:
    """What `apply_techniques` did: the names applied, each skipped one with its reason, the notes."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"applied  {name}" for name in self.applied]
        lines += [f"skipped  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def apply_techniques(target: Target) -> ApplyReport:
    """Install every technique the configuration asks for and the model supports, in order."""
    report = ApplyReport()
    for technique in TECHNIQUES:
        if not technique.wanted(target.cfg):
            continue
        reason = technique.skip_reason(target)
        if reason is not None:
            report.skipped[technique.name] = reason
            report.notes.append(f"{technique.name}: skipped, {reason}")
            continue
        report.notes.append(technique.enable(target))
        report.applied.append(technique.name)
    return report


def remove_techniques(model: nn.Module, names: list[str] | None = None) -> None:
    """Take the named techniques (default: all) off `model`, in reverse order of installation."""
    for technique in reversed(TECHNIQUES):
        if names is None or technique.name in names:
            technique.disable(model)
