#!/usr/bin/env python
"""Compare memtune with the usual LoRA/QLoRA stacks on one model shape, one subprocess per run.

Stacks (all NF4 double-quant with bf16 compute, LoRA r=8 alpha=16 dropout 0,
batch 1, AdamW lr 2e-4, grad-norm clip 1.0, the same random-weight model and
the same random tokens):

  seed            transformers + peft + bitsandbytes as users write it:
                  prepare_model_for_kbit_training, gradient_checkpointing_enable,
                  the model's own loss via labels, no autocast
  seed-autocast   the same, forward under torch.autocast(bf16)
  seed-fp32       the same model in fp32 throughout (bnb_4bit_compute_dtype fp32, fp32 weights
                  outside the 4-bit linears): not a stack users run, the full-precision reference for
                  --grad-check --grad-reference seed-fp32 (seed itself runs its 4-bit matmuls in bf16)
  liger           seed-autocast + liger_kernel apply_liger_kernel_to_qwen2()
  unsloth         FastLanguageModel (load_in_4bit) + get_peft_model(use_gradient_checkpointing="unsloth"),
                  forward under autocast(bf16) as its trainer runs it
  memtune         `python -m memtune train` with its defaults (plus --memtune-args)
  NAME            a memtune variant declared with --variant NAME="--flag value ..."

Each stack other than memtune's is one module in benchmarks/stacks/; all of them train in one
measuring loop (compare_worker.py); records and reports are compare_records.py and
compare_report.py. Scenario files (benchmarks/scenarios/, run_scenario.py) hold the runs of each
experiment.

Each run is a subprocess (a fresh CUDA context, the GPU cap applied inside it,
a per-run timeout, the host peak RSS taken from the kernel via wait4). Records
are appended to --out (JSON list, written atomically after every run; earlier
records are never dropped), and compare-*.md / compare-*.png beside it are
regenerated from all records.

  python benchmarks/compare.py --seq-lens 16384,65536
  python benchmarks/compare.py --seq-lens 16384 --stacks memtune,unsloth --repeat 3   # interleaved rounds

A host-bound step varies by about 5% between runs of the same build, so
`--repeat N` runs the stacks N rounds over, interleaved, and the reports show
each row's median tokens/s (and highest peak) over its round with the count.
  python benchmarks/compare.py --max-length-search --gpu-memory 24GiB
  python benchmarks/compare.py --preset tiny-test --stacks seed,memtune --out /tmp/c/compare.json   # CPU plumbing
"""


from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

# the parent process imports no torch: records, reports and the stacks' registry only
from child_process import run_logged, tail  # noqa: E402
from compare_records import (DEFAULT_GRAD_REFERENCE, append_record, check_rounds, finish_record,  # noqa: E402
                             latest_records, load_records, loss_agreement, median_after_warmup, ratio_section,
                             search_summary)
from compare_report import write_reports  # noqa: E402
from compare_worker import gradient_errors, lora_key, set_common_lora_weights, worker  # noqa: E402,F401
from memtune.config import parse_memory_size  # noqa: E402
from memtune.provenance import now_iso  # noqa: E402
from shared_model import PRESETS, drop_model_dir, family_of, prepare_model_dir  # noqa: E402,F401
from stacks import BUILTIN_STACKS, REFERENCE_STACKS  # noqa: E402
from stacks import memtune_stack  # noqa: E402
from stacks.common import LORA, TARGETS  # noqa: E402
import families_report  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compare-h200.json"
# ratio_section, search_summary, lora_key, set_common_lora_weights, gradient_errors: this module's
# names for its tests and for the scripts that import it
__all__ = ["main", "parse_args", "append_record", "load_records", "latest_records", "loss_agreement",
           "ratio_section", "search_summary", "write_reports", "lora_key", "set_common_lora_weights",
           "gradient_errors", "prepare_model_dir"]


def parse_size(text: str) -> int:
    """'24GiB' -> bytes (memtune's own parser, as an argparse type)."""
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# =========================================================================== one run (parent side)


def run_one(args: argparse.Namespace, stack: str, seq_len: int, model_dir: Path, mode: str,
            repeat: dict | None = None) -> dict:
    """One subprocess; returns the record (also appended to args.out)."""
    record: dict[str, Any] = {
        "stack": stack, "seq_len": seq_len, "lora_targets": args.lora_targets,
        "gpu_memory_cap": args.gpu_memory or None,
        "gpu_memory_cap_bytes": parse_size(args.gpu_memory) if args.gpu_memory else None,
        "preset": args.preset, "family": args.model_type, "lora_rank": args.lora_rank, "mode": mode,
        "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "date": now_iso(), **(repeat or {}),
    }
    work = Path(tempfile.mkdtemp(prefix=f"compare-{stack}-{seq_len}-", dir=args.work_dir))
    log = work / "log.txt"
    cmd, via_cli = _command(args, record, model_dir, work)
    record["command"] = shlex.join(cmd)
    print(f"compare: {stack} @ {seq_len} ...", flush=True)
    started = time.perf_counter()
    code, rss = run_logged(cmd, ROOT, log, args.timeout)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["peak_host_rss_bytes"] = rss
    record["exit_code"] = code
    if via_cli:
        memtune_stack.fill_record(record, work / "run" / "metrics.json", code, tail(log, 20000))
    else:
        _fill_from_worker(record, work / "result.json", code, log, args.warmup)
    return finish_record(record, code, log, args.timeout, args.out, "compare")


