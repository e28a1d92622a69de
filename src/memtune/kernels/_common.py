"""Pieces shared by the recomputing kernels: finding decoder layers, RNG and autocast replay."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # noqa: BLE001 - not a peft model after all
            pass
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of an HF causal LM (Qwen2/Qwen3/Llama ...), through peft if wrapped."""
    root = base_model(model)
    candidates = []
    get_decoder = getattr(root, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # noqa: BLE001
            pass
    candidates += [getattr(root, "model", None), root]
    for owner in candidates:
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    # last resort: the longest ModuleList named "layers" anywhere
    best: list[nn.Module] = []
    for name, module in root.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = list(module)
    if not best:
        raise ValueError(f"no decoder layers found in {type(root).__name__}")
    return best


def swap_forward(module: nn.Module, attr: str, make_forward: Callable[[nn.Module, Callable], Callable],
                 **extra: Any) -> None:
    """Give the instance `module` the forward `make_forward(module, original)`, once; record the
    original (and `extra`) in `module.<attr>` for `restore_forward`."""
    if module.__dict__.get(attr) is None:
        setattr(module, attr, {"had_own_forward": "forward" in module.__dict__, "original": module.forward, **extra})
        module.forward = make_forward(module, module.__dict__[attr]["original"])


def swap_forwards(modules: list[nn.Module], attr: str, make_forward: Callable[[nn.Module, Callable], Callable]) -> int:
    """`swap_forward` on each of `modules`; returns how many."""
    for module in modules:
        swap_forward(module, attr, make_forward)
    return len(modules)


def restore_forwards(modules: Iterable[nn.Module], attr: str) -> int:
    """`restore_forward` on each of `modules`; returns how many had a swap to undo."""
    return sum(restore_forward(module, attr) is not None for module in modules)


def restore_forward(module: nn.Module, attr: str) -> dict[str, Any] | None:
    """Undo an instance-level forward swap recorded in `module.<attr>`
    ({"had_own_forward": bool, "original": callable, ...}); return the record, None if there was none."""
    info = module.__dict__.get(attr)
    if info is None:
        return None
    if info["had_own_forward"]:
        module.forward = info["original"]
    else:
        del module.forward  # the class's forward shows through again
    delattr(module, attr)
    return info


def trainable_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class RngState:
    """CPU (and this CUDA device's) generator state, to replay dropout identically in a recompute."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def autocast_state(device_type: str) -> list[tuple[str, bool, Any]]:
    """Autocast settings in force now (autocast is thread local; backward may run on another thread)."""
    state = []
    for dev in dict.fromkeys((device_type, "cpu")):
        try:
            state.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        except (TypeError, RuntimeError):
            continue
    return state


@contextlib.contextmanager
def replay_autocast(state: list[tuple[str, bool, Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for dev, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type=dev, dtype=dtype, enabled=enabled))
        yield


_DISCARDED_ATTR = "_memtune_outputs_discarded"


@contextlib.contextmanager
def outputs_discarded(layer: nn.Module) -> Iterator[None]:
    """Mark `layer`'s checkpoint recompute, whose output values are never read, only its graph.

    Kernels inside it that recompute again in their own backward (the tiled MLP) can then skip
    their forward. Kept on the layer instance: backward may run on another thread."""
    previous = layer.__dict__.get(_DISCARDED_ATTR, False)
    layer.__dict__[_DISCARDED_ATTR] = True
    try:
        yield
    finally:
        layer.__dict__[_DISCARDED_ATTR] = previous


def outputs_are_discarded(layer: nn.Module) -> bool:
    return layer.__dict__.get(_DISCARDED_ATTR, False)
