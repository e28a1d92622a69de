"""Attention kept from the forward pass, so a checkpoint recompute does not run attention again.

An offloaded checkpoint recomputes its whole layer in backward, attention
included: for the 1.5B shape at 16384 tokens that is 28 flash-attention
forwards (about 38 ms of a 590 ms step on an H200), and attention's share
grows with the square of the length. What attention's backward needs beyond
its inputs q, k, v is small next to the layer's other activations: its
output and one softmax statistic per head and token. So during the layer's
first forward, attention runs once with gradients on, and:

- whatever its autograd graph saves is packed (saved-tensor hooks): q, k and
  v are not kept at all but referred to, because the recompute produces them
  again bit for bit; the output and the statistics go to pinned host memory
  beside the layer's checkpoint (one copy per storage: the output the layer
  uses and the one the kernel saves are the same memory);
- in the recompute, attention is not run: its output comes back from the
  host, and its backward is that first graph's backward, fed with the
  recomputed q, k, v.

The recorded graph's inputs are views made by a function that keeps nothing
(`_Grip`), so recording holds no GPU memory beyond the copies in flight.
The price is one more [tokens, heads x head_dim] copy each way per layer
over PCIe (overlapped with compute) and as much host memory: 0.05 GB per
layer at 16384 tokens for the 1.5B shape.

The hook is on the layer's attention module instance: while its layer is
being recorded or replayed, its forward runs under a torch function mode that
intercepts `torch.nn.functional.scaled_dot_product_attention` (the call
transformers' "sdpa" attention makes) and nothing else; outside those two
moments the attention module runs untouched, so eval, generation and other
models are unaffected, and no library registry or class is ever changed. The
record lives on the module instance, not in a thread local: backward may run
on another thread.
Anything the replay cannot match (another attention implementation, attention
dropout, a layer calling attention a different number of times) falls back to
recomputing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from memtune.kernels._common import restore_forwards, swap_forwards
from memtune.kernels.host_copy import HostCopy

__all__ = ["AttentionRecord", "recording", "replaying", "enable_saved_attention", "disable_saved_attention",
           "attention_module", "saved_attention_supported"]

# Saved tensors smaller than this stay where they are (RNG seeds, short statistics).
_KEEP_BELOW_BYTES = 1 << 20
# Tests set this to copy (and rebuild) off CUDA too, as on a GPU.
COPY_OFF_CUDA = False
_ATTR = "_memtune_saved_attention"  # on the attention module: {"active": (mode, record) | None, ...}


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _bytes_of_storage(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over all of `t`'s storage."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _rebuild(storage_owner: torch.Tensor, dtype: torch.dtype, offset: int, size, stride) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=storage_owner.device).set_(
        storage_owner.untyped_storage(), offset, size, stride)


@dataclass(frozen=True)
class _Layout:
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]
    storage_bytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Layout":
        return cls(t.dtype, t.storage_offset(), t.shape, t.stride(), t.untyped_storage().nbytes())


class _Blob:
    """One storage parked on the host; fetched to the device once, however many tensors refer to it."""

    def __init__(self, tensor: torch.Tensor, copy_off_cuda: bool):
        self.source: torch.Tensor | None = _bytes_of_storage(tensor)
        self.copy = HostCopy(self.source, copy_off_cuda=copy_off_cuda)
        self.on_device: torch.Tensor | None = None

    def prefetch(self) -> None:
        self.copy.prefetch()

    def tensor(self, layout: _Layout) -> torch.Tensor:
        if self.on_device is None:
            self.on_device = self.copy.fetch()
        return _rebuild(self.on_device, layout.dtype, layout.offset, layout.size, layout.stride)


@dataclass(frozen=True)
class _InputRef:
    """A saved tensor that is (a view of) q, k or v: rebuilt from the recomputed tensor."""
    index: int
    layout: _Layout


@dataclass(frozen=True)
class _BlobRef:
    blob: _Blob
    layout: _Layout


class _Grip(torch.autograd.Function):
    """`tensor`, made to require grad through a node that keeps nothing (not `tensor`, not its storage).

    A detached leaf would do the same, but autograd's accumulator node would
    then hold the leaf, and with it the [tokens, heads, dim] storage, until
    backward. The gradient arriving here is captured by `autograd.grad` with
    this node's edge as input; the node itself never runs."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