def _command(args: argparse.Namespace, record: dict, model_dir: Path, work: Path) -> tuple[list[str], bool]:
    """The child's command line, and whether it is `memtune train` (else this script's worker).

    memtune rows train through its CLI; the other stacks, and every gradient check, run in the
    worker (which builds a memtune row in-process from the same train flags)."""
    stack, seq_len, mode = record["stack"], record["seq_len"], record["mode"]
    extra = args.memtune_args if stack == "memtune" else args.variants.get(stack)
    train_args = None
    if extra is not None:  # a memtune row
        record["stack_args"] = extra
        train_args = memtune_stack.train_args(args, model_dir, seq_len, work / "run", extra)
    if train_args is not None and mode != "grad":
        return [sys.executable, "-m", "memtune", "train", *train_args], True
    grad = mode == "grad"
    spec = {"stack": stack, "seq_len": seq_len, "lora_targets": args.lora_targets, "seed": args.seed,
            "lora_rank": args.lora_rank, "model_type": args.model_type,
            "steps": 1 if grad else args.steps, "model_dir": str(model_dir), "result": str(work / "result.json"),
            "max_positions": PRESETS[args.preset]["config"]["max_position_embeddings"],
            "gpu_memory_cap_bytes": None if grad else record["gpu_memory_cap_bytes"]}
    if grad:
        spec.update(grad_file=str(work / "grads.pt"), memtune_argv=train_args)
        record.update(grad_file=spec["grad_file"], grad_reference=args.grad_reference)
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], False


def _fill_from_worker(record: dict, path: Path, code: int | None, log: Path, warmup: int) -> None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        record["status"] = "oom" if "out of memory" in tail(log, 20000).lower() else "error"
        record["error"] = f"no result from the worker (exit {code})"
        return
    record["status"] = result.get("status", "error")
    if result.get("error"):
        record["error"] = result["error"]
    for key in ("gpu_name", "versions", "git_commit", "peak_allocated_bytes", "peak_reserved_bytes",
                "model_allocated_bytes", "trainable_params", "losses", "step_times_s", "traceback"):
        if key in result:
            record[key] = result[key]
    if record["status"] == "ok":
        record["loss_step1"] = result["losses"][0]
    if record["status"] == "ok" and record.get("mode") != "grad":
        step = median_after_warmup(result["step_times_s"], warmup)
        record["step_time_s"] = step
        record["tokens_per_s"] = record["seq_len"] / step if step else None


# =========================================================================== modes


def fixed_lengths(args, stacks: list[str], model_dir: Path) -> None:
    # one id for this invocation: the reports merge the rounds of a row that share it
    group = now_iso() if args.repeat > 1 else None
    for seq_len in args.seq_lens:
        for round_index in range(args.repeat):
            for stack in stacks:
                run_one(args, stack, seq_len, model_dir, "fixed",
                        repeat={"repeat_group": group, "repeat_round": round_index + 1} if group else None)


def gradient_check(args, stacks: list[str], model_dir: Path) -> None:
    """LoRA gradients of one step from common weights, each stack against --grad-reference (run first)."""
    import torch

    reference_stack = args.grad_reference
    order = [reference_stack] + [s for s in stacks if s != reference_stack]
    for seq_len in args.seq_lens:
        reference = None
        for stack in order:
            record = run_one(args, stack, seq_len, model_dir, "grad")
            if record.get("status") != "ok":
                continue
            grads = torch.load(record["grad_file"])
            if reference is None:
                reference = grads
            record.update(gradient_errors(grads, reference), grad_reference=reference_stack)
            append_record(args.out, record)  # the newest record per row wins in the reports
            print(f"compare: {stack} @ {seq_len}: LoRA gradients vs {reference_stack}: relative error "
                  f"{record['grad_rel_error']:.2e} (worst tensor {record['grad_worst_tensor_rel_error']:.2e})",
                  flush=True)


