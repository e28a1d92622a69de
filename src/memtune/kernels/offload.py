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

Kept layers (`keep_layer_activations`, RunConfig.keep_layers): with memory to
spare, the last N decoder layers are not checkpointed at all. They run their
plain forward with autograd saving everything (the MLP untiled, so its
intermediates are kept rather than recomputed chunk by chunk), so their
backward recomputes nothing: a checkpointed layer costs about 4 forwards of
work (forward, recompute, backward), a kept one 3. This works on the offloaded
layers above (a mark their forward reads) and on transformers' own per-layer
checkpointing (an instance forward that keeps the layer's flag off).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtune.kernels.dequantize_graph import has_dequantize_graph
from memtune.kernels.frozen_4bit import dequantized_once
from memtune.kernels.host_copy import HostCopy
from memtune.kernels.saved_attention import (AttentionRecord, attention_module, disable_saved_attention,
                                             enable_saved_attention, recording, replaying,
                                             saved_attention_supported)
from memtune.kernels._common import (RngState, autocast_state, base_model, decoder_layers, outputs_discarded,
                                     replay_autocast, restore_forward, swap_forward, trainable_params)
from memtune.kernels.tiled_mlp import _ATTR as _TILED_MLP_ATTR

__all__ = ["enable_offloaded_checkpointing", "disable_offloaded_checkpointing", "is_offloaded_checkpointing",
           "saved_attention_skip_reason", "keep_layer_activations", "release_kept_layers", "kept_layers"]

_ATTR = "_memtune_offload"
# Keyword arguments that carry a KV cache: a checkpointed training forward must
# not write to one (the recompute would write a second time).
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")
# On a decoder layer whose activations are kept: {"swapped": whether this module gave it its own
# forward (a layer on transformers' checkpointing), ...}. An offloaded layer only carries the mark.
_KEEP_ATTR = "_memtune_keep_activations"

class _PassState:
    """Links the host copies of one forward pass so backward can prefetch one layer ahead."""

    def __init__(self, save_attention: bool = False) -> None:
        self.last: "weakref.ReferenceType[HostCopy] | None" = None
        self.last_position = -1
        self.save_attention = save_attention  # keep attention from the forward (kernels/saved_attention.py)

    def save(self, tensor: torch.Tensor, position: int) -> HostCopy:
        prev = self.last() if self.last is not None and self.last_position < position else None
        copy = HostCopy(tensor, prev)
        self.last, self.last_position = weakref.ref(copy), position
        return copy


class _Run:
    """Calls the original layer forward with the saved non-hidden arguments."""

    __slots__ = ("original", "layer", "flat", "spec", "grad_slots", "extra_outputs", "state", "position")

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
        ctx.attention = None
        record_attention = contextlib.nullcontext()
        if run.state.save_attention:
            ctx.attention = AttentionRecord()
            ctx.saved.extras.append(ctx.attention)  # moved back together with the layer input
            record_attention = recording(ctx.attention, run.layer)
        # with a dequantize graph the layer's frozen 4-bit weights are written by one replay for
        # the whole pass; without, each is dequantized where it is used, holding one at a time
        weights = dequantized_once(run.layer) if has_dequantize_graph(run.layer) else contextlib.nullcontext()
        with torch.no_grad(), record_attention, weights:
            return run(hidden, inputs[:n_grad_tensors])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved: HostCopy = ctx.saved
        hidden = saved.fetch()
        if saved.prev is not None:
            saved.prev.prefetch()  # overlaps with this layer's recompute and backward
        needs = ctx.needs_input_grad[2:]
        n_grad = ctx.n_grad_tensors
        x = hidden.detach().requires_grad_(needs[0])
        tensors = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs[1:1 + n_grad])]
        wanted = [t for t, need in zip([x, *tensors, *ctx.params], needs) if need]
        grads_iter = iter(())
        # frozen 4-bit weights on the short path: dequantized once for the recompute and the gradients
        with dequantized_once(ctx.run.layer):
            # only the recomputed graph is used below, never `out`'s values (outputs_discarded)
            with torch.enable_grad(), ctx.rng.replay(), replay_autocast(ctx.autocast), outputs_discarded(ctx.run.layer), \
                    replaying(ctx.attention, ctx.run.layer):
                out = ctx.run(x, tensors)
            if wanted and out.requires_grad:
                grads_iter = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
            del out
        if ctx.attention is not None:
            # the autograd graph (and this ctx) lives until the whole backward ends: let go of the
            # layer's attention tensors now, or every layer's would pile up on the GPU
            ctx.attention.release()
            saved.extras.clear()
            ctx.attention = None
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
        if layer.__dict__.get(_KEEP_ATTR) is not None:
            out = _kept_call(layer, original, (hidden, *rest), kwargs)
            _prefetch_when_backward_starts(out, state, position)
            return out
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
        run.original, run.layer, run.state, run.position = original, layer, state, position
        run.spec, run.grad_slots, run.extra_outputs = spec, grad_slots, None
        grad_tensors = [flat[i] for i in grad_slots]
        for i in grad_slots:
            flat[i] = None  # replaced by the Function's inputs at every call
        run.flat = flat
        out = _OffloadedCheckpoint.apply(run, len(grad_tensors), hidden, *grad_tensors, *params)
        extra, run.extra_outputs = run.extra_outputs, None
        return (out, *extra) if extra is not None else out

    return forward