class _Entry:
    """One attention call of one layer: its recorded graph and how to rebuild what that graph saved."""

    def __init__(self, copy_off_cuda: bool):
        self.copy_off_cuda = copy_off_cuda
        self.blobs: dict[tuple[str, int], _Blob] = {}
        self.input_keys: list[tuple[str, int]] = []
        self.keep_keys: set[tuple[str, int]] = set()
        self.inputs: tuple[torch.Tensor, ...] = ()  # the recomputed q, k, v, bound at replay
        self.output: Any = None
        self.out_edge = None
        self.input_edges: list[Any] = []

    def pack(self, t: torch.Tensor) -> Any:
        key = _storage_key(t)
        if key in self.input_keys:
            return _InputRef(self.input_keys.index(key), _Layout.of(t))
        if (key in self.keep_keys or t.device.type not in ("cuda", "cpu") or t.numel() == 0
                or t.untyped_storage().nbytes() < _KEEP_BELOW_BYTES):
            return t
        if t.device.type == "cpu" and not self.copy_off_cuda:
            return t  # no host to park on: keep it, as offloaded checkpoints do off CUDA
        blob = self.blobs.get(key)
        if blob is None:
            blob = self.blobs[key] = _Blob(t, self.copy_off_cuda)
        return _BlobRef(blob, _Layout.of(t))

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _InputRef):
            source = self.inputs[packed.index]
            if source.untyped_storage().nbytes() != packed.layout.storage_bytes:
                raise RuntimeError("the recomputed attention inputs differ in layout from the recorded ones")
            layout = packed.layout
            return _rebuild(source, layout.dtype, layout.offset, layout.size, layout.stride)
        if isinstance(packed, _BlobRef):
            return packed.blob.tensor(packed.layout)
        return packed

    def prefetch(self) -> None:
        for blob in self.blobs.values():
            blob.prefetch()

    def release(self) -> None:
        for blob in self.blobs.values():
            blob.on_device = None
        self.blobs, self.inputs, self.output, self.out_edge, self.input_edges = {}, (), None, None, []


class AttentionRecord:
    """The attention calls of one layer in one forward pass, in call order."""

    def __init__(self, copy_off_cuda: bool | None = None):
        self.copy_off_cuda = COPY_OFF_CUDA if copy_off_cuda is None else copy_off_cuda
        self.entries: list[_Entry] = []
        self.cursor = 0

    def prefetch(self) -> None:
        for entry in self.entries:
            entry.prefetch()

    def release(self) -> None:
        """Drop every tensor of the record (after its layer's backward)."""
        for entry in self.entries:
            entry.release()
        self.entries = []


def attention_module(layer: nn.Module) -> nn.Module | None:
    """The decoder layer's attention module (`self_attn` in every Llama-style family)."""
    attn = getattr(layer, "self_attn", None)
    return attn if isinstance(attn, nn.Module) else None


@contextlib.contextmanager
def _mode(layer: nn.Module, mode: str | None, record: AttentionRecord | None) -> Iterator[None]:
    attn = attention_module(layer)
    info = attn.__dict__.get(_ATTR) if attn is not None else None
    if info is None or mode is None:
        yield
        return
    previous, info["active"] = info["active"], (mode, record)
    try:
        yield
    finally:
        info["active"] = previous


def recording(record: AttentionRecord, layer: nn.Module) -> contextlib.AbstractContextManager:
    """The layer's attention calls record their graphs into `record` (a checkpointed layer's first forward)."""
    return _mode(layer, "record", record)


def replaying(record: AttentionRecord | None, layer: nn.Module) -> contextlib.AbstractContextManager:
    """The layer's attention calls take their outputs from `record` instead of running (the recompute)."""
    if record is not None:
        record.cursor = 0
    return _mode(layer, "replay" if record is not None else None, record)


