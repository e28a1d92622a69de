"""A tensor parked in pinned host memory, copied out and back on a side CUDA stream.

Used by the offloaded checkpoints (one layer input per layer) and by the saved
attention outputs beside them. The copy out starts as soon as the tensor is
ready and overlaps the next layers' compute; `prefetch` starts the copy back
one layer ahead of its use in backward, and `fetch` hands it to the compute
stream. Off CUDA there is no host to park on: the tensor itself is kept (or,
with `copy_off_cuda`, a clone, so that tests exercise the copy-and-rebuild
logic of the callers on a CPU).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HostCopy"]

_SIDE_STREAMS: dict[int, Any] = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


class HostCopy:
    """One tensor, parked on the host until its backward needs it."""

    __slots__ = ("host", "device", "copied", "prefetched", "prefetch_done", "prev", "version", "extras",
                 "__weakref__")

    def __init__(self, tensor: torch.Tensor, prev: "HostCopy | None" = None, copy_off_cuda: bool = False):
        self.device = tensor.device
        self.prev = prev  # the previous layer's copy in the same forward pass: prefetched during our backward
        self.extras: list[Any] = []  # more host copies of the same layer (objects with .prefetch()), moved together
        self.prefetched = None
        self.prefetch_done = None
        self.copied = None
        self.version = None
        if tensor.device.type == "cuda":
            side = _side_stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is ready
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                self.host.copy_(tensor, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(side)
            tensor.record_stream(side)  # the allocator keeps the GPU block until the copy has read it
        elif copy_off_cuda:
            self.host = tensor.detach().clone()
        else:
            self.host = tensor.detach()  # no offload off CUDA: keep the tensor itself
            self.version = tensor._version

    def prefetch(self) -> None:
        """Start the host-to-device copy on the side stream (no-op off CUDA or when already started)."""
        for extra in self.extras:
            extra.prefetch()
        if self.copied is None or self.prefetched is not None or self.host is None:
            return
        side = _side_stream(self.device)
        with torch.cuda.stream(side):  # ordered after our device-to-host copy on the same stream
            self.prefetched = self.host.to(self.device, non_blocking=True)
            self.prefetch_done = torch.cuda.Event()
            self.prefetch_done.record(side)

    def fetch(self) -> torch.Tensor:
        """The tensor on its device, ready for use on the current stream."""
        if self.copied is None:
            if self.version is not None and self.host._version != self.version:
                raise RuntimeError("a checkpointed layer input was modified in place before backward")
            return self.host
        main = torch.cuda.current_stream(self.device)
        if self.prefetched is not None:
            tensor, self.prefetched = self.prefetched, None
            main.wait_event(self.prefetch_done)
            tensor.record_stream(main)  # allocated on the side stream, used and freed on this one
            return tensor
        main.wait_event(self.copied)
        return self.host.to(self.device, non_blocking=True)
