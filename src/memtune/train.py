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

from memtune import measure, provenance
from memtune.batch_feed import BatchFeed
from memtune.config import RunConfig, parse_memory_size, save_yaml, write_text_atomic
from memtune.errors import UserError
from memtune.estimate import estimate_memory, gib
from memtune.kernels._common import base_model
from memtune.models import BuiltModel, build_model, compile_unavailable_reason, count_parameters, trainable_line


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


def setup(cfg: RunConfig, log: Callable[[str], None]) -> Session:
    from memtune.data import load_data

    torch.manual_seed(cfg.seed)
    built = build_model(cfg)
    for note in built.notes:
        log(note)
    bundle = load_data(cfg, built.tokenizer, built.max_positions)
    for note in bundle.notes:
        log(note)
    if not cfg.batch_size:
        cfg = cfg.replace(batch_size=cfg.resolved_batch_size(bundle.seq_len))
        log(f"batch_size: auto -> {cfg.batch_size} sequences of {bundle.seq_len} tokens a step")
    optimizer = make_optimizer(cfg, built.model, built.device)
    scaler = torch.amp.GradScaler("cuda") if built.compute_dtype == torch.float16 and built.device.type == "cuda" else None
    return Session(cfg, built, bundle, optimizer, make_scheduler(cfg, optimizer), scaler)


# --- the step ------------------------------------------------------------------

def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig,
                 host_batch: dict[str, torch.Tensor] | None = None,
                 host_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss over the unmasked labels.

    `chunked` runs the decoder, then the lm_head and cross-entropy a chunk of
    tokens at a time, so the [tokens, vocab] logits (10 GB in fp32 for 16k
    tokens and a 152k vocabulary) never exist. `host_batch`: the same batch
    still on the host: its token ids feed an embedding table kept there, its
    labels tell the loss which tokens count, both without waiting for the GPU.
    `host_embeds`: that lookup, done already (memtune.batch_feed).
    """
    from memtune.kernels import lookup_on_host

    host_batch = host_batch or {}
    host_ids = host_batch.get("input_ids")
    embeds = host_embeds
    if embeds is None and host_ids is not None:
        embeds = lookup_on_host(model, host_ids, batch["input_ids"].device)
    if cfg.residual_dtype == "fp32":
        if embeds is None:
            embeds = model.get_input_embeddings()(batch["input_ids"])
        if embeds.dtype != torch.float32:
            # fp32 hidden states from here on; every matmul and attention runs in the compute dtype
            with torch.autocast(device_type=embeds.device.type, dtype=embeds.dtype):
                return _forward_loss(model, {"inputs_embeds": embeds.float()}, batch, cfg, host_batch)
    inputs = {"input_ids": batch["input_ids"]} if embeds is None else {"inputs_embeds": embeds}
    return _forward_loss(model, inputs, batch, cfg, host_batch)


def _loss_chunk_kernel(cfg: RunConfig, device: torch.device) -> bool | str:
    """chunked_linear_cross_entropy's `fused`: the kernel each loss chunk runs (False = unfused)."""
    if not cfg.fuse_loss or compile_unavailable_reason(device) is not None:
        return False
    return "triton" if cfg.loss_kernel == "triton" else True


