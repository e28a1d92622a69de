"""Checkpoints of a training run: write one atomically, find the newest complete one, restore it.

    DIR/checkpoints/step-N/
        adapter/ or model/      the trained weights (peft / transformers save_pretrained format)
        training_state.pt       optimizer, scheduler, GradScaler and torch RNG states (tensors only)
        trainer_state.json      step, losses so far, data position, Python and NumPy RNG states, ...
        config.yaml             the resolved config of the run
        manifest.json           sha256 and size of every file above; written last

A checkpoint is written to `.step-N.tmp/` and renamed into place, so a killed
process leaves either a complete checkpoint or a temporary directory that
nothing reads. The manifest finds what the rename cannot: a file damaged or cut
short later. `latest()` walks back from the newest, naming each damaged one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from memtune.config import RunConfig, save_yaml, write_text_atomic
from memtune.errors import UserError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TENSOR_STATE = "training_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    """What a run has done so far: written into every checkpoint, restored on resume."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # one per step, from step 1
    val_losses: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"}
    step_times: list[float] = field(default_factory=list)  # seconds, one per step
    best: dict[str, float] | None = None  # {"step", "val_loss"} of the checkpoint kept for it
    before: dict[str, Any] | None = None  # accuracy before training: {"accuracy", "correct", "total"}


@dataclass
class Checkpoint:
    """A complete checkpoint found on disk (its manifest checked)."""

    path: Path
    step: int
    meta: dict[str, Any]  # trainer_state.json

    @property
    def state(self) -> TrainState:
        return TrainState(**self.meta["state"])

    @property
    def requested(self) -> dict[str, Any]:
        """The config as the run was asked for (before auto values were resolved)."""
        return self.meta["requested_config"]


@dataclass
class Trained:
    """The objects whose state a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    lora: bool
    parallel: Any = None  # memtune.distributed.Parallel of a --strategy ddp|fsdp run


def checkpoints_dir(out_dir: Path) -> Path:
    return out_dir / CHECKPOINTS


def step_dir(out_dir: Path, step: int) -> Path:
    return checkpoints_dir(out_dir) / f"step-{step}"


# --- writing -------------------------------------------------------------------

def save(out_dir: Path, trained: Trained, cfg: RunConfig, meta: dict[str, Any]) -> Path:
    """Write DIR/checkpoints/step-N/ (N = meta["state"]["step"]) through a temporary directory."""
    step = meta["state"]["step"]
    final = step_dir(out_dir, step)
    weights = optimizer = None
    if trained.parallel is not None and trained.parallel.shards:
        # FSDP2: every rank takes part in gathering the shards; what rank 0 writes is the
        # single-process format, so either kind of run resumes it (memtune.distributed)
        from memtune import distributed

        weights = distributed.trained_state(trained.model)
        optimizer = distributed.optimizer_state(trained.model, trained.optimizer)
    if trained.parallel is not None and not trained.parallel.is_main:
        return final  # rank 0 alone writes
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trained.model.save_pretrained(str(tmp / ("adapter" if trained.lora else "model")),
                                  **({"state_dict": weights} if weights is not None else {}))
    torch.save(_tensor_state(trained, optimizer), tmp / TENSOR_STATE)
    write_text_atomic(tmp / TRAINER_STATE, json.dumps({**meta, "rng": _host_rng_state()}, indent=1))
    save_yaml(cfg, tmp / "config.yaml")
    write_text_atomic(tmp / MANIFEST, json.dumps(_manifest(tmp), indent=1))
    if final.exists():  # a damaged one of the same step, skipped by the resume that led here
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    return final


def _tensor_state(trained: Trained, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    state = {"optimizer": optimizer if optimizer is not None else trained.optimizer.state_dict(),
             "scheduler": trained.scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if trained.scaler is not None:
        state["scaler"] = trained.scaler.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _host_rng_state() -> dict[str, Any]:
    """Python's and NumPy's generators as JSON (no pickle: a checkpoint must be safe to load)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _manifest(directory: Path) -> dict[str, Any]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(directory)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                      for p in files}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prune(out_dir: Path, keep: int, best_step: int | None) -> None:
    """Delete all but the `keep` newest checkpoints and the best one (at least the newest stays)."""
    steps = sorted(_steps_on_disk(out_dir), reverse=True)
    kept = set(steps[:max(1, keep)]) | ({best_step} if best_step is not None else set())
    for step in steps:
        if step not in kept:
            shutil.rmtree(step_dir(out_dir, step), ignore_errors=True)


