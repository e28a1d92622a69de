"""`memtune estimate [train flags] [--json]`: predicted peak GPU memory, without loading weights."""

from __future__ import annotations

import argparse
import json

from memtune.cli import add_config_flags, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: total_bytes, breakdown (component -> bytes), cuda_context_bytes ...")


def run(args: argparse.Namespace) -> int:
    from memtune.bounds import check_lora_rank_for_shape
    from memtune.estimate import estimate_memory, format_estimate, load_model_config, model_shape

    cfg = config_from_args(args)
    model_config = load_model_config(cfg.model)
    # a rank no layer can hold, refused as train refuses it
    check_lora_rank_for_shape(cfg, model_shape(model_config, source=f"model '{cfg.model}'"))
    estimate = estimate_memory(cfg, model_config)
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
    else:
        print(format_estimate(estimate, cfg))
    return 0
