#!/usr/bin/env python
"""TRL's SFTTrainer with memtune.apply against SFTTrainer with Unsloth, on one saved random-weight model.

Both stacks train the same saved model (the DeepSeek-R1-Distill-Qwen-1.5B shape with seeded
random bf16 weights, `shared_model`) on the same random tokens, NF4 with double quantization,
LoRA r=8 alpha=16 dropout 0 on q_proj/v_proj, batch 1, AdamW lr 2e-4 (constant), grad-norm
clip 1.0, through the same SFTConfig:

  memtune   the model as a Hugging Face user builds it (AutoModelForCausalLM.from_pretrained
            with a BitsAndBytesConfig, sdpa attention, then peft get_peft_model), then
            `memtune.apply(model)`; SFTConfig(gradient_checkpointing=False): memtune's
            checkpointing is one of the techniques apply switched on
  unsloth   FastLanguageModel.from_pretrained(load_in_4bit=True) and
            FastLanguageModel.get_peft_model(use_gradient_checkpointing="unsloth")

Each stack trains in its own subprocess (a fresh CUDA context). A TrainerCallback times every
step between torch.cuda.synchronize() calls (on_step_begin / on_step_end); the record keeps the
median after --warmup steps, and the peaks allocated and reserved over training, model included.
Records are appended to --out (a JSON list like compare.py's); the .md beside it is
regenerated from all of them.

  python benchmarks/trainer_compare.py --out $OUT/trainer-h200.json          # on the H200, both stacks
  python benchmarks/trainer_compare.py --device cpu --preset tiny-test --seq-len 64 --steps 3 \\
      --warmup 1 --stacks memtune --out /tmp/t/trainer.json                    # CPU plumbing
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

from child_process import run_logged, tail  # noqa: E402
from compare_records import (append_record, check_rounds, finish_record, fmt, gb, latest_records,  # noqa: E402,F401
                             load_records, median_after_warmup, ratio_section)
from memtune.config import write_text_atomic  # noqa: E402
from memtune.provenance import now_iso  # noqa: E402
from shared_model import PRESETS, prepare_model_dir, random_batches  # noqa: E402
from stacks.common import LEARNING_RATE, LORA, MAX_GRAD_NORM, TARGETS  # noqa: E402

STACKS = ("memtune", "unsloth")
MODE = "trainer"
DEFAULT_OUT = HERE / "results" / "trainer-h200.json"
# the issue's target for memtune.apply under SFTTrainer: the lead `memtune train` has over Unsloth
TARGET_MEMORY_RATIO, TARGET_SPEED_RATIO = 0.8, 1.1


# =========================================================================== worker (one stack, in a subprocess)


def memtune_model(model_dir: str, device, targets: list[str], options: dict) -> tuple[Any, Any, dict]:
    """The model as a Hugging Face user builds it, then memtune.apply; (model, tokenizer, apply's report)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import memtune

    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, attn_implementation="sdpa",
        device_map={"": device.index if device.type == "cuda" else "cpu"})
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=targets,
        bias="none", task_type="CAUSAL_LM"))
    report = memtune.apply(model, **options)
    print(report, flush=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, {"applied": list(report.applied), "skipped": dict(report.skipped)}


def unsloth_model(model_dir: str, seq_len: int, targets: list[str], seed: int) -> tuple[Any, Any, dict]:
    from stacks import unsloth_stack

    model, tokenizer = unsloth_stack.load(model_dir, seq_len, targets, seed)
    return model, tokenizer, {}


def step_timer(device):
    """A TrainerCallback that times each optimizer step between synchronizations and keeps the logged losses."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def sft_config(spec: dict, cuda: bool, output_dir: Path):
    """The same SFTConfig for both stacks: batch 1, no packing, no Trainer checkpointing, constant lr."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=1, gradient_accumulation_steps=1,
        max_length=spec["seq_len"], packing=False, bf16=cuda, gradient_checkpointing=False,
        max_steps=spec["steps"], learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        disable_tqdm=True, use_cpu=not cuda)


