"""Several processes under torchrun: DDP or FSDP2 over the model, each rank its share of the batch.

    torchrun --nproc-per-node N -m memtune train --strategy ddp|fsdp ...

- The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR):
  NCCL on CUDA GPUs (each rank on the GPU LOCAL_RANK names), gloo on CPUs.
- `batch_size` stays the global batch of one micro-step: every rank walks the same seeded global
  stream (memtune.data.BatchStream) and takes its slice, rows [rank * b, (rank + 1) * b) with
  b = batch_size / world. Each rank's loss is weighted by its share of the global batch's labelled
  tokens, so the gradient the strategies average is the single-process gradient of the whole
  batch: a run's result does not depend on the number of processes (fp32: equal within 1e-5).
- ddp: torch.nn.parallel.DistributedDataParallel over a module whose forward is memtune's loss
  (the model's frozen 4-bit weights get no gradient and no hook; every LoRA weight is used each
  step, so find_unused_parameters stays off).
- fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) per decoder layer, then the same loss module
  as the root (embeddings, final norm and lm_head in its group: the chunked loss reads lm_head's
  weight directly, inside the root's forward). bitsandbytes' 4-bit weights shard in their uint8
  storage (FSDP2 all-gathers groups of mixed dtypes as bytes); the quantization state, which a
  sharded parameter loses, is kept on the layer and put back on the gathered weight before each
  forward (bitsandbytes' own `module.quant_state` fallback, set here because memtune builds its
  Params4bit without a module).
- Rank 0 alone writes the run directory; checkpoints hold the full (gathered) adapter and
  optimizer state in the single-process format, so a run saved under fsdp resumes in one process
  and the reverse (torch.distributed.checkpoint.state_dict for the optimizer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from memtune.cli import MULTI_GPU_ENVIRONMENT
from memtune.config import RunConfig
from memtune.errors import UserError

STRATEGIES = ("single", "ddp", "fsdp")

# NVLink multicast off in every rank, set before NCCL starts (a user's own setting wins)
SAFE_ENV = MULTI_GPU_ENVIRONMENT


@dataclass
class Parallel:
    """This process's place in the group, and the module its steps run through."""

    strategy: str  # ddp | fsdp
    rank: int
    world: int
    local_rank: int
    device: torch.device
    root: nn.Module | None = None  # the DDP / fully_shard loss module (wrap)
    context: int = 1  # ranks each sequence is split across (--context-parallel); rows go to groups of them
    context_mesh: Any = None  # the DeviceMesh of this rank's context-parallel group
    param_counts: tuple[int, int] | None = None  # (trainable, total) as counted before wrapping

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which rows of the global batch this rank takes: the ranks of one context group share them."""
        return self.rank // self.context

    @property
    def data_world(self) -> int:
        return self.world // self.context

    @property
    def shards(self) -> bool:
        return self.strategy == "fsdp"


def set_safe_env(env: Any = os.environ) -> None:
    for key, value in SAFE_ENV.items():
        env.setdefault(key, value)


def launched_world() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(cfg: RunConfig) -> Parallel | None:
    """The process group of a --strategy ddp|fsdp run (None for single); one line for a wrong launch."""
    world = launched_world()
    if cfg.strategy == "single":
        if world > 1:
            raise UserError(f"strategy: torchrun started {world} processes; give --strategy ddp or fsdp "
                            f"(or --nproc-per-node 1)")
        return None
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise UserError(f"strategy: {cfg.strategy} runs one process per GPU under torchrun: "
                        f"torchrun --nproc-per-node N -m memtune train --strategy {cfg.strategy} ...")
    set_safe_env()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"strategy: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            f"--nproc-per-node at most the GPUs of a machine")
        torch.cuda.set_device(local_rank)  # memtune.models.resolve_device takes the current device
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Parallel(cfg.strategy, rank, dist.get_world_size(), local_rank, device, context=cfg.context_parallel)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- what a strategy changes in the configuration ------------------------------------------------

def plan(cfg: RunConfig, parallel: Parallel) -> tuple[RunConfig, list[str]]:
    """cfg with the techniques the strategy cannot take turned off, each with its one-line note;
    UserError for a combination that cannot run at all."""
    notes: list[str] = []
    rows = parallel.world // max(1, cfg.context_parallel)  # the ranks of a context group share rows
    if cfg.batch_size and rows and cfg.batch_size % rows:
        raise UserError(f"batch_size: {cfg.batch_size} is the global batch and must divide into "
                        f"{rows} processes (--nproc-per-node x nodes); give a multiple of {rows}")
    if cfg.context_parallel > 1:
        check_context_parallel(cfg, parallel)
        changes = {}
        if cfg.embeddings_on_host:  # the lookup would run on the whole sequence, before it is split
            changes["embeddings_on_host"] = False
            notes.append("embeddings_on_host: off with context_parallel (the input ids are split on the GPU)")
        if cfg.save_attention:  # it records SDPA's outputs, which ring attention replaces
            changes["save_attention"] = False
            notes.append("save_attention: off with context_parallel (ring attention replaces SDPA)")
        cfg = cfg.replace(**changes) if changes else cfg
    if not parallel.shards:
        return cfg, notes
    if cfg.quantization == "int8":
        raise UserError("quantization: int8 weights keep their scales on the parameter, which FSDP2 shards "
                        "away; use nf4/fp4 with --strategy fsdp, or --strategy ddp")
    if cfg.optimizer != "adamw":
        raise UserError(f"optimizer: {cfg.optimizer} (bitsandbytes) does not step FSDP2's sharded "
                        f"parameters; use adamw with --strategy fsdp")
    changes: dict[str, Any] = {}
    if cfg.dequantizes_by_graph:
        changes["dequantize_graph"] = False
        notes.append("dequantize_graph: off under fsdp (a CUDA graph keeps the addresses of weights "
                     "FSDP2 gathers anew each pass)")
    if cfg.embeddings_on_host:
        changes["embeddings_on_host"] = False
        notes.append("embeddings_on_host: off under fsdp (the embedding table is sharded instead)")
    if cfg.eval:
        changes["eval"] = False
        notes.append("eval: accuracy is not generated under fsdp; run memtune eval on the saved adapter")
    return (cfg.replace(**changes) if changes else cfg), notes


def check_context_parallel(cfg: RunConfig, parallel: Parallel) -> None:
    """--context-parallel N: ring attention over SDPA, which PyTorch runs on CUDA with NCCL only."""
    if parallel.device.type != "cuda":
        raise UserError("context_parallel: ring attention (torch context_parallel) needs CUDA GPUs and NCCL; "
                        "this run is on CPUs (gloo)")
    if parallel.world % cfg.context_parallel:
        raise UserError(f"context_parallel: {cfg.context_parallel} must divide the {parallel.world} processes")
    if cfg.attention not in ("auto", "sdpa"):
        raise UserError(f"context_parallel: ring attention runs over SDPA; got attention {cfg.attention}")
    if cfg.strategy != "ddp":
        raise UserError("context_parallel: runs with --strategy ddp (the LoRA gradients all-reduced over "
                        "every rank); fsdp with it is not built")
    if cfg.packing:
        raise UserError("context_parallel: packed sequences need a per-document mask, which ring attention "
                        "over causal SDPA does not take; use --no-packing")


# --- the step ----------------------------------------------------------------------------------

LOSS_SCALE = "loss_scale"  # host batch key: W x this rank's share of the global batch's labelled tokens


def labelled_tokens(labels: torch.Tensor) -> int:
    """The tokens the loss is a mean over: labels shifted by one, not -100 (memtune.loss.lm_loss)."""
    return int((labels[:, 1:] != -100).sum())


class RankBatches:
    """The global batch stream, each batch cut to this rank's rows and given its loss weight.

    Every rank draws the same global batches (the same seed), so the position a checkpoint records
    and the resume that skips to it are those of a single-process run.
    """

    def __init__(self, stream: Any, parallel: Parallel):
        self.stream, self.parallel = stream, parallel

    def __iter__(self) -> "RankBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return shard_batch(next(self.stream), self.parallel.data_rank, self.parallel.data_world)

    def __getattr__(self, name: str) -> Any:  # position(), taken, ...: the global stream's
        return getattr(self.stream, name)


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rows [rank * b, (rank + 1) * b) of a global batch, and the weight that makes the mean of the
    ranks' weighted losses the global batch's loss (padding stays the global batch's: the same math)."""
    rows = batch["input_ids"].shape[0]
    if rows % world:
        raise UserError(f"batch_size: {rows} does not divide into {world} processes")
    size = rows // world
    local = {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}
    total = labelled_tokens(batch["labels"])
    share = labelled_tokens(local["labels"])
    local[LOSS_SCALE] = torch.tensor(world * share / total if total else 0.0, dtype=torch.float64)
    local[LABELLED_TOTAL] = torch.tensor(total, dtype=torch.float64)
    return local


