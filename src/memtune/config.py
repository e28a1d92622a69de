"""Run configuration: one frozen, typed dataclass, loaded from YAML and flags.

Every knob the seed study varies is a field here, and therefore both a YAML key
and a command-line flag (`lora_rank` <-> `--lora-rank`). Validation runs once
over the whole config and reports every problem at once, each naming the field
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from memtune.errors import UserError

Quantization = Literal["nf4", "fp4", "int8", "none"]
ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"]
LossImpl = Literal["chunked", "full"]
LossKernel = Literal["triton", "compiled"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"]
DataFormat = Literal["auto", "text", "prompt_completion", "gsm8k", "alpaca", "messages"]
LongPolicy = Literal["truncate", "drop"]
LoraMatmul = Literal["compute", "fp32"]
ResidualDtype = Literal["compute", "fp32"]
Device = Literal["auto", "cuda", "cpu"]
Strategy = Literal["single", "ddp", "fsdp"]
SpeedBudget = Literal["off", "auto"]
RopeScaling = Literal["", "linear", "dynamic", "yarn"]
LogSink = Literal["jsonl", "tensorboard"]


@dataclass(frozen=True)
class RunConfig:
    # --- model -------------------------------------------------------------
    # A shape preset (`tiny`, `deepseek-r1-distill-qwen-1.5b`, ... see
    # `memtune.presets`), a local directory with config.json (+ weights), or a
    # hub id already in the local cache. No network is ever used.
    model: str = "tiny"
    # Build the model from its config with random weights: memory and speed do
    # not depend on weight values, so this measures a 8B model without weights.
    random_init: bool = False
    trust_remote_code: bool = False  # off: never run code shipped with a model
    attention: Attention = "auto"  # auto = sdpa, or what the family needs (memtune.families)
    # RoPE scaling to train past max_position_embeddings: linear, dynamic or yarn. "" = the
    # model's own RoPE. Mapped onto transformers' rope_parameters (memtune.models.apply_rope_scaling);
    # seq_len may then go up to max_position_embeddings x rope_factor.
    rope_scaling: RopeScaling = ""
    # Times max_position_embeddings the scaled RoPE covers (> 1, with rope_scaling).
    rope_factor: float = 1.0

    # --- quantization (bitsandbytes) ---------------------------------------
    # nf4/fp4 store frozen weights in 4 bits (about 0.53 bytes/param with
    # double quantization), int8 in 8 bits; none keeps the compute dtype.
    quantization: Quantization = "nf4"
    double_quant: bool = True  # quantizes the absmax scales too: -0.37 bit/param
    compute_dtype: ComputeDtype = "auto"  # auto = bf16 where the device supports it

    # --- LoRA (peft) -------------------------------------------------------
    lora: bool = True  # False = full fine-tuning (only with quantization none)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # "default" = peft's default for the architecture (q_proj, v_proj for
    # Qwen2/Llama), "all-linear", or a list of module names.
    lora_targets: Union[str, tuple[str, ...]] = "default"
    # LoRA matmuls in the compute dtype (compute) or peft's fp32 path (fp32). compute = the adapter matmuls run in the compute dtype (bf16), as they do
    # under autocast, with fp32 master weights; fp32 = peft's own path, which
    # casts each adapted layer's input to fp32 and keeps that copy for
    # backward (2x the bytes of the input, once per adapted module).
    lora_matmul: LoraMatmul = "compute"
    # The residual stream in the compute dtype or fp32. The residual stream (the hidden states between and around the layers'
    # sublayers) in the compute dtype, or in fp32 with the matmuls and
    # attention under bf16/fp16 autocast, as `Trainer(bf16=True)` runs a model
    # whose norms were upcast: LoRA gradients as close to an fp32 run as
    # Trainer's (on the H200 at 4096 tokens, relative error 2.47e-2 against
    # 3.06e-2, Trainer's stack 2.40e-2), for fp32 checkpoints: at 16384 tokens
    # 2.90 GB and 24,940 tokens/s against 2.59 GB and 30,679. The norms hand
    # the matmuls their output in the compute dtype, so a layer's saved
    # tensors stay as they were.
    residual_dtype: ResidualDtype = "compute"

    # --- memory techniques -------------------------------------------------
    # Each technique below is switchable; on by default, measured together on the H200
    # (1.5B shape, 16384 tokens) they take 2.59 GB instead of 5.29 GB and run
    # 17% faster (31,849 against 27,129 tokens/s; benchmarks/results/compare-h200.md).

    # Recompute each layer's activations in backward: less memory, ~30% more time.
    gradient_checkpointing: bool = True
    # Keep the checkpointed layer inputs in pinned host memory, copied on a
    # side stream: GPU activation memory no longer grows with depth. Needs
    # gradient_checkpointing (with it off there are no checkpoints to move).
    offload_activations: bool = True
    # Keep each layer's attention output from the forward (with offloaded checkpoints). With offloaded checkpoints: keep each layer's attention output and
    # softmax statistics from the forward, in host memory beside the layer's
    # input, so that the backward's recompute skips attention (28 attention
    # forwards a step for the 1.5B shape). Costs one more [tokens, hidden]
    # copy per layer each way over PCIe and as much host memory. sdpa only.
    save_attention: bool = True
    # The last N decoder layers keep their activations (not recomputed): faster, more memory.
    # 0 = every layer checkpointed (the lean path). Needs gradient_checkpointing; see docs/techniques.md.
    keep_layers: int = 0
    # auto: keep as many layers as fit --gpu-memory (or the card), with a 10% margin.
    # off: keep_layers as given. The margin and the choice: memtune.estimate.most_kept_layers.
    speed_budget: SpeedBudget = "off"
    # Run the MLP over chunks of the sequence so its [tokens, intermediate]
    # tensors never exist whole. 0 = off; otherwise the chunk length in tokens
    # (sequences no longer than one chunk run untiled). 8192, not 4096: every
    # chunk costs the same host-side launch work, and at 4096 an H200 step of
    # the 1.5B shape at 16384 tokens waited on the CPU (0.65-0.79 s a step,
    # varying) where 8192 ran a steady 0.52 s for 0.33 GB more.
    tiled_mlp_chunk: int = 8192
    # Keep the frozen input-embedding table in pinned host memory and look the
    # batch's tokens up there: 0.47 GB less on the GPU for the 1.5B shape,
    # 1.05 GB for Llama-3.1-8B. Only on a CUDA GPU; kept on the GPU, with a
    # note, when the table is tied to the lm_head (the lm_head needs it there).
    embeddings_on_host: bool = True
    # Compile each RMSNorm and the MLP's silu(gate) * up into fused kernels
    # (torch.compile, same math; the first steps compile). CUDA GPUs only.
    fuse_elementwise: bool = True
    # Compile the rotary position embedding of q and k into one kernel each way
    # (Qwen2 and Llama attention; the attention instance gets a forward with
    # transformers' steps, generation with a KV cache keeps transformers' own).
    # CUDA GPUs only. Eager RoPE is about 1000 launches a 16384-token step of
    # the 1.5B shape, and that step waits on the host: compiled, it measured
    # 33,614 tokens/s against 28,875 in the same H200 command
    # (benchmarks/results/compare-h200-11.log).
    fuse_rope: bool = True
    # Frozen 4-bit linears (nf4/fp4 LoRA) on memtune's own short path: one
    # dequantize and one matmul each way instead of bitsandbytes' layers of
    # Python; each weight dequantized once per offloaded layer backward (not
    # for the recompute and again for the gradients) and once per tiled-MLP
    # pass (not per chunk). Holds a layer's dequantized weights meanwhile
    # (77 MB for the 1.5B shape). A 16384-token step of the 1.5B shape waits
    # on the host, much of it in bitsandbytes' layers (profile-16k-idle-h200.txt):
    # on the H200, run twice over in one command interleaved with the plain
    # path, it made 34,324 and 35,365 tokens/s against 31,603 and 29,937
    # (compare-h200-12.log).
    dequantize_once: bool = True
    # Each layer's frozen 4-bit dequantizes replayed as one CUDA graph. With dequantize_once and offloaded checkpoints on a CUDA GPU: capture each
    # decoder layer's frozen 4-bit dequantize kernels once as a CUDA graph and
    # replay it at the start of the layer's forward and backward (one launch
    # instead of 21 kernels and bitsandbytes' Python for the 1.5B shape). All
    # layers write one shared buffer: one layer's dequantized weights (77 MB
    # for the 1.5B shape) held for the whole run, which the offloaded backward
    # held at its peak anyway. Before it, `_Frozen4bitLinear` launched late
    # for 91 ms of a profiled 16384-token step (profile-16k-defaults-h200.txt);
    # with it, 7.7 ms of late launches were left in the whole step
    # (profile-16k-graph-h200.txt). Its tokens/s gain was inside the run-to-run
    # spread (37,145 / 37,311 against 37,657 / 36,016 without, compare-h200-15.log),
    # for 0.2-0.4 GB more reserved memory at 16384 tokens. On by default
    # because it takes that host work out of every step, so a host slower than
    # the H200 machine's is less likely to make the GPU wait (not measured).
    dequantize_graph: bool = True
    # In training mode, compile the fused kernels (fuse_elementwise, fuse_rope,
    # fuse_loss's full chunks) for the step's exact shapes instead of for any length. Kernels compiled
    # for symbolic shapes cannot prove 16-byte alignment, so Triton emits
    # scalar loads (reported 1.5-3.4x slower pointwise and norm kernels:
    # pytorch/pytorch#177061). Measured on the H200 at 16384 tokens, two rounds
    # interleaved in one command: 38,437 and 38,346 tokens/s against 36,952 and
    # 36,820 without, the same peak; the compiled kernels of a step fell from 59
    # to 36 ms (compare-h200-18.log, profile-16k-static-h200.txt). Each new
    # training shape compiles once more, up to a few per function
    # (kernels/fused.py); eval and generation keep the any-length kernels.
    compile_static_shapes: bool = True
    # chunked = never materialise the [tokens, vocab] logits (loss and its
    # gradient computed a chunk of tokens at a time); full = model's own loss.
    loss: LossImpl = "chunked"
    # 512 tokens x a 152k vocabulary = 0.47 GB of chunk logits at the peak;
    # the lm_head matmuls stay compute bound down to about that size.
    loss_chunk_tokens: int = 512
    # Compute each loss chunk's softmax and gradient as one compiled kernel
    # (torch.compile): no fp32 [chunk, vocab] copy, two reads of the logits
    # instead of about ten passes. CUDA GPUs only. Measured on the H200 at
    # 16384 tokens: 31,849 against 30,679 tokens/s in the same command, the
    # same peak (2.59 GB); the loss's elementwise kernels fall from about 30 ms
    # a step to under 10 (benchmarks/results/profile-16k-fuse-loss-h200.txt).
    fuse_loss: bool = True
    # The loss chunk kernel on CUDA: triton or compiled. triton = a hand-written kernel
    # (kernels/cross_entropy_triton.py: online softmax, two reads of the chunk
    # logits, the gradient written over them in place, so no second [chunk,
    # vocab] buffer); compiled = chunk_loss_and_grad under torch.compile. One
    # 512 x 151936 chunk on the H200: 150 us against 283 (compiled for the
    # exact shape) and 407 (any length). At 16384 tokens, two rounds
    # interleaved: 39,170 and 39,128 tokens/s against 37,869 and 38,670
    # (compare-h200-19.log). Where triton is missing the loss runs unfused.
    loss_kernel: LossKernel = "triton"

    # --- training ----------------------------------------------------------
    seq_len: int = 16384  # capped to what the data and the model allow
    # 0 = auto: fill the seq_len token budget with short examples, at most 8
    # sequences a step (1 when examples are seq_len long, as with random data).
    batch_size: int = 0
    grad_accum: int = 1
    steps: int = 400
    # Passes over the training data instead of `steps` (0 = use steps): the
    # steps become ceil(epochs x examples / (batch_size x grad_accum)), each
    # epoch a fresh seeded shuffle; a batch may take its last examples from the
    # next epoch's order (every batch is full).
    epochs: float = 0.0
    warmup_steps: int = 5  # steps excluded from the median step time
    # 2e-3 lifts the built-in task in 400 steps; real models usually want 1e-4..2e-4.
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: Optimizer = "adamw"
    seed: int = 0
    device: Device = "auto"
    # Under torchrun: ddp (replicas) or fsdp (FSDP2, weights sharded); single = one process.
    # ddp all-reduces the LoRA gradients; fsdp shards weights, LoRA and optimizer state.
    # batch_size stays the global batch, each rank takes its share (memtune.distributed).
    strategy: Strategy = "single"
    # GPUs each sequence is split across (ring attention over SDPA; CUDA and NCCL only). 1 = off.
    context_parallel: int = 1
    # Cap what this run may allocate on the GPU ("24GiB", "16GB", "0.5"
    # fraction); empty = the whole card. Used by `study` to play a small card.
    gpu_memory: str = ""
    # Host RAM for offloaded tensors, such as 64GiB; empty = 90% of what is free. Over it, train
    # and fit recompute attention, then keep checkpoints on the GPU (memtune.fit.choose_host_plan).
    host_memory: str = ""
    # A validation loss (masked as training is) every val_every steps and at
    # the end, on the examples of this file (the training data's format).
    val_data: str = ""
    # Or on this fraction of the training examples, held out (seeded) from training.
    val_split: float = 0.0
    val_every: int = 0  # steps between validation losses; 0 = at each checkpoint

    # --- data --------------------------------------------------------------
    # "builtin" = the shipped arithmetic word-problem task; otherwise a path to
    # a JSONL/JSON/CSV/Parquet file, a local dataset directory, or a cached
    # `datasets` name.
    data: str = "builtin"
    data_format: DataFormat = "auto"
    train_on_prompt: bool = False  # False = loss on the answer tokens only
    long_examples: LongPolicy = "truncate"
    packing: bool = False
    skip_bad_lines: bool = False
    train_examples: int = 0  # 0 = all

    # --- evaluation --------------------------------------------------------
    eval: bool = True  # accuracy before and after training on held-out data
    eval_examples: int = 200
    eval_batch_size: int = 32
    max_new_tokens: int = 48
    answer_regex: str = ""  # custom pattern whose group 1 is the answer

    # --- output ------------------------------------------------------------
    out: str = ""  # run directory; empty = a new directory under runs/
    # Steps between checkpoints in DIR/checkpoints/step-N/ (adapter or model,
    # optimizer, scheduler, RNG states, data position; `--resume` continues
    # from the newest complete one). 0 = auto: every 10% of the run, at most
    # 500 steps apart. A checkpoint is also written at the end and when
    # SIGINT or SIGTERM stops the run.
    checkpoint_every: int = 0
    # The newest checkpoints kept (and the one with the best validation loss);
    # 0 = none once the run has finished (the newest still protects it while it runs).
    checkpoint_keep: int = 2
    # DIR/log.jsonl is always written, one line a step; tensorboard = also
    # TensorBoard event files in DIR/tensorboard/ (needs the tensorboard package).
    log: LogSink = "jsonl"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["lora_targets"], tuple):
            data["lora_targets"] = list(data["lora_targets"])
        return data

    def config_hash(self) -> str:
        """Hash of everything that changes what a run measures (not where it writes)."""
        data = self.to_dict()
        for name in NOT_MEASURED:
            data.pop(name)
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def offloads_checkpoints(self) -> bool:
        """Checkpoints go to host memory: offload_activations, which acts only with checkpointing on."""
        return self.offload_activations and self.gradient_checkpointing

    @property
    def dequantizes_by_graph(self) -> bool:
        """Dequantize graphs in use (on a CUDA GPU): dequantize_graph, which acts only on 4-bit weights on
        the short path (dequantize_once) with offloaded checkpoints."""
        return (self.dequantize_graph and self.dequantize_once and self.offloads_checkpoints
                and self.quantization in ("nf4", "fp4"))

    @property
    def saves_attention(self) -> bool:
        """Attention kept from the forward: save_attention, which acts only with offloaded checkpoints."""
        return self.save_attention and self.offloads_checkpoints

    def position_limit(self, max_positions: int) -> int:
        """The longest sequence the model's RoPE covers: max_position_embeddings, times rope_factor
        with rope_scaling (0 = unknown stays 0)."""
        return int(max_positions * self.rope_factor) if self.rope_scaling else max_positions

    def resolved_batch_size(self, effective_seq_len: int) -> int:
        """batch_size, with 0 (auto) turned into as many sequences as fill seq_len tokens, at most 8."""
        if self.batch_size:
            return self.batch_size
        return min(AUTO_BATCH_MAX, max(1, self.seq_len // max(1, effective_seq_len)))

    def replace(self, **changes: Any) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})


AUTO_BATCH_MAX = 8
# Fields that say where and how often a run writes, not what it measures: out of config_hash.
NOT_MEASURED = ("out", "checkpoint_every", "checkpoint_keep", "log")
FIELD_NAMES = tuple(f.name for f in fields(RunConfig))
_TYPES = get_type_hints(RunConfig)

# The checks that are about ranges rather than types: field -> (test, allowed).
_RANGE_CHECKS: dict[str, tuple[Any, str]] = {
    "lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seq_len": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 0, "an integer >= 0 (0 = auto)"),
    "grad_accum": (lambda v: v >= 1, "an integer >= 1"),
    "context_parallel": (lambda v: v >= 1, "an integer >= 1 (1 = off)"),
    "steps": (lambda v: v >= 1, "an integer >= 1"),
    "epochs": (lambda v: 0 <= v <= 1e6, "a number of passes >= 0 (0 = use steps)"),
    "val_split": (lambda v: 0 <= v < 1, "a fraction in [0, 1) (0 = none)"),
    "val_every": (lambda v: v >= 0, "an integer >= 0 (0 = at each checkpoint)"),
    "checkpoint_every": (lambda v: v >= 0, "an integer >= 0 (0 = auto: every 10% of the run)"),
    "checkpoint_keep": (lambda v: v >= 0, "an integer >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0 = no clipping)"),
    "tiled_mlp_chunk": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "keep_layers": (lambda v: v >= 0, "an integer >= 0 (0 = every layer checkpointed)"),
    "loss_chunk_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "train_examples": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "eval_examples": (lambda v: v >= 0, "an integer >= 0"),
    "eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "model": (lambda v: bool(v.strip()), "a preset name, a local directory or a hub id"),
    "data": (lambda v: bool(v.strip()), "'builtin' or a path / dataset name"),
}


def _coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """Convert a YAML/flag value to the field's type; return (value, problem)."""
    typ = _TYPES[name]
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed:
            shown = ", ".join("'' (none)" if a == "" else str(a) for a in allowed)
            return value, f"{name}: expected one of {shown}; got {value!r}"
        return value, None
    if name == "lora_targets":
        if isinstance(value, str):
            if "," in value:
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            return value, None if value else f"{name}: expected 'default', 'all-linear' or a list of module names; got an empty value"
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
            return tuple(value), None
        return value, f"{name}: expected 'default', 'all-linear' or a list of module names; got {value!r}"
    if typ is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on"), None
        return value, f"{name}: expected true or false; got {value!r}"
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return value, f"{name}: expected an integer; got {value!r}"
        try:
            return int(value), None
        except ValueError:
            return value, f"{name}: expected an integer; got {value!r}"
    if typ is float:
        if isinstance(value, bool):
            return value, f"{name}: expected a number; got {value!r}"
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            return value, f"{name}: expected a finite number; got an integer of {len(str(value))} digits"
        except (TypeError, ValueError):
            return value, f"{name}: expected a number; got {value!r}"
        # inf, nan, and a literal beyond the float range (1e400 reads as inf) pass every comparison
        # check below or fail it with a misleading bound, then poison the run: refused here, by name
        if not math.isfinite(number):
            return value, f"{name}: expected a finite number; got {value!r}"
        return number, None
    if typ is str:
        if value is None:
            return "", None
        if not isinstance(value, (str, int, float)):
            return value, f"{name}: expected a string; got {value!r}"
        return str(value), None
    raise AssertionError(f"no coercion for field {name} of type {typ}")  # a programming error


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    problems = []
    if not cfg.lora and cfg.quantization != "none":
        problems.append(
            f"lora: full fine-tuning (lora false) needs quantization none; bitsandbytes "
            f"{cfg.quantization} weights are frozen and cannot be trained directly"
        )
    if cfg.answer_regex:
        import re

        try:
            if re.compile(cfg.answer_regex).groups < 1:
                problems.append("answer_regex: expected a pattern with one capture group for the answer")
        except re.error as exc:
            problems.append(f"answer_regex: not a valid regular expression ({exc})")
    for name in ("gpu_memory", "host_memory"):
        if getattr(cfg, name):
            try:
                parse_memory_size(getattr(cfg, name))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
    if cfg.rope_scaling and cfg.rope_factor <= 1:
        problems.append(f"rope_factor: expected a number > 1 with rope_scaling {cfg.rope_scaling} (how many times "
                        f"max_position_embeddings to cover); got {cfg.rope_factor:g}")
    elif not cfg.rope_scaling and cfg.rope_factor != 1:
        problems.append(f"rope_factor: {cfg.rope_factor:g} needs a rope_scaling type (linear, dynamic or yarn), "
                        f"e.g. --rope-scaling yarn --rope-factor {cfg.rope_factor:g}")
    if cfg.keep_layers and cfg.speed_budget == "auto":
        problems.append(f"keep_layers, speed_budget: speed_budget auto chooses keep_layers; give one of them "
                        f"(got keep_layers {cfg.keep_layers} with speed_budget auto)")
    elif cfg.keep_layers and not cfg.gradient_checkpointing:
        problems.append(f"keep_layers: {cfg.keep_layers} needs gradient_checkpointing (without it every layer "
                        f"keeps its activations already)")
    if cfg.val_data and cfg.val_split:
        problems.append("val_data, val_split: expected one source of validation examples; got both")
    elif (cfg.val_data or cfg.val_split) and cfg.data == "random":
        problems.append("val_data, val_split: random data has nothing to validate on; expected a data file")
    return problems


