"""Keep a frozen input-embedding table in host memory and look tokens up there.

The embedding table is the largest frozen tensor a QLoRA run keeps in 16 bits:
vocab x hidden x 2 bytes, 0.47 GB for the 1.5B shape (151,936 x 1536) and
1.05 GB for Llama-3.1-8B (128,256 x 4096), as much as a quarter of the
weights a 4-bit model holds on the GPU. A lookup reads only the rows of the
batch's tokens, so it is cheap on the CPU: the token ids come to the host,
the rows are gathered there into pinned memory, and [tokens, hidden] (50 MB
for 16k tokens) is copied back. The GPU never holds the table.

Only a frozen table that is not tied to the lm_head moves: a tied one is
needed on the GPU by the output projection anyway. The weight is kept as a
plain attribute, not a parameter: transformers takes a model's device from
its first parameter, and that must stay the GPU for `generate` and friends.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memtune.kernels._common import base_model, restore_forward, swap_forward

__all__ = ["enable_host_embeddings", "host_embedding_weight", "host_embeddings_skip_reason", "lookup_on_host"]

_ATTR = "_memtune_host_embedding"


def host_embeddings_skip_reason(model: nn.Module, require_cuda: bool = True) -> str | None:
    """Why the input embeddings of `model` cannot live in host memory, or None when they can."""
    root = base_model(model)
    embed = root.get_input_embeddings()
    if getattr(embed, "embed_scale", None) is not None:
        # Gemma's ScaledWordEmbedding multiplies each row by sqrt(hidden_size) in its forward; the
        # host lookup gathers plain rows (memtune.families: scaled_embeddings)
        return f"the input embeddings ({type(embed).__name__}) scale their rows by sqrt(hidden_size)"
    if type(embed) is not nn.Embedding:
        return f"input embeddings are {type(embed).__name__}, not a plain nn.Embedding"
    if embed.weight.requires_grad:
        return "the input embeddings train"
    head = root.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None \
            and head.weight.data_ptr() == embed.weight.data_ptr():
        return "the input embeddings are tied to the lm_head, which needs them on the GPU"
    if require_cuda and embed.weight.device.type != "cuda":
        return "the model is not on a CUDA GPU"
    return None


def _rows_on(weight: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The table's rows for host-side `ids`, on `device`.

    For a GPU they are gathered straight into pinned memory, so the copy is a
    real asynchronous DMA queued without waiting for the GPU.
    """
    if device.type != "cuda":
        return F.embedding(ids, weight)
    rows = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=True)
    torch.index_select(weight, 0, ids.reshape(-1), out=rows)
    return rows.view(*ids.shape, weight.shape[1]).to(device, non_blocking=True)


def _make_forward(weight: torch.Tensor) -> Any:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        # ids already on the GPU must come back first, which waits for the GPU (see lookup_on_host)
        return _rows_on(weight, ids.to("cpu"), ids.device)

    return forward


def enable_host_embeddings(model: nn.Module, require_cuda: bool = True) -> str | None:
    """Move `model`'s frozen input embeddings to pinned host memory; returns the skip reason or None.

    Idempotent. The table keeps its dtype; the module's `weight` becomes the host tensor.
    require_cuda=False also moves a CPU model's table (the same code path, for testing).
    """
    root = base_model(model)
    embed = root.get_input_embeddings()
    if embed.__dict__.get(_ATTR) is not None:
        return None
    reason = host_embeddings_skip_reason(model, require_cuda)
    if reason is not None:
        return reason
    host = embed.weight.detach().to("cpu")
    if torch.cuda.is_available():
        host = host.pin_memory()
    device = embed.weight.device
    del embed._parameters["weight"]
    embed.weight = host  # a plain attribute: not a parameter, not in state_dict, not moved by .to()
    swap_forward(embed, _ATTR, lambda _module, _original: _make_forward(host), device=device)
    return None


def lookup_on_host(model: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The embeddings of token ids that are still on the host, sent to `device`; None when the table is not on the host.

    The module's own forward gets ids already on the GPU and must bring them back
    first, which waits for the GPU to finish everything queued before. Here the
    rows are gathered straight into pinned memory from ids the data loader has
    on the host anyway, and the copy is queued without waiting.
    """
    weight = host_embedding_weight(model)
    return None if weight is None else _rows_on(weight, ids.to("cpu"), device)


def host_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    """The host-held embedding table, or None when the embeddings are on the device."""
    embed = base_model(model).get_input_embeddings()
    return embed.weight if embed.__dict__.get(_ATTR) is not None else None


def disable_host_embeddings(model: nn.Module) -> bool:
    """Put the table back on its device as a frozen parameter; True when something was undone."""
    embed = base_model(model).get_input_embeddings()
    state = embed.__dict__.get(_ATTR)
    if state is None:
        return False
    host = embed.__dict__.pop("weight")
    restore_forward(embed, _ATTR)
    embed.weight = nn.Parameter(host.to(state["device"]), requires_grad=False)
    return True