LABELLED_TOTAL = "labelled_total"  # host batch key: the global batch's labelled tokens (context parallelism)


class LossModule(nn.Module):
    """The module DDP and FSDP2 wrap: its forward is memtune's training loss of one micro-batch,
    weighted by the rank's share. (forward_loss calls the decoder and reads lm_head's weight
    directly, so the model's own forward, which the wrappers would hook, never runs.)"""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor], host_batch: dict[str, torch.Tensor] | None = None,
                host_embeds: torch.Tensor | None = None, weighted: bool = True, shifted: bool = False) -> torch.Tensor:
        from memtune.loss import forward_loss

        if shifted:  # context parallelism: labels shifted before the sequence was split
            return shifted_loss_sum(self.model, batch, self.cfg)
        loss = forward_loss(self.model, batch, self.cfg, host_batch=host_batch, host_embeds=host_embeds)
        scale = (host_batch or {}).get(LOSS_SCALE)
        return loss * float(scale) if weighted and scale is not None else loss


def wrap(parallel: Parallel, model: nn.Module, cfg: RunConfig) -> nn.Module:
    """DDP or FSDP2 over the model (built on this rank's device); sets and returns parallel.root."""
    from memtune.models import count_parameters

    parallel.param_counts = count_parameters(model)
    root = LossModule(model, cfg)
    if parallel.context > 1:
        from torch.distributed.device_mesh import init_device_mesh as mesh_of

        # [rows, context]: the ranks of one context group are neighbours (one host's NVLink, if any)
        parallel.context_mesh = mesh_of("cuda", (parallel.data_world, parallel.context),
                                        mesh_dim_names=("rows", "context"))["context"]
    if parallel.strategy == "ddp":
        ids = [parallel.device.index] if parallel.device.type == "cuda" else None
        # init_sync off: every rank built the same weights from the same seed; broadcasting would
        # send the whole 4-bit model over the wire at start for nothing
        parallel.root = nn.parallel.DistributedDataParallel(root, device_ids=ids, init_sync=False)
        return parallel.root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from memtune.models import decoder_layers

    mesh = init_device_mesh(parallel.device.type, (parallel.world,))
    keep_quant_state(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    parallel.root = root
    return root


def keep_quant_state(model: nn.Module) -> int:
    """Each 4-bit linear keeps its quantization state on itself, and hands it to whatever parameter
    FSDP2 puts in place of its weight (the gathered one has none) before its forward runs."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_state", None) is not None:
            module.quant_state = module.weight.quant_state
            module.quant_storage = module.weight.data.dtype
            module.register_forward_pre_hook(_restore_quant_state)
            count += 1
    return count


def _restore_quant_state(module: nn.Module, args: Any) -> None:
    weight = module.weight
    if getattr(weight, "quant_state", None) is None:
        weight.quant_state = module.quant_state  # the gathered parameter object outlives the step


def step_loss(parallel: Parallel, ready: Any, sync: bool) -> torch.Tensor:
    """One micro-batch's weighted loss through the wrapper; gradients are reduced only when `sync`
    (the step's last micro-batch): the others accumulate locally."""
    root = parallel.root
    if parallel.strategy == "ddp":
        root.require_backward_grad_sync = sync  # what DDP.no_sync() toggles, as a flag
    else:
        root.set_requires_gradient_sync(sync)
    return root(ready.device, ready.host, ready.embeds)


def context_parallel_backward(parallel: Parallel, ready: Any, cfg: RunConfig, sync: bool) -> torch.Tensor:
    """--context-parallel: this group's rows with each sequence split across its ranks, ring attention
    over SDPA (torch.distributed.tensor.experimental.context_parallel), forward and backward inside
    it; returns this rank's share of the global loss (detached: the backward has run).

    The labels are shifted by one before the split (a chunk's last position predicts the next
    chunk's first token), the sequence padded to a multiple of 2 x N (PyTorch's causal load
    balancing hands each rank a head and a tail chunk), and the loss is the sum over this rank's
    labelled tokens / the global batch's, times world (DDP averages over every rank).
    """
    from torch.distributed.tensor.experimental import context_parallel

    batch, host = ready.device, ready.host
    ids, labels = batch["input_ids"], batch["labels"]
    rows, length = ids.shape
    shifted = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], dim=1)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, length)
    multiple = 2 * parallel.context
    pad = (-length) % multiple
    if pad:  # right padding: causal attention never lets a real token see it
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
        shifted = torch.nn.functional.pad(shifted, (0, pad), value=-100)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)], dim=1)
    ids, shifted, positions = ids.contiguous(), shifted.contiguous(), positions.contiguous()
    total = float(host[LABELLED_TOTAL])
    parallel.root.require_backward_grad_sync = sync
    buffers = [ids, shifted, positions]
    with context_parallel(parallel.context_mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1],
                          no_restore_buffers=set(buffers)):
        loss_sum = parallel.root({"input_ids": ids, "labels": shifted, "position_ids": positions}, None, None,
                                 weighted=False, shifted=True)
        share = loss_sum * (parallel.world / total if total else 0.0) / cfg.grad_accum
        share.backward()
    return share.detach() * cfg.grad_accum