def remove_all(out_dir: Path) -> None:
    """checkpoint_keep 0: a finished run keeps no checkpoint (only memtune's own step-N/ go)."""
    for step in _steps_on_disk(out_dir):
        shutil.rmtree(step_dir(out_dir, step), ignore_errors=True)
    with_leftovers = checkpoints_dir(out_dir)
    if with_leftovers.is_dir() and not any(with_leftovers.iterdir()):
        with_leftovers.rmdir()


def _steps_on_disk(out_dir: Path) -> list[int]:
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]


# --- finding -------------------------------------------------------------------

def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when its manifest checks out."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the checkpoint is incomplete)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not readable"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    if TRAINER_STATE not in files or TENSOR_STATE not in files:
        return f"{MANIFEST} does not list {TRAINER_STATE} and {TENSOR_STATE}"
    return None


def latest(out_dir: Path, log: Callable[[str], None]) -> Checkpoint | None:
    """The newest complete checkpoint; each damaged newer one is named in one line and skipped."""
    for step in sorted(_steps_on_disk(out_dir), reverse=True):
        path = step_dir(out_dir, step)
        why = problem(path)
        if why is None:
            try:
                return Checkpoint(path, step, json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))
            except ValueError:
                why = f"{TRAINER_STATE} is not valid JSON"
        log(f"checkpoint {path} is damaged ({why}); using the one before")
    return None


# --- restoring -----------------------------------------------------------------

def restore(checkpoint: Checkpoint, trained: Trained) -> TrainState:
    """Load the weights, optimizer, scheduler, scaler and every RNG state; return the run's progress."""
    state = torch.load(checkpoint.path / TENSOR_STATE, map_location="cpu", weights_only=True)
    if trained.parallel is not None and trained.parallel.shards:  # whole weights into FSDP2's shards
        from memtune import distributed

        distributed.load_trained(trained.parallel, trained.model, trained.optimizer,
                                 _weights_by_parameter(checkpoint.path, trained), state["optimizer"])
    else:
        _load_weights(checkpoint.path, trained)
        trained.optimizer.load_state_dict(state["optimizer"])
    # The schedule's function is not in its state: the one built from the current `steps` is used,
    # so a resume with more steps follows the schedule of the new total from here on.
    trained.scheduler.load_state_dict(state["scheduler"])
    _rates_from_schedule(trained.optimizer, trained.scheduler)
    if trained.scaler is not None and "scaler" in state:
        trained.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and "cuda_rng" in state:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    python, numpy = checkpoint.meta["rng"]["python"], checkpoint.meta["rng"]["numpy"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((numpy[0], np.array(numpy[1], dtype=np.uint32), *numpy[2:]))
    return checkpoint.state


def _rates_from_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The next step's rate from the current schedule, not the one saved with the optimizer.

    Equal when `steps` is unchanged (the same expression LambdaLR evaluates); with more steps,
    the first resumed step already follows the new total's schedule.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def _load_weights(path: Path, trained: Trained) -> None:
    if trained.lora:
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        weights = load_peft_weights(str(path / "adapter"), device="cpu")
        result = set_peft_model_state_dict(trained.model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for file in sorted((path / "model").glob("*.safetensors")):
            weights.update(load_file(str(file)))
        unexpected = trained.model.load_state_dict(weights, strict=False).unexpected_keys
        # named_parameters lists a tied weight once (the lm_head sharing the embedding is not missing)
        missing = [name for name, _ in trained.model.named_parameters() if name not in weights]
        if missing:
            raise UserError(f"resume: {path / 'model'} has no {missing[0]} (and {len(missing) - 1} more); "
                            f"the checkpoint is incomplete or of another model")
    if unexpected:
        raise UserError(f"resume: {path} holds weights this model does not have ({unexpected[0]}, ...); "
                        f"it was written for another model")


def _weights_by_parameter(path: Path, trained: Trained) -> dict[str, torch.Tensor]:
    """The checkpoint's trained weights keyed by the model's parameter names (peft saves a LoRA
    weight without its adapter's name: lora_A.default.weight is stored as lora_A.weight)."""
    from safetensors.torch import load_file

    folder = path / ("adapter" if trained.lora else "model")
    saved: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(str(file)))
    names = [name for name, p in trained.model.named_parameters() if p.requires_grad]
    adapter = getattr(trained.model, "active_adapter", "default") if trained.lora else None
    found = {name: saved[key] for name in names
             if (key := name.replace(f".{adapter}", "") if adapter else name) in saved}
    if len(found) != len(names):
        missing = next(name for name in names if name not in found)
        raise UserError(f"resume: {folder} has no weight for {missing}; the checkpoint is of another model")
    return found


def state_dict(state: TrainState) -> dict[str, Any]:
    return asdict(state)
