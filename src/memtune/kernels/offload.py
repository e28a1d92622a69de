"""Per-decoder-layer gradient checkpointing with the checkpoints kept in pinned host memory.

Plain gradient checkpointing keeps one [tokens, hidden] tensor per layer on
the GPU: for the 1.5B shape (hidden 1536, 28 layers, bf16) that is
28 x 3 KiB = 84 KiB per token, 1.4 GB at 16k tokens and 11.3 GB at 131k.
Here each layer's input is copied to pinned host memory on a side CUDA
stream while the next layers compute, and copied back (again on the side
stream, one layer ahead of use) during backward, where the layer is
recomputed from it. GPU activation memory then no longer grows with depth:
at any time at most about two layer inputs are resident (the one being
recomputed and the one being prefetched).

How it hooks in: each decoder layer *instance* gets its own `forward`
(the class is never patched). Training with gradients goes through
`_OffloadedCheckpoint`, a custom autograd Function whose forward runs the
layer under no_grad and whose backward fetches the input, recomputes the
layer with the same RNG and autocast state, and backpropagates through it.
The layer's trainable parameters (LoRA) and any other tensor argument that
requires grad are inputs of the Function, so their gradients flow even when
the hidden states themselves do not require grad (frozen embeddings, no
`enable_input_require_grads` needed). Without grad mode (eval, generation)
or outside training mode the original forward runs untouched, KV cache
included.

On devices other than CUDA the "host copy" is the tensor itself (no copy),
so the recompute path runs and is testable on a CPU.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtune.kernels._common import (RngState, autocast_state, decoder_layers, outputs_discarded, replay_autocast,
                                     restore_forward, trainable_params)

__all__ = ["enable_offloaded_checkpointing", "disable_offloaded_checkpointing", "is_offloaded_checkpointing"]

_ATTR = "_memtune_offload"
# Keyword arguments that carry a KV cache: a checkpointed training forward must
# not write to one (the recompute would write a second time).
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")

_SIDE_STREAMS: dict[int, Any] = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


class _HostCopy:
    """One layer input, parked on the host until its layer's backward."""

    __slots__ = ("host", "device", "copied", "prefetched", "prefetch_done", "prev", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor, prev: "_HostCopy | None"):
        self.device = tensor.device
        self.prev = prev  # the previous layer's copy in the same forward pass: prefetched during our backward
        self.prefetched = None
        self.prefetch_done = None
        self.copied = None
        if tensor.device.type == "cuda":
            side = _side_stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is ready
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                self.host.copy_(tensor, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(side)
            tensor.record_stream(side)  # the allocator keeps the GPU block until the copy has read it
            self.version = None
        else:
            self.host = tensor.detach()  # no offload off CUDA: keep the tensor itself
            self.version = tensor._version

    def prefetch(self) -> None:
        """Start the host-to-device copy on the side stream (no-op off CUDA or when already started)."""
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
            if self.host._version != self.version:
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


class _PassState:
    """Links the host copies of one forward pass so backward can prefetch one layer ahead."""

    def __init__(self) -> None:
        self.last: "weakref.ReferenceType[_HostCopy] | None" = None
        self.last_position = -1

    def save(self, tensor: torch.Tensor, position: int) -> _HostCopy:
        prev = self.last() if self.last is not None and self.last_position < position else None
        copy = _HostCopy(tensor, prev)
        self.last, self.last_position = weakref.ref(copy), position
        return copy


class _Run:
    """Calls the original layer forward with the saved non-hidden arguments."""

    __slots__ = ("original", "flat", "spec", "grad_slots", "extra_outputs", "state", "position")

    def __call__(self, hidden: torch.Tensor, grad_tensors) -> torch.Tensor:
        flat = list(self.flat)
        for slot, tensor in zip(self.grad_slots, grad_tensors):
            flat[slot] = tensor
        args, kwargs = tree_unflatten(flat, self.spec)
        out = self.original(hidden, *args, **kwargs)
        if isinstance(out, (tuple, list)):  # layers of older transformers return (hidden, ...)
            self.extra_outputs = tuple(out[1:])
            out = out[0]
        return out


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, n_grad_tensors: int, hidden: torch.Tensor, *inputs: torch.Tensor):
        ctx.run = run
        ctx.n_grad_tensors = n_grad_tensors  # inputs = grad-requiring tensor arguments, then parameters
        ctx.params = inputs[n_grad_tensors:]
        ctx.save_for_backward(*inputs[:n_grad_tensors])
        ctx.saved = run.state.save(hidden, run.position)
        ctx.rng = RngState(hidden.device)
        ctx.autocast = autocast_state(hidden.device.type)
        with torch.no_grad():
            return run(hidden, inputs[:n_grad_tensors])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved: _HostCopy = ctx.saved
        hidden = saved.fetch()
        if saved.prev is not None:
            saved.prev.prefetch()  # overlaps with this layer's recompute and backward
        needs = ctx.needs_input_grad[2:]
        n_grad = ctx.n_grad_tensors
        x = hidden.detach().requires_grad_(needs[0])
        tensors = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs[1:1 + n_grad])]
        # only the recomputed graph is used below, never `out`'s values (outputs_discarded)
        with torch.enable_grad(), ctx.rng.replay(), replay_autocast(ctx.autocast), outputs_discarded():
            out = ctx.run(x, tensors)
        wanted = [t for t, need in zip([x, *tensors, *ctx.params], needs) if need]
        grads_iter = iter(())
        if wanted and out.requires_grad:
            grads_iter = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        del out
        grads = [next(grads_iter, None) if need else None for need in needs]
        return (None, None, *grads)