def shifted_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig) -> torch.Tensor:
    """The summed loss of labels already shifted by one (position t against label t), chunked as
    memtune.loss.lm_loss is: the context-parallel step's, over its split of the sequence."""
    from memtune.kernels import chunked_linear_cross_entropy
    from memtune.kernels._common import base_model
    from memtune.loss import _softcap_kwargs, chunkable_head, loss_chunk_kernel

    head = chunkable_head(model)
    if head is None:
        raise UserError("context_parallel: needs the chunked loss over a plain lm_head (--loss chunked)")
    hidden = base_model(model).get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                            use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = batch["labels"].reshape(-1)
    mean = chunked_linear_cross_entropy(hidden, head.weight, labels, bias=head.bias,
                                        chunk_tokens=cfg.loss_chunk_tokens, fused=loss_chunk_kernel(cfg, hidden.device),
                                        **_softcap_kwargs(model))
    return mean * (labels != -100).sum()


def eval_loss(parallel: Parallel, batch: dict[str, torch.Tensor], host_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unweighted loss of a batch every rank evaluates whole (validation)."""
    root = parallel.root
    module = root.module if parallel.strategy == "ddp" else root
    return module(batch, host_batch, None, weighted=False)


def mean(parallel: Parallel, value: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks (the sum of their weighted losses / world: the global loss)."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / parallel.world


def full(value: Any) -> Any:
    """A DTensor's whole value (FSDP2's gradient norm, parameters); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


