"""A decoder layer's frozen 4-bit weights, dequantized by one CUDA graph replay.

With the short path (`frozen_4bit.py`) a 16384-token H200 step of the 1.5B
shape still waited on the host: 199 ms of launches arriving late against
395 ms of kernels, 91 ms of it inside `_Frozen4bitLinear`
(`benchmarks/results/profile-16k-defaults-h200.txt`). Dequantizing one NF4
weight is three small kernels (the double-quantized absmax, its offset, the
weight), but bitsandbytes reaches them through several layers of Python and
ctypes: about 0.1 ms of host time a weight, seven weights a layer, twice a
step (the first forward and the offloaded backward), 28 layers.

The frozen weights never change, so all of a layer's dequantize kernels are
captured once into a CUDA graph, and each pass replays it: one launch from
the host instead of 21 kernels and their Python. The graphs write into one
buffer shared by every layer (all decoder layers have the same shapes), so
the memory is one layer's dequantized weights (77 MB in bf16 for the 1.5B
shape), held for the whole run: the offloaded backward held that much anyway
at its peak, which is where the step's peak is. The graphs' own temporaries
(the fp32 absmax) come from one private pool that all of them share: at most
one is replayed at a time, on the compute stream.

The buffer is only valid until the next layer's replay. `dequantized_once(layer)`
(frozen_4bit.py) replays at the start of a layer's pass and hands the views out
for that pass only; the pass ends before the next layer's begins, and every
reader of the views runs on the same stream, in order.

The graph reads the weights' storage by address: if a weight or its
quantization state is replaced or moved after the capture, `weights()`
notices and returns None, and the layer dequantizes the ordinary way.

Off CUDA (the tests) there is no graph: `capture=False` replays the same
dequantize calls eagerly into the shared buffer, so everything but the graph
itself runs on a CPU.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from memtune.kernels._common import decoder_layers
from memtune.kernels.frozen_4bit import WEIGHT_SOURCE_ATTR, four_bit_linears, has_frozen_4bit_weight, on_short_path

__all__ = ["enable_dequantize_graphs", "disable_dequantize_graphs", "layer_weights", "has_dequantize_graph"]

_ATTR = WEIGHT_SOURCE_ATTR  # where frozen_4bit.dequantized_once looks for a layer's weights
# (device, dtype, shapes) -> the flat buffer all layers of that shape share, alive while a graph holds it
_BUFFERS: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_POOLS: dict[int, tuple] = {}  # CUDA device index -> graph memory pool shared by all dequantize graphs


def _source_tensors(linear: nn.Module) -> list[torch.Tensor]:
    """Every tensor the dequantize of `linear` reads (the graph reads them by address)."""
    state = linear.weight.quant_state
    tensors = [linear.weight.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
        if isinstance(state.offset, torch.Tensor):
            tensors.append(state.offset)
    return tensors


def _addresses(linears: list[nn.Module]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for linear in linears for t in _source_tensors(linear))


def _shared_buffer(device: torch.device, dtype: torch.dtype, shapes: tuple) -> torch.Tensor:
    key = (str(device), dtype, shapes)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        buffer = _BUFFERS[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


def _views(buffer: torch.Tensor, shapes: tuple) -> list[torch.Tensor]:
    views, start = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        views.append(buffer[start:start + n].view(shape))
        start += n
    return views


def _capture(fn: Callable[[], None], device: torch.device) -> "torch.cuda.CUDAGraph":
    """`fn`'s kernels as a CUDA graph (run once eagerly first, so lazy set-up stays out of the capture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)  # a capture cannot run on the default stream
    side.wait_stream(main)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        fn()
        graph.capture_begin(pool=_POOLS[index], capture_error_mode="thread_local")
        try:
            fn()
        finally:
            graph.capture_end()
    main.wait_stream(side)
    return graph


class LayerDequantizeGraph:
    """One decoder layer's frozen 4-bit linears, dequantized together into a shared buffer."""

    def __init__(self, linears: list[nn.Module], dtype: torch.dtype, capture: bool):
        device = linears[0].weight.device
        self.linears = linears
        self.dtype = dtype
        shapes = tuple(tuple(linear.weight.quant_state.shape) for linear in linears)
        self.buffer = _shared_buffer(device, dtype, shapes)
        self.views = _views(self.buffer, shapes)
        self.addresses = _addresses(linears)
        self.by_id = {id(linear): view for linear, view in zip(linears, self.views)}
        self.graph = _capture(self._dequantize, device) if capture else None

    def _dequantize(self) -> None:
        import bitsandbytes.functional as bnbf

        with torch.no_grad():
            for linear, out in zip(self.linears, self.views):
                if out.is_cuda:
                    bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state, out=out)
                else:  # bitsandbytes has no CPU kernel writing into a given tensor
                    out.copy_(bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state))

    def weights(self) -> dict[int, torch.Tensor] | None:
        """{id(linear): W} for this layer, freshly written; None if a weight moved since the capture."""
        if _addresses(self.linears) != self.addresses:
            return None
        if self.graph is not None:
            self.graph.replay()
        else:
            self._dequantize()
        return dict(self.by_id)


def _graphable_linears(layer: nn.Module) -> list[nn.Module]:
    """The layer's frozen 4-bit linears on the short path whose dequantize writes the compute dtype."""
    return [lin for lin in four_bit_linears(layer)
            if on_short_path(lin) and has_frozen_4bit_weight(lin)
            and lin.weight.quant_state.dtype == getattr(lin, "compute_dtype", None)]


def enable_dequantize_graphs(model: nn.Module, capture: bool = True) -> int:
    """Give each decoder layer of `model` a dequantize graph of its 4-bit linears on the short path.

    Call it once the weights are where they will stay. capture=False replays eagerly (off CUDA).
    Returns how many layers have one. A capture that fails raises; the caller decides what to say."""
    count = 0
    for layer in decoder_layers(model):
        if layer.__dict__.get(_ATTR) is None:
            linears = _graphable_linears(layer)
            if linears:  # one buffer, one dtype and device: the others dequantize as they go
                first = linears[0]
                linears = [lin for lin in linears
                           if lin.compute_dtype == first.compute_dtype and lin.weight.device == first.weight.device]
            if not linears:
                continue
            setattr(layer, _ATTR, LayerDequantizeGraph(linears, linears[0].compute_dtype, capture))
        count += 1
    return count


def disable_dequantize_graphs(model: nn.Module) -> int:
    """Drop `model`'s dequantize graphs (its layers dequantize the ordinary way); returns how many."""
    return sum(layer.__dict__.pop(_ATTR, None) is not None for layer in decoder_layers(model))


def has_dequantize_graph(layer: nn.Module | None) -> bool:
    return layer is not None and layer.__dict__.get(_ATTR) is not None


def layer_weights(layer: nn.Module | None) -> dict[int, torch.Tensor] | None:
    """The layer's dequantized frozen weights by id(linear), written now; None without a (valid) graph."""
    graph = layer.__dict__.get(_ATTR) if layer is not None else None
    return graph.weights() if graph is not None else None