def _in_autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v cast as autocast would cast them inside attention, but here, where the recompute casts
    them again: the graph then saves tensors that the recompute reproduces (an fp32 residual stream
    makes q and k fp32 after the rotary embedding), not private copies that would have to be kept."""
    device_type = tensors[0].device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return tensors
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)


def _tensor_args(values) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]


def _record_call(record: AttentionRecord, original: Callable, module, query, key, value, attention_mask,
                 args, kwargs):
    if kwargs.get("dropout") or kwargs.get("dropout_p"):
        # Attention dropout draws random numbers; a recompute that skipped it would shift every later
        # draw of the layer (LoRA dropout masks) away from the forward's. Such a layer recomputes.
        return original(module, query, key, value, attention_mask, *args, **kwargs)
    entry = _Entry(record.copy_off_cuda)
    query, key, value = _in_autocast_dtype(query, key, value)
    anchor = torch.empty(0, requires_grad=True)
    with torch.enable_grad():
        gripped = [_Grip.apply(anchor, t) for t in (query, key, value)]
    entry.input_keys = [_storage_key(t) for t in (query, key, value)]
    # the mask (and any other tensor argument) lives on through the whole step: refer to it, never copy it
    entry.keep_keys = {_storage_key(t) for t in _tensor_args([attention_mask, *args, *kwargs.values()])}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(entry.pack, entry.unpack):
        out, weights = original(module, *gripped, attention_mask, *args, **kwargs)
    # Blobs are keyed by storage address: each held its source until here, so that no storage freed
    # during the call could come back at the same address as another saved tensor and be mistaken for it.
    for blob in entry.blobs.values():
        blob.source = None
    if weights is not None or not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return out.detach() if isinstance(out, torch.Tensor) else out, weights  # nothing replayable
    entry.out_edge = torch.autograd.graph.get_gradient_edge(out)
    entry.input_edges = [torch.autograd.graph.get_gradient_edge(t) for t in gripped]
    entry.output = entry.pack(out.detach())
    record.entries.append(entry)
    return out.detach(), None


class _Replay(torch.autograd.Function):
    """The recorded output, with the recorded graph's backward fed by the recomputed q, k, v."""

    @staticmethod
    def forward(ctx, entry: _Entry, query, key, value):
        entry.inputs = (query.detach(), key.detach(), value.detach())
        ctx.entry = entry
        # Not a copy: the recorded graph's saved output may be this same memory. Saving it makes
        # autograd refuse (loudly, in backward) a layer that writes into it in place.
        out = entry.unpack(entry.output)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 - the in-place check
        entry, ctx.entry = ctx.entry, None
        grads = torch.autograd.grad([entry.out_edge], entry.input_edges, [grad], allow_unused=True)
        entry.release()
        return (None, *grads)


def _replay_call(record: AttentionRecord, original: Callable, module, query, key, value, attention_mask,
                 args, kwargs):
    if record.cursor >= len(record.entries):
        return original(module, query, key, value, attention_mask, *args, **kwargs)  # not recorded: recompute
    entry = record.entries[record.cursor]
    record.cursor += 1
    return _Replay.apply(entry, *_in_autocast_dtype(query, key, value)), None


def _sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """torch's SDPA in the shape of a transformers attention function: (output, weights)."""
    return F.scaled_dot_product_attention(query, key, value, attention_mask, *args, **kwargs), None


# the torch function a mode sees for SDPA, whatever may wrap `F.scaled_dot_product_attention` later
_SDPA_FUNCTION = F.scaled_dot_product_attention


class _AttentionMode(TorchFunctionMode):
    """Inside one attention module's forward: SDPA recorded, or replayed from the record."""

    def __init__(self, mode: str, record: AttentionRecord):
        super().__init__()
        self.mode, self.record = mode, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not _SDPA_FUNCTION:
            return func(*args, **kwargs)
        query, key, value, *rest = args
        mask = kwargs.pop("attn_mask") if "attn_mask" in kwargs else (rest.pop(0) if rest else None)
        call = _record_call if self.mode == "record" else _replay_call
        return call(self.record, _sdpa, None, query, key, value, mask, tuple(rest), kwargs)[0]


def _make_attention_forward(attn: nn.Module, original: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any):
        active = attn.__dict__[_ATTR]["active"]
        if active is None:
            return original(*args, **kwargs)
        with _AttentionMode(*active):
            return original(*args, **kwargs)

    return forward


def enable_saved_attention(layers: list[nn.Module]) -> int:
    """Give each layer's attention module the record/replay hook (idle until `recording`/`replaying`)."""
    modules = [m for m in map(attention_module, layers) if m is not None]
    swap_forwards(modules, _ATTR, _make_attention_forward)
    for module in modules:
        module.__dict__[_ATTR].setdefault("active", None)
    return len(modules)


def disable_saved_attention(layers: list[nn.Module]) -> int:
    return restore_forwards([m for m in map(attention_module, layers) if m is not None], _ATTR)


@functools.cache  # a property of this torch build
def saved_attention_supported() -> bool:
    """This torch can differentiate from a saved graph edge (torch.autograd.grad with GradientEdge outputs)."""
    try:
        x = torch.ones(2, requires_grad=True)
        y = x * 2
        (g,) = torch.autograd.grad([torch.autograd.graph.get_gradient_edge(y)], [x], [torch.ones(2)])
        return bool(torch.equal(g, torch.full((2,), 2.0)))
    except (AttributeError, TypeError, RuntimeError):
        return False