def _forward_loss(model: nn.Module, inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                  cfg: RunConfig, host_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    lm = base_model(model)
    head = lm.get_output_embeddings()
    if cfg.loss == "full" or not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        # A LoRA-wrapped or quantized lm_head has no plain weight to chunk over.
        return model(**inputs, labels=batch["labels"], use_cache=False).loss
    from memtune.kernels import chunked_linear_cross_entropy

    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    # Position t predicts token t+1.
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = batch["labels"][:, 1:].reshape(-1)
    host_labels = host_batch.get("labels")
    return chunked_linear_cross_entropy(hidden, head.weight, labels, bias=head.bias,
                                        chunk_tokens=cfg.loss_chunk_tokens,
                                        fused=_loss_chunk_kernel(cfg, hidden.device),
                                        host_labels=None if host_labels is None else host_labels[:, 1:],
                                        static_full_chunks=cfg.compile_static_shapes)


def train_step(session: Session, batches) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean loss."""
    cfg, model = session.cfg, session.built.model
    total = torch.zeros((), device=session.built.device)
    if session.feed is None or session.feed.batches is not batches:
        session.feed = BatchFeed(batches, model, session.built.device)
    for _ in range(cfg.grad_accum):
        ready = session.feed.take()
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
        torch.nn.utils.clip_grad_norm_(session.trained_params, cfg.max_grad_norm)
    if session.scaler:
        session.scaler.step(session.optimizer)
        session.scaler.update()
    else:
        session.optimizer.step()
    session.scheduler.step()
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


def train_loop(session: Session, progress: bool) -> tuple[list[float], measure.StepTimer, int]:
    from tqdm.auto import tqdm

    from memtune.data import iterate_batches

    cfg, model, device = session.cfg, session.built.model, session.built.device
    model.train()
    batches = iterate_batches(session.bundle, cfg, cfg.seed)
    timer = measure.StepTimer(device)
    losses, grads_bytes = [], 0
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    with long_lived_objects_frozen(), _feed_released(session):
        for _ in bar:
            timer.start()
            loss = train_step(session, batches)
            # Gradients are largest right after backward; measure them before they are freed.
            grads_bytes = max(grads_bytes, measure.gradient_bytes(session.trained_params))
            session.optimizer.zero_grad(set_to_none=True)
            timer.stop()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {len(losses) + 1}; lower learning_rate")
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
    return losses, timer, grads_bytes


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


def run(cfg: RunConfig, out_dir: Path, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train one configuration, write the run directory, return its metrics."""
    started_at, wall_start = provenance.now_iso(), time.perf_counter()
    device = _apply_gpu_cap(cfg, log)
    metrics: dict[str, Any] = {"status": "running", "config_hash": cfg.config_hash(), "started_at": started_at}
    metrics.update(measure.device_info(device))
    metrics["versions"] = provenance.package_versions()
    metrics["git_commit"] = provenance.git_commit()
    metrics["estimate"] = _estimate(cfg, log)
    if device.type == "cuda":
        available = measure.available_host_memory()
        cfg, metrics["estimate"] = drop_saved_attention_if_host_short(cfg, metrics["estimate"], available, log)
        host_memory_warning(metrics["estimate"], available, log)

    session = setup(cfg, log)
    # Only now, with the model and data known good, does the run directory appear.
    out_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(session.cfg, out_dir / "config.yaml")  # resolved: auto values filled in
    model = session.built.model
    trainable, total = count_parameters(model)
    log(trainable_line(trainable, total))
    metrics.update(trainable_params=trainable, total_params=total,
                   trainable_percent=100 * trainable / total, seq_len=session.bundle.seq_len,
                   compute_dtype=str(session.built.compute_dtype).replace("torch.", ""))

    before = evaluate(session, "before", log, progress)
    measure.reset_peak(session.built.device)
    losses, timer, grads_bytes = train_loop(session, progress)
    peaks = measure.peak_memory(session.built.device)
    after = evaluate(session, "after", log, progress)

    metrics.update(peaks)
    peak = peaks.get("peak_allocated_bytes", peaks["peak_rss_bytes"])
    metrics["memory_breakdown"] = measure.memory_breakdown(peak, model, session.optimizer, grads_bytes)
    metrics.update(_time_metrics(session.cfg, session, timer, metrics.get("gpu_name")))
    metrics.update(losses=losses, loss_first=losses[0], loss_last=losses[-1])
    if before is not None:
        metrics.update(accuracy_before=before.accuracy, accuracy_after=after.accuracy, eval_examples=after.total)
        _write_predictions(out_dir, before, after)
    _save_weights(model, cfg, out_dir)
    metrics["batch_size"] = session.cfg.batch_size
    metrics.update(status="ok", finished_at=provenance.now_iso(), wall_time_s=time.perf_counter() - wall_start)
    from memtune.run_report import write_run_report

    write_run_report(out_dir, session.cfg, metrics)
    # last: a directory without metrics.json is not a result, so everything it describes comes first
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


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


def _estimate(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The analytical prediction, stored beside the measurement so the report can show its error."""
    try:
        estimate = estimate_memory(cfg)
    except UserError as exc:
        log(f"no memory estimate: {exc}")
        return None
    return {"total_bytes": int(estimate.total_bytes), "breakdown": {k: int(v) for k, v in estimate.breakdown.items()},
            "host_bytes": {k: int(v) for k, v in estimate.host_bytes.items()}}


def _host_need(estimate: dict[str, Any] | None) -> int:
    return sum((estimate or {}).get("host_bytes", {}).values())


def drop_saved_attention_if_host_short(cfg: RunConfig, estimate: dict[str, Any] | None, available: int | None,
                                       log: Callable[[str], None]) -> tuple[RunConfig, dict[str, Any] | None]:
    """Switch save_attention off (one line says so) when its host copies would overfill the free RAM.

    Saved attention doubles what offloading keeps in host memory (65 GB for an 8B model at 131072
    tokens, against 33 GB). Recomputing attention is slower but does not get the run killed.
    """
    if not cfg.saves_attention or not available or _host_need(estimate) <= 0.9 * available:
        return cfg, estimate
    saved = (estimate or {}).get("host_bytes", {}).get("saved_attention", 0)
    log(f"save_attention: off for this run, its {gib(saved)} of host memory would not fit beside the rest in "
        f"the {gib(available)} free; attention is recomputed in backward instead")
    cfg = cfg.replace(save_attention=False)
    return cfg, _estimate(cfg, log)


def host_memory_warning(estimate: dict[str, Any] | None, available: int | None,
                        log: Callable[[str], None]) -> bool:
    """Warn (one line) when the tensors this run keeps in host memory may not fit in the free RAM.

    A run the kernel kills for memory leaves no metrics behind; saying so first is
    cheaper. Only a warning: the estimate leaves out the process itself.
    """
    need = _host_need(estimate)
    if not need or not available or need <= 0.9 * available:
        return False
    log(f"warning: host memory: this run keeps about {gib(need)} in host memory (offloaded checkpoints, "
        f"embedding table) and {gib(available)} is free; it may be killed. "
        f"--no-offload-activations or a shorter --seq-len needs less")
    return True


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


def _write_predictions(out_dir: Path, before: Any, after: Any) -> None:
    for label, result in (("before", before), ("after", after)):
        lines = "\n".join(json.dumps(p) for p in result.predictions)
        write_text_atomic(out_dir / f"predictions_{label}.jsonl", lines + "\n")


def _save_weights(model: nn.Module, cfg: RunConfig, out_dir: Path) -> None:
    """Save to a temporary directory and rename, so a killed run leaves no half an adapter."""
    final = out_dir / ("adapter" if cfg.lora else "model")
    tmp = out_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
