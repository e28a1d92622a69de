"""The training recipe: setup, evaluate, train with measurements, evaluate, save.

One readable loop. Memory is measured over the training steps only (the peak
is reset after the model is built and after the first evaluation), time as the
median optimizer step after warm-up.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from memtune import checkpoint, measure, provenance
from memtune.batch_feed import BatchFeed
from memtune.checkpoint import TrainState
from memtune.config import RunConfig, parse_memory_size, save_yaml, write_text_atomic
from memtune.errors import UserError
from memtune.estimate import estimate_memory, gib
from memtune.kernels._common import base_model
from memtune.loss import forward_loss
from memtune.models import BuiltModel, build_model, count_parameters, trainable_line
from memtune.stop import StopRequest, Stopped, stop_on_signals
from memtune.train_log import TrainLog, peak_so_far_bytes, plot_losses, require_sink


@dataclass
class Session:
    """Everything one run holds while it trains."""

    cfg: RunConfig
    built: BuiltModel
    bundle: Any  # memtune.data.DataBundle
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    feed: BatchFeed | None = None  # the micro-batches of the running loop, each prepared ahead
    grad_norm: float = math.nan  # of the last step, before clipping
    lr: float = math.nan  # the learning rate the last step used
    step_tokens: int = 0  # token positions the last step trained on (padding included)
    parallel: Any = None  # memtune.distributed.Parallel under --strategy ddp|fsdp (torchrun), else None

    @property
    def trained_params(self) -> list[torch.Tensor]:
        """The parameters the optimizer steps: no walk over the model's modules (each step needs them)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]


# --- setup ---------------------------------------------------------------------

