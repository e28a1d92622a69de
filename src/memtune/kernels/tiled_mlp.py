"""Run each decoder layer's MLP over chunks of the sequence, recomputing each chunk in backward.

The gated MLP `down(act(gate(x)) * up(x))` is per token, so chunking it along
the sequence is exact. Untiled, one layer's forward + backward holds several
[tokens, intermediate] tensors: for the 1.5B shape (intermediate 8960) each is
17.5 KiB per token in bf16, 35 KiB in fp32 (peft casts a LoRA layer's input to
the fp32 adapter dtype, so down_proj's LoRA keeps an fp32 [tokens, 8960]
copy): at 65k tokens one such tensor is 1.2 GB (bf16) / 2.3 GB (fp32), and
gate, up, act(gate), their product and the LoRA copies add up to several.
Tiled, only one chunk's worth exists at a time (4096 tokens: 73 MB bf16 per
tensor). The price is one more MLP forward per layer in backward (the MLP is
about 2/3 of a layer's flops); under gradient checkpointing the MLP forward
then runs three times: forward, checkpoint recompute, tiled backward.

Under memtune's offloaded checkpointing the layer is recomputed in backward
only for its graph: the layer's output values are never read. In decoder
layers whose MLP output only enters the residual sum that the layer returns
(`_OUTPUT_ONLY_IN_RESIDUAL`), the tiled MLP then skips its forward there and
returns zeros of the right shape, since its own backward recomputes each
chunk anyway: the MLP forward runs twice, as in an untiled checkpointed layer.

In its own backward the MLP's output values are not read either: only
d(loss)/d(input of down_proj) is, which for a frozen down_proj (LoRA on the
attention only, the seed's setting) is grad_out @ W_down and needs no
forward product. In MLPs that return down_proj's output as it is
(`_RETURNS_DOWN_PROJ`), a frozen 4-bit or plain down_proj therefore skips its
matmul in the tiled backward: a sixth of the MLP's flops in that pass (16 ms
of an H200's 16384-token step of the 1.5B shape, by the flop count).

Only the MLP input [tokens, hidden] is saved. The module instance gets its own
`forward`. Without anything to differentiate (no grad mode, as in eval or the
first pass of a checkpointed layer) the chunks run without the autograd
Function, so the forward peak is bounded by the chunk too; sequences no longer
than one chunk (generation) call the original forward.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from memtune.kernels._common import (RngState, autocast_state, decoder_layers, outputs_are_discarded, replay_autocast,
                                     restore_forward, restore_forwards, swap_forward, trainable_params)
from memtune.kernels.frozen_4bit import dequantized_once, frozen_4bit_weight, takes_short_path

__all__ = ["enable_tiled_mlp", "disable_tiled_mlp", "tiled_mlp_chunk"]

_ATTR = "_memtune_tiled_mlp"


def _chunked_forward(mlp: nn.Module, run: Callable, chunk: int, x: torch.Tensor) -> torch.Tensor:
    out = None
    start = 0
    with torch.no_grad(), dequantized_once(mlp):  # frozen 4-bit weights: dequantized once for all chunks
        for piece in x.split(chunk, dim=-2):
            y = run(piece)
            if out is None:
                out = y.new_empty(*x.shape[:-2], x.shape[-2], y.shape[-1])
            out.narrow(-2, start, piece.shape[-2]).copy_(y)
            start += piece.shape[-2]
            del y
    return out


# Decoder layers that end in `residual + mlp(norm(h))` and return that sum: nothing
# but the discarded layer output depends on the MLP output's values.
_OUTPUT_ONLY_IN_RESIDUAL = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                                      "MistralDecoderLayer"})


# Gated MLPs whose forward returns `down_proj(...)` unchanged.
_RETURNS_DOWN_PROJ = frozenset({"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"})
_GRAD_ONLY_ATTR = "_memtune_grad_only"


class _InputGradOnly(torch.autograd.Function):
    """A frozen linear whose output values nobody reads: no product forward, dL/dx = dL/dy @ W backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_of: Callable[[torch.dtype], torch.Tensor], out_features: int):
        ctx.weight_of = weight_of
        return x.new_empty(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return torch.matmul(grad_out, ctx.weight_of(grad_out.dtype)), None, None


def _frozen_weight_of(layer: nn.Module, x: torch.Tensor) -> Callable[[torch.dtype], torch.Tensor] | None:
    """How to get W [out, in] of a frozen linear called on `x`, when its gradient is just grad @ W; else None."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    if getattr(layer.weight, "quant_state", None) is not None:
        return (lambda dtype: frozen_4bit_weight(layer, dtype)) if takes_short_path(layer, x) else None
    if (type(layer) is nn.Linear and not layer.weight.requires_grad and layer.weight.dtype == x.dtype
            and (layer.bias is None or not layer.bias.requires_grad)):
        return lambda dtype: layer.weight.to(dtype)
    return None


@contextlib.contextmanager
def _down_proj_grad_only(mlp: nn.Module) -> Iterator[None]:
    """Within the block a frozen down_proj of a `_RETURNS_DOWN_PROJ` MLP computes no output, only its input grad."""
    down = getattr(mlp, "down_proj", None)
    if type(mlp).__name__ not in _RETURNS_DOWN_PROJ or down is None or not hasattr(down, "weight"):
        yield
        return

    def make_forward(layer: nn.Module, original: Callable) -> Callable:
        def forward(x: torch.Tensor, *args, **kwargs):
            weight_of = None if args or kwargs else _frozen_weight_of(layer, x)
            if weight_of is None:
                return original(x, *args, **kwargs)
            return _InputGradOnly.apply(x, weight_of, layer.out_features)

        return forward

    swap_forward(down, _GRAD_ONLY_ATTR, make_forward)
    try:
        yield
    finally:
        restore_forward(down, _GRAD_ONLY_ATTR)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp: nn.Module, layer: nn.Module, run: Callable, chunk: int, skip_width: int, x: torch.Tensor,
                *params: torch.Tensor):
        ctx.mlp, ctx.run, ctx.chunk, ctx.params = mlp, run, chunk, params
        ctx.rng = RngState(x.device)
        ctx.autocast = autocast_state(x.device.type)
        ctx.save_for_backward(x)
        if skip_width and outputs_are_discarded(layer):
            return x.new_zeros(*x.shape[:-1], skip_width)
        return _chunked_forward(mlp, run, chunk, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[5]
        need_p = ctx.needs_input_grad[6:]
        params = [p for p, need in zip(ctx.params, need_p) if need]
        grad_x = torch.empty_like(x) if need_x else None
        grad_p: list[torch.Tensor | None] = [None] * len(params)
        x = x.detach()
        start = 0
        # the chunks run in the forward's order, so dropout draws the same masks
        with (torch.enable_grad(), ctx.rng.replay(), replay_autocast(ctx.autocast), dequantized_once(ctx.mlp),
              _down_proj_grad_only(ctx.mlp)):
            for piece in x.split(ctx.chunk, dim=-2):
                n = piece.shape[-2]
                piece = piece.detach().requires_grad_(need_x)
                y = ctx.run(piece)
                wanted = ([piece] if need_x else []) + params
                if y.requires_grad and wanted:
                    grads = torch.autograd.grad(y, wanted, grad_out.narrow(-2, start, n), allow_unused=True)
                    if need_x:
                        grad_x.narrow(-2, start, n).copy_(grads[0] if grads[0] is not None else 0)
                        grads = grads[1:]
                    for i, g in enumerate(grads):
                        if g is not None:
                            grad_p[i] = g if grad_p[i] is None else grad_p[i].add_(g)
                elif need_x:
                    grad_x.narrow(-2, start, n).zero_()
                del y
                start += n
        it = iter(grad_p)
        return (None, None, None, None, None, grad_x, *[next(it) if need else None for need in need_p])


def _make_forward(mlp: nn.Module, original: Callable, chunk: int, skip_width: int, layer: nn.Module) -> Callable:
    def forward(x: torch.Tensor, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] <= chunk:
            return original(x, *args, **kwargs)  # one chunk: tiling would only add a recompute
        run = original if not (args or kwargs) else (lambda piece: original(piece, *args, **kwargs))
        params = trainable_params(mlp) if torch.is_grad_enabled() else []
        if not (torch.is_grad_enabled() and (x.requires_grad or params)):
            # nothing to differentiate (eval, or the no-grad first pass of a checkpointed layer):
            # still chunked, so the [tokens, intermediate] tensors never exist whole
            return _chunked_forward(mlp, run, chunk, x)
        return _TiledMLP.apply(mlp, layer, run, chunk, skip_width, x, *params)

    return forward


def _mlp_of(layer: nn.Module) -> nn.Module | None:
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    # gated dense MLPs only: a mixture of experts also adds router losses that are not per token
    if mlp is not None and hasattr(mlp, "down_proj") and not hasattr(mlp, "experts"):
        return mlp
    return None


def _skippable_width(layer: nn.Module, mlp: nn.Module) -> int:
    """The MLP's output width when its forward may be skipped in a discarded recompute, else 0."""
    if type(layer).__name__ not in _OUTPUT_ONLY_IN_RESIDUAL:
        return 0
    return int(getattr(mlp.down_proj, "out_features", 0) or 0)


def enable_tiled_mlp(model: nn.Module, chunk_tokens: int) -> int:
    """Run every decoder layer's MLP over `chunk_tokens`-long chunks of the sequence.

    A chunk_tokens of 0 or less disables it. Calling again changes the chunk.
    Returns the number of MLPs tiled.
    """
    if chunk_tokens <= 0:
        return -disable_tiled_mlp(model)
    count = 0
    for layer in decoder_layers(model):
        mlp = _mlp_of(layer)
        if mlp is None:
            continue
        info = mlp.__dict__.get(_ATTR)
        if info is None:
            info = {"had_own_forward": "forward" in mlp.__dict__, "original": mlp.forward}
            setattr(mlp, _ATTR, info)
        info["chunk"] = int(chunk_tokens)
        mlp.forward = _make_forward(mlp, info["original"], int(chunk_tokens), _skippable_width(layer, mlp), layer)
        count += 1
    return count


def disable_tiled_mlp(model: nn.Module) -> int:
    """Undo `enable_tiled_mlp`; returns the number of MLPs restored."""
    return restore_forwards([m for m in map(_mlp_of, decoder_layers(model)) if m is not None], _ATTR)


def tiled_mlp_chunk(model: nn.Module) -> int:
    """The chunk the model's MLPs are tiled with (0 = not tiled)."""
    for layer in decoder_layers(model):
        mlp = _mlp_of(layer)
        info = None if mlp is None else mlp.__dict__.get(_ATTR)
        if info is not None:
            return info["chunk"]
    return 0
