"""`memtune train --out DIR --resume`: the config of the run to continue, and what may change.

The config is the checkpoint's (as the run was asked for); options given with
`--resume` override it. An option that changes what the resumed steps compute
is refused with one line naming it: the resumed run would be neither the old
run nor a new one. Allowed to change:

- `steps` / `epochs`: extend (or finish earlier, not before the checkpoint). The
  learning-rate schedule is the one of the new total from the checkpoint on
  (warm-up and cosine over the new `steps`), so the rate jumps where the run
  was extended; the steps already done keep the losses they had.
- `checkpoint_every`, `checkpoint_keep`, `log`, `val_every`, `out`: where and how
  often the run writes and validates; none of them touches the training.
- `strategy`: single, ddp or fsdp (torchrun); the checkpoint's format and the global batch are the
  same under each, so a run saved under fsdp resumes in one process and the reverse.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Any, Callable

from memtune import checkpoint
from memtune.config import FIELD_NAMES, RunConfig, from_stored_dict, load_yaml
from memtune.errors import UserError

# strategy: a checkpoint holds the whole adapter and optimizer state in one format whatever the strategy
# (memtune.distributed), and the global batch, hence every step, is the same under each
MAY_CHANGE = frozenset({"steps", "epochs", "checkpoint_every", "checkpoint_keep", "log", "val_every", "out",
                        "strategy"})


def resume_run(args: Any, out_dir: Path, log: Callable[[str], None] = print) -> tuple[RunConfig, checkpoint.Checkpoint]:
    """`--resume`: the newest complete checkpoint of `out_dir` and the config to continue with."""
    if not getattr(args, "out", None):
        raise UserError("resume: expected --out DIR, the run directory to continue")
    found = find_checkpoint(out_dir, log)
    return resume_config(found, given_values(args)), found


def find_checkpoint(out_dir: Path, log: Callable[[str], None]) -> checkpoint.Checkpoint:
    found = checkpoint.latest(out_dir, log)
    if found is None:
        where = checkpoint.checkpoints_dir(out_dir)
        raise UserError(f"resume: no complete checkpoint in {where}; nothing to resume "
                        f"(start the run again without --resume)")
    return found


def resume_config(found: checkpoint.Checkpoint, given: dict[str, Any]) -> RunConfig:
    """The checkpoint's requested config with `given` (YAML + typed flags) over it; refuse a changed result."""
    stored = from_stored_dict(found.requested)
    cfg = from_stored_dict({**stored.to_dict(), **given})
    for name in FIELD_NAMES:
        if name not in MAY_CHANGE and getattr(cfg, name) != getattr(stored, name):
            raise UserError(f"resume: {name} is {getattr(cfg, name)!r} but the run in {found.path.parent.parent} "
                            f"was trained with {getattr(stored, name)!r}; a resume may change only "
                            f"{', '.join(sorted(MAY_CHANGE))} (start a new run with another --out)")
    return cfg


def given_values(args: Any) -> dict[str, Any]:
    """The config values the user gave on this command line: --config's YAML, then typed flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if k in FIELD_NAMES})
    return values


def check_resolved(found: checkpoint.Checkpoint, cfg: RunConfig, data_digest: str, bundle_train: list) -> None:
    """After setup: the same data, data position and a step count not before the checkpoint's."""
    if data_digest != found.meta["data_sha256"]:
        raise UserError(f"resume: the training data are not those of {found.path} (a data file changed?); "
                        f"start a new run with another --out")
    position = found.meta["data_position"]
    epoch, index = divmod(position["batches"] * cfg.batch_size, len(bundle_train))
    if (epoch, index) != (position["epoch"], position["index"]):
        raise UserError(f"resume: batch_size {cfg.batch_size} does not reach the data position of {found.path} "
                        f"(epoch {position['epoch']}, example {position['index']}); start a new run with another --out")
    if cfg.steps < found.step:
        raise UserError(f"steps: {cfg.steps} is before the checkpoint's step {found.step} ({found.path}); "
                        f"expected at least {found.step}")


def data_sha256(bundle: Any) -> str:
    """A digest of the tokenized training and validation examples, in order."""
    digest = hashlib.sha256()
    for split in (bundle.train, bundle.val):
        digest.update(b"split")
        for example in split:
            for ids in (example.input_ids, example.labels, example.position_ids or []):
                digest.update(array("q", ids).tobytes())
                digest.update(b"|")
    return digest.hexdigest()