def enable_offloaded_checkpointing(model: nn.Module, save_attention: bool = False) -> int:
    """Checkpoint every decoder layer with its input kept in pinned host memory.

    Works on the instance (HF Qwen2/Qwen3/Llama decoder layers, plain or under
    peft, with LoRA and bitsandbytes 4-bit layers inside); transformers' own
    per-layer checkpointing is switched off on these layers since this replaces
    it. save_attention: keep each layer's attention output beside its input
    so the recompute skips attention (`saved_attention_skip_reason` says when
    that cannot be done; then layers recompute it). Idempotent for layers
    already covered. Returns the number of layers it now covers.
    """
    layers = decoder_layers(model)
    state = _PassState(save_attention and saved_attention_skip_reason(model) is None)
    if state.save_attention:
        enable_saved_attention(layers)  # idle hooks on the attention modules, active only in record/replay
    for position, layer in enumerate(layers):
        if getattr(layer, _ATTR, None) is not None:
            continue
        swap_forward(layer, _ATTR, lambda l, original, position=position: _make_forward(l, original, state, position),
                     hf_flag=getattr(layer, "gradient_checkpointing", None))
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
    return len(layers)


def saved_attention_skip_reason(model: nn.Module) -> str | None:
    """Why attention cannot be kept from the forward for `model` (None: it can)."""
    implementation = getattr(getattr(base_model(model), "config", None), "_attn_implementation", None)
    if implementation != "sdpa":
        return f"the model's attention is {implementation!r}, not 'sdpa'"
    if not saved_attention_supported():
        return "this torch cannot differentiate from a saved graph edge"
    if any(attention_module(layer) is None for layer in decoder_layers(model)):
        return "a decoder layer has no self_attn module"
    return None


def disable_offloaded_checkpointing(model: nn.Module) -> int:
    """Undo `enable_offloaded_checkpointing` (and `keep_layer_activations`); returns the number of layers restored."""
    restored = 0
    release_kept_layers(model)
    layers = decoder_layers(model)
    disable_saved_attention(layers)
    for layer in layers:
        info = restore_forward(layer, _ATTR)
        if info is None:
            continue
        if info["hf_flag"] is not None:
            layer.gradient_checkpointing = info["hf_flag"]
        restored += 1
    return restored


def is_offloaded_checkpointing(model: nn.Module) -> bool:
    return any(layer.__dict__.get(_ATTR) is not None for layer in decoder_layers(model))


# --- kept layers: activations saved, nothing recomputed ----------------------------------------