# The sections of a grouped config (YAML or API), each a `# --- name ---` block of RunConfig:
# section name -> its fields. Flat keys are accepted everywhere as well.
_SECTION_OF_HEADER = {"model": "model", "quantization": "quantization", "lora": "lora", "memory": "memory",
                      "training": "train", "data": "data", "evaluation": "eval", "output": "output"}


def sections() -> dict[str, tuple[str, ...]]:
    """section -> field names, read from the `# --- name ---` headers in RunConfig's source."""
    import inspect

    result: dict[str, list[str]] = {}
    current = None
    for line in inspect.getsource(RunConfig).splitlines():
        stripped = line.strip()
        if stripped.startswith("# ---"):
            header = stripped.strip("#- ").split()[0].lower()
            current = _SECTION_OF_HEADER.get(header, header)
            result.setdefault(current, [])
        elif current and ":" in stripped and not stripped.startswith(("#", "def", "@", "return")):
            name = stripped.split(":")[0]
            if name in FIELD_NAMES:
                result[current].append(name)
    return {name: tuple(names) for name, names in result.items()}


def flatten_sections(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """{"lora": {"lora_rank": 16}, "seq_len": 4096} -> {"lora_rank": 16, "seq_len": 4096}.

    A section is a mapping under a section name; `model`, `data` and `eval` are also fields,
    told apart by their value (a mapping is the section). A key in the wrong section, or given
    twice, is a UserError naming it."""
    groups = sections()
    flat: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        if key in groups and isinstance(value, dict):
            for name, item in value.items():
                home = next((g for g, names in groups.items() if name in names), None)
                if home != key:
                    where = f"it belongs to '{home}'" if home else "no such key"
                    problems.append(f"{source}: section '{key}' has no key '{name}' ({where})")
                elif name in flat:
                    problems.append(f"{source}: '{name}' is given twice")
                else:
                    flat[name] = item
        elif key in flat:
            problems.append(f"{source}: '{key}' is given twice")
        else:
            flat[key] = value
    if problems:
        raise UserError("; ".join(problems))
    return flat


def to_sections(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A flat config dict grouped by section (for display and grouped YAML)."""
    return {name: {k: values[k] for k in names if k in values} for name, names in sections().items()}


def from_dict(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a RunConfig (flat keys or sections); raise UserError listing every problem."""
    values = flatten_sections(values, source)
    problems = []
    unknown = sorted(set(values) - set(FIELD_NAMES))
    for key in unknown:
        close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see `memtune train --help` for the keys"
        problems.append(f"{source}: unknown key '{key}' ({hint})")
    coerced = {}
    for name in FIELD_NAMES:
        if name not in values:
            continue
        value, problem = _coerce(name, values[name])
        if problem:
            problems.append(problem)
            continue
        check = _RANGE_CHECKS.get(name)
        if check and not check[0](value):
            problems.append(f"{name}: expected {check[1]}; got {value!r}")
            continue
        coerced[name] = value
    if not problems:
        cfg = RunConfig(**coerced)
        problems = _cross_field_problems(cfg)
        if not problems:
            return cfg
    raise UserError("; ".join(problems))


# Fields added after results were first stored, with the value a run made before
# them had: a stored config without the key is read back as what actually ran.
LEGACY_VALUES: dict[str, Any] = {"lora_matmul": "fp32", "embeddings_on_host": False, "fuse_elementwise": False,
                                 "save_attention": False, "dequantize_once": False, "dequantize_graph": False,
                                 "fuse_loss": False, "residual_dtype": "compute", "fuse_rope": False,
                                 "compile_static_shapes": False, "loss_kernel": "compiled"}


def from_stored_dict(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from a stored (resolved) config, which may predate newer fields."""
    return from_dict({**LEGACY_VALUES, **values}, source="stored config")


def parse_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in `path`; a read or syntax error is a UserError naming file:line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config: file not found: {path}")
    data = parse_yaml_file(path, "config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a failed write (the path is a directory, the disk is full) leaves nothing behind
        tmp.unlink(missing_ok=True)
        raise


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str) -> int:
    """'24GiB' -> bytes. A bare number is bytes. Raises ValueError with the allowed forms."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"expected a size such as 24GiB, 16GB or 8000MiB; got {text!r}")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"expected a size > 0; got {text!r}")
    if not math.isfinite(value):  # 400 digits read as inf
        raise ValueError(f"expected a finite size; got {len(match.group(1))} digits")
    return int(value)


def field_help() -> dict[str, str]:
    """The comment above each field, for --help, read from this file's source."""
    import inspect

    lines = inspect.getsource(RunConfig).splitlines()
    helps, pending = {}, []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# ---"):
            pending = []
        elif stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
        elif ":" in stripped and not stripped.startswith(("def", "@", "class", "return", '"""')):
            name = stripped.split(":")[0]
            if name in FIELD_NAMES:
                inline = stripped.split("#", 1)[1].strip() if "#" in stripped else ""
                helps[name] = " ".join(pending + ([inline] if inline else []))
            pending = []
        else:
            pending = []
    return helps