# --- checkpoints and the saved adapter ---------------------------------------------------------

def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, whole, on the CPU (every rank takes part in gathering)."""
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state whole, keyed as a single process's optimizer.state_dict() (by position
    among the trained parameters), so either kind of run can load it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:  # cpu_offload gathers onto rank 0 alone
        return {}
    names = _trained_names(model)
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: value for name, value in by_name["state"].items()}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [index[n] for n in group["params"]]}
              for group in by_name["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_trained(parallel: Parallel, model: nn.Module, optimizer: torch.optim.Optimizer,
                 weights: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Put whole trained weights (by parameter name) and a single-process optimizer state into the
    sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in weights:
                continue
            value = weights[name].to(param.device, param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)
    names = _trained_names(model)
    by_name = {"state": {names[i]: value for i, value in optim_state["state"].items()},
               "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                 "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _trained_names(model: nn.Module) -> list[str]:
    """The trained parameters' names in the optimizer's order (memtune.train.make_optimizer)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- measurements -------------------------------------------------------------------------------

def gather_metrics(parallel: Parallel, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's measurements, in rank order (on every rank)."""
    everyone: list[Any] = [None] * parallel.world
    dist.all_gather_object(everyone, mine)
    return everyone


def rank_summary(ranks: list[dict[str, Any]], tokens_per_s: float) -> dict[str, Any]:
    """Per-rank peaks and the totals: memory summed over the ranks, the max beside it; tokens/s is the
    global batch's (each rank's step is the whole group's step)."""
    summary: dict[str, Any] = {"ranks": ranks, "world_size": len(ranks)}
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes", "peak_tensor_bytes"):
        values = [r[key] for r in ranks if r.get(key) is not None]
        if values:
            summary[f"{key.removesuffix('_bytes')}_total_bytes"] = sum(values)
            summary[f"{key.removesuffix('_bytes')}_max_rank_bytes"] = max(values)
    summary["tokens_per_s_per_rank"] = tokens_per_s / len(ranks)
    return summary


def rank_stream(parallel: Parallel | None, stream: Iterator[dict[str, torch.Tensor]]) -> Any:
    return stream if parallel is None else RankBatches(stream, parallel)
