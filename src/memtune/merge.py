"""`memtune merge`: fold a LoRA adapter into the base weights and save a plain model.

The base is loaded unquantized (in the compute dtype): merging into 4-bit
weights would round the adapter away.

`--merged-out` is a new or empty directory; one that holds files needs
`--overwrite`, and then only the files this merge writes are replaced (with
the weight files of an earlier save, which transformers would otherwise load
beside or instead of the new ones); a user's other files stay. The model is
written to a temporary directory beside it first, removed if anything fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from memtune.cli import add_config_flags, config_from_args
from memtune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--adapter", required=True, help="a LoRA adapter directory (from memtune train: RUN/adapter)")
    parser.add_argument("--merged-out", required=True, help="directory to write the merged model to (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a --merged-out that holds files: the merged model's files are replaced, "
                             "other files stay")


# Files of an earlier save_pretrained that would be read with (or instead of) the new ones: a
# single-file model beside a sharded one, or shards beyond the new count.
STALE_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def run(args: argparse.Namespace) -> int:
    from memtune.adapters import attach, open_adapter
    from memtune.models import build_model

    out = Path(args.merged_out).expanduser()
    check_merged_out(out, args.overwrite)
    adapter = open_adapter(args.adapter)
    cfg = config_from_args(args, overrides={"quantization": "none", "lora": False, "gradient_checkpointing": False,
                                            "device": "cpu", "compute_dtype": "fp32"})
    built = build_model(cfg)
    merged = attach(built.model, adapter, cfg.model).merge_and_unload()
    tmp = out.with_name(f".{out.name}.merge.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp))
        built.tokenizer.save_pretrained(str(tmp))
        install(tmp, out)
    except OSError as exc:  # the disk filled, the directory went away: one line, the temporary removed
        raise UserError(f"merged_out: cannot write {out} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {adapter.path} into {cfg.model}; wrote {out}/")
    return 0


def check_merged_out(out: Path, overwrite: bool) -> None:
    """A new directory, an empty one, or (with --overwrite) one with files; never a file."""
    from memtune.run_dir import check_dir_target

    check_dir_target(out, "merged_out")
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise UserError(f"merged_out: {out} is not empty ({shown}); choose a new directory, or add "
                            f"--overwrite to replace the merged model's files there (other files stay)")


def install(tmp: Path, out: Path) -> None:
    """Put the files written in `tmp` into `out`: a rename when `out` is new, else file by file."""
    if not out.exists():
        tmp.rename(out)
        return
    written = {p.name for p in tmp.iterdir()}
    for name in sorted(written):
        if (out / name).is_dir():  # checked before anything there changes
            raise UserError(f"merged_out: {out / name} is a directory; the merged model writes a file of that name")
    for pattern in STALE_WEIGHTS:
        for stale in out.glob(pattern):
            if stale.name not in written and stale.is_file():
                stale.unlink()
    # config.json last: until it is replaced, the directory does not claim to hold the new model
    for name in sorted(written, key=lambda n: n == "config.json"):
        os.replace(tmp / name, out / name)
