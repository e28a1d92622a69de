"""Build the model a run trains: load or random-init, quantize, add LoRA, checkpointing.

The path, in order:
1. Resolve `cfg.model` to a config (preset, local directory, or cached hub id).
   Nothing is ever downloaded.
2. Build the model on the CPU in the compute dtype (weights from disk, or random).
3. Swap every nn.Linear inside the decoder layers for a bitsandbytes layer and
   move the model to the device; bitsandbytes quantizes each weight as it is
   moved, so the device never holds the full-precision copy. Embeddings,
   lm_head and norms stay in the compute dtype: the residual stream stays bf16
   (unlike peft's `prepare_model_for_kbit_training`, which upcasts them to fp32
   and makes every activation twice as large).
4. Add LoRA with peft (adapter weights fp32), or make everything trainable.
5. Gradient checkpointing: transformers' own (non-reentrant), or memtune's
   offloading variant; optionally the tiled MLP.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memtune.config import RunConfig, parse_memory_size
from memtune.errors import UserError
from memtune.loss import compile_unavailable_reason
from memtune.presets import PRESETS, TINY_DIR, is_preset, preset_config_dict

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ModelSource:
    """Where a model comes from: a directory with config.json (+ weights) or a preset dict."""

    name: str
    config_dict: dict[str, Any]
    weights_dir: Path | None  # None = random weights
    tokenizer_dir: Path | None  # None = no tokenizer of its own
    config_file: Path | None = None  # the config.json it was read from (None: a preset)


@dataclass
class BuiltModel:
    model: nn.Module  # peft-wrapped when LoRA is on
    tokenizer: Any
    device: torch.device
    compute_dtype: torch.dtype
    max_positions: int
    notes: list[str] = field(default_factory=list)
    techniques: Any = None  # memtune.techniques.ApplyReport: what was applied, what skipped and why


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    if cfg.compute_dtype != "auto":
        return _DTYPES[cfg.compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPUs run bf16 matmuls natively (AMX/AVX512-BF16) or by emulation; both
    # are supported by torch, and bf16 matches what a GPU run computes.
    return torch.bfloat16


def resolve_source(cfg: RunConfig) -> ModelSource:
    """Find the model's config without touching the network."""
    name = cfg.model
    if is_preset(name):
        if name == "tiny":
            has_weights = (TINY_DIR / "model.safetensors").is_file()
            weights = None if cfg.random_init or not has_weights else TINY_DIR
            return ModelSource(name, preset_config_dict(name), weights, TINY_DIR)
        if not cfg.random_init:
            raise UserError(
                f"model: preset '{name}' is a shape without weights; add --random-init to build it with "
                f"random weights (memory and speed do not depend on them), or give a local directory"
            )
        return ModelSource(name, preset_config_dict(name), None, None)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return _local_source(name, path, cfg)
    return _cached_hub_source(name, cfg)


