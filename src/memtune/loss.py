"""The training loss: next-token cross-entropy that never builds the [tokens, vocab] logits.

Two callers share one path:
- `memtune train`'s step calls `forward_loss` with the batch (and its host copy, which feeds an
  embedding table kept in host memory and tells the loss which tokens count without a sync);
- a model given to a Hugging Face `Trainer` (or any loop calling `model(input_ids, labels=...)`)
  gets `install_chunked_loss_forward`: in training mode with labels, its forward returns this
  loss and no logits.

Both end in `lm_loss`: the decoder's hidden states, shifted by one, against the labels, through
`chunked_linear_cross_entropy` a chunk of tokens at a time (10 GB of fp32 logits for 16k tokens
and a 152k vocabulary never exist).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from memtune.config import RunConfig
from memtune.kernels._common import base_model, restore_forward, swap_forward

_ATTR = "_memtune_chunked_loss"


@functools.cache  # asked at every training step by the loss: a Triton import and a capability query
def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile's GPU kernels cannot be used on `device`, or None when they can."""
    if device.type != "cuda":
        return "torch.compile's kernels are used on CUDA GPUs only"
    try:
        import triton  # noqa: F401 - torch.compile's GPU code generator
    except ImportError:
        return "Triton is not installed"
    if torch.cuda.get_device_capability(device) < (7, 0):
        return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


def loss_chunk_kernel(cfg: RunConfig, device: torch.device) -> bool | str:
    """chunked_linear_cross_entropy's `fused`: the kernel each loss chunk runs (False = unfused)."""
    if not cfg.fuse_loss or compile_unavailable_reason(device) is not None:
        return False
    return "triton" if cfg.loss_kernel == "triton" else True


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The model's lm_head when the chunked loss can run over it: a plain nn.Linear
    (a LoRA-wrapped or quantized lm_head has no plain weight to chunk over)."""
    head = base_model(model).get_output_embeddings()
    return head if type(head) is nn.Linear else None


def lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, cfg: RunConfig,
            host_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of the decoder's `hidden` [B, L, H] against `labels` [B, L] (position t predicts t+1)."""
    from memtune.kernels import chunked_linear_cross_entropy

    head = chunkable_head(model)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    return chunked_linear_cross_entropy(hidden, head.weight, labels, bias=head.bias,
                                        chunk_tokens=cfg.loss_chunk_tokens,
                                        fused=loss_chunk_kernel(cfg, hidden.device),
                                        host_labels=None if host_labels is None else host_labels[:, 1:],
                                        static_full_chunks=cfg.compile_static_shapes,
                                        **_softcap_kwargs(model))


def _softcap_kwargs(model: nn.Module) -> dict[str, Any]:
    """The final-logit softcap of the model's family (Gemma 2), where the loss kernel takes one."""
    from memtune.families import final_logit_softcap

    cap = final_logit_softcap(base_model(model).config)
    return {"softcap": cap} if cap else {}


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig,
                 host_batch: dict[str, torch.Tensor] | None = None,
                 host_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss over the unmasked labels.

    `chunked` runs the decoder, then the lm_head and cross-entropy a chunk of
    tokens at a time, so the [tokens, vocab] logits never exist. `host_batch`:
    the same batch still on the host: its token ids feed an embedding table kept
    there, its labels tell the loss which tokens count, both without waiting for
    the GPU. `host_embeds`: that lookup, done already (memtune.batch_feed).
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


def _forward_loss(model: nn.Module, inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                  cfg: RunConfig, host_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if cfg.loss == "full" or chunkable_head(model) is None:
        return _model_loss(model, inputs, batch["labels"])
    hidden = base_model(model).get_decoder()(**inputs, use_cache=False).last_hidden_state
    return lm_loss(model, hidden, batch["labels"], cfg, host_labels=host_batch.get("labels"))


def _model_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The model's own loss (full logits), past a chunked-loss forward installed on it."""
    lm = base_model(model)
    info = lm.__dict__.get(_ATTR)
    if info is not None:  # installed: call the forward it replaced, which builds the logits
        return info["original"](**inputs, labels=labels, use_cache=False).loss
    return model(**inputs, labels=labels, use_cache=False).loss


# --- the model's own forward, for Trainer / TRL -------------------------------------------------

def install_chunked_loss_forward(model: nn.Module, cfg: RunConfig) -> str | None:
    """Give the causal LM instance under `model` a forward that, in training mode with labels and
    gradients on, returns memtune's chunked loss and no logits; anything else (eval, generation,
    no labels) runs the model's own forward. Returns why it cannot be installed, or None."""
    reason = chunked_loss_skip_reason(model)
    if reason is None:
        swap_forward(base_model(model), _ATTR, lambda module, original: _chunked_loss_forward(module, original, cfg))
    return reason


def chunked_loss_skip_reason(model: nn.Module) -> str | None:
    """Why the chunked loss cannot serve `model`, or None when it can."""
    lm = base_model(model)
    if chunkable_head(lm) is None:
        return f"the lm_head is {type(lm.get_output_embeddings()).__name__}, not a plain nn.Linear to chunk over"
    if not callable(getattr(lm, "get_decoder", None)):
        return f"{type(lm).__name__} has no get_decoder()"
    return None


def remove_chunked_loss_forward(model: nn.Module) -> int:
    return int(restore_forward(base_model(model), _ATTR) is not None)


_DECODER_KWARGS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def _chunked_loss_forward(lm: nn.Module, original, cfg: RunConfig):
    # the original's signature shows through (inspect follows __wrapped__): Trainer keeps the dataset
    # columns the forward names, and passes num_items_in_batch to a forward taking **kwargs
    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        labels = kwargs.get("labels")
        if args or labels is None or not lm.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        decoder_kwargs = {k: kwargs.pop(k) for k in _DECODER_KWARGS if kwargs.get(k) is not None}
        for unused in ("use_cache", "return_dict", "logits_to_keep", "past_key_values", "cache", "cache_position"):
            kwargs.pop(unused, None)
        hidden = lm.get_decoder()(**decoder_kwargs, use_cache=False, **kwargs).last_hidden_state
        loss = lm_loss(lm, hidden, labels, cfg)
        if num_items is not None:
            # Trainer's gradient-accumulation convention: the sum over this micro-batch's labelled
            # tokens divided by the labelled tokens of the whole accumulated step
            valid = (labels[:, 1:] != -100).sum()
            loss = loss * valid / torch.as_tensor(num_items, device=loss.device)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    return forward
