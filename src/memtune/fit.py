"""`memtune fit --gpu-memory 24GiB [constraints]`: which configurations fit this card?

Searches, for the model and task of the given flags, over
    seq_len                 powers of two from 1024 to max_position_embeddings (or the one given)
    quantization            nf4, int8, none (or the one given)
    gradient_checkpointing  off, on, on with offloaded activations (with attention kept from the
                            forward, and without: `offload-ra`, half the host memory; or as given)
keeping every other field as typed (lora_rank, batch_size ... default otherwise), and
lists the configurations whose predicted peak (plus the CUDA context) is within the
budget, ranked: longest sequence first, then the least aggressive quantization
(none > int8 > nf4), then the fewest memory techniques. With --seq-len the
question is the other way round: which settings make that length fit.

Host memory is part of the bill: offloaded checkpoints (11.3 GB for the 1.5B
shape at 131072 tokens), the embedding table and paged optimizer states live
there. The `host` column gives those tensors; `--host-memory SIZE` also drops
the configurations whose host tensors exceed SIZE (leave the process itself,
2-5 GB with CUDA libraries, out of SIZE).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Iterable

from memtune.cli import add_config_flags, config_from_args
from memtune.config import RunConfig, parse_memory_size
from memtune.errors import UserError
from memtune.estimate import most_kept_layers
from memtune.estimate import (GIB, Estimate, effective_seq_len, estimate_for_shape, gib, load_model_config,
                              model_shape)

QUANT_PREFERENCE = ("none", "int8", "nf4")  # least aggressive first
MIN_SEQ_LEN = 1024


@dataclass
class Candidate:
    cfg: RunConfig
    estimate: Estimate
    needed_bytes: int  # predicted peak + CUDA context (when counted)
    budget_bytes: int
    host_budget_bytes: int | None = None  # for the host tensors; None = not checked

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.needed_bytes

    @property
    def host_bytes(self) -> int:
        return sum(self.estimate.host_bytes.values())

    @property
    def fits(self) -> bool:
        host_ok = self.host_budget_bytes is None or self.host_bytes <= self.host_budget_bytes
        return self.needed_bytes <= self.budget_bytes and host_ok

    def checkpointing(self) -> str:
        if self.cfg.offloads_checkpoints:
            return "offload" if self.cfg.saves_attention else "offload-ra"
        return "on" if self.cfg.gradient_checkpointing else "off"

    def speed_keep_layers(self) -> int:
        """The layers `--speed-budget auto` would keep from recomputation in this row's headroom
        (memtune.estimate.most_kept_layers: predicted peak within 90% of the budget)."""
        shape = model_shape(load_model_config(self.cfg.model), source=f"model '{self.cfg.model}'")
        with_context = self.needed_bytes != self.estimate.total_bytes
        return most_kept_layers(self.cfg, shape, self.budget_bytes, include_context=with_context)[0]

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.estimate.seq_len, "quantization": self.cfg.quantization,
                "speed_keep_layers": self.speed_keep_layers(),
                "gradient_checkpointing": self.cfg.gradient_checkpointing,
                "offload_activations": self.cfg.offload_activations, "save_attention": self.cfg.saves_attention,
                "lora_rank": self.cfg.lora_rank,
                "batch_size": self.cfg.batch_size, "predicted_bytes": self.estimate.total_bytes,
                "needed_bytes": self.needed_bytes, "headroom_bytes": self.headroom_bytes,
                "host_bytes": self.host_bytes}


@dataclass
class FitResult:
    fits: list[Candidate]  # ranked
    closest: Candidate | None  # the smallest miss, when nothing fits
    searched: int


def seq_len_choices(max_positions: int, upper: int | None = None) -> list[int]:
    """1024, 2048, ... up to max_position_embeddings (and `upper` when given)."""
    top = max_positions or 131072
    if upper:
        top = min(top, upper)
    values, n = [], MIN_SEQ_LEN
    while n <= top:
        values.append(n)
        n *= 2
    return values or [top]


def search_space(base: RunConfig, fixed: set[str], max_positions: int) -> Iterable[RunConfig]:
    """Every configuration to try: the free knobs varied, the fixed ones as given."""
    seqs = [base.seq_len] if "seq_len" in fixed else seq_len_choices(max_positions)
    if "quantization" in fixed or not base.lora:
        quants = [base.quantization]
    else:
        quants = list(QUANT_PREFERENCE)
    if "offload_activations" in fixed or "gradient_checkpointing" in fixed:
        ckpts = [(base.gradient_checkpointing, base.offload_activations, base.save_attention)]
    else:
        ckpts = [(False, False, base.save_attention), (True, False, base.save_attention),
                 (True, True, base.save_attention)]
    if "save_attention" not in fixed and base.save_attention and any(offload for _, offload, _ in ckpts):
        ckpts.append((True, True, False))  # attention recomputed: half the host memory of offloading
    for seq in seqs:
        for quant in quants:
            for ckpt, offload, save in ckpts:
                yield base.replace(seq_len=seq, quantization=quant, gradient_checkpointing=ckpt,
                                   offload_activations=offload, save_attention=save)


def _rank_key(cand: Candidate, seq_fixed: bool) -> tuple:
    techniques = (int(cand.cfg.gradient_checkpointing) + int(cand.cfg.offloads_checkpoints)
                  + int(cand.cfg.offloads_checkpoints and not cand.cfg.saves_attention))
    quant = QUANT_PREFERENCE.index(cand.cfg.quantization) if cand.cfg.quantization in QUANT_PREFERENCE else 9
    return (0 if seq_fixed else -cand.estimate.seq_len, quant, techniques, cand.needed_bytes)


def fit_configurations(base: RunConfig, budget_bytes: int, fixed: Iterable[str] = (),
                       include_context: bool = True, model_config: dict | None = None,
                       host_budget_bytes: int | None = None) -> FitResult:
    """The configurations within `budget_bytes`, ranked; the closest miss when none is."""
    fixed = set(fixed)
    shape = model_shape(model_config if model_config is not None else load_model_config(base.model),
                        source=f"model '{base.model}'")
    candidates, seen = [], set()
    for cfg in search_space(base, fixed, shape.max_positions):
        est = estimate_for_shape(cfg, shape)
        key = (est.seq_len, cfg.quantization, cfg.gradient_checkpointing, cfg.offloads_checkpoints,
               cfg.saves_attention)
        if key in seen:  # seq_len capped to the same length twice
            continue
        seen.add(key)
        needed = est.total_bytes + (est.cuda_context_bytes if include_context else 0)
        candidates.append(Candidate(cfg, est, needed, budget_bytes, host_budget_bytes))
    fits = sorted((c for c in candidates if c.fits), key=lambda c: _rank_key(c, "seq_len" in fixed))
    closest = None if fits else min(candidates, key=lambda c: c.needed_bytes, default=None)
    return FitResult(fits, closest, len(candidates))


def _describe(c: Candidate) -> str:
    return (f"seq_len {c.estimate.seq_len}, quantization {c.cfg.quantization}, checkpointing {c.checkpointing()}, "
            f"lora_rank {c.cfg.lora_rank}, batch {c.cfg.batch_size}")


def format_table(result: FitResult, budget_bytes: int, top: int) -> str:
    header = (f"{'seq_len':>8}  {'quant':<5}  {'ckpt':<10}  {'rank':>4}  {'batch':>5}  {'predicted':>10}  "
              f"{'headroom':>10}  {'host':>10}  {'keep':>4}")
    lines = [header, "-" * len(header)]
    for c in result.fits[:top]:
        lines.append(f"{c.estimate.seq_len:>8}  {c.cfg.quantization:<5}  {c.checkpointing():<10}  "
                     f"{c.cfg.lora_rank:>4}  {c.cfg.batch_size or 'auto':>5}  {c.needed_bytes / GIB:>6.2f} GiB  "
                     f"{c.headroom_bytes / GIB:>6.2f} GiB  {c.host_bytes / GIB:>6.2f} GiB  {c.speed_keep_layers():>4}")
    more = len(result.fits) - top
    if more > 0:
        lines.append(f"... and {more} more (--top N to show them)")
    lines.append(f"{len(result.fits)} of {result.searched} configurations fit {gib(budget_bytes)} "
                 f"(predicted peak allocated + CUDA context); host = tensors kept in host memory")
    lines.append("keep = the layers --speed-budget auto keeps from recomputation in the headroom (faster; "
                 "the run's peak grows toward 90% of the budget)")
    if any(c.checkpointing() == "offload-ra" for c in result.fits[:top]):
        lines.append("offload-ra = offloaded checkpoints with attention recomputed in backward (--no-save-attention): "
                     "half the host memory of `offload`, slower")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)  # --gpu-memory is the budget; any other flag fixes that knob
    parser.add_argument("--top", type=int, default=20, metavar="N", help="show the N best configurations (default 20)")
    parser.add_argument("--no-context", dest="include_context", action="store_false",
                        help="leave the CUDA context (~0.5 GB) out of the budget check")
    parser.add_argument("--host-memory", metavar="SIZE", default=None,
                        help="host RAM for offloaded checkpoints, the embedding table and paged optimizer states "
                             "(e.g. 32GiB); configurations needing more are dropped")
    parser.add_argument("--json", action="store_true", help="print the fitting configurations as JSON")


def run(args: argparse.Namespace) -> int:
    from memtune.config import FIELD_NAMES

    fixed = {k for k in vars(args) if k in FIELD_NAMES}
    cfg = config_from_args(args)
    if not cfg.gpu_memory:
        raise UserError("gpu_memory: give the card's memory, e.g. --gpu-memory 24GiB")
    try:
        budget = parse_memory_size(cfg.gpu_memory)
    except ValueError as exc:
        raise UserError(f"gpu_memory: {exc}") from None
    host_budget = None
    if args.host_memory:
        try:
            host_budget = parse_memory_size(args.host_memory)
        except ValueError as exc:
            raise UserError(f"--host-memory: {exc}") from None
    result = fit_configurations(cfg, budget, fixed, include_context=args.include_context,
                                host_budget_bytes=host_budget)
    if not result.fits:
        c = result.closest
        if c is None:
            raise UserError("nothing to search: the constraints leave no configuration")
        raise UserError(
            f"no configuration fits {gib(budget)}"
            + (f" with {gib(host_budget)} of host memory" if host_budget is not None else "")
            + f"; the closest is {_describe(c)} at {gib(c.needed_bytes)}, {gib(-c.headroom_bytes)} over the budget"
        )
    if args.json:
        print(json.dumps({"budget_bytes": budget, "fits": [c.to_dict() for c in result.fits[:args.top]]}, indent=2))
    else:
        print(format_table(result, budget, args.top))
    return 0


from memtune._callable_module import make_callable  # noqa: E402 - memtune.fit(...) is the API function

make_callable(__name__)
