"""`memtune eval`: accuracy of a model, optionally with a LoRA adapter, on held-out examples.

    memtune eval                                   # the tiny base on the built-in test split
    memtune eval --adapter runs/X/adapter          # after fine-tuning
    memtune eval --model DIR --data test.jsonl --predictions preds.jsonl

The model and data flags are those of `memtune train`, so a run's
config.yaml can be passed with --config. Per-example predictions are written
as JSONL (by default beside the adapter, else under runs/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memtune.adapters import Adapter, attach, open_adapter
from memtune.cli import add_config_flags, config_from_args
from memtune.config import RunConfig, write_text_atomic
from memtune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--adapter", metavar="DIR", default="",
                        help="a peft LoRA adapter directory (e.g. runs/X/adapter) to apply to the model")
    parser.add_argument("--predictions", metavar="FILE", default="",
                        help="where to write per-example predictions as JSONL "
                             "(default: predictions.jsonl beside the adapter, else under runs/)")


def run(args: argparse.Namespace) -> int:
    # Evaluation never trains: no activation checkpointing to slow generation.
    cfg = config_from_args(args, overrides={"gradient_checkpointing": False,
                                            "offload_activations": False, "eval": True})
    from memtune.bounds import check_lora_rank
    from memtune.run_dir import check_file_target

    adapter = open_adapter(args.adapter) if args.adapter else None
    if cfg.eval_examples == 0:
        raise UserError("eval_examples: expected an integer >= 1 for memtune eval; got 0")
    out = _predictions_path(args.predictions, adapter.path if adapter else None)
    # where the results go, before the model and data load: a directory there is one line, not a traceback
    check_file_target(out, "predictions")
    check_file_target(out.with_suffix(".score.json"), "predictions")
    check_lora_rank(cfg)  # build_model adds (and eval drops) a fresh LoRA of this rank
    model, tokenizer, max_positions = _load_model(cfg, adapter)
    examples = _eval_examples(cfg, tokenizer, max_positions)

    from memtune.evaluate import evaluate_accuracy

    result = evaluate_accuracy(model, tokenizer, examples, cfg)
    adapter_path = adapter.path if adapter else None
    write_predictions(out, result, cfg, adapter_path)
    label = f"{cfg.model}" + (f" + {adapter_path}" if adapter else "")
    print(f"accuracy: {result.accuracy:.3f} ({result.correct}/{result.total}) of {label} on {cfg.data}")
    print(f"wrote {out} and {out.with_suffix('.score.json').name}")
    return 0


def _load_model(cfg: RunConfig, adapter: Adapter | None):
    from memtune.models import build_model

    built = build_model(cfg)
    model = built.model
    if hasattr(model, "unload"):
        # build_model adds a fresh (identity) LoRA for training; drop it so the
        # base is evaluated as it is, or with the adapter asked for.
        model = model.unload()
    if adapter is not None:
        model = attach(model, adapter, cfg.model)
    return model, built.tokenizer, getattr(built, "max_positions", None)


def _eval_examples(cfg: RunConfig, tokenizer, max_positions):
    from memtune.data import load_data

    examples = load_data(cfg, tokenizer, max_positions).eval
    if not examples:
        raise UserError(f"data: {cfg.data} gave no evaluation examples (is eval_examples 0?)")
    return examples[: cfg.eval_examples]


def _predictions_path(text: str, adapter: Path | None) -> Path:
    if text:
        return Path(text).expanduser()
    if adapter is not None:
        return adapter.parent / "predictions.jsonl"
    return Path("runs") / "eval" / "predictions.jsonl"


def write_predictions(path: Path, result, cfg: RunConfig, adapter: Path | None) -> None:
    """predictions JSONL, and the score beside it (`X.score.json`), each written atomically."""
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
    write_text_atomic(path, lines)
    score = {"accuracy": result.accuracy, "correct": result.correct, "total": result.total,
             "model": cfg.model, "adapter": str(adapter) if adapter else "", "data": cfg.data,
             "quantization": cfg.quantization, "config_hash": cfg.config_hash()}
    write_text_atomic(path.with_suffix(".score.json"), json.dumps(score, indent=2) + "\n")
