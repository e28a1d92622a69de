"""`memtune merge`: fold a LoRA adapter into the base weights and save a plain model.

The base is loaded unquantized (in the compute dtype): merging into 4-bit
weights would round the adapter away.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from memtune.cli import add_config_flags, config_from_args
from memtune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--adapter", required=True, help="a LoRA adapter directory (from memtune train: RUN/adapter)")
    parser.add_argument("--merged-out", required=True, help="directory to write the merged model to")


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from memtune.models import build_model

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"adapter: {adapter} has no adapter_config.json")
    cfg = config_from_args(args, overrides={"quantization": "none", "lora": False, "gradient_checkpointing": False,
                                            "device": "cpu", "compute_dtype": "fp32"})
    built = build_model(cfg)
    model = PeftModel.from_pretrained(built.model, str(adapter))
    merged = model.merge_and_unload()
    out = Path(args.merged_out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    built.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"merged {adapter} into {cfg.model}; wrote {out}/")
    return 0
