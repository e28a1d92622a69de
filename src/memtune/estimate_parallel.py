"""Per-GPU memory of a run over several GPUs: a thin layer over memtune.estimate's single-GPU terms.

The single-GPU estimate of one rank's work (its share of the global batch; with context
parallelism its share of each sequence) is taken as it is, then by strategy:

- ddp: every rank holds the whole model; DDP's gradient buckets add a copy of the trained
  parameters' gradients (gradient_as_bucket_view is off).
- fsdp: the weights (4-bit decoder weights, their constants, embeddings, lm_head, norms) and the
  trained parameters, their gradients and optimizer states are divided by the number of GPUs;
  the layers FSDP2 has gathered at once (the running one and the one prefetched) come back whole.

What it does not model: NCCL's own buffers (a few hundred MB a process, outside the allocator)
and ring attention's exchanged key/value blocks (two blocks of one layer per rank). It has not
been checked against a measurement on several GPUs yet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from memtune.config import RunConfig
from memtune.errors import UserError
from memtune.estimate import Estimate, estimate_for_shape, load_model_config, model_shape

# the weights a fully_shard group holds sharded: decoder layers' (their groups), the rest (the root's)
SHARDED_WEIGHTS = ("decoder_weights", "quant_constants", "lm_head", "embeddings", "norms", "biases")
TRAINED_STATE = ("lora_params", "trainable_params", "optimizer_states", "gradients")
GATHERED_LAYERS = 2  # FSDP2 unshards the running layer while it prefetches the next


@dataclass
class ParallelEstimate:
    gpus: int
    strategy: str
    per_gpu_bytes: int  # the estimated peak of one rank's torch.cuda.max_memory_allocated
    breakdown: dict[str, int]  # component -> bytes on one GPU
    local: Estimate  # the single-GPU estimate of one rank's share
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.per_gpu_bytes * self.gpus

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "strategy": self.strategy, "per_gpu_bytes": int(self.per_gpu_bytes),
                "total_bytes": int(self.total_bytes), "breakdown": {k: int(v) for k, v in self.breakdown.items()},
                "notes": list(self.notes)}


def rank_config(cfg: RunConfig, gpus: int) -> RunConfig:
    """What one rank trains: its rows of the global batch, and its split of each sequence."""
    context = max(1, cfg.context_parallel)
    if gpus < 1 or gpus % context:
        raise UserError(f"gpus: expected a multiple of context_parallel {context}; got {gpus}")
    rows = gpus // context
    changes: dict[str, Any] = {"strategy": "single", "context_parallel": 1}
    if cfg.batch_size:
        if cfg.batch_size % rows:
            raise UserError(f"batch_size: {cfg.batch_size} is the global batch and must divide into {rows} processes")
        changes["batch_size"] = cfg.batch_size // rows
    if context > 1:
        changes["seq_len"] = math.ceil(cfg.seq_len / context)
    return dataclasses.replace(cfg, **changes)


def estimate_parallel(cfg: RunConfig, gpus: int, strategy: str | None = None, model_config: dict | None = None,
                      device: str = "cuda") -> ParallelEstimate:
    """The per-GPU estimate of `cfg` over `gpus` processes under `strategy` (default cfg.strategy)."""
    strategy = strategy or cfg.strategy
    if model_config is None:
        model_config = load_model_config(cfg.model)
    shape = model_shape(model_config, source=f"model '{cfg.model}'")
    local = estimate_for_shape(rank_config(cfg, gpus), shape, device)
    breakdown = dict(local.breakdown)
    notes: list[str] = []
    if cfg.context_parallel > 1:
        notes.append(f"context_parallel {cfg.context_parallel}: activations of "
                     f"{math.ceil(cfg.seq_len / cfg.context_parallel)} tokens a sequence per GPU")
    if strategy == "ddp" and gpus > 1:
        breakdown["ddp_gradient_buckets"] = breakdown.get("gradients", 0)
    elif strategy == "fsdp" and gpus > 1:
        layer = breakdown.get("decoder_weights", 0) + breakdown.get("quant_constants", 0)
        for name in SHARDED_WEIGHTS + TRAINED_STATE:
            if name in breakdown:
                breakdown[name] = math.ceil(breakdown[name] / gpus)
        breakdown["fsdp_gathered_layers"] = math.ceil(layer * min(GATHERED_LAYERS, shape.layers) / shape.layers)
    return ParallelEstimate(gpus, strategy, sum(breakdown.values()), breakdown, local, notes)


def longest_seq_len(cfg: RunConfig, gpus: int, budget_bytes: int, strategy: str | None = None,
                    model_config: dict | None = None, include_context: bool = True) -> int | None:
    """The longest seq_len of memtune.fit's grid whose per-GPU estimate fits `budget_bytes` (None: none)."""
    from memtune.fit import longest_fitting, seq_len_grid

    if model_config is None:
        model_config = load_model_config(cfg.model)
    shape = model_shape(model_config, source=f"model '{cfg.model}'")
    limit = cfg.position_limit(shape.max_positions)

    def fits(seq: int) -> bool:
        est = estimate_parallel(dataclasses.replace(cfg, seq_len=seq), gpus, strategy, model_config)
        context = est.local.cuda_context_bytes if include_context else 0
        return est.per_gpu_bytes + context <= budget_bytes

    return longest_fitting(seq_len_grid(limit), fits)
