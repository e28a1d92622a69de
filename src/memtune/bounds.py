"""Bounds a user can reason about, checked on the model's shape before any weight or file exists.

LoRA's update B @ A of a linear [out, in] has rank at most min(in, out), so a
rank above the smallest adapted layer's width buys nothing and can ask for
terabytes (`--lora-rank 10000000000`). The widths come from the model built on
the meta device: every architecture transformers knows, no memory used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memtune.config import RunConfig
from memtune.errors import UserError


@dataclass(frozen=True)
class RankLimit:
    rank: int  # the largest rank every adapted module can use
    module: str  # the narrowest adapted module (its name in the model)


def meta_model(cfg: RunConfig) -> Any:
    """The model of `cfg` with its parameters on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memtune.models import _hf_config, resolve_source

    source = resolve_source(cfg)
    hf_config = _hf_config(source, cfg)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.trust_remote_code)
    except Exception:
        from memtune.models import _validate_on_meta

        _validate_on_meta(hf_config, source, cfg)  # the same build: a config it rejects becomes one line naming it
        raise


def _targets(cfg: RunConfig, model_type: str) -> list[str] | str | None:
    """The target names peft is given (see models.add_lora); None = peft has no default for the model."""
    if cfg.lora_targets == "default":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        return list(DEFAULTS[model_type]) if model_type in DEFAULTS else None
    if cfg.lora_targets == "all-linear":
        return "all-linear"
    return list(cfg.lora_targets) if isinstance(cfg.lora_targets, tuple) else [cfg.lora_targets]


def _width(module: Any) -> int | None:
    from torch import nn

    if isinstance(module, nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim)
    in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return min(in_features, out_features)
    return None


def lora_rank_limit(model: Any, targets: Any) -> RankLimit | None:
    """The smallest width among the modules `targets` selects, matched as peft matches a list of names
    (the full name, or its end after a dot); 'all-linear' is every linear but the output layer."""
    from torch import nn

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    best: RankLimit | None = None
    for name, module in model.named_modules():
        if targets == "all-linear":
            chosen = isinstance(module, nn.Linear) and module is not output
        else:
            chosen = any(name == t or name.endswith("." + t) for t in targets)
        width = _width(module) if chosen else None
        if width is not None and (best is None or width < best.rank):
            best = RankLimit(width, name)
    return best


def check_lora_rank(cfg: RunConfig, model: Any = None) -> None:
    """UserError (one line) when lora_rank exceeds the smallest adapted layer's width."""
    if not cfg.lora:
        return
    model = model if model is not None else meta_model(cfg)
    targets = _targets(cfg, getattr(model.config, "model_type", ""))
    _refuse_above(cfg, lora_rank_limit(model, targets) if targets is not None else None)


def check_lora_rank_for_shape(cfg: RunConfig, shape: Any) -> None:
    """The same bound from the estimator's ModelShape (memtune.estimate), for verbs that build no model."""
    if not cfg.lora:
        return
    from memtune.estimate import lora_target_linears

    linears = lora_target_linears(shape, cfg.lora_targets)
    narrowest = min(linears, key=lambda lin: min(lin.in_features, lin.out_features), default=None)
    if narrowest is not None:
        width = min(narrowest.in_features, narrowest.out_features)
        _refuse_above(cfg, RankLimit(width, f"each layer's {narrowest.name}"))


def _refuse_above(cfg: RunConfig, limit: RankLimit | None) -> None:
    if limit is not None and cfg.lora_rank > limit.rank:
        raise UserError(f"lora_rank: expected at most {limit.rank} for {cfg.model} (the width of {limit.module}, "
                        f"the narrowest adapted layer: a larger rank adds nothing); got {cfg.lora_rank}")