def _make_forward(layer: nn.Module, original: Callable, state: _PassState, position: int) -> Callable:
    def forward(*args: Any, **kwargs: Any):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if getattr(layer, "gradient_checkpointing", False):
            # transformers' own per-layer checkpointing was switched on again after us (e.g. by a
            # Trainer): it would recompute a second time around or inside ours; ours replaces it
            layer.gradient_checkpointing = False
        if not (torch.is_grad_enabled() and layer.training and isinstance(hidden, torch.Tensor)):
            return original(hidden, *rest, **kwargs)
        params = trainable_params(layer)
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        flat, spec = tree_flatten((rest, kwargs))
        grad_slots = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and v.requires_grad]
        if not (hidden.requires_grad or params or grad_slots):
            return original(hidden, *rest, **kwargs)  # nothing to differentiate
        run = _Run()
        run.original, run.state, run.position = original, state, position
        run.spec, run.grad_slots, run.extra_outputs = spec, grad_slots, None
        grad_tensors = [flat[i] for i in grad_slots]
        for i in grad_slots:
            flat[i] = None  # replaced by the Function's inputs at every call
        run.flat = flat
        out = _OffloadedCheckpoint.apply(run, len(grad_tensors), hidden, *grad_tensors, *params)
        extra, run.extra_outputs = run.extra_outputs, None
        return (out, *extra) if extra is not None else out

    return forward


def enable_offloaded_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer with its input kept in pinned host memory.

    Works on the instance (HF Qwen2/Qwen3/Llama decoder layers, plain or under
    peft, with LoRA and bitsandbytes 4-bit layers inside); transformers' own
    per-layer checkpointing is switched off on these layers since this replaces
    it. Idempotent. Returns the number of layers it now covers.
    """
    layers = decoder_layers(model)
    state = _PassState()
    for position, layer in enumerate(layers):
        if getattr(layer, _ATTR, None) is not None:
            continue
        had_own = "forward" in layer.__dict__
        original = layer.forward
        setattr(layer, _ATTR, {
            "had_own_forward": had_own,
            "original": original,
            "hf_flag": getattr(layer, "gradient_checkpointing", None),
        })
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
        layer.forward = _make_forward(layer, original, state, position)
    return len(layers)


def disable_offloaded_checkpointing(model: nn.Module) -> int:
    """Undo `enable_offloaded_checkpointing`; returns the number of layers restored."""
    restored = 0
    for layer in decoder_layers(model):
        info = restore_forward(layer, _ATTR)
        if info is None:
            continue
        if info["hf_flag"] is not None:
            layer.gradient_checkpointing = info["hf_flag"]
        restored += 1
    return restored


def is_offloaded_checkpointing(model: nn.Module) -> bool:
    return any(layer.__dict__.get(_ATTR) is not None for layer in decoder_layers(model))
