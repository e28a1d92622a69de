"""The competitor stacks of the side-by-side comparison, one small module each.

Every stack builds the model as its own users set it up and returns it with
whether its forward runs under bf16 autocast; the measuring loop
(`compare_worker`) is the same for all of them. memtune's own rows run through
`memtune train` instead (`memtune_stack`), so they measure exactly what a user
of the CLI gets. Nothing here imports torch at module level: the parent
process of a comparison never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import liger_stack, seed_stack, unsloth_stack


@dataclass(frozen=True)
class Stack:
    name: str
    build: Callable[[dict, list[str], Any], tuple[Any, bool]]  # (spec, LoRA targets, device) -> (model, autocast)
    preload: str | None = None  # a module imported before torch and transformers (it patches them at import)


def _seed_variant(name: str) -> Callable[[dict, list[str], Any], tuple[Any, bool]]:
    return lambda spec, targets, device: seed_stack.build(name, spec, targets, device)


STACKS: dict[str, Stack] = {
    "seed": Stack("seed", _seed_variant("seed")),
    "seed-autocast": Stack("seed-autocast", _seed_variant("seed-autocast")),
    "seed-fp32": Stack("seed-fp32", _seed_variant("seed-fp32")),
    "liger": Stack("liger", liger_stack.build),
    "unsloth": Stack("unsloth", unsloth_stack.build, preload="unsloth"),
}
# what --stacks runs by default, in this order ("memtune" is memtune_stack's)
BUILTIN_STACKS = ("seed", "seed-autocast", "liger", "unsloth", "memtune")
REFERENCE_STACKS = ("seed-fp32",)  # accepted by --stacks, never run by default


def get(name: str) -> Stack:
    if name not in STACKS:
        raise ValueError(f"unknown stack {name!r}; expected one of {', '.join(STACKS)}")
    return STACKS[name]