def train_with_sft(spec: dict) -> dict:
    """Build the stack's model, train spec['steps'] SFTTrainer steps, return what the record needs."""
    if spec["stack"] == "unsloth":
        import unsloth  # noqa: F401 - before transformers, peft and trl: it patches them at import
    import torch

    from memtune.provenance import git_commit, package_versions

    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    info: dict[str, Any] = {"versions": package_versions(("unsloth", "unsloth-zoo", "trl", "datasets")),
                            "git_commit": git_commit(),
                            "gpu_name": torch.cuda.get_device_name(device) if cuda else None}
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(spec["seed"])
    targets = TARGETS["qv"]
    if spec["stack"] == "memtune":
        model, tokenizer, applied = memtune_model(spec["model_dir"], device, targets, spec["apply_options"])
    else:
        model, tokenizer, applied = unsloth_model(spec["model_dir"], spec["seq_len"], targets, spec["seed"])
    info.update(applied)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dataset = token_dataset(spec, tokenizer)
    from trl import SFTTrainer

    timer = step_timer(device)
    trainer = SFTTrainer(model=model, args=sft_config(spec, cuda, Path(spec["work"]) / "trainer"),
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    info["loss_forward"] = forward_name(model)
    if cuda:
        info["model_allocated_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    if cuda:
        info["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    info["losses"] = timer.losses
    info["step_times_s"] = timer.times
    return info


def forward_name(model) -> str:
    """Whose forward the causal LM runs once SFTTrainer is built: TRL (1.15 and later) puts its own fused
    LM head over the one memtune.apply installed, so the record says which loss trained."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(lm.forward, "__func__", lm.forward)
    code = getattr(forward, "__code__", None)
    if code is None:
        return repr(forward)
    where = "/".join(Path(code.co_filename).parts[-3:])  # e.g. trl/trainer/utils.py (wraps() hides __module__)
    return f"{where}:{code.co_qualname}"


def token_dataset(spec: dict, tokenizer):
    """memtune's random batches (the same tokens compare.py's stacks see) as a pre-tokenized dataset."""
    from datasets import Dataset

    batches = random_batches(spec["model_dir"], spec["seq_len"], spec["seed"], spec["max_positions"], tokenizer,
                             spec["steps"])
    return Dataset.from_dict({"input_ids": [b["input_ids"][0].tolist() for b in batches]})


def worker(spec: dict) -> int:
    from compare_worker import report_result

    return report_result(spec, train_with_sft)


# =========================================================================== parent side


RESULT_KEYS = ("gpu_name", "versions", "git_commit", "peak_allocated_bytes", "peak_reserved_bytes",
               "model_allocated_bytes", "trainable_params", "losses", "step_times_s", "applied", "skipped",
               "loss_forward", "error", "traceback")


def run_stack(args: argparse.Namespace, stack: str, model_dir: Path, repeat: dict | None) -> dict:
    """One stack in one subprocess; returns its record (also appended to args.out)."""
    record: dict[str, Any] = {
        "stack": stack, "seq_len": args.seq_len, "lora_targets": "qv", "gpu_memory_cap": None,
        "preset": args.preset, "mode": MODE, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "device": args.device, "date": now_iso(), **(repeat or {}),
    }
    work = Path(tempfile.mkdtemp(prefix=f"trainer-{stack}-{args.seq_len}-", dir=args.work_dir))
    spec = {"stack": stack, "model_dir": str(model_dir), "seq_len": args.seq_len, "steps": args.steps,
            "seed": args.seed, "device": args.device, "work": str(work), "result": str(work / "result.json"),
            "max_positions": PRESETS[args.preset]["config"]["max_position_embeddings"],
            "apply_options": args.apply_options}
    if stack == "memtune":
        record["apply_options"] = args.apply_options
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    record["command"] = shlex.join(cmd)
    print(f"trainer: {stack} @ {args.seq_len} ...", flush=True)
    started = time.perf_counter()
    log = work / "log.txt"
    code, rss = run_logged(cmd, ROOT, log, args.timeout)
    record.update(wall_s=round(time.perf_counter() - started, 1), peak_host_rss_bytes=rss, exit_code=code)
    fill_record(record, work / "result.json", code, tail(log, 20000), args.warmup)
    return finish_record(record, code, log, args.timeout, args.out, "trainer")


def fill_record(record: dict, path: Path, code: int | None, log_tail: str, warmup: int) -> None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        record["status"] = "oom" if "out of memory" in log_tail.lower() else "error"
        record["error"] = f"no result from the worker (exit {code})"
        return
    record["status"] = result.get("status", "error")
    record.update({key: result[key] for key in RESULT_KEYS if key in result})
    times = result.get("step_times_s") or []
    if record["status"] == "ok" and len(times) <= warmup:
        record.update(status="error", error=f"{len(times)} timed steps, not more than the {warmup} warm-up steps")
    if record["status"] == "ok":
        step = median_after_warmup(times, warmup)
        record.update(step_time_s=step, tokens_per_s=record["seq_len"] / step if step else None,
                      loss_step1=(result.get("losses") or [None])[0])


def write_report(out: Path, preset: str) -> Path:
    """The markdown beside the records: the newest row per stack and length, memtune against Unsloth."""
    rows = latest_records([r for r in load_records(out) if r.get("mode") == MODE], preset)
    gpu = next((r.get("gpu_name") for r in reversed(rows) if r.get("gpu_name")), None)
    versions = next((r.get("versions") for r in reversed(rows) if r.get("versions")), None)
    lines = [f"# TRL SFTTrainer: memtune.apply against Unsloth ({preset})", "",
             f"GPU: {gpu or 'none (CPU)'}; versions: "
             + (", ".join(f"{k} {v}" for k, v in versions.items() if v) if versions else "-"), "",
             "The same saved random-weight model and random tokens; NF4 double-quant, bf16, LoRA r=8 alpha=16 "
             "dropout 0 on q_proj/v_proj, batch 1, AdamW lr 2e-4, one SFTConfig for both (packing off, "
             "Trainer checkpointing off: each stack checkpoints its own way). Peaks over training, model "
             "included; tokens/s from the median step after warm-up, timed by a TrainerCallback between "
             "CUDA synchronizations.", "",
             "| seq_len | stack | status | peak alloc GB | peak reserved GB | host RSS GB | tokens/s | step s "
             "| loss step 1 |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        status = r.get("status", "?")
        if status != "ok" and r.get("error"):
            status += f" ({str(r['error'])[:60].replace('|', '/')})"
        runs = r.get("tokens_per_s_runs") or []
        rounds = f" (median of {' / '.join(format(v, ',.0f') for v in runs)})" if len(runs) > 1 else ""
        lines.append(f"| {r['seq_len']} | {r['stack']} | {status} | {gb(r.get('peak_allocated_bytes'))} "
                     f"| {gb(r.get('peak_reserved_bytes'))} | {gb(r.get('peak_host_rss_bytes'))} "
                     f"| {fmt(r.get('tokens_per_s'), ',.0f')}{rounds} | {fmt(r.get('step_time_s'), '.3f')} "
                     f"| {fmt(r.get('loss_step1'), '.4f')} |")
    lines += ratio_section(rows)
    lines += _target_lines(rows) + _apply_lines(rows)
    md = out.with_suffix(".md")
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md


def _target_lines(rows: list[dict]) -> list[str]:
    """Whether memtune.apply keeps `memtune train`'s lead: at most 0.8x Unsloth's memory, at least 1.1x its speed."""
    out = []
    for ours in (r for r in rows if r["stack"] == "memtune" and r.get("status") == "ok"):
        theirs = next((r for r in rows if r["stack"] == "unsloth" and r["seq_len"] == ours["seq_len"]
                       and r.get("status") == "ok"), None)
        if not theirs or not ours.get("peak_allocated_bytes") or not theirs.get("peak_allocated_bytes"):
            continue
        memory = ours["peak_allocated_bytes"] / theirs["peak_allocated_bytes"]
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        met = memory <= TARGET_MEMORY_RATIO and speed >= TARGET_SPEED_RATIO
        out.append(f"- {ours['seq_len']} tokens: memory {memory:.2f}x, speed {speed:.2f}x Unsloth's: target "
                   f"(<= {TARGET_MEMORY_RATIO}x, >= {TARGET_SPEED_RATIO}x) {'met' if met else 'not met'}")
    return ["", "## Target", ""] + out if out else []


def _apply_lines(rows: list[dict]) -> list[str]:
    ours = next((r for r in reversed(rows) if r["stack"] == "memtune" and "applied" in r), None)
    if ours is None:
        return []
    lines = ["", "## memtune.apply", "", f"options: `{ours.get('apply_options') or {}}`", "",
             "applied: " + (", ".join(ours["applied"]) or "none"),
             f"the causal LM's forward under SFTTrainer: `{ours.get('loss_forward', '-')}`", ""]
    lines += [f"- skipped {name}: {why}" for name, why in sorted((ours.get("skipped") or {}).items())]
    return lines


def parse_apply_options(text: str) -> dict[str, Any]:
    """'offload_activations=false,tiled_mlp_chunk=4096' -> options for memtune.apply (YAML scalars)."""
    import yaml

    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...]; got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--stacks", default=",".join(STACKS), help="comma list of memtune, unsloth (default both)")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--steps", type=int, default=10, help="SFTTrainer steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="rounds, the stacks interleaved (default 1)")
    p.add_argument("--timeout", type=float, default=400, help="seconds per run before it is killed (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), default="r1-1.5b")
    p.add_argument("--apply-options", type=parse_apply_options, default={}, metavar="KEY=VALUE,...",
                   help="options for memtune.apply, named as memtune's config keys (default: none, its defaults)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "memtune-compare",
                   help="where the random-weight model is saved once (shared with compare.py)")
    p.add_argument("--work-dir", default=None, help="parent of the per-run directories (default: $TMPDIR)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the .md from --out")
    args = p.parse_args(argv)
    args.stack_list = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in args.stack_list if s not in STACKS]
    if unknown or not args.stack_list:
        p.error(f"--stacks: expected a comma list of {', '.join(STACKS)}; got {args.stacks!r}")
    check_rounds(p, args)
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2")
    max_positions = PRESETS[args.preset]["config"]["max_position_embeddings"]
    if args.seq_len > max_positions:
        p.error(f"--seq-len {args.seq_len} is longer than the {args.preset} shape's {max_positions} positions")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    args = parse_args(argv)
    records = []
    if not args.report_only:
        model_dir = prepare_model_dir(args.preset, args.model_cache)
        group = now_iso() if args.repeat > 1 else None
        for round_index in range(args.repeat):
            repeat = {"repeat_group": group, "repeat_round": round_index + 1} if group else None
            records += [run_stack(args, stack, model_dir, repeat) for stack in args.stack_list]
    md = write_report(args.out, args.preset)
    print(f"trainer: records {args.out}; table {md}")
    print(md.read_text(), end="")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
