"""`memtune VERB ...`: parse, call the verb's module, print. No logic of its own.

Each verb lives in its own module with `add_arguments(parser)` and
`run(args) -> int`. A UserError anywhere becomes one line on stderr and exit
code 2; nothing a user types produces a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from dataclasses import fields
from typing import Any, MutableMapping, Sequence

from memtune.errors import EXIT_OOM, UserError, is_out_of_memory

# verb -> (module, one-line description)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("memtune.train_cmd", "fine-tune one configuration and measure it"),
    "study": ("memtune.study", "run a grid of configurations and write the seed's tables"),
    "report": ("memtune.report", "tables and plots from a results database"),
    "estimate": ("memtune.estimate_cmd", "predict peak GPU memory without a GPU"),
    "fit": ("memtune.fit", "find the configurations that fit a memory budget"),
    "eval": ("memtune.evaluate_cmd", "accuracy of a model (+ adapter) on a task"),
    "merge": ("memtune.merge", "fold a LoRA adapter into the base weights and save"),
}


# What argparse must take as a value, not an option, after a flag: negative numbers in every form
# float() reads. Python 3.11's pattern (^-\d+$|^-\d*\.\d+$) misses "-1e-4" and "-inf", so
# `--learning-rate -1e-4` said "expected one argument" instead of the range check's
# "learning_rate: expected a number > 0". Python 3.14 widened it the same way (gh-123945).
NEGATIVE_NUMBER = re.compile(r"^-(\d[\d_]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line and exit code 2, not a page of usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's hook for this; no flag looks like a number

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(UserError.exit_code, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (`lora_rank` -> `--lora-rank`), plus --config.

    Defaults are SUPPRESSed so that only flags the user typed override the YAML.
    """
    from memtune.config import RunConfig, field_help, sections

    helps = field_help()
    parser.add_argument("--config", metavar="YAML", help="a YAML file of config keys (flat or by section); flags override it")
    groups = {name: parser.add_argument_group(f"{name} options") for name in sections()}
    section_of = {field: name for name, names in sections().items() for field in names}
    for f in fields(RunConfig):
        target = groups.get(section_of.get(f.name), parser)
        flag = "--" + f.name.replace("_", "-")
        text = short_help(helps.get(f.name, "")).replace("%", "%%")  # argparse %-formats help strings
        default_text = f"(default: {f.default})"
        if f.type in ("bool", bool):
            target.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                help=f"{text} {default_text}")
            # on-by-default switches show their off flag
            target.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                default=argparse.SUPPRESS,
                                help=f"turn {flag} off" if f.default is True else argparse.SUPPRESS)
        else:
            target.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar="VALUE",
                                help=f"{text} {default_text}")


HELP_CHARS = 90  # one or two lines an option; what each technique costs and buys is in docs/techniques.md


def short_help(text: str) -> str:
    """The first sentence of a field's comment, within HELP_CHARS."""
    sentence = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0].rstrip(".")
    if len(sentence) > HELP_CHARS:
        sentence = sentence[:HELP_CHARS].rsplit(" ", 1)[0] + " ..."
    return sentence


def config_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None):
    """YAML (if --config) <- flags the user typed <- overrides; validated."""
    from memtune.config import FIELD_NAMES, from_dict, load_yaml

    values: dict[str, Any] = {}
    source = "config"
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
        source = args.config
    values.update({k: v for k, v in vars(args).items() if k in FIELD_NAMES})
    values.update(overrides or {})
    return from_dict(values, source=source)


def _usage() -> str:
    lines = ["usage: memtune VERB [options]   (memtune VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<9} {description}" for verb, (_, description) in VERBS.items()]
    return "\n".join(lines)


def build_verb_parser(verb: str) -> tuple[argparse.ArgumentParser, Any]:
    """The parser of one verb; only that verb's module is imported (fast --help)."""
    module_name, description = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = OneLineParser(prog=f"memtune {verb}", description=description)
    module.add_arguments(parser)
    return parser, module


def quiet_libraries() -> None:
    """Silence library chatter that says nothing about the user's run."""
    import logging
    import warnings

    # bitsandbytes warns at import that an optional CPU kernel is not
    # downloadable; its own CPU path works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers 5.x renames gradient checkpointing methods that peft still calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# What every memtune process runs with unless the user set otherwise.
RUN_ENVIRONMENT: dict[str, str] = {
    # No network, ever: a hub id must already be in the local cache.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # CUDA memory in segments that grow in place: a long-context step allocates and frees blocks
    # of very different sizes (a layer's [tokens, intermediate] chunks beside a few MB of weights),
    # which fragments fixed segments, and reserved memory (what the card must hold) runs above the
    # allocated peak. Every H200 comparison row was measured with this setting (benchmarks/compare.py
    # gives every stack this environment), so memtune's own runs match them. Read when CUDA first
    # allocates.
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}


# Every process memtune starts for several GPUs (torchrun's ranks, `study --gpus` runs) has NVLink
# multicast (NVLS) off, as the machines it was built for require; rings over NVLink/PCIe stay.
MULTI_GPU_ENVIRONMENT: dict[str, str] = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                         "NVSHMEM_DISABLE_NVLS": "1"}


def set_run_environment(env: MutableMapping[str, str]) -> None:
    """Fill in RUN_ENVIRONMENT where `env` (os.environ, or a child process's) has no value; a user's wins."""
    for key, value in RUN_ENVIRONMENT.items():
        env.setdefault(key, value)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    set_run_environment(os.environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb = argv[0]
    if verb not in VERBS:
        print(f"memtune: error: unknown verb {verb!r}; expected one of {', '.join(VERBS)}", file=sys.stderr)
        return UserError.exit_code
    parser, module = build_verb_parser(verb)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # --help (0) or an argument error (2, already printed)
        return int(exc.code or 0)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"memtune {verb}: error: {_one_line(str(exc))}", file=sys.stderr)
        return UserError.exit_code
    except (MemoryError, RuntimeError) as exc:
        # out of memory is a result to report (exit 3), on a CPU too; any other error is a bug: traceback
        if not is_out_of_memory(exc):
            raise
        print(f"memtune {verb}: out of memory: {_one_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_OOM
    except BrokenPipeError:  # the output went to a pager or `head` that closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"memtune {verb}: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    """A message on one line: a library's multi-line text joined, so the error stays one line on stderr."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
