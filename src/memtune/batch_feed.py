"""The next micro-batch, made ready while the GPU still works on the current one.

A training step starts with host work: the next batch from the data loader,
its copies to the GPU and, with the embedding table in host memory, the
lookup of its token rows (16384 rows of the 1.5B shape's table: 50 MB gathered
by the CPU). Done at the start of a step, the GPU waits for all of it. Done
right after the previous micro-batch's backward has been queued, it overlaps
that backward, which the GPU is still working through: a step that is bound by
the GPU (memtune's 16384-token H200 step once the dequantize graphs were in)
no longer pays for it.

The prepared batch holds its device copies and its embeddings (what the
forward would allocate first anyway); they are allocated after the backward
has been queued, when the step's activations are already released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = ["BatchFeed", "ReadyBatch"]


@dataclass
class ReadyBatch:
    host: dict[str, torch.Tensor]  # as the data loader gave it
    device: dict[str, torch.Tensor]  # the same tensors, queued to the device
    embeds: torch.Tensor | None  # input embeddings looked up in a host-held table, queued too (else None)


class BatchFeed:
    """Hands out micro-batches from `batches`, each prepared ahead by `prepare()`."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], model: nn.Module, device: torch.device):
        self.batches = batches
        self.model = model
        self.device = device
        self._ready: ReadyBatch | None = None

    def prepare(self) -> None:
        """Make the next micro-batch ready now (no-op when one is ready or the data has ended)."""
        if self._ready is not None:
            return
        from memtune.kernels import lookup_on_host

        try:
            host = next(self.batches)
        except StopIteration:
            return
        device = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        ids = host.get("input_ids")
        embeds = lookup_on_host(self.model, ids, self.device) if ids is not None else None
        self._ready = ReadyBatch(host, device, embeds)

    def take(self) -> ReadyBatch:
        """The next micro-batch (prepared now if it was not); StopIteration when the data has ended."""
        self.prepare()
        if self._ready is None:
            raise StopIteration
        ready, self._ready = self._ready, None
        return ready
