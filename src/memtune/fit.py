"""`memtune fit --gpu-memory 24GiB [constraints]`: which configurations fit this card?

Searches, for the model and task of the given flags, over
    quantization            nf4, int8, none (or the one given)
    gradient_checkpointing  off, on, on with offloaded activations (with attention kept from the
                            forward, and without: `offload-ra`, half the host memory; or as given)
keeping every other field as typed (lora_rank, batch_size ... default otherwise), and for each
of those configurations bisects seq_len, to 1,024 tokens, between 1,024 and the model's
max_position_embeddings (times rope_factor with --rope-scaling): the longest length whose
predicted peak (plus the CUDA context) is within the budget, the host tensors within
--host-memory. The estimate grows with seq_len, so the bisection finds that length in about
log2(limit / 1024) estimates a configuration. The rows (one a configuration, at its longest
length) are ranked: longest sequence first, then the least aggressive quantization
(none > int8 > nf4), then the fewest memory techniques; `max_seq_len` is the first row's. With
--seq-len the question is the other way round: which settings make that length fit.

Host memory is part of the bill: offloaded checkpoints (11.3 GB for the 1.5B
shape at 131072 tokens), saved attention outputs, the embedding table and paged
optimizer states live there. The `host` column gives those tensors; `--host-memory SIZE`
drops the configurations whose host tensors exceed SIZE (leave the process itself,
2-5 GB with CUDA libraries, out of SIZE), and `choose_host_plan` is the order in which
`train` and `fit` give host memory up: saved attention first (recomputed in backward),
then the offload itself (checkpoints kept on the GPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from memtune.cli import add_config_flags, config_from_args
from memtune.config import RunConfig, parse_memory_size
from memtune.errors import UserError
from memtune.estimate import (GIB, Estimate, estimate_for_shape, gib, load_model_config, model_shape,
                              most_kept_layers)

QUANT_PREFERENCE = ("none", "int8", "nf4")  # least aggressive first
MIN_SEQ_LEN = 1024
SEQ_STEP = 1024  # the bisection's granularity
DEFAULT_LIMIT = 131072  # a model that names no max_position_embeddings


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
        return checkpointing_name(self.cfg)

    def speed_keep_layers(self) -> int:
        """The layers `--speed-budget auto` would keep from recomputation in this row's headroom
        (memtune.estimate.most_kept_layers: predicted peak within 90% of the budget)."""
        shape = model_shape(load_model_config(self.cfg.model), source=f"model '{self.cfg.model}'")
        with_context = self.needed_bytes != self.estimate.total_bytes
        return most_kept_layers(self.cfg, shape, self.budget_bytes, include_context=with_context)[0]

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.estimate.seq_len, "quantization": self.cfg.quantization,
                "speed_keep_layers": self.speed_keep_layers(),
                "checkpointing": self.checkpointing(),
                "gradient_checkpointing": self.cfg.gradient_checkpointing,
                "offload_activations": self.cfg.offload_activations, "save_attention": self.cfg.saves_attention,
                "lora_rank": self.cfg.lora_rank,
                "batch_size": self.cfg.batch_size, "predicted_bytes": self.estimate.total_bytes,
                "needed_bytes": self.needed_bytes, "headroom_bytes": self.headroom_bytes,
                "host_bytes": self.host_bytes}


@dataclass
class FitResult:
    fits: list[Candidate]  # ranked; one a configuration, at the longest seq_len that fits it
    closest: Candidate | None  # the smallest miss, when nothing fits
    searched: int  # configurations searched
    host_note: str | None = None  # what the host budget made the best configuration give up

    @property
    def max_seq_len(self) -> int | None:
        """The longest length that fits the caps, for the best configuration (None: nothing fits)."""
        return self.fits[0].estimate.seq_len if self.fits else None


def checkpointing_name(cfg: RunConfig) -> str:
    if cfg.offloads_checkpoints:
        return "offload" if cfg.saves_attention else "offload-ra"
    return "on" if cfg.gradient_checkpointing else "off"


def seq_len_grid(limit: int, upper: int | None = None) -> list[int]:
    """1024, 2048, 3072 ... up to `limit` (the model's positions; and `upper` when given), with the
    limit itself last when it is not a multiple of 1024."""
    top = limit or DEFAULT_LIMIT
    if upper:
        top = min(top, upper)
    values = list(range(MIN_SEQ_LEN, top + 1, SEQ_STEP))
    if not values or values[-1] != top:
        values.append(top)
    return values


def longest_fitting(grid: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest value of the ascending `grid` for which `fits` holds, by bisection (fits is taken
    to hold up to some length and not beyond it); None when even the first does not fit."""
    if not grid or not fits(grid[0]):
        return None
    lo, hi = 0, len(grid)  # fits(grid[lo]); every index >= hi does not fit (hi = len: not known yet)
    if fits(grid[-1]):
        return grid[-1]
    hi = len(grid) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(grid[mid]):
            lo = mid
        else:
            hi = mid
    return grid[lo]


def configurations(base: RunConfig, fixed: set[str]) -> list[RunConfig]:
    """Every configuration to try (seq_len aside): the free knobs varied, the fixed ones as given."""
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
    return [base.replace(quantization=quant, gradient_checkpointing=ckpt, offload_activations=offload,
                         save_attention=save)
            for quant in quants for ckpt, offload, save in ckpts]


def _rank_key(cand: Candidate, seq_fixed: bool) -> tuple:
    techniques = (int(cand.cfg.gradient_checkpointing) + int(cand.cfg.offloads_checkpoints)
                  + int(cand.cfg.offloads_checkpoints and not cand.cfg.saves_attention))
    quant = QUANT_PREFERENCE.index(cand.cfg.quantization) if cand.cfg.quantization in QUANT_PREFERENCE else 9
    return (0 if seq_fixed else -cand.estimate.seq_len, quant, techniques, cand.needed_bytes)


def fit_configurations(base: RunConfig, budget_bytes: int, fixed: Iterable[str] = (),
                       include_context: bool = True, model_config: dict | None = None,
                       host_budget_bytes: int | None = None) -> FitResult:
    """Each configuration at the longest seq_len within `budget_bytes` (and the host budget: the
    argument, else base.host_memory), ranked; the closest miss when none fits."""
    fixed = set(fixed)
    if host_budget_bytes is None and base.host_memory:
        host_budget_bytes = parse_memory_size(base.host_memory)
    shape = model_shape(model_config if model_config is not None else load_model_config(base.model),
                        source=f"model '{base.model}'")

    def candidate(cfg: RunConfig) -> Candidate:
        est = estimate_for_shape(cfg, shape)
        needed = est.total_bytes + (est.cuda_context_bytes if include_context else 0)
        return Candidate(cfg, est, needed, budget_bytes, host_budget_bytes)

    grid = [base.seq_len] if "seq_len" in fixed else seq_len_grid(base.position_limit(shape.max_positions))
    rows, misses = [], []
    searched = configurations(base, fixed)
    for cfg in searched:
        tried: dict[int, Candidate] = {}

        def fits(seq: int, cfg: RunConfig = cfg, tried: dict[int, Candidate] = tried) -> bool:
            tried[seq] = candidate(cfg.replace(seq_len=seq))
            return tried[seq].fits

        best = longest_fitting(grid, fits)
        if best is None:
            misses.append(tried[grid[0]])
        else:
            rows.append(tried[best])
    fits = sorted(rows, key=lambda c: _rank_key(c, "seq_len" in fixed))
    closest = None if fits else min(misses, key=lambda c: c.needed_bytes, default=None)
    note = None
    if fits and host_budget_bytes is not None and fits[0].cfg.offloads_checkpoints:
        note = choose_host_plan(fits[0].cfg.replace(save_attention=base.save_attention), host_budget_bytes,
                                lambda c: estimate_for_shape(c, shape), "--host-memory").line
    return FitResult(fits, closest, len(searched), note)


# --- the host-memory budget -----------------------------------------------------------

@dataclass
class HostPlan:
    cfg: RunConfig  # what to run: the configuration given, or one that keeps less on the host
    estimate: Estimate | None  # the estimate of cfg
    line: str | None  # what was given up and why (None: the configuration given fits)
    fits: bool  # whether cfg's host tensors fit the budget


def choose_host_plan(cfg: RunConfig, budget_bytes: int, estimate: Callable[[RunConfig], Estimate],
                     budget_label: str) -> HostPlan:
    """What to keep in host memory so that the offloaded tensors fit `budget_bytes`, in this order:
    saved attention outputs with the offloaded checkpoints (the fastest backward), the checkpoints
    alone with attention recomputed (`offload-ra`: about half the host bytes), then no offload
    (checkpoints on the GPU: more GPU memory). `estimate` predicts a configuration; the line gives
    the numbers."""
    def host(est: Estimate) -> int:
        return sum(est.host_bytes.values())

    steps = [cfg]
    if cfg.saves_attention:
        steps.append(steps[-1].replace(save_attention=False))
    if cfg.offloads_checkpoints:
        steps.append(steps[-1].replace(offload_activations=False))
    ests = [estimate(steps[0])]
    if host(ests[0]) <= budget_bytes:
        return HostPlan(cfg, ests[0], None, True)
    over = f"over the {gib(budget_bytes)} of {budget_label}"
    for step in steps[1:]:
        ests.append(estimate(step))
        if host(ests[-1]) <= budget_bytes:
            return HostPlan(step, ests[-1], _host_line(steps[0], ests[0], step, ests[-1], over), True)
    rest = ", ".join(k.replace("_", " ") for k in ests[-1].host_bytes) or "host tensors"
    line = (f"host memory: this run keeps {gib(host(ests[-1]))} in host memory ({rest}) even without offloading, "
            f"{over}; --no-embeddings-on-host or a non-paged --optimizer needs less")
    return HostPlan(steps[-1], ests[-1], line, False)


def _host_line(first: RunConfig, first_est: Estimate, chosen: RunConfig, chosen_est: Estimate, over: str) -> str:
    need, now = sum(first_est.host_bytes.values()), sum(chosen_est.host_bytes.values())
    what = ("offloaded checkpoints with saved attention" if first.saves_attention else "offloaded checkpoints")
    if chosen.offloads_checkpoints:
        choice = f"attention recomputed in backward instead (offload-ra: {gib(now)} on the host, slower)"
    else:
        choice = (f"checkpoints kept on the GPU instead (no offload: {gib(now)} on the host, "
                  f"{gib(chosen_est.total_bytes)} predicted on the GPU)")
    return f"host memory: {what} need {gib(need)}, {over}; {choice}"


# --- the verb ------------------------------------------------------------------------------

def _describe(c: Candidate) -> str:
    return (f"seq_len {c.estimate.seq_len}, quantization {c.cfg.quantization}, checkpointing {c.checkpointing()}, "
            f"lora_rank {c.cfg.lora_rank}, batch {c.cfg.batch_size}")


def format_table(result: FitResult, budget_bytes: int, top: int, seq_fixed: bool = False) -> str:
    longest = "seq_len" if seq_fixed else "max_seq"
    header = (f"{longest:>8}  {'quant':<5}  {'ckpt':<10}  {'rank':>4}  {'batch':>5}  {'predicted':>10}  "
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
    if not seq_fixed:
        lines.append(f"max_seq = the longest seq_len (to {SEQ_STEP} tokens) that fits each configuration; "
                     f"longest: {result.max_seq_len}")
    if result.host_note:
        lines.append(result.host_note)
    if any(c.checkpointing() == "offload-ra" for c in result.fits[:top]):
        lines.append("offload-ra = offloaded checkpoints with attention recomputed in backward (--no-save-attention): "
                     "half the host memory of `offload`, slower")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)  # --gpu-memory is the budget, --host-memory the host's; any other flag fixes that knob
    parser.add_argument("--top", type=int, default=20, metavar="N", help="show the N best configurations (default 20)")
    parser.add_argument("--no-context", dest="include_context", action="store_false",
                        help="leave the CUDA context (~0.5 GB) out of the budget check")
    parser.add_argument("--json", action="store_true", help="print max_seq_len and the fitting configurations as JSON")


def run(args: argparse.Namespace) -> int:
    from memtune.config import FIELD_NAMES

    fixed = {k for k in vars(args) if k in FIELD_NAMES}
    cfg = config_from_args(args)
    if not cfg.gpu_memory:
        raise UserError("gpu_memory: give the card's memory, e.g. --gpu-memory 24GiB")
    budget = parse_memory_size(cfg.gpu_memory)  # validated with the config
    host_budget = parse_memory_size(cfg.host_memory) if cfg.host_memory else None
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
        print(json.dumps({"budget_bytes": budget, "host_budget_bytes": host_budget,
                          "max_seq_len": result.max_seq_len, "seq_step": SEQ_STEP, "host_note": result.host_note,
                          "fits": [c.to_dict() for c in result.fits[:args.top]]}, indent=2))
    else:
        print(format_table(result, budget, args.top, "seq_len" in fixed))
    return 0


from memtune._callable_module import make_callable  # noqa: E402 - memtune.fit(...) is the API function

make_callable(__name__)