def make_optimizer(cfg: RunConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        # fused: one kernel for all parameters instead of several per tensor.
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)
    if device.type != "cuda":
        raise UserError(f"optimizer: {cfg.optimizer} (bitsandbytes) needs a CUDA GPU; use adamw on a CPU")
    import bitsandbytes as bnb

    optimizers = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
                  "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    return optimizers[cfg.optimizer](params, **kwargs)


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(cfg: RunConfig, log: Callable[[str], None], parallel: Any = None) -> Session:
    from memtune.data import load_data

    torch.manual_seed(cfg.seed)
    built = build_model(cfg)
    if parallel is not None:  # before the optimizer: FSDP2 replaces the parameters it steps
        from memtune import distributed

        distributed.wrap(parallel, built.model, cfg)
    for note in built.notes:
        log(note)
    bundle = load_data(cfg, built.tokenizer, built.max_positions)
    for note in bundle.notes:
        log(note)
    extend = position_cap_line(cfg, built.max_positions)
    if extend:
        log(extend)
    if not cfg.batch_size:
        cfg = cfg.replace(batch_size=cfg.resolved_batch_size(bundle.seq_len))
        log(f"batch_size: auto -> {cfg.batch_size} sequences of {bundle.seq_len} tokens a step")
        if parallel is not None and cfg.batch_size % parallel.world:  # the global batch: a share per rank
            cfg = cfg.replace(batch_size=max(1, cfg.batch_size // parallel.world) * parallel.world)
            log(f"batch_size: -> {cfg.batch_size}, a multiple of the {parallel.world} processes")
    cfg = resolve_schedule(cfg, len(bundle.train), log)
    optimizer = make_optimizer(cfg, built.model, built.device)
    scaler = torch.amp.GradScaler("cuda") if built.compute_dtype == torch.float16 and built.device.type == "cuda" else None
    return Session(cfg, built, bundle, optimizer, make_scheduler(cfg, optimizer), scaler, parallel=parallel)


def position_cap_line(cfg: RunConfig, max_positions: int) -> str | None:
    """How to go past the model's positions, when seq_len asks for more than they cover (data caps it)."""
    if cfg.seq_len <= max_positions or max_positions >= 1 << 30:  # 1 << 30: the model names no limit
        return None
    if cfg.rope_scaling:
        return (f"seq_len: rope_scaling {cfg.rope_scaling} x {cfg.rope_factor:g} covers {max_positions} positions; "
                f"a larger --rope-factor trains longer")
    return (f"seq_len: to train past max_position_embeddings ({max_positions}), scale RoPE: "
            f"--rope-scaling yarn --rope-factor {math.ceil(cfg.seq_len / max_positions)}")


def resolve_schedule(cfg: RunConfig, examples: int, log: Callable[[str], None]) -> RunConfig:
    """epochs -> steps; checkpoint_every 0 (auto) -> every 10% of the run, at most 500 steps apart."""
    if cfg.epochs:
        per_step = cfg.batch_size * cfg.grad_accum
        steps = max(1, math.ceil(cfg.epochs * examples / per_step))
        log(f"epochs: {cfg.epochs:g} x {examples} examples at {per_step} a step -> {steps} steps")
        cfg = cfg.replace(steps=steps)
    if not cfg.checkpoint_every:
        cfg = cfg.replace(checkpoint_every=min(500, max(1, math.ceil(cfg.steps / 10))))
    return cfg


# --- the step ------------------------------------------------------------------

def train_step(session: Session, batches) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean loss."""
    cfg, model = session.cfg, session.built.model
    total = torch.zeros((), device=session.built.device)
    if session.feed is None or session.feed.batches is not batches:
        session.feed = BatchFeed(batches, model, session.built.device)
    session.step_tokens = 0
    parallel = session.parallel
    for micro in range(cfg.grad_accum):
        ready = session.feed.take()
        session.step_tokens += ready.host["input_ids"].numel() * (parallel.world if parallel else 1)
        if parallel is not None and parallel.context > 1:  # the sequence split across ranks: its own backward
            from memtune.distributed import context_parallel_backward

            total += context_parallel_backward(parallel, ready, cfg, sync=micro == cfg.grad_accum - 1) / cfg.grad_accum
            del ready
            session.feed.prepare()
            continue
        if parallel is not None:  # this rank's share through DDP / FSDP2; gradients reduced at the last
            from memtune.distributed import step_loss

            loss = step_loss(parallel, ready, sync=micro == cfg.grad_accum - 1) / cfg.grad_accum
        else:
            loss = forward_loss(model, ready.device, cfg, host_batch=ready.host, host_embeds=ready.embeds) / cfg.grad_accum
        # let go of the batch before backward: held, its embeddings ([tokens, hidden], 0.4 GB at
        # 131072 tokens of the 1.5B shape) would add to the backward's peak (measured on the H200)
        del ready
        (session.scaler.scale(loss) if session.scaler else loss).backward()
        # the backward is queued and the GPU is still at it: the next micro-batch's copies and
        # host-side lookup happen now, not at the start of the next step with the GPU waiting
        session.feed.prepare()
        total += loss.detach()
    if session.scaler:
        session.scaler.unscale_(session.optimizer)
    if cfg.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(session.trained_params, cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in session.trained_params if p.grad is not None])
    if session.scaler:
        session.scaler.step(session.optimizer)
        session.scaler.update()
    else:
        session.optimizer.step()
    session.lr = session.optimizer.param_groups[0]["lr"]
    session.scheduler.step()
    if parallel is not None:  # the global batch's loss; FSDP2's norm is a DTensor over the shards
        from memtune.distributed import full, mean

        total, norm = mean(parallel, total), full(norm)
    session.grad_norm = float(norm)
    return float(total)  # a CPU-GPU sync point, once per step


def tokens_per_step(batches_cfg: RunConfig, seq_len: int) -> int:
    return batches_cfg.batch_size * batches_cfg.grad_accum * seq_len


# --- the whole run -------------------------------------------------------------

def evaluate(session: Session, label: str, log: Callable[[str], None], progress: bool = True) -> Any:
    if not session.cfg.eval or not session.bundle.eval:
        return None
    from memtune.evaluate import evaluate_accuracy

    result = evaluate_accuracy(session.built.model, session.built.tokenizer, session.bundle.eval, session.cfg,
                               progress=progress)
    log(f"accuracy {label}: {result.accuracy:.3f} ({result.correct}/{result.total})")
    return result


@dataclass
class RunFiles:
    """What the loop writes as it goes in a run directory: log, validation, checkpoints."""

    out_dir: Path
    requested: RunConfig  # the config as asked for, which a resume compares against
    data_sha256: str
    log: TrainLog | None = None


def train_loop(session: Session, progress: bool, files: RunFiles | None = None,
               state: TrainState | None = None) -> tuple[list[float], measure.StepTimer, int]:
    """Steps state.step + 1 .. cfg.steps; with `files`, each step is logged and checkpointed as due."""
    from tqdm.auto import tqdm

    from memtune.data import iterate_batches

    cfg, model, device = session.cfg, session.built.model, session.built.device
    state = state if state is not None else TrainState()
    model.train()
    # a resumed run skips the micro-batches its steps so far took: the same batches follow
    batches = iterate_batches(session.bundle, cfg, cfg.seed, start=state.step * cfg.grad_accum)
    if session.parallel is not None:  # every rank walks the global stream and takes its rows
        from memtune.distributed import RankBatches

        batches = RankBatches(batches, session.parallel)
    timer = measure.StepTimer(device)
    timer.times = list(state.step_times)
    grads_bytes = 0
    bar = tqdm(range(state.step + 1, cfg.steps + 1), desc="train", unit="step", disable=not progress,
               dynamic_ncols=True, initial=state.step, total=cfg.steps)
    signals = stop_on_signals() if files else contextlib.nullcontext(StopRequest())
    with long_lived_objects_frozen(), _feed_released(session), signals as stop, _log_open(session, files, state):
        for step in bar:
            timer.start()
            loss = train_step(session, batches)
            # Gradients are largest right after backward; measure them before they are freed.
            grads_bytes = max(grads_bytes, measure.gradient_bytes(session.trained_params))
            session.optimizer.zero_grad(set_to_none=True)
            timer.stop()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower learning_rate")
            state.step = step
            state.losses.append(loss)
            state.step_times.append(timer.times[-1])
            bar.set_postfix(loss=f"{loss:.4f}")
            if files:
                after_step(session, files, state, batches, stop.signum)
    return state.losses, timer, grads_bytes


def after_step(session: Session, files: RunFiles, state: TrainState, batches: Any, signum: int | None) -> None:
    """Validate, log, checkpoint as due; on a stop request, checkpoint and raise Stopped."""
    cfg, step = session.cfg, state.step
    last = step == cfg.steps
    val = None
    if session.bundle.val and (step % (cfg.val_every or cfg.checkpoint_every) == 0 or last):
        val = validation_loss(session)
        state.val_losses.append({"step": step, "loss": val})
    files.log.write(_log_record(session, state, val))
    path = None
    if step % cfg.checkpoint_every == 0 or last or signum:
        if val is not None and (state.best is None or val < state.best["val_loss"]):
            state.best = {"step": step, "val_loss": val}
        meta = {"state": checkpoint.state_dict(state), "requested_config": files.requested.to_dict(),
                "data_position": batches.position(step * cfg.grad_accum), "data_sha256": files.data_sha256,
                "val_loss": val}
        trained = checkpoint.Trained(session.built.model, session.optimizer, session.scheduler, session.scaler,
                                     cfg.lora, session.parallel)
        path = checkpoint.save(files.out_dir, trained, cfg, meta)
        checkpoint.prune(files.out_dir, cfg.checkpoint_keep, state.best and state.best["step"])
    if signum:
        raise Stopped(signum, step, path)


def _log_record(session: Session, state: TrainState, val: float | None) -> dict[str, Any]:
    record = {"step": state.step, "epoch": round(state.step * session.cfg.grad_accum * session.cfg.batch_size
                                                  / len(session.bundle.train), 4),
              "loss": state.losses[-1], "lr": session.lr, "grad_norm": session.grad_norm,
              "tokens_per_s": session.step_tokens / state.step_times[-1],
              "peak_memory_bytes": peak_so_far_bytes(session.built.device)}
    if val is not None:
        record["val_loss"] = val
    return record


def validation_loss(session: Session) -> float:
    """Mean loss over every unmasked token of the validation examples, as the training step computes it."""
    from memtune.data import collate

    cfg, model, device = session.cfg, session.built.model, session.built.device
    bundle, size = session.bundle, session.cfg.batch_size
    total, tokens = 0.0, 0
    model.eval()  # no dropout: the same loss whenever it is asked
    try:
        with torch.no_grad():
            for start in range(0, len(bundle.val), size):
                host = collate(bundle.val[start:start + size], bundle.pad_token_id, None, False)
                batch = {k: v.to(device) for k, v in host.items()}
                counted = int((host["labels"][:, 1:] != -100).sum())  # the tokens the mean is over
                if session.parallel is not None:  # every rank the whole batch, through the wrapper
                    from memtune.distributed import eval_loss

                    loss = eval_loss(session.parallel, batch, host)
                else:
                    loss = forward_loss(model, batch, cfg, host_batch=host)
                total += float(loss) * counted
                tokens += counted
    finally:
        model.train()
    return total / max(1, tokens)


@contextlib.contextmanager
def _log_open(session: Session, files: RunFiles | None, state: TrainState) -> Iterator[None]:
    if files is None:
        yield
        return
    files.log = TrainLog(files.out_dir, session.cfg, state.step)
    try:
        yield
    finally:
        files.log.close()


@contextlib.contextmanager
def _feed_released(session: Session) -> Iterator[None]:
    """Drop the batch prepared for a step that will not come (its device copies) when the loop ends."""
    try:
        yield
    finally:
        session.feed = None


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Keep Python's cyclic garbage collector off the objects that outlive the loop.

    A process holding torch, transformers, peft and a model tracks about half a
    million objects; a full collection of them takes 0.1-0.2 s and lands in some
    step at random. A long-context step waits on the host (the GPU idles
    while Python launches the next layer), so the stall shows up as a slow step.
    Frozen, they are never scanned again; what the steps make is still collected.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run(cfg: RunConfig, out_dir: Path, log: Callable[[str], None] = print, progress: bool = True,
        resume_from: checkpoint.Checkpoint | None = None) -> dict[str, Any]:
    """Train one configuration (or continue one from `resume_from`), write the run directory, return its metrics.

    Raises memtune.stop.Stopped when SIGINT / SIGTERM stopped it (after a checkpoint).
    """
    from memtune import resume

    started_at, wall_start = provenance.now_iso(), time.perf_counter()
    requested = cfg
    require_sink(cfg)
    parallel, cfg, out_dir, log, progress = _parallel_run(cfg, out_dir, log, progress)
    device = _apply_gpu_cap(cfg, log)
    metrics: dict[str, Any] = {"status": "running", "config_hash": cfg.config_hash(), "started_at": started_at}
    metrics.update(measure.device_info(device))
    metrics["versions"] = provenance.package_versions()
    metrics["git_commit"] = provenance.git_commit()
    cfg = plan_speed_budget(cfg, device, log)
    metrics["estimate"] = _estimate(cfg, log, device.type)
    cfg, metrics["estimate"] = plan_host_memory(cfg, metrics["estimate"], device.type, log)
    if parallel is not None and metrics["estimate"] is not None:
        metrics["estimate"] = _parallel_estimate(cfg, parallel, device.type, log) or metrics["estimate"]

    session = setup(cfg, log, parallel)
    files = RunFiles(out_dir, requested, resume.data_sha256(session.bundle))
    if resume_from is not None:
        resume.check_resolved(resume_from, session.cfg, files.data_sha256, session.bundle.train)
    # Only now, with the model and data known good, does the run directory appear.
    out_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(session.cfg, out_dir / "config.yaml")  # resolved: auto values filled in
    model = session.built.model
    # counted before FSDP2 sharded them (a sharded 4-bit weight no longer reads as one)
    counted = getattr(parallel, "param_counts", None)
    trainable, total = counted or count_parameters(model)
    log(trainable_line(trainable, total))
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_percent=100 * trainable / total, seq_len=session.bundle.seq_len,
                   compute_dtype=str(session.built.compute_dtype).replace("torch.", ""))

    state = _start_or_resume(session, out_dir, resume_from, log, progress)
    if parallel is not None and parallel.shards and session.built.device.type == "cpu":
        # FSDP2 frees and regrows its gathered storages, which the CPU tensor tracker cannot follow:
        # a CPU fsdp run reports peak RSS only (a GPU run the allocator's peaks, as always)
        measure._reset_peak_rss()
    else:
        measure.reset_peak(session.built.device, owners=(session.built.model, session.optimizer))
    losses, timer, grads_bytes = train_loop(session, progress, files, state)
    peaks = measure.peak_memory(session.built.device)
    after = evaluate(session, "after", log, progress)

    metrics.update(peaks)
    peak = measure.peak_bytes(peaks)
    if parallel is not None:
        metrics["strategy"] = session.cfg.strategy
    metrics["memory_breakdown"] = measure.memory_breakdown(peak, model, session.optimizer, grads_bytes)
    metrics.update(_time_metrics(session.cfg, session, timer, metrics.get("gpu_name")))
    if parallel is not None:  # each rank's peak and step time; memory totals over the group
        from memtune import distributed

        mine = {"rank": parallel.rank, **peaks, "step_time_s": metrics["step_time_s"]}
        metrics.update(distributed.rank_summary(distributed.gather_metrics(parallel, mine), metrics["tokens_per_s"]))
    metrics.update(losses=losses, loss_first=losses[0], loss_last=losses[-1])
    if state.val_losses:
        metrics.update(val_loss=state.val_losses[-1]["loss"], val_losses=state.val_losses)
    if resume_from is not None:
        metrics["resumed_from_step"] = resume_from.step
    if state.before is not None and after is not None:
        metrics.update(accuracy_before=state.before["accuracy"], accuracy_after=after.accuracy,
                       eval_examples=after.total)
        _write_predictions(out_dir, "after", after)
    plot_losses(out_dir, losses, state.val_losses)
    _save_weights(model, cfg, out_dir, session.parallel)
    if session.cfg.checkpoint_keep == 0:
        checkpoint.remove_all(out_dir)
    metrics["batch_size"] = session.cfg.batch_size
    metrics.update(status="ok", finished_at=provenance.now_iso(), wall_time_s=time.perf_counter() - wall_start)
    from memtune.run_report import write_run_report

    write_run_report(out_dir, session.cfg, metrics)
    # last: a directory without metrics.json is not a result, so everything it describes comes first
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    if parallel is not None and not parallel.is_main:  # its files were a scratch copy
        shutil.rmtree(out_dir, ignore_errors=True)
    return metrics


def _parallel_run(cfg: RunConfig, out_dir: Path, log: Callable[[str], None], progress: bool):
    """Under torchrun (--strategy ddp|fsdp): the process group, the configuration the strategy takes
    (memtune.distributed.plan), and for every rank but 0 a scratch directory, no log lines and no bars:
    rank 0 alone writes the run directory."""
    from memtune import distributed

    parallel = distributed.init(cfg)
    if parallel is None:
        return None, cfg, out_dir, log, progress
    if not parallel.is_main:
        import tempfile

        out_dir, log, progress = Path(tempfile.mkdtemp(prefix=f"memtune-rank{parallel.rank}-")), _silent, False
    cfg, notes = distributed.plan(cfg, parallel)
    log(f"strategy {cfg.strategy}: {parallel.world} processes ({parallel.device.type}); batch_size "
        f"{cfg.batch_size or 'auto'} is the global batch, each rank takes its share")
    for note in notes:
        log(note)
    return parallel, cfg, out_dir, log, progress


def _silent(_: str) -> None:
    pass


def _parallel_estimate(cfg: RunConfig, parallel: Any, device: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """One rank's estimate (memtune.estimate_parallel), in the single-GPU estimate's format: rank 0's
    measured peaks are the ones metrics.json shows beside it."""
    from memtune.estimate_parallel import estimate_parallel

    try:
        est = estimate_parallel(cfg, parallel.world, cfg.strategy, device=device)
    except UserError as exc:
        log(f"no per-GPU estimate: {exc}")
        return None
    return {"total_bytes": int(est.per_gpu_bytes), "breakdown": {k: int(v) for k, v in est.breakdown.items()},
            "host_bytes": {k: int(v) for k, v in est.local.host_bytes.items()}, "gpus": est.gpus,
            "strategy": est.strategy}


def _apply_gpu_cap(cfg: RunConfig, log: Callable[[str], None]) -> torch.device:
    from memtune.models import resolve_device

    device = resolve_device(cfg)
    if cfg.gpu_memory:
        if device.type != "cuda":
            log(f"gpu_memory cap {cfg.gpu_memory} ignored: no CUDA GPU")
        else:
            fraction = measure.cap_gpu_memory(device, parse_memory_size(cfg.gpu_memory))
            log(f"GPU memory capped at {cfg.gpu_memory} ({fraction:.1%} of the card)")
    return device


def plan_speed_budget(cfg: RunConfig, device: torch.device, log: Callable[[str], None]) -> RunConfig:
    """speed_budget auto -> keep_layers, before anything is built (memtune.estimate.resolve_speed_budget):
    the budget is --gpu-memory (the allocator's cap, the CUDA context outside it), else the card's
    whole memory (the context inside it); with neither known, the lean path (keep_layers 0)."""
    if cfg.speed_budget != "auto":
        return cfg
    from memtune.estimate import load_model_config, model_shape, resolve_speed_budget

    if cfg.gpu_memory:
        budget, label, context = parse_memory_size(cfg.gpu_memory), f"--gpu-memory {cfg.gpu_memory}", False
    elif device.type == "cuda":
        budget, label, context = torch.cuda.get_device_properties(device).total_memory, "the card", True
    else:
        log("speed_budget auto: no --gpu-memory and no CUDA card to size it by; keep_layers 0")
        return cfg.replace(speed_budget="off")
    try:
        shape = model_shape(load_model_config(cfg.model), source=f"model '{cfg.model}'")
        cfg, line = resolve_speed_budget(cfg, shape, budget, device.type, context, label)
    except UserError as exc:
        log(f"speed_budget auto: no estimate ({exc}); keep_layers 0")
        return cfg.replace(speed_budget="off")
    log(line)
    return cfg.replace()  # validated


def _estimate(cfg: RunConfig, log: Callable[[str], None], device: str = "cuda") -> dict[str, Any] | None:
    """The analytical prediction for this device, stored beside the measurement so the report can show its error."""
    try:
        estimate = estimate_memory(cfg, device=device)
    except UserError as exc:
        log(f"no memory estimate: {exc}")
        return None
    return {"total_bytes": int(estimate.total_bytes), "breakdown": {k: int(v) for k, v in estimate.breakdown.items()},
            "host_bytes": {k: int(v) for k, v in estimate.host_bytes.items()}}


def plan_host_memory(cfg: RunConfig, estimate: dict[str, Any] | None, device_type: str,
                     log: Callable[[str], None], available: int | None = None) -> tuple[RunConfig, dict[str, Any] | None]:
    """The configuration whose host tensors fit the host budget (memtune.fit.choose_host_plan), chosen
    from the estimate before anything is built; one line says what was given up and why.

    The budget is host_memory, else 90% of the memory free now (the process itself needs the rest).
    The free memory is a budget, not only a warning, because a run the kernel kills for memory
    leaves no result, while each step down (attention recomputed, then checkpoints on the GPU)
    trains the same model, only slower or with more GPU memory; the resolved config.yaml records
    the choice, and --host-memory makes it the same on every machine. Over an explicit budget
    with nothing left to give up, the run stops here (UserError); over the free memory it warns.
    """
    if device_type != "cuda":  # nothing is offloaded to the host without a GPU
        if cfg.host_memory:
            log(f"host_memory {cfg.host_memory} ignored: no CUDA GPU")
        return cfg, estimate
    if estimate is None:  # no prediction to choose from
        return cfg, estimate
    if cfg.host_memory:
        budget, label = parse_memory_size(cfg.host_memory), "--host-memory"
    else:
        available = measure.available_host_memory() if available is None else available
        if not available:
            return cfg, estimate
        budget, label = int(0.9 * available), f"90% of the {gib(available)} free (no --host-memory)"
    from memtune.fit import choose_host_plan

    plan = choose_host_plan(cfg, budget, lambda c: estimate_memory(c, device=device_type), label)
    if not plan.fits and cfg.host_memory:
        raise UserError("host_memory: " + (plan.line or "").removeprefix("host memory: "))
    if plan.line:
        log(plan.line if plan.fits else f"warning: {plan.line}; it may be killed")
    if plan.cfg is cfg:
        return cfg, estimate
    return plan.cfg, _estimate(plan.cfg, log, device_type)


def _time_metrics(cfg: RunConfig, session: Session, timer: measure.StepTimer, gpu_name: str | None) -> dict[str, Any]:
    step_time = timer.median(skip=min(cfg.warmup_steps, cfg.steps - 1))
    tokens = tokens_per_step(cfg, session.bundle.seq_len)
    result = {"step_time_s": step_time, "step_times_s": timer.times, "tokens_per_step": tokens,
              "tokens_per_s": tokens / step_time}
    peak = measure.peak_flops(gpu_name)
    if peak:
        config = base_model(session.built.model).config
        flops = measure.train_flops_per_token(_dense_params(config), config.num_hidden_layers,
                                              config.hidden_size, session.bundle.seq_len, cfg.lora,
                                              cfg.gradient_checkpointing)
        result["mfu"] = flops * result["tokens_per_s"] / peak
    return result


def _dense_params(config: Any) -> int:
    """Parameters that do matmul work per token: decoder linears and lm_head (not the embedding lookup)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    return layers * (attention + mlp) + hidden * config.vocab_size


def _start_or_resume(session: Session, out_dir: Path, resume_from: checkpoint.Checkpoint | None,
                     log: Callable[[str], None], progress: bool) -> TrainState:
    """A fresh run evaluates the base model first; a resumed one restores its checkpoint instead."""
    if resume_from is None:
        before = evaluate(session, "before", log, progress)
        if before is None:
            return TrainState()
        _write_predictions(out_dir, "before", before)
        return TrainState(before={"accuracy": before.accuracy, "correct": before.correct, "total": before.total})
    trained = checkpoint.Trained(session.built.model, session.optimizer, session.scheduler, session.scaler,
                                 session.cfg.lora, session.parallel)
    state = checkpoint.restore(resume_from, trained)
    log(f"resumed from {resume_from.path} (step {state.step} of {session.cfg.steps})")
    return state


def _write_predictions(out_dir: Path, label: str, result: Any) -> None:
    lines = "\n".join(json.dumps(p) for p in result.predictions)
    write_text_atomic(out_dir / f"predictions_{label}.jsonl", lines + "\n")


def _save_weights(model: nn.Module, cfg: RunConfig, out_dir: Path, parallel: Any = None) -> None:
    """Save to a temporary directory and rename, so a killed run leaves no half an adapter."""
    state = None
    if parallel is not None and parallel.shards:  # every rank takes part in gathering the shards
        from memtune.distributed import trained_state

        state = trained_state(model)
    if parallel is not None and not parallel.is_main:
        return
    final = out_dir / ("adapter" if cfg.lora else "model")
    tmp = out_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), **({"state_dict": state} if state is not None else {}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