@contextlib.contextmanager
def _untiled_mlp(layer: nn.Module):
    """The layer's MLP runs whole for the duration (not kernels/tiled_mlp.py's chunks): a kept layer
    saves the MLP's intermediates; tiled, its backward would run the MLP forward again, chunk by chunk."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    info = mlp.__dict__.get(_TILED_MLP_ATTR) if isinstance(mlp, nn.Module) else None
    if info is None or "forward" not in mlp.__dict__:
        yield
        return
    tiled, mlp.forward = mlp.__dict__["forward"], info["original"]
    try:
        yield
    finally:
        mlp.forward = tiled


def _kept_call(layer: nn.Module, original: Callable, args: tuple, kwargs: dict):
    """The layer's plain forward under autograd: every tensor its backward needs is saved.

    With a dequantize graph the frozen 4-bit weights are written by one replay for this forward
    (the shared buffer is valid for this pass only, and the short path saves no weight: its
    backward, outside any scope, dequantizes each weight again where it is used)."""
    weights = dequantized_once(layer) if has_dequantize_graph(layer) else contextlib.nullcontext()
    with _untiled_mlp(layer), weights:
        return original(*args, **kwargs)


def _prefetch_when_backward_starts(out: Any, state: _PassState, position: int) -> None:
    """Start copying the last checkpointed layer's input back to the GPU as soon as backward
    reaches the kept layers, so that its recompute does not wait for the copy: the checkpointed
    layers' own chain (prefetch one layer ahead) starts from it."""
    tensor = out[0] if isinstance(out, (tuple, list)) else out
    copy = state.last() if state.last is not None and state.last_position < position else None
    if copy is None or copy.copied is None or not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return  # nothing offloaded before this layer in this pass, or no CUDA copy to start
    ref = weakref.ref(copy)

    def hook(grad: torch.Tensor) -> None:
        target = ref()
        if target is not None:
            target.prefetch()  # idempotent: the first kept layer's hook to fire (the last layer's) starts it

    tensor.register_hook(hook)


def _make_kept_forward(layer: nn.Module, original: Callable) -> Callable:
    """A kept layer's forward on transformers' checkpointing: the layer's flag stays off (a Trainer
    may switch every layer's on again) and training runs the plain forward, MLP untiled."""
    def forward(*args: Any, **kwargs: Any):
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
        if not (torch.is_grad_enabled() and layer.training):
            return original(*args, **kwargs)
        return _kept_call(layer, original, args, kwargs)

    return forward


def keep_layer_activations(model: nn.Module, count: int) -> int:
    """The last `count` decoder layers keep their activations (no checkpoint, no recompute); the
    others stay checkpointed as they are (offloaded, or transformers' own). Calling again changes
    the count; 0 releases them all. Returns the number of layers kept.

    Why the last layers: backward runs from the last layer down, so the activations of the
    last layers are the first to be freed. The step's activation peak is at the start of
    backward (the loss's gradient, then the last layer's backward): there, keeping the last N
    holds N layers' activations, the current layer's among them, whereas keeping the first N
    would hold those N through the whole backward plus the recomputed last layer's, one layer
    more at that peak and for the whole backward. Once the kept layers' backward is done they
    are gone, and the checkpointed layers below meet the same peak as with none kept.
    """
    layers = decoder_layers(model)
    if not 0 <= count <= len(layers):
        raise ValueError(f"keep_layers: expected 0 to {len(layers)} (the model's decoder layers); got {count}")
    release_kept_layers(model)
    for layer in layers[len(layers) - count:] if count else []:
        if layer.__dict__.get(_ATTR) is not None:
            layer.__dict__[_KEEP_ATTR] = {"swapped": False}  # its offloaded forward reads the mark
            continue
        swap_forward(layer, _KEEP_ATTR, _make_kept_forward, swapped=True,
                     hf_flag=getattr(layer, "gradient_checkpointing", None))
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
    return count


def release_kept_layers(model: nn.Module) -> int:
    """Undo `keep_layer_activations`: those layers are checkpointed again. Returns how many."""
    released = 0
    for layer in decoder_layers(model):
        info = layer.__dict__.get(_KEEP_ATTR)
        if info is None:
            continue
        if info["swapped"]:
            restore_forward(layer, _KEEP_ATTR)
            if info["hf_flag"] is not None:
                layer.gradient_checkpointing = info["hf_flag"]
        else:
            del layer.__dict__[_KEEP_ATTR]
        released += 1
    return released


def kept_layers(model: nn.Module) -> int:
    """How many decoder layers keep their activations."""
    return sum(layer.__dict__.get(_KEEP_ATTR) is not None for layer in decoder_layers(model))
