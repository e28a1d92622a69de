"""Predict the peak GPU memory of a training run from shapes alone.

No weights are loaded and no GPU is touched: every term below is arithmetic
on the model's config (hidden size, layers, heads, vocabulary ...) and the
RunConfig. The prediction is what `torch.cuda.max_memory_allocated` reports
over the training steps after `reset_peak_memory_stats`; the CUDA context
(driver, kernels: about 500 MB) is not part of it and is reported apart in
`cuda_context_bytes`.

The code path modelled is memtune's (memtune.models / memtune.train /
memtune.kernels):

* decoder linears as bitsandbytes Linear4bit (nf4/fp4, blocksize 64) or
  Linear8bitLt (threshold 6.0), or in the compute dtype (`none`); embeddings,
  lm_head, norms and biases in the compute dtype;
* LoRA (peft) adapters in fp32, peft casting each adapted layer's input to
  fp32 before dropout;
* SDPA attention (flash kernel, grouped-query heads not repeated), RMSNorm
  computed in fp32, SiLU-gated MLP;
* the loss either chunked (memtune.kernels.chunked_linear_cross_entropy:
  grad_hidden computed in the forward, fp32 chunk logits capped at 1 GiB) or
  the model's own (full bf16 logits, upcast to fp32 for cross-entropy);
* gradient checkpointing (non-reentrant: one [tokens, hidden] input per layer
  kept, one layer recomputed at a time), memtune's offloaded checkpointing
  and tiled MLP;
* torch AdamW (fused; states like the parameter), bitsandbytes 8-bit and
  paged AdamW.

The peak is the largest of a few phases of a step (end of forward with the
loss, backward through the last layer, end of backward, optimizer step);
`breakdown` lists the components alive at the peak phase and sums to
`total_bytes`. Per-token activation terms are in bytes per token (one token
of one sequence); multiply by batch x seq_len.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from memtune.config import RunConfig, parse_memory_size
from memtune.errors import UserError

GIB = 1 << 30
MIB = 1 << 20

# The CUDA context (driver state, kernel images, cuBLAS handles) on an H200 with
# torch 2.x: outside max_memory_allocated, reported apart.
CUDA_CONTEXT_BYTES = 500 * 10**6
# cuBLAS/cuBLASLt workspace on Hopper, taken from the caching allocator and
# therefore inside max_memory_allocated (CUBLAS_WORKSPACE_CONFIG default :4096:8
# = 8 x 4 MiB).
CUBLAS_WORKSPACE_BYTES = 32 * MIB
# The CUDA caching allocator rounds every block up to a multiple of 512 bytes.
ALLOCATOR_ROUND = 512
# bitsandbytes: 4-bit blocks of 64 weights, double-quant blocks of 256 absmax values.
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# bitsandbytes 8-bit optimizers: tensors smaller than this keep fp32 states;
# 8-bit states carry one fp32 absmax per 256 values each.
OPT8_MIN_SIZE = 4096
OPT8_BLOCKSIZE = 256
# bitsandbytes paged optimizers page (cudaMallocManaged, invisible to torch's
# allocator) only state tensors of at least this many elements.
PAGED_MIN_SIZE = 100_000
# memtune.kernels.cross_entropy caps the fp32 chunk logits at 1 GiB.
LOSS_CHUNK_MAX_BYTES = GIB
# speed_budget auto keeps layers until the predicted peak reaches 90% of the budget. Why 10%:
# the budget bounds what the caching allocator *reserves* (a --gpu-memory cap is torch's
# per-process memory fraction; the card is the card), while the estimate predicts what tensors
# *allocate*. Reserved runs above allocated by the blocks freed between larger ones, and the
# estimate itself errs: on the H200 from -3.8% to +15% (estimate-vs-measured-h200.md, 75 runs).
# A run that fills its budget exactly would meet an out-of-memory at the first unlucky step; one
# kept layer less costs a few percent of speed at most.
SPEED_BUDGET_MARGIN = 0.10

SUPPORTED_FAMILIES = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text", "phi3")
REQUIRED_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "vocab_size")
# peft's default LoRA targets (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_LORA_TARGETS = {"qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
                        "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
                        "gemma2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj")}  # phi3: none
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj")  # the last two: Phi-3's fused projections
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}


# --- the model's shapes ---------------------------------------------------------

@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tie_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2 always; Llama when attention_bias)
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3, Gemma 3: RMSNorm over each head of q and k
    # per family (memtune.families): Phi-3's fused projections, Gemma's four norms a layer
    # (before and after attention and MLP), attention-logit and final-logit softcaps (Gemma 2)
    fused_qkv: bool = False
    fused_gate_up: bool = False
    layer_norms: int = 2
    attention_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None  # some layers attend within this many tokens (Gemma, Mistral variants)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linears(self) -> list[Linear]:
        """The nn.Linear modules of one decoder layer: (name, in, out, bias)."""
        h, i = self.hidden, self.intermediate
        qkv = ([Linear("qkv_proj", h, self.q_dim + 2 * self.kv_dim, self.attention_bias)] if self.fused_qkv else
               [Linear("q_proj", h, self.q_dim, self.attention_bias),
                Linear("k_proj", h, self.kv_dim, self.attention_bias),
                Linear("v_proj", h, self.kv_dim, self.attention_bias)])
        gate_up = ([Linear("gate_up_proj", h, 2 * i, self.mlp_bias)] if self.fused_gate_up else
                   [Linear("gate_proj", h, i, self.mlp_bias), Linear("up_proj", h, i, self.mlp_bias)])
        return [*qkv, Linear("o_proj", self.q_dim, h, self.o_bias), *gate_up, Linear("down_proj", i, h, self.mlp_bias)]

    def total_params(self) -> int:
        linears = sum(l.in_features * l.out_features + (l.out_features if l.bias else 0) for l in self.layer_linears())
        norms = self.layer_norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab * self.hidden
        return self.layers * (linears + norms) + self.hidden + embed * (1 if self.tie_embeddings else 2)


def model_shape(config: dict[str, Any], source: str = "model config") -> ModelShape:
    """The shapes the estimate needs, from a config.json dict; UserError naming what is missing."""
    family = config.get("model_type")
    text_config = config.get("text_config")
    if family not in SUPPORTED_FAMILIES and isinstance(text_config, dict):
        return model_shape(text_config, source)
    missing = [name for name in REQUIRED_FIELDS if config.get(name) in (None, "")]
    if missing:
        raise UserError(
            f"{source}: cannot estimate memory without the config fields {', '.join(missing)} "
            f"(needed: {', '.join(REQUIRED_FIELDS)}; optional: num_key_value_heads, head_dim, "
            f"max_position_embeddings, tie_word_embeddings)"
        )
    if family not in SUPPORTED_FAMILIES:
        raise UserError(
            f"{source}: model_type '{family}' is not a family the estimator knows; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)} (Llama-style decoders with a gated MLP)"
        )
    from memtune.families import FAMILIES, features

    family_traits, feats = FAMILIES.get(family), features(config)
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        shape = ModelShape(
            family=family,
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings") or 0),
            tie_embeddings=feats.tied_embeddings,
            attention_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=bool(family_traits and family_traits.qk_norm),
            fused_qkv=bool(family_traits and family_traits.fused_qkv),
            fused_gate_up=bool(family_traits and family_traits.fused_gate_up),
            layer_norms=4 if family in ("gemma2", "gemma3_text") else 2,
            attention_softcap=feats.attn_softcap,
            final_softcap=feats.final_softcap,
            sliding_window=feats.sliding_window,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: a shape field is not an integer ({exc})") from None
    bad = [n for n, v in (("hidden_size", shape.hidden), ("intermediate_size", shape.intermediate),
                          ("num_hidden_layers", shape.layers), ("num_attention_heads", heads),
                          ("vocab_size", shape.vocab), ("head_dim", head_dim)) if v <= 0]
    if bad:
        raise UserError(f"{source}: expected positive integers for {', '.join(bad)}")
    return shape


def load_model_config(model: str) -> dict[str, Any]:
    """config.json of a preset, a local directory or a hub id in the local cache (never the network)."""
    from memtune.presets import PRESETS, is_preset, preset_config_dict

    if is_preset(model):
        return preset_config_dict(model)
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise UserError(f"model: {path} has no config.json")
        return _read_json(config_file)
    cached = _cached_hub_config(model)
    if cached is None:
        raise UserError(
            f"model: '{model}' is not a preset, not a local directory and not in the local Hugging Face "
            f"cache (memtune never downloads); give a local directory with config.json, or a shape preset "
            f"({', '.join(['tiny', *PRESETS])})"
        )
    return _read_json(cached)


def _cached_hub_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is simply "not cached"
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"model: {path} is not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"model: {path} does not hold a JSON object")
    return data


# --- weights ----------------------------------------------------------------------

# The rounding of one allocation: CUDA's caching allocator rounds to 512 bytes; on a CPU the
# tensor tracker counts the storages' own bytes, so estimate_for_shape sets 1 there.
_ALLOCATION_ROUND: contextvars.ContextVar[int] = contextvars.ContextVar("allocation_round",
                                                                         default=ALLOCATOR_ROUND)


def _round(nbytes: int) -> int:
    """One allocation: rounded up to 512 bytes on CUDA, its own size on a CPU (0 stays 0)."""
    step = _ALLOCATION_ROUND.get()
    return 0 if nbytes <= 0 else -(-nbytes // step) * step


def quantized_linear_tensors(out_features: int, in_features: int, quantization: str,
                             double_quant: bool) -> dict[str, int]:
    """Bytes of each tensor bitsandbytes keeps for one quantized weight [out, in] (n = out x in).

    4-bit (nf4/fp4):  packed weight  uint8 [ceil(n/2)]          = n/2 B
                      absmax         fp32  [ceil(n/64)]         = n/16 B      (no double quant)
                      code           fp32  [16]                 = 64 B
      double quant:   absmax         uint8 [ceil(n/64)]         = n/64 B
                      nested absmax  fp32  [ceil(n/64/256)]     = n/4096 B
                      nested code    fp32  [256]                = 1 KiB
                      offset         fp32  scalar               = 4 B
    int8:             weight         int8  [out, in]            = n B
                      row scales     fp32  [out]                = 4 out B
    """
    n = out_features * in_features
    if quantization == "int8":
        return {"weight": n, "scales": 4 * out_features}
    blocks = -(-n // NF4_BLOCKSIZE)
    tensors = {"weight": -(-n // 2), "code": 16 * 4}
    if double_quant:
        tensors.update(absmax=blocks, nested_absmax=4 * -(-blocks // NESTED_BLOCKSIZE), nested_code=256 * 4,
                       offset=4)
    else:
        tensors["absmax"] = 4 * blocks
    return tensors


def decoder_linear_weight_bytes(shape: ModelShape, quantization: str, double_quant: bool,
                                dtype_bytes: int, rounded: bool = True) -> tuple[int, int]:
    """(weight bytes, quantization-constant bytes) of every decoder linear, biases excluded.

    none: n x dtype bytes per weight; nf4/fp4/int8: see quantized_linear_tensors.
    """
    fit = _round if rounded else (lambda b: b)
    weights = constants = 0
    for lin in shape.layer_linears():
        if quantization == "none":
            weights += fit(lin.in_features * lin.out_features * dtype_bytes)
            continue
        tensors = quantized_linear_tensors(lin.out_features, lin.in_features, quantization, double_quant)
        weights += fit(tensors.pop("weight"))
        constants += sum(fit(b) for b in tensors.values())
    weights *= shape.layers
    constants *= shape.layers
    return weights, constants


def unquantized_weight_bytes(shape: ModelShape, dtype_bytes: int) -> dict[str, int]:
    """Modules kept in the compute dtype whatever the quantization.

    embeddings  vocab x hidden x dtype
    lm_head     vocab x hidden x dtype (0 when tied: it shares the embedding's storage)
    norms       (2 per layer + final) x hidden x dtype, + Qwen3's q/k norms 2 x head_dim per layer
    biases      sum of the linear biases x dtype
    """
    embed = _round(shape.vocab * shape.hidden * dtype_bytes)
    norm_tensors = [shape.hidden] * (shape.layer_norms * shape.layers + 1)
    if shape.qk_norm:
        norm_tensors += [shape.head_dim] * (2 * shape.layers)
    biases = [lin.out_features for lin in shape.layer_linears() if lin.bias] * shape.layers
    return {
        "embeddings": embed,
        "lm_head": 0 if shape.tie_embeddings else embed,
        "norms": sum(_round(n * dtype_bytes) for n in norm_tensors),
        "biases": sum(_round(n * dtype_bytes) for n in biases),
    }


# --- LoRA and training state --------------------------------------------------------

def lora_target_linears(shape: ModelShape, targets: Any) -> list[Linear]:
    """The linears of one layer that get a LoRA adapter ('default', 'all-linear' or names)."""
    if targets == "default":
        if shape.family not in DEFAULT_LORA_TARGETS:
            raise UserError(f"lora_targets: peft has no default target modules for '{shape.family}'; "
                            f"give all-linear or a list")
        names = set(DEFAULT_LORA_TARGETS[shape.family])
    elif targets == "all-linear":
        names = set(LINEAR_NAMES)
    else:
        names = {targets} if isinstance(targets, str) else set(targets)
        unknown = sorted(names - set(LINEAR_NAMES))
        if unknown:
            raise UserError(f"lora_targets: the estimator knows the decoder linears {', '.join(LINEAR_NAMES)}; "
                            f"got {', '.join(unknown)}")
    return [lin for lin in shape.layer_linears() if lin.name in names]


def lora_param_tensors(shape: ModelShape, cfg: RunConfig) -> list[int]:
    """Element counts of every LoRA tensor: A [r, in] and B [out, r] per targeted linear per layer."""
    r = cfg.lora_rank
    per_layer = []
    for lin in lora_target_linears(shape, cfg.lora_targets):
        per_layer += [r * lin.in_features, lin.out_features * r]
    return per_layer * shape.layers


def lora_param_count(shape: ModelShape, cfg: RunConfig) -> int:
    """Trainable LoRA parameters: layers x sum over targets of r x (in + out) (what peft counts)."""
    return sum(lora_param_tensors(shape, cfg))


def trainable_tensors(shape: ModelShape, cfg: RunConfig) -> tuple[list[int], int]:
    """(element count of each trainable tensor, bytes per element of the parameter and its grad).

    LoRA: the adapters, fp32. Full fine-tuning: every parameter in the compute dtype.
    """
    if cfg.lora:
        return lora_param_tensors(shape, cfg), 4
    tensors = []
    for lin in shape.layer_linears():
        tensors.append(lin.in_features * lin.out_features)
        if lin.bias:
            tensors.append(lin.out_features)
    tensors += [shape.hidden] * shape.layer_norms + ([shape.head_dim] * 2 if shape.qk_norm else [])
    tensors *= shape.layers
    tensors += [shape.hidden, shape.vocab * shape.hidden]
    if not shape.tie_embeddings:
        tensors.append(shape.vocab * shape.hidden)
    return tensors, _DTYPE_BYTES[cfg.compute_dtype]


def gradient_bytes(tensors: list[int], elem_bytes: int) -> int:
    """One gradient per trainable tensor, same dtype as the parameter (fp32 for LoRA)."""
    return sum(_round(n * elem_bytes) for n in tensors)


def optimizer_state_bytes(tensors: list[int], param_bytes: int, optimizer: str) -> tuple[int, int]:
    """(bytes on the GPU in torch's allocator, bytes paged by bitsandbytes) of the optimizer states.

    adamw (torch, fused):  exp_avg + exp_avg_sq, each like the parameter      = 2 x param bytes
                           (fp32 for LoRA adapters; bf16 for full fine-tuning)
    adamw8bit:             2 uint8 states + 2 fp32 absmax per 256 values      = 2 + 8/256 B/param
                           (tensors under 4096 elements keep 2 fp32 states    = 8 B/param)
    paged_*:               the same, but states of tensors >= 1e5 elements live in CUDA managed
                           memory, which torch.cuda.max_memory_allocated does not see.
    """
    on_gpu = paged = 0
    eight_bit = optimizer in ("adamw8bit", "paged_adamw8bit")
    bnb = optimizer != "adamw"
    for n in tensors:
        if eight_bit and n >= OPT8_MIN_SIZE:
            blocks = -(-n // OPT8_BLOCKSIZE)
            state = 2 * _round(n) + 2 * _round(4 * blocks)
        elif bnb:
            state = 2 * _round(4 * n)  # bitsandbytes 32-bit states are fp32
        else:
            state = 2 * _round(n * param_bytes)
        if optimizer.startswith("paged") and n >= PAGED_MIN_SIZE:
            paged += state
        else:
            on_gpu += state
    if eight_bit:
        on_gpu += 2 * _round(256 * 4)  # the two shared quantization maps
    return on_gpu, paged


# --- activations ------------------------------------------------------------------

def rmsnorm_saved_per_token(width: int, trainable_weight: bool, dtype_bytes: int, fused: bool = False) -> int:
    """RMSNorm (x.float(); x * rsqrt(mean(x^2) + eps); weight * x.to(dtype)) keeps, per token:

    the fp32 copy of x (saved by pow and mul)      4 x width      (fused: x itself, dtype x width)
    rsqrt(...)                                     4
    x.to(dtype) for the weight's gradient          dtype x width   (only when the weight trains)

    fused = memtune.kernels.fused (compiled): the kernel keeps its input and recomputes the rest.
    """
    kept_input = dtype_bytes * width if fused else 4 * width
    return kept_input + 4 + (dtype_bytes * width if trainable_weight else 0)


def fuses_elementwise(cfg: RunConfig, device: str) -> bool:
    return cfg.fuse_elementwise and device == "cuda"


def tiles_mlp(cfg: RunConfig, seq_len: int) -> bool:
    """The tiled MLP runs sequences longer than one chunk tiled; shorter ones untouched."""
    return 0 < cfg.tiled_mlp_chunk < seq_len


def lora_saved_per_token(in_features: int, rank: int, dropout: float, device: str = "cuda") -> int:
    """One LoRA adapter keeps, per token (peft casts the input to fp32 first):

    dropout(x.float()) saved by lora_A        4 x in
    the dropout mask                          1 x in      (only when dropout > 0; CUDA's fused
                                                            dropout keeps a bool mask, the CPU
                                                            one an fp32 noise tensor: 4 x in)
    lora_A output saved by lora_B             4 x r
    """
    mask = (1 if device == "cuda" else 4) * in_features if dropout > 0 else 0
    return 4 * in_features + mask + 4 * rank


# Adapted linears that read the same input tensor (q/k/v read the attention norm's
# output, gate/up the MLP norm's); o_proj reads the attention output, which SDPA keeps anyway.
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "down_proj": "down_in"}
_MLP_LINEARS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")


def lora_layer_saved_per_token(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, device: str = "cuda",
                               only: tuple[str, ...] | None = None) -> int:
    """Everything the LoRA adapters of one layer keep per token (optionally only the named linears).

    lora_matmul fp32 (peft's path): `lora_saved_per_token` per adapter.
    lora_matmul compute (memtune.kernels.lora), per adapter:
        lora_A output saved by lora_B             dtype x r
        dropout 0: lora_A's input is the base layer's input, saved once per distinct
                   tensor (dtype x in for q/k/v together, gate/up together, down_proj;
                   o_proj's input is the attention output, already kept)
        dropout > 0: dropout(x) in the dtype + its mask, per adapter
    """
    linears = [lin for lin in lora_target_linears(shape, cfg.lora_targets) if only is None or lin.name in only]
    if cfg.lora_matmul == "fp32":
        return sum(lora_saved_per_token(lin.in_features, cfg.lora_rank, cfg.lora_dropout, device)
                   for lin in linears)
    total = sum(dtype_bytes * cfg.lora_rank for _ in linears)
    if cfg.lora_dropout > 0:
        mask = 1 if device == "cuda" else dtype_bytes  # CPU dropout keeps its noise in the input's dtype
        return total + sum((dtype_bytes + mask) * lin.in_features for lin in linears)
    inputs = {_SHARED_INPUT[lin.name]: lin.in_features for lin in linears if lin.name in _SHARED_INPUT}
    return total + dtype_bytes * sum(inputs.values())


def flash_attention_saved_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """SDPA (flash kernel, grouped-query heads not repeated) keeps q, k, v, out and the fp32 log-sum-exp:

    q (after RoPE)  heads x head_dim x dtype       k, v  kv_heads x head_dim x dtype each
    out             heads x head_dim x dtype       lse   heads x 4
    (the o_proj input is a view of `out`)
    """
    return dtype_bytes * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.heads


def eager_attention_saved_per_token(shape: ModelShape, seq_len: int, dtype_bytes: int) -> int:
    """Eager attention repeats k and v to all heads and materialises the [heads, L, L] scores:

    q, repeated k, repeated v       3 x heads x head_dim x dtype
    softmax output (fp32)           heads x L x 4
    its cast to dtype (for @ v)     heads x L x dtype
    (per token; the [L, L] terms make it quadratic in L)
    """
    return 3 * dtype_bytes * shape.q_dim + shape.heads * seq_len * (4 + dtype_bytes)


def qk_norm_saved_per_token(shape: ModelShape, dtype_bytes: int, trainable: bool, fused: bool = False) -> int:
    """Qwen3's RMSNorm over each head of q and k: fp32 copies + one rsqrt per head."""
    if not shape.qk_norm:
        return 0
    q = shape.heads * (rmsnorm_saved_per_token(shape.head_dim, trainable, dtype_bytes, fused))
    k = shape.kv_heads * (rmsnorm_saved_per_token(shape.head_dim, trainable, dtype_bytes, fused))
    return q + k


def projection_inputs_saved_per_token(shape: ModelShape, cfg: RunConfig, dtype_bytes: int) -> int:
    """Inputs of the frozen/trainable base linears that their backward keeps.

    A 4-bit linear (bitsandbytes MatMul4Bit), a frozen dense linear and a frozen 8-bit linear
    (memtune.kernels.int8_backward replaces MatMul8bitLt's backward, which held its input A)
    keep nothing: the input gradient needs only the weight. A trainable linear (full
    fine-tuning) saves its input for the weight gradient:
        attention-norm output (q/k/v)   hidden x dtype
        MLP-norm output (gate/up)       hidden x dtype
        act(gate) * up (down_proj)      intermediate x dtype
        (o_proj's input is the attention output, already kept)
    """
    if cfg.lora:
        return 0
    return dtype_bytes * (2 * shape.hidden + shape.intermediate)


def mlp_saved_per_token(shape: ModelShape, dtype_bytes: int, tiled: bool, fused: bool = False) -> int:
    """The gated MLP down(silu(gate(x)) * up(x)) keeps gate(x) (for silu), silu(.) and up(x) (for *):

    3 x intermediate x dtype; fused (compiled silu * up, silu recomputed in backward): 2 x.
    Tiled (memtune.kernels.tiled_mlp): only its input, hidden x dtype.
    """
    if tiled:
        return dtype_bytes * shape.hidden
    return (2 if fused else 3) * dtype_bytes * shape.intermediate


def runs_eager_attention(cfg: RunConfig, shape: ModelShape, device: str) -> bool:
    """Eager attention ([heads, L, L] scores): asked for, or a softcapped family (Gemma 2) where
    flex_attention is not used (memtune.families.attention_implementation: off CUDA). On CUDA
    flex_attention keeps what SDPA's flash kernel keeps (q, k, v, out, log-sum-exp)."""
    return cfg.attention == "eager" or (cfg.attention == "auto" and shape.attention_softcap is not None
                                        and device != "cuda")


def keeps_attention(cfg: RunConfig, shape: ModelShape) -> bool:
    """save_attention acts: it hooks SDPA only, so not under eager or flex attention (Gemma 2's
    softcapped attention never runs SDPA; memtune.families.technique_skip_reason)."""
    return cfg.saves_attention and cfg.attention in ("auto", "sdpa") and shape.attention_softcap is None


def layer_saved_per_token(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, seq_len: int,
                          device: str = "cuda") -> dict[str, int]:
    """Everything one decoder layer's forward keeps for its backward, bytes per token, by part."""
    full_ft = not cfg.lora
    tiled = tiles_mlp(cfg, seq_len)
    fused = fuses_elementwise(cfg, device)
    parts = {
        "norms": shape.layer_norms * rmsnorm_saved_per_token(shape.hidden, full_ft, dtype_bytes, fused),
        "attention": (eager_attention_saved_per_token(shape, seq_len, dtype_bytes)
                      if runs_eager_attention(cfg, shape, device)
                      else flash_attention_saved_per_token(shape, dtype_bytes)),
        "qk_norm": qk_norm_saved_per_token(shape, dtype_bytes, full_ft, fused),
        "mlp": mlp_saved_per_token(shape, dtype_bytes, tiled, fused),
        "projection_inputs": projection_inputs_saved_per_token(shape, cfg, dtype_bytes),
        "lora": 0,
    }
    if tiled and parts["projection_inputs"]:
        # the tiled MLP runs under no_grad in the forward: its linears keep nothing
        parts["projection_inputs"] -= dtype_bytes * (shape.hidden + shape.intermediate)
    if cfg.lora:
        only = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") if tiled else None
        parts["lora"] = lora_layer_saved_per_token(shape, cfg, dtype_bytes, device, only)
    return parts


def kept_layer_count(cfg: RunConfig, shape: ModelShape) -> int:
    """Layers whose activations are kept (keep_layers; all of them without checkpointing, where the
    notion does not apply and 0 is returned). More than the model has is a UserError, as train's."""
    if not cfg.gradient_checkpointing:
        return 0
    if cfg.keep_layers > shape.layers:
        raise UserError(f"keep_layers: expected 0 to {shape.layers} (the model's decoder layers); "
                        f"got {cfg.keep_layers}")
    return cfg.keep_layers


def kept_layer_saved_per_token(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, seq_len: int,
                               device: str = "cuda") -> dict[str, int]:
    """What a kept layer's forward saves for its backward (memtune.kernels.offload.keep_layer_activations),
    bytes per token, by part: `layer_saved_per_token` with the MLP untiled (a kept layer runs it whole):
    the norms' fp32 inputs and rsqrt, attention's q, k, v, output and log-sum-exp, the MLP's gate,
    act and up, the LoRA inputs and A outputs. No checkpoint: the layer input is not kept apart."""
    return layer_saved_per_token(shape, dataclasses.replace(cfg, tiled_mlp_chunk=0), dtype_bytes, seq_len, device)


def kept_layer_backward_workspace(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, tokens: int,
                                  device: str = "cuda") -> int:
    """A kept layer's backward: the untiled gradients (layer_backward_workspace_per_token), one
    weight dequantized at a time (no dequantize_once scope outside a checkpoint), the int8
    matmul's int32 result, and the dequantize graph buffer, which lives for the whole run."""
    return (tokens * layer_backward_workspace_per_token(shape, dtype_bytes)
            + dequantized_weight_bytes(shape, cfg, dtype_bytes)
            + int8_matmul_workspace_bytes(shape, cfg, tokens, device)
            + dequantize_graph_buffer_bytes(shape, cfg, dtype_bytes, device))


def mlp_chunk_saved_per_token(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, device: str = "cuda") -> int:
    """What the untiled MLP of one layer keeps per token (gate, act, up, LoRA and base-linear inputs)."""
    per_token = mlp_saved_per_token(shape, dtype_bytes, False, fuses_elementwise(cfg, device))
    if cfg.quantization == "int8" or not cfg.lora:
        per_token += dtype_bytes * (shape.hidden + shape.intermediate)
    if cfg.lora:
        per_token += lora_layer_saved_per_token(shape, cfg, dtype_bytes, device, _MLP_LINEARS)
    return per_token


def layer_backward_workspace_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Gradients alive together inside one layer's backward, at its largest point (the MLP product):

    grad of down_proj's input, of silu(gate) and of up(x)    3 x intermediate x dtype
    grad of the layer output and of the residual branch      2 x hidden x dtype
    """
    return dtype_bytes * (3 * shape.intermediate + 2 * shape.hidden)


def dequantized_weight_bytes(shape: ModelShape, cfg: RunConfig, dtype_bytes: int) -> int:
    """A quantized linear's matmul dequantizes its weight to the compute dtype (largest: [I, H])."""
    if cfg.quantization == "none":
        return 0
    largest = max(lin.in_features * lin.out_features for lin in shape.layer_linears())
    return _round(largest * dtype_bytes)


def _dequantized_bytes(linears, dtype_bytes: int) -> int:
    """`linears`' weights dequantized to the compute dtype, held together."""
    return sum(_round(lin.in_features * lin.out_features * dtype_bytes) for lin in linears)


def dequantized_once_extra_bytes(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, seq: int) -> int:
    """dequantize_once holds dequantized weights for a whole pass instead of one at a time: a layer's
    all through its offloaded recompute and backward, else the MLP's through a tiled pass."""
    if not (cfg.dequantize_once and cfg.quantization in ("nf4", "fp4")):
        return 0
    if cfg.offloads_checkpoints:
        held = shape.layer_linears()
    elif tiles_mlp(cfg, seq):
        held = [lin for lin in shape.layer_linears() if lin.name in _MLP_LINEARS]
    else:
        return 0
    return _dequantized_bytes(held, dtype_bytes) - dequantized_weight_bytes(shape, cfg, dtype_bytes)


def dequantize_graph_buffer_bytes(shape: ModelShape, cfg: RunConfig, dtype_bytes: int, device: str) -> int:
    """With dequantize graphs (CUDA) one layer's dequantized weights live in a buffer for the whole run.
    The backward's workspace counts them already (dequantized_once_extra_bytes); the forward and the
    loss hold them too."""
    if not (cfg.dequantizes_by_graph and device == "cuda"):
        return 0
    return _dequantized_bytes(shape.layer_linears(), dtype_bytes)


def int8_matmul_workspace_bytes(shape: ModelShape, cfg: RunConfig, tokens: int, device: str = "cuda") -> int:
    """bitsandbytes' int8 matmul accumulates in int32 before scaling back: a transient
    tokens x out_features x 4 bytes for the widest linear (gate/up: the intermediate size).
    Measured on the H200 at 16384 tokens, leaving it out under-estimated int8 runs by 5-6%.
    On a CPU bitsandbytes dequantizes the weight and multiplies in the dtype (no int32 result)."""
    if cfg.quantization != "int8" or device != "cuda":
        return 0
    widest = max(lin.out_features for lin in shape.layer_linears())
    return _round(tokens * widest * 4)


def chunked_loss_bytes(shape: ModelShape, tokens: int, cfg: RunConfig, dtype_bytes: int,
                       device: str = "cuda") -> dict[str, int]:
    """memtune.kernels.chunked_linear_cross_entropy (gradients computed in the forward):

    grad_hidden kept for backward      tokens x hidden x dtype
    one chunk of C tokens at its peak: fp32 logits (4 C V) + a dtype copy (2 C V)   = 6 C V
        (fuse_loss on CUDA: the dtype logits and their dtype gradient, 4 C V;
         with loss_kernel=triton the gradient is written over the logits, 2 C V)
        C = min(loss_chunk_tokens, tokens, 1 GiB / (4 V) rounded down to 64)
    """
    cap = LOSS_CHUNK_MAX_BYTES // (4 * shape.vocab)
    cap = cap - cap % 64 if cap >= 64 else max(cap, 1)
    chunk = min(cfg.loss_chunk_tokens, cap, tokens)
    if cfg.fuse_loss and device == "cuda":  # compiled chunk: logits and their gradient in the dtype, no fp32 copy
        buffers = 1 if cfg.loss_kernel == "triton" else 2  # a softcap is applied inside either kernel
        chunk_bytes = buffers * _round(chunk * shape.vocab * dtype_bytes)
    else:
        chunk_bytes = _round(chunk * shape.vocab * 4) + _round(chunk * shape.vocab * dtype_bytes)
        if shape.final_softcap is not None:  # 1 - tanh^2 of the chunk, fp32, for the gradient
            chunk_bytes += _round(chunk * shape.vocab * 4)
    return {"grad_hidden": _round(tokens * shape.hidden * dtype_bytes), "chunk": chunk_bytes}


def full_loss_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """The model's own loss over full logits, at its peak (cross-entropy backward):

    log_softmax output (fp32, saved)        4 x tokens x V
    its gradient from nll_loss (fp32)       4 x tokens x V
    the logits' gradient (fp32)             4 x tokens x V
    (in the forward: bf16 logits + fp32 copy + log_softmax output = (2 + 4 + 4) x tokens x V, less)
    """
    return 3 * _round(4 * tokens * shape.vocab)


# --- the estimate -------------------------------------------------------------------

@dataclass
class Estimate:
    total_bytes: int  # predicted torch.cuda.max_memory_allocated over training steps
    breakdown: dict[str, int]  # component -> bytes at the peak; sums to total_bytes
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES  # outside total_bytes
    host_bytes: dict[str, int] = field(default_factory=dict)  # offloaded checkpoints, paged states
    phase: str = ""  # the step phase at which the peak falls
    seq_len: int = 0
    notes: list[str] = field(default_factory=list)
    keep_layers: int = 0  # layers whose activations are kept (after speed_budget auto)
    kept_layer_bytes: int = 0  # what one kept layer saves (0 without checkpointing)

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": int(self.total_bytes), "breakdown": {k: int(v) for k, v in self.breakdown.items()},
                "cuda_context_bytes": int(self.cuda_context_bytes), "host_bytes": dict(self.host_bytes),
                "phase": self.phase, "seq_len": self.seq_len, "notes": list(self.notes),
                "keep_layers": self.keep_layers, "kept_layer_bytes": int(self.kept_layer_bytes)}


def effective_seq_len(cfg: RunConfig, shape: ModelShape) -> int:
    """cfg.seq_len capped at the model's max_position_embeddings, times rope_factor with rope_scaling
    (as memtune.data does with the built model's limit)."""
    limit = cfg.position_limit(shape.max_positions)
    return min(cfg.seq_len, limit) if limit else cfg.seq_len


def estimate_memory(cfg: RunConfig, model_config: dict | None = None, device: str = "cuda") -> Estimate:
    """Predicted peak memory of `memtune train` with `cfg`, by component.

    device "cuda": torch.cuda.max_memory_allocated; "cpu": the peak of live tensor bytes
    that memtune.measure.TensorMemoryTracker counts (no CUDA workspace or context there)."""
    if model_config is None:
        model_config = load_model_config(cfg.model)
    shape = model_shape(model_config, source=f"model '{cfg.model}'")
    return estimate_for_shape(cfg, shape, device)


def estimate_for_shape(cfg: RunConfig, shape: ModelShape, device: str = "cuda") -> Estimate:
    """The estimate for known shapes; device "cpu" models the CPU kernels and allocations."""
    token = _ALLOCATION_ROUND.set(ALLOCATOR_ROUND if device == "cuda" else 1)
    try:
        return _estimate_for_shape(cfg, shape, device)
    finally:
        _ALLOCATION_ROUND.reset(token)


def _estimate_for_shape(cfg: RunConfig, shape: ModelShape, device: str) -> Estimate:
    speed_note = None
    if cfg.speed_budget == "auto":  # what train runs: keep_layers chosen under the --gpu-memory cap
        if cfg.gpu_memory:
            cfg, speed_note = resolve_speed_budget(cfg, shape, parse_memory_size(cfg.gpu_memory), device,
                                                   include_context=False, label=f"--gpu-memory {cfg.gpu_memory}")
        else:
            cfg = dataclasses.replace(cfg, speed_budget="off")
            speed_note = "speed_budget auto: no --gpu-memory given here; train takes the card's size (keep_layers 0 shown)"
    seq = effective_seq_len(cfg, shape)
    # batch auto fills seq_len tokens; the estimate assumes full-length sequences, so one.
    cfg = cfg.replace(batch_size=cfg.resolved_batch_size(seq))
    c = _DTYPE_BYTES[cfg.compute_dtype]
    tokens = cfg.batch_size * seq
    notes = []
    if seq < cfg.seq_len:
        notes.append(f"seq_len capped at max_position_embeddings = {seq}" if not cfg.rope_scaling else
                     f"seq_len capped at max_position_embeddings x rope_factor = {seq}")

    # persistent: weights, adapters, optimizer states (exist from the second step on)
    persistent = _weights(shape, cfg, c)
    host = {}
    if cfg.embeddings_on_host and not shape.tie_embeddings and device == "cuda":
        host["embeddings"] = persistent.pop("embeddings")  # memtune.kernels.host_embedding
    tensors, param_bytes = trainable_tensors(shape, cfg)
    if cfg.lora:
        persistent["lora_params"] = gradient_bytes(tensors, param_bytes)
    states, paged = optimizer_state_bytes(tensors, param_bytes, cfg.optimizer)
    persistent["optimizer_states"] = states
    persistent["cuda_workspace"] = CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0
    persistent["inputs"] = _round(tokens * 8) * 2 + (_round(tokens * 8) if cfg.packing else 0)  # int64 ids, labels
    grads = gradient_bytes(tensors, param_bytes)
    kept = kept_layer_count(cfg, shape)

    act = _activation_phases(shape, cfg, c, seq, tokens, device)
    # LoRA gradients arrive layer by layer during backward: at the last layer's backward
    # (where the checkpoints, larger than any layer's adapters, are all still held) only that
    # layer's exist, at the first recomputed layer below the kept ones kept + 1 layers', and none
    # at the loss. Full fine-tuning gradients only matter at the end of backward (own phase below).
    layers_with_grads = {"backward_last_layer": 1, "backward_recomputed": kept + 1}
    phases: dict[str, dict[str, int]] = {}
    for name, parts in act.items():
        phase_grads = grads * layers_with_grads[name] // shape.layers if (cfg.lora and name in layers_with_grads) else 0
        phases[name] = {**persistent, **parts, "gradients": phase_grads}
    phases["end_of_backward"] = {**persistent, "gradients": grads, "rope_cache": act["forward_loss"]["rope_cache"]}
    phases["optimizer_step"] = {**persistent, "gradients": grads}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    breakdown = {k: int(v) for k, v in phases[phase].items() if v}
    if paged:
        host["paged_optimizer_states"] = paged
    checkpointed = shape.layers - kept  # the kept layers put nothing on the host
    if cfg.offloads_checkpoints and checkpointed:
        host["offloaded_checkpoints"] = checkpointed * _round(tokens * shape.hidden * residual_bytes(cfg, c))
    if keeps_attention(cfg, shape) and checkpointed:
        host["saved_attention"] = checkpointed * saved_attention_bytes(shape, tokens, c)
    kept_one = (tokens * sum(kept_layer_saved_per_token(shape, cfg, c, seq, device).values())
                if cfg.gradient_checkpointing else 0)
    if speed_note:
        notes.append(speed_note)
    if kept:
        notes.append(f"keep_layers {kept}: the last {kept} of {shape.layers} layers keep their activations, "
                     f"{gib(kept_one)} each (not recomputed)")
    elif cfg.gradient_checkpointing:
        notes.append(f"a layer kept from recomputation would add about {gib(kept_one)} (--keep-layers N, or "
                     f"--speed-budget auto with --gpu-memory)")
    return Estimate(total_bytes=sum(breakdown.values()), breakdown=breakdown, host_bytes=host,
                    cuda_context_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,
                    phase=phase, seq_len=seq, notes=notes, keep_layers=kept, kept_layer_bytes=kept_one)


def most_kept_layers(cfg: RunConfig, shape: ModelShape, budget_bytes: int, device: str = "cuda",
                     include_context: bool = True, margin: float = SPEED_BUDGET_MARGIN) -> tuple[int, Estimate]:
    """The largest keep_layers whose predicted peak (plus the CUDA context, when the budget is the
    whole card) is within (1 - margin) x budget_bytes, and its estimate; 0 (the lean path) when
    even that does not fit. The peak grows with every kept layer, so this bisects."""
    usable = budget_bytes * (1 - margin)
    base = dataclasses.replace(cfg, speed_budget="off")

    def estimate(k: int) -> Estimate:
        return estimate_for_shape(dataclasses.replace(base, keep_layers=k), shape, device)

    def needed(est: Estimate) -> int:
        return est.total_bytes + (est.cuda_context_bytes if include_context else 0)

    lo, lo_est = 0, estimate(0)
    if not cfg.gradient_checkpointing or needed(lo_est) > usable:
        return 0, lo_est
    hi = shape.layers + 1  # lo fits; every k >= hi does not (hi = layers + 1: not known yet)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        est = estimate(mid)
        if needed(est) <= usable:
            lo, lo_est = mid, est
        else:
            hi = mid
    return lo, lo_est


def resolve_speed_budget(cfg: RunConfig, shape: ModelShape, budget_bytes: int, device: str = "cuda",
                         include_context: bool = True, label: str = "the budget") -> tuple[RunConfig, str]:
    """speed_budget auto turned into keep_layers (most_kept_layers) and speed_budget off, with one line
    saying what was chosen; another speed_budget is returned as it is."""
    if cfg.speed_budget != "auto":
        return cfg, ""
    if not cfg.gradient_checkpointing:
        return (dataclasses.replace(cfg, speed_budget="off"),
                "speed_budget auto: gradient checkpointing is off, every layer keeps its activations already")
    kept, est = most_kept_layers(cfg, shape, budget_bytes, device, include_context)
    usable = f"{gib(budget_bytes * (1 - SPEED_BUDGET_MARGIN))} (90% of {label})"
    peak = est.total_bytes + (est.cuda_context_bytes if include_context else 0)
    if kept:
        line = (f"speed_budget auto: keep_layers {kept} of {shape.layers} (their activations kept, not recomputed): "
                f"predicted {gib(peak)} within {usable}")
    else:
        line = f"speed_budget auto: keep_layers 0, the lean path is predicted at {gib(peak)} against {usable}"
    return dataclasses.replace(cfg, keep_layers=kept, speed_budget="off"), line


def residual_bytes(cfg: RunConfig, dtype_bytes: int) -> int:
    """Bytes per element of the residual stream: the layer inputs and outputs, the rotary cos/sin.

    With residual_dtype fp32 only these grow: the norms hand the matmuls their output in the
    compute dtype, so a layer's saved tensors stay as they were (measured on CPU: 4742 against
    4614 bytes a token for one tiny layer, the difference being the fp32 cos/sin)."""
    return 4 if cfg.residual_dtype == "fp32" else dtype_bytes


def saved_attention_bytes(shape: ModelShape, tokens: int, c: int) -> int:
    """One layer's attention kept from the forward (kernels/saved_attention.py): its output
    [tokens, heads x head_dim] in the dtype and its fp32 log-sum-exp per head and token."""
    return _round(tokens * shape.q_dim * c) + _round(tokens * shape.heads * 4)


def _weights(shape: ModelShape, cfg: RunConfig, c: int) -> dict[str, int]:
    weights, constants = decoder_linear_weight_bytes(shape, cfg.quantization, cfg.double_quant, c)
    parts = {"decoder_weights": weights, "quant_constants": constants}
    parts.update(unquantized_weight_bytes(shape, c))
    return parts


def sliding_window_mask_bytes(shape: ModelShape, cfg: RunConfig, seq: int, device: str) -> int:
    """The sliding-window layers' mask, built once a forward and shared by those layers: SDPA has
    no window of its own, so transformers hands it a boolean [B, 1, L, L] mask (1 byte an entry)
    when the window is shorter than the sequence; the full-attention layers pass is_causal and no
    mask. flex_attention (Gemma 2 on CUDA) takes a block mask instead: a few bytes per block."""
    if shape.sliding_window is None or shape.sliding_window >= seq:
        return 0
    if shape.attention_softcap is not None and not runs_eager_attention(cfg, shape, device):
        return 0  # flex_attention
    return _round(cfg.batch_size * seq * seq)


def _activation_phases(shape: ModelShape, cfg: RunConfig, c: int, seq: int, tokens: int,
                       device: str) -> dict[str, dict[str, int]]:
    """Activation memory at the candidate peaks: forward + loss, the last layer's backward, the loss's
    backward, and with kept layers (keep_layers) the first recomputed layer's backward below them.

    Kept layers are the last ones. Their activations are alive from their forward through the loss
    until their own backward, which comes first: at the end of forward and in the loss they all add
    to the checkpoints; in the last layer's backward (a kept layer) they are all still there, that
    layer's own among them, with its untiled workspace; once they are done the first recomputed
    layer meets the peak the lean path has (its phase `backward_recomputed`)."""
    kept = kept_layer_count(cfg, shape)
    checkpointed = shape.layers - kept
    kept_bytes = kept * tokens * sum(kept_layer_saved_per_token(shape, cfg, c, seq, device).values()) if kept else 0
    layer = layer_saved_per_token(shape, cfg, c, seq, device)
    per_layer = sum(layer.values())
    layer_bytes = tokens * per_layer
    r = residual_bytes(cfg, c)
    ckpt_one = _round(tokens * shape.hidden * r)  # one layer input [B, L, H]
    rope = 2 * _round(tokens * shape.head_dim * r)  # cos and sin [B, L, head_dim], shared by all layers
    final_norm = _round(tokens * rmsnorm_saved_per_token(shape.hidden, not cfg.lora, c, fuses_elementwise(cfg, device)))
    hidden_out = _round(tokens * shape.hidden * c)  # last_hidden_state (the final norm's output)

    if cfg.offloads_checkpoints:
        # the layer being recomputed and the one being prefetched
        stored = {"checkpoints": 2 * ckpt_one if checkpointed else 0}
        current_layer = layer_bytes
    elif cfg.gradient_checkpointing:
        stored = {"checkpoints": checkpointed * ckpt_one}
        current_layer = layer_bytes
    else:
        stored = {"layer_activations": shape.layers * layer_bytes}
        current_layer = 0
    stored["rope_cache"] = rope
    masks = sliding_window_mask_bytes(shape, cfg, seq, device)
    if masks:
        stored["attention_masks"] = masks

    workspace = tokens * layer_backward_workspace_per_token(shape, c)
    if tiles_mlp(cfg, seq):
        chunk = cfg.tiled_mlp_chunk * cfg.batch_size
        workspace = tokens * c * 2 * shape.hidden + chunk * (
            mlp_chunk_saved_per_token(shape, cfg, c, device) + 3 * c * shape.intermediate)
        workspace += tokens * c * shape.hidden  # the tiled MLP's grad_x buffer
        if not fuses_elementwise(cfg, device):
            # With the MLP's [tokens, intermediate] gradients chunked, the largest backward moment
            # becomes an RMSNorm's: its decomposed backward holds about three fp32 [tokens, hidden]
            # temporaries (the fp32 grad, its product with rsqrt, the pow backward). Measured: the
            # offloaded + tiled 1.5B runs at 65536 / 131072 tokens held 18-21 KB a token above the
            # terms before this one (benchmarks/results/estimate-vs-measured-h200.md).
            workspace += tokens * 3 * 4 * shape.hidden
        else:
            # the compiled RMSNorm's backward still makes one fp32 [tokens, hidden] temporary: the
            # fused + tiled rows at 65536 / 131072 tokens held 2-5 KB a token above the terms before
            workspace += tokens * 4 * shape.hidden
    workspace += dequantized_weight_bytes(shape, cfg, c)
    workspace += dequantized_once_extra_bytes(shape, cfg, c, seq)
    workspace += int8_matmul_workspace_bytes(shape, cfg, tokens, device)

    lm_tokens = cfg.batch_size * max(seq - 1, 1)
    if cfg.loss == "chunked":
        loss = chunked_loss_bytes(shape, lm_tokens, cfg, c, device)
        loss_peak = loss["grad_hidden"] + loss["chunk"]
        loss_after = loss["grad_hidden"] * 2  # backward scales grad_hidden into a new tensor
        if cfg.batch_size > 1:
            loss_peak += _round(lm_tokens * shape.hidden * c)  # hidden[:, :-1] copy
        if not cfg.lora:
            # trainable lm_head: fp32 grad_weight [V, H] kept + one [V, H] chunk product in the dtype
            loss_peak += _round(shape.vocab * shape.hidden * 4) + _round(shape.vocab * shape.hidden * c)
            loss_after += _round(shape.vocab * shape.hidden * 4) + _round(shape.vocab * shape.hidden * (4 + c))
    else:
        loss_peak = full_loss_bytes(shape, tokens, c)
        loss_after = _round(tokens * shape.hidden * c) * 2
    stored_outside_backward = {**stored,
                               "dequantize_graph_buffer": dequantize_graph_buffer_bytes(shape, cfg, c, device)}
    kept_part = {"kept_layer_activations": kept_bytes} if kept else {}
    forward_loss = {**stored_outside_backward, **kept_part, "final_norm": final_norm + hidden_out,
                    "logits_and_loss": loss_peak}
    backward = {**stored, "layer_activations": stored.get("layer_activations", 0) + current_layer,
                "backward_workspace": workspace, "logits_and_loss": 0}
    if cfg.gradient_checkpointing:
        backward["checkpoints"] = stored["checkpoints"]
    if keeps_attention(cfg, shape):  # the layer being recomputed and the one being prefetched, as for checkpoints
        backward["saved_attention"] = 2 * saved_attention_bytes(shape, tokens, c)
    loss_backward = {**stored_outside_backward, **kept_part, "final_norm": final_norm + hidden_out,
                     "logits_and_loss": loss_after}
    if not kept:
        return {"forward_loss": forward_loss, "backward_last_layer": backward, "loss_backward": loss_backward}
    # the last layer is a kept one: nothing recomputed, the last checkpointed layer's input (and its
    # saved attention) prefetched meanwhile
    kept_backward = {**stored, **kept_part, "logits_and_loss": 0,
                     "backward_workspace": kept_layer_backward_workspace(shape, cfg, c, tokens, device)}
    if keeps_attention(cfg, shape) and checkpointed:
        kept_backward["saved_attention"] = saved_attention_bytes(shape, tokens, c)
    phases = {"forward_loss": forward_loss, "backward_last_layer": kept_backward, "loss_backward": loss_backward}
    if checkpointed:
        phases["backward_recomputed"] = backward
    return phases


# --- reporting --------------------------------------------------------------------------

def gib(num_bytes: float | None) -> str:
    """Bytes as 'x.xx GiB' ('n/a' for None): the one formatter of the CLI's lines."""
    return "n/a" if num_bytes is None else f"{num_bytes / GIB:.2f} GiB"


def format_estimate(estimate: Estimate, cfg: RunConfig) -> str:
    lines = [f"predicted peak allocated: {gib(estimate.total_bytes)}  ({estimate.total_bytes:,d} bytes)",
             f"  model {cfg.model}, seq_len {estimate.seq_len}, batch {cfg.batch_size or 'auto (1)'}, quantization "
             f"{cfg.quantization}, {'LoRA r=' + str(cfg.lora_rank) if cfg.lora else 'full fine-tuning'}, "
             f"checkpointing {'offloaded' if cfg.offloads_checkpoints else 'on' if cfg.gradient_checkpointing else 'off'}, "
             f"loss {cfg.loss}, peak at {estimate.phase.replace('_', ' ')}",
             ""]
    width = max(len(k) for k in estimate.breakdown) if estimate.breakdown else 10
    for name, nbytes in sorted(estimate.breakdown.items(), key=lambda kv: -kv[1]):
        share = 100 * nbytes / estimate.total_bytes if estimate.total_bytes else 0
        lines.append(f"  {name:<{width}}  {gib(nbytes):>11}  {share:5.1f}%")
    lines.append("")
    lines.append(f"  + CUDA context (not in the peak): {gib(estimate.cuda_context_bytes)}")
    for name, nbytes in estimate.host_bytes.items():
        lines.append(f"  host memory, {name.replace('_', ' ')}: {gib(nbytes)}")
    lines += [f"  note: {n}" for n in estimate.notes]
    return "\n".join(lines)


def _summary(row: dict[str, Any]) -> str:
    cfg = row.get("config") or {}
    bits = [str(cfg.get("model", "?")), f"L={row.get('seq_len') or cfg.get('seq_len', '?')}",
            f"q={cfg.get('quantization', '?')}"]
    if cfg.get("lora", True):
        bits.append(f"r={cfg.get('lora_rank', '?')}")
        targets = cfg.get("lora_targets", "default")
        if targets not in (None, "default"):
            names = [targets] if isinstance(targets, str) else [t.removesuffix("_proj") for t in targets]
            bits.append("lora=" + ",".join(names))
    else:
        bits.append("full")
    ckpt = cfg.get("gradient_checkpointing", True)
    bits.append("ckpt" if ckpt else "no-ckpt")
    if ckpt and cfg.get("offload_activations"):
        bits.append("offload")
        if cfg.get("save_attention"):
            bits.append("saved-attn")
    if cfg.get("tiled_mlp_chunk"):
        bits.append(f"tiled{cfg['tiled_mlp_chunk']}")
    if cfg.get("embeddings_on_host"):
        bits.append("host-emb")
    if cfg.get("fuse_elementwise"):
        bits.append("fused")
    if cfg.get("fuse_rope"):
        bits.append("fused-rope")
    if cfg.get("compile_static_shapes"):
        bits.append("static-shapes")
    if cfg.get("lora", True) and cfg.get("lora_matmul") == "compute":
        bits.append("bf16-lora")
    if cfg.get("dequantize_once"):
        bits.append("dq-once")
        if cfg.get("dequantize_graph"):
            bits.append("dq-graph")
    if cfg.get("residual_dtype") == "fp32":
        bits.append("fp32-residual")
    if cfg.get("fuse_loss"):
        bits.append("triton-loss" if cfg.get("loss_kernel") == "triton" else "fused-loss")
    if cfg.get("loss_chunk_tokens") not in (None, 4096):
        bits.append(f"loss-chunk{cfg['loss_chunk_tokens']}")
    if cfg.get("loss") == "full":
        bits.append("full-loss")
    if cfg.get("batch_size", 1) != 1:
        bits.append(f"b={cfg['batch_size']}")
    return " ".join(bits)


def compare_to_measurements(rows: Iterable[dict[str, Any]]) -> str:
    """A markdown table of measured vs estimated peak allocated memory, one line per run.

    Each row: {"config": RunConfig dict, "measured_bytes": int, "estimated_bytes": int (optional: computed
    from the config when absent), "seq_len": effective length (optional), "status": optional}.
    """
    lines = ["| run | measured | estimated | error |", "|---|---:|---:|---:|"]
    errors = []
    for row in rows:
        measured = row.get("measured_bytes")
        estimated = row.get("estimated_bytes")
        if row.get("config"):
            from memtune.config import from_stored_dict

            cfg = from_stored_dict(dict(row["config"]))
            if row.get("seq_len"):
                cfg = cfg.replace(seq_len=int(row["seq_len"]))
            row = {**row, "config": cfg.to_dict()}  # the summary shows what ran, defaults included
            if estimated is None:
                estimated = estimate_memory(cfg).total_bytes
        if not measured:
            lines.append(f"| {_summary(row)} | {row.get('status', 'n/a')} | {gib(estimated or 0)} | n/a |")
            continue
        err = 100 * (estimated - measured) / measured
        errors.append(abs(err))
        lines.append(f"| {_summary(row)} | {gib(measured)} | {gib(estimated)} | {err:+.1f}% |")
    if errors:
        lines.append("")
        lines.append(f"{len(errors)} runs; mean |error| {sum(errors) / len(errors):.1f}%, max |error| "
                     f"{max(errors):.1f}%; within 5%: {sum(e <= 5 for e in errors)}, within 10%: "
                     f"{sum(e <= 10 for e in errors)}")
    return "\n".join(lines)


from memtune._callable_module import make_callable  # noqa: E402 - memtune.estimate(...) is the API function

make_callable(__name__)