def max_length_search(args, stacks: list[str], model_dir: Path) -> None:
    """Per stack: double from the start length until a failure, then bisect to the granularity."""
    start, top, step = args.search_start, args.search_max, args.search_granularity
    for stack in stacks:
        ok, fail = 0, None
        length = start
        while length <= top:
            r = run_one(args, stack, length, model_dir, "search")
            if r["status"] != "ok":
                fail = length
                break
            ok = length
            if length == top:
                break
            length = min(length * 2, top)
        while ok and fail is not None and fail - ok > step:
            mid = (ok + fail) // 2
            mid -= mid % step
            if mid <= ok:
                break
            r = run_one(args, stack, mid, model_dir, "search")
            if r["status"] == "ok":
                ok = mid
            else:
                fail = mid
        print(f"compare: {stack}: longest ok {ok or 'none'}"
              + (f", shortest failing {fail}" if fail else ""), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--stacks", default=",".join(BUILTIN_STACKS),
                   help="comma list of seed, seed-autocast, liger, unsloth, memtune and --variant names")
    p.add_argument("--seq-lens", default=None, help="comma list (default: the preset's, 4096..131072)")
    p.add_argument("--lora-targets", choices=sorted(TARGETS), default="qv")
    p.add_argument("--lora-rank", type=int, default=LORA["r"], help="LoRA rank (alpha = 2 x rank; default 8)")
    p.add_argument("--gpu-memory", default="", help="cap each run's GPU memory, e.g. 24GiB (default: the whole card)")
    p.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the fixed-length runs, the stacks interleaved; reports show each row's "
                        "median over its rounds (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed (default 900)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--preset", choices=sorted(PRESETS), default="r1-1.5b")
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "memtune-compare",
                   help="where the random-weight model is saved once (default: $TMPDIR/memtune-compare)")
    p.add_argument("--work-dir", default=None, help="parent of the per-run directories (default: $TMPDIR)")
    p.add_argument("--memtune-args", default="", help="extra flags for the memtune stack, e.g. '--offload-activations'")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="a memtune variant stack: NAME='--tiled-mlp-chunk 4096 ...' (repeatable)")
    p.add_argument("--memtune-model", default="dir",
                   help="'dir' (default): the same saved random weights as the other stacks, so first-step "
                        "losses are comparable; or a memtune preset name, run with --random-init")
    p.add_argument("--loss-tolerance", type=float, default=0.05,
                   help="largest first-step loss difference from the median before it is flagged")
    p.add_argument("--max-length-search", action="store_true",
                   help="find each stack's longest trainable length (use with --gpu-memory)")
    p.add_argument("--grad-reference", default=DEFAULT_GRAD_REFERENCE,
                   help="the stack whose gradients --grad-check compares the others with (default seed; "
                        "seed-fp32 is the full-precision one)")
    p.add_argument("--grad-check", action="store_true",
                   help="compare each stack's LoRA gradients of one step with seed's (from common LoRA weights)")
    p.add_argument("--search-start", type=int, default=None)
    p.add_argument("--search-max", type=int, default=None)
    p.add_argument("--search-granularity", type=int, default=None)
    p.add_argument("--report", choices=("compare", "families"), default="compare",
                   help="the .md/.png written beside --out: one preset's table (compare) or one row per "
                        "family, memtune against the other stack (families)")
    p.add_argument("--drop-model", action="store_true",
                   help="delete the saved random-weight model afterwards (8B shapes are 16 GB a model)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the .md and .png from --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else list(preset["seq_lens"])
    start, top, step = preset["search"]
    args.search_start = args.search_start or start
    args.search_max = args.search_max or top
    args.search_granularity = args.search_granularity or step
    if args.gpu_memory:
        try:
            parse_size(args.gpu_memory)
        except argparse.ArgumentTypeError as exc:
            p.error(f"--gpu-memory: {exc}")
    args.variants = {}
    for item in args.variant:
        name, sep, flags = item.partition("=")
        if not sep or not name or name in BUILTIN_STACKS + REFERENCE_STACKS:
            p.error(f"--variant: expected NAME=FLAGS with a new name; got {item!r}")
        args.variants[name] = flags
    args.stack_list = [s.strip() for s in args.stacks.split(",") if s.strip()]
    known = (*BUILTIN_STACKS, *REFERENCE_STACKS, *args.variants)
    unknown = [s for s in [*args.stack_list, args.grad_reference] if s not in known]
    if unknown:
        p.error(f"--stacks: unknown {', '.join(unknown)}")
    check_rounds(p, args)
    args.out = args.out.resolve()
    args.model_type = family_of(args.preset)
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if not args.report_only:
        model_dir = prepare_model_dir(args.preset, args.model_cache)
        if args.grad_check:
            gradient_check(args, args.stack_list, model_dir)
        elif args.max_length_search:
            max_length_search(args, args.stack_list, model_dir)
        else:
            fixed_lengths(args, args.stack_list, model_dir)
        if args.drop_model:
            drop_model_dir(args.preset, args.model_cache)
    if args.report == "families":
        md, png = families_report.write_reports(args.out)
    else:
        md, png = write_reports(args.out, args.preset, args.loss_tolerance)
    print(f"compare: records {args.out}; table {md}; plot {png}")
    fixed = [r for r in load_records(args.out) if r.get("mode", "fixed") == "fixed"]
    problems = loss_agreement(latest_records(fixed, args.preset), args.loss_tolerance)
    for problem in problems:
        print(f"compare: warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