def _local_source(name: str, path: Path, cfg: RunConfig) -> ModelSource:
    if not path.is_dir():
        raise UserError(f"model: {path} is not a directory (expected a model directory with config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"model: {path} has no config.json")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"model: {config_file} is not valid JSON ({exc})") from None
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not cfg.random_init and not has_weights:
        raise UserError(f"model: {path} has no weights (*.safetensors); add --random-init to measure its shape")
    if not isinstance(config_dict, dict):
        raise UserError(f"model: {config_file} does not hold a JSON object")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return ModelSource(name, config_dict, None if cfg.random_init else path, path if has_tokenizer else None,
                       config_file)


def _cached_hub_source(name: str, cfg: RunConfig) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        presets = ", ".join(["tiny", *PRESETS])
        raise UserError(
            f"model: '{name}' is not a local directory and not in the local Hugging Face cache, and memtune "
            f"never downloads; give a local directory with the weights, or a shape preset with --random-init "
            f"({presets})"
        ) from None
    return _local_source(name, local, cfg)


def _load_tokenizer(source: ModelSource, cfg: RunConfig, notes: list[str]):
    from transformers import AutoTokenizer

    tokenizer_dir = source.tokenizer_dir
    if tokenizer_dir is None:
        # Token ids matter for accuracy, not for memory or speed; the shipped
        # tokenizer's ids are valid in any larger vocabulary.
        notes.append(f"model '{source.name}' has no tokenizer; using the built-in tiny tokenizer")
        tokenizer_dir = TINY_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# What a model constructor or a config class raises for values it rejects (nn.Embedding asserts
# on a padding_idx outside the table; config classes raise ValueError/TypeError).
_CONSTRUCTOR_ERRORS = (AssertionError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                       ZeroDivisionError, RuntimeError)


def _config_label(source: ModelSource) -> str:
    return str(source.config_file) if source.config_file is not None else f"the config of '{source.name}'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _check_config_values(config: Any, label: str) -> None:
    """The values a constructor rejects without naming them, checked first so the error can name the field."""
    def value(name: str) -> Any:
        return getattr(config, name, None)

    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        v = value(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise UserError(f"model: {label}: {name} is {v!r}; expected a positive integer")
    vocab, pad = value("vocab_size"), value("pad_token_id")
    if isinstance(vocab, int) and isinstance(pad, int) and not isinstance(pad, bool) and not 0 <= pad < vocab:
        raise UserError(f"model: {label}: pad_token_id {pad} is outside the vocabulary (vocab_size {vocab}); "
                        f"expected 0..{vocab - 1} or null")
    heads, kv = value("num_attention_heads"), value("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and (kv <= 0 or heads % kv):
        raise UserError(f"model: {label}: num_key_value_heads {kv} does not divide num_attention_heads {heads}")


def _hf_config(source: ModelSource, cfg: RunConfig):
    """The transformers config of `source`, its values checked by building the model on the meta device
    (no memory, no weights), so that a value the constructor rejects is one line naming the file."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    label = _config_label(source)
    config_dict = dict(source.config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise UserError(f"model: {label} has no model_type")
    remote = model_type not in CONFIG_MAPPING and cfg.trust_remote_code and source.weights_dir is not None
    if model_type not in CONFIG_MAPPING and not remote:
        # one line, not transformers' list of every architecture it knows
        raise UserError(f"model: {label}: model_type '{model_type}' is not an architecture this transformers "
                        f"knows (memtune's families: {', '.join(_family_names())})")
    try:
        if remote:  # the directory's own config class
            config = AutoConfig.from_pretrained(str(source.weights_dir), trust_remote_code=True)
        else:
            config = AutoConfig.for_model(model_type, **config_dict)
    except UserError:
        raise
    except _CONSTRUCTOR_ERRORS as exc:
        raise UserError(f"model: {label} is not a valid {model_type} config ({_first_line(exc)})") from None
    _check_config_values(config, label)
    return config


# RoPE types whose parameters name the pretraining length (transformers' standardize_rope_params)
_ROPE_TYPES_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


def apply_rope_scaling(config: Any, cfg: RunConfig, label: str = "model") -> str | None:
    """Set cfg.rope_scaling / rope_factor on a transformers config (its `rope_parameters`); the note.

    rope_factor is the extension over the model's max_position_embeddings; transformers' `factor` is
    the extension over the pretraining length, which a model already scaled (Llama 3.1: llama3,
    factor 8 from 8192 to 131072) names as original_max_position_embeddings, so its scaling is
    replaced by one covering max_position_embeddings x rope_factor from that length. dynamic
    (NTK) takes max_position_embeddings itself as the trained length and scales beyond it, so it
    is left as it is there and refused on a model whose RoPE is already scaled.
    """
    if not cfg.rope_scaling:
        return None
    params = getattr(config, "rope_parameters", None)
    old_max = int(getattr(config, "max_position_embeddings", 0) or 0)
    if not isinstance(params, dict) or not params or old_max <= 0:
        raise UserError(f"rope_scaling: {label} has no RoPE parameters and max_position_embeddings to scale")
    # a copy: the dict may be the preset's or config.json's own, shared with later builds
    config.rope_parameters = params = copy.deepcopy(params)
    nested = config.nested_rope_parameter_keys(params) if hasattr(config, "nested_rope_parameter_keys") else []
    # per layer type (Gemma 3): only the full-attention layers see the whole sequence
    entries = ([params["full_attention"]] if "full_attention" in nested else [params[k] for k in nested]) \
        if nested else [params]
    new_max = cfg.position_limit(old_max)
    olds, factor = [], float(cfg.rope_factor)
    for entry in (e for e in entries if e is not None):
        old_type = entry.get("rope_type", "default")
        if old_type != "default" and cfg.rope_scaling == "dynamic":
            raise UserError(f"rope_scaling: dynamic cannot extend {label}, whose RoPE is already {old_type}-scaled; "
                            f"use --rope-scaling yarn or linear")
        original = old_max
        if old_type in _ROPE_TYPES_WITH_ORIGINAL and entry.get("original_max_position_embeddings"):
            original = int(entry["original_max_position_embeddings"])
            factor = new_max / original
        elif old_type != "default":  # linear: its factor from a length the config does not name
            factor = float(entry.get("factor") or 1) * cfg.rope_factor
        kept = {k: entry[k] for k in ("rope_theta", "partial_rotary_factor") if k in entry}
        scaled = {"rope_type": cfg.rope_scaling, "factor": factor, **kept}
        if cfg.rope_scaling == "yarn":
            scaled["original_max_position_embeddings"] = original
        if old_type != "default":
            olds.append(f"{old_type} (factor {entry.get('factor', 1):g})")
        entry.clear()
        entry.update(scaled)
    if cfg.rope_scaling != "dynamic":
        config.max_position_embeddings = new_max  # the saved config says how far the model now reaches
    try:
        config.validate_rope()
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"rope_scaling: {label} rejects {cfg.rope_scaling} RoPE ({_first_line(exc)})") from None
    replaced = f", replacing its {', '.join(olds)}" if olds else ""
    return (f"rope_scaling: {cfg.rope_scaling}, factor {factor:g}{replaced}: positions up to {new_max} "
            f"(max_position_embeddings {old_max} x {cfg.rope_factor:g})")


def _family_names() -> list[str]:
    from memtune.families import FAMILIES

    return list(FAMILIES)


def _validate_on_meta(config: Any, source: ModelSource, cfg: RunConfig) -> None:
    """Build the model on the meta device: a value its constructor rejects is a UserError, before
    any weights are read or drawn and before anything is written."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except UserError:
        raise
    except _CONSTRUCTOR_ERRORS as exc:
        architecture = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
        raise UserError(f"model: {_config_label(source)} is rejected by {architecture} ({_first_line(exc)})") from None


def _attention_impl(cfg: RunConfig, config: Any, device: torch.device, notes: list[str]) -> str:
    """The attention kernel for this family (memtune.families.attention_implementation), with its note."""
    from memtune.families import attention_implementation

    impl, note = attention_implementation(config, cfg.attention, device.type, compile_unavailable_reason(device))
    if note:
        notes.append(note)
    return impl


def _build_full_precision(source: ModelSource, cfg: RunConfig, dtype: torch.dtype,
                          device: torch.device, notes: list[str]) -> nn.Module:
    """The model in the compute dtype, before quantization.

    Weights from disk are loaded on the CPU, so the device only ever holds
    their quantized form. Random weights are drawn on the device itself:
    initialising 1.5B parameters takes over a minute on a CPU and a fraction
    of a second on a GPU (the full-precision copy lives there only until
    quantization, before the peak is measured).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    config = _hf_config(source, cfg)
    rope_note = apply_rope_scaling(config, cfg, _config_label(source))
    if rope_note:
        notes.append(rope_note)
    attention = _attention_impl(cfg, config, device, notes)
    config._attn_implementation = attention
    _validate_on_meta(config, source, cfg)
    if source.weights_dir is not None:
        # the scaled config replaces the directory's own; without scaling the directory's is read as before
        scaled = {"config": config} if rope_note else {}
        return AutoModelForCausalLM.from_pretrained(
            str(source.weights_dir), dtype=dtype, attn_implementation=attention,
            trust_remote_code=cfg.trust_remote_code, low_cpu_mem_usage=True, **scaled,
        )
    if device.type == "cuda":
        device = _random_init_device(config, cfg, dtype, device, notes)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)


def random_init_fits(need_bytes: int, free_bytes: int, cap_bytes: int | None, allocated_bytes: int) -> bool:
    """Whether the full-precision random model fits the GPU now (with 10% to spare): the free
    memory, and under a gpu_memory cap what the cap leaves beside what is already allocated."""
    budget = free_bytes if cap_bytes is None else min(free_bytes, cap_bytes - allocated_bytes)
    return need_bytes <= 0.9 * budget


def _random_init_device(config: Any, cfg: RunConfig, dtype: torch.dtype, device: torch.device,
                        notes: list[str]) -> torch.device:
    """The GPU, unless the full-precision model would not fit there before quantization (an 8B
    model is 16 GB in bf16): then the CPU, slower but within a small card or a gpu_memory cap."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        shell = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    need = sum(p.numel() * p.element_size() for p in shell.parameters())
    free, _total = torch.cuda.mem_get_info(device)
    cap = parse_memory_size(cfg.gpu_memory) if cfg.gpu_memory else None
    if random_init_fits(need, free, cap, torch.cuda.memory_allocated(device)):
        return device
    notes.append(f"random weights drawn on the CPU (slower): the full-precision model, {need / 1e9:.1f} GB, "
                 f"would not fit the GPU before quantization")
    return torch.device("cpu")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The stack of decoder layers of a causal LM (peft-wrapped or not), as the kernels find it."""
    from memtune.kernels._common import decoder_layers as find_layers

    try:
        return find_layers(model)
    except ValueError:
        raise UserError(f"model: {type(model).__name__} has no decoder layers; memtune supports "
                        f"Llama-style decoders") from None


def _quantized_linear(linear: nn.Linear, cfg: RunConfig, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight, not yet quantized (that happens on .to(device))."""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    weight = linear.weight.data
    if cfg.quantization == "int8":
        # Int8Params quantizes only when it moves off the CPU.
        weight = weight.cpu()
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=dtype, compress_statistics=cfg.double_quant,
                                  quant_type=cfg.quantization, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=cfg.double_quant,
                                         quant_type=cfg.quantization, blocksize=64)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_decoder_linears(model: nn.Module, cfg: RunConfig, dtype: torch.dtype) -> int:
    """Swap every nn.Linear inside the decoder layers for a bitsandbytes layer; return how many."""
    count = 0
    for layer in decoder_layers(model):
        for parent in layer.modules():
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, child_name, _quantized_linear(child, cfg, dtype))
                    count += 1
    return count


def _move_to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move layer by layer, so only one layer's full-precision weights are ever on the device."""
    for layer in decoder_layers(model):
        layer.to(device)
    model.to(device)
    return model


def _lora_targets(cfg: RunConfig, model_type: str) -> Any:
    if cfg.lora_targets == "default":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            raise UserError(
                f"lora_targets: peft has no default target modules for '{model_type}'; give all-linear or a list"
            )
        return list(DEFAULTS[model_type])
    if cfg.lora_targets == "all-linear":
        return "all-linear"
    return list(cfg.lora_targets) if isinstance(cfg.lora_targets, tuple) else [cfg.lora_targets]


def add_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = _lora_targets(cfg, model.config.model_type)
    lora_config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype keeps the adapter weights fp32 for stable updates.
        model = get_peft_model(model, lora_config, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise UserError(f"lora_targets: {exc}".splitlines()[0]) from None
    return model


def build_model(cfg: RunConfig) -> BuiltModel:
    """The model `memtune train` trains: loaded, quantized, LoRA added, then every memory technique
    of the registry (memtune.techniques) that the configuration asks for and the model supports."""
    from memtune.techniques import Target, apply_techniques

    notes: list[str] = []
    device = resolve_device(cfg)
    dtype = resolve_compute_dtype(cfg, device)
    source = resolve_source(cfg)
    tokenizer = _load_tokenizer(source, cfg, notes)
    model = _build_full_precision(source, cfg, dtype, device, notes)
    if source.weights_dir is None:
        notes.append(f"model '{source.name}' built with random weights")
    if cfg.quantization != "none":
        quantize_decoder_linears(model, cfg, dtype)
    model = _move_to_device(model, device)
    if cfg.lora:
        model = add_lora(model, cfg)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    report = apply_techniques(Target(model, cfg, device, dtype))
    notes += report.notes
    # with rope_scaling the model's max_position_embeddings x rope_factor (dynamic leaves the config's as it was)
    max_positions = cfg.position_limit(int(source.config_dict.get("max_position_embeddings")
                                           or getattr(model.config, "max_position_embeddings", 0) or 0)) or 1 << 30
    return BuiltModel(model, tokenizer, device, dtype, max_positions, notes, report)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) the way peft counts them: a 4-bit weight counts as two params per byte."""
    from memtune.kernels import host_embedding_weight

    host = host_embedding_weight(model)
    host_params = host.numel() if host is not None else 0  # held outside the parameters, still the model's
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return trainable, total + host_params
    total = sum(p.numel() for p in model.parameters()) + host_params
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
