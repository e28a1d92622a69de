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
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from memtune.config import parse_memory_size  # noqa: E402  (yaml only: no torch in the parent)
from memtune.presets import PRESETS as MEMTUNE_PRESETS  # noqa: E402
from memtune.provenance import now_iso  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compare-h200.json"
BUILTIN_STACKS = ("seed", "seed-autocast", "liger", "unsloth", "memtune")
REFERENCE_STACKS = ("seed-fp32",)  # accepted by --stacks, never run by default
# what --grad-check compares against unless told, and what its records before --grad-reference had
DEFAULT_GRAD_REFERENCE = "seed"
TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 1.0

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B (its published config.json)
    "r1-1.5b": {
        "config": dict(MEMTUNE_PRESETS["deepseek-r1-distill-qwen-1.5b"]),
        "seq_lens": [4096, 16384, 32768, 65536, 131072],
        "search": (4096, 131072, 8192),  # start, max, bisection granularity
    },
    # a CPU-sized Qwen2 for testing this script's plumbing
    "tiny-test": {
        "config": {
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 576, "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "use_sliding_window": False,
        },
        "seq_lens": [64, 128],
        "search": (64, 256, 64),
    },
}
# the same, 28 layers deep like the 1.5B shape: how bf16 rounding grows with depth (--grad-check on a CPU)
PRESETS["tiny-deep-test"] = {**PRESETS["tiny-test"],
                             "config": {**PRESETS["tiny-test"]["config"], "num_hidden_layers": 28}}


# =========================================================================== helpers


def parse_size(text: str) -> int:
    """'24GiB' -> bytes (memtune's own parser, as an argparse type)."""
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_records(path: Path) -> list[dict]:
    """Earlier records; a file that is not a JSON list is moved aside, never overwritten."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return data
        raise ValueError("not a JSON list")
    except (ValueError, UnicodeDecodeError) as exc:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        path.rename(aside)
        print(f"compare: {path} was unreadable ({exc}); moved to {aside}", file=sys.stderr)
        return []


def append_record(path: Path, record: dict) -> None:
    records = load_records(path)  # re-read: another invocation may have appended meanwhile
    records.append(record)
    write_json_atomic(path, records)


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for key, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                      ("bitsandbytes", "bitsandbytes"), ("liger", "liger-kernel"), ("unsloth", "unsloth")):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    # nothing is downloaded: the model, tokenizer and data are all local
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


# =========================================================================== the shared model


def prepare_model_dir(preset: str, cache_root: Path) -> Path:
    """Save the preset's shape once with seeded random bf16 weights, plus memtune's small tokenizer."""
    config_dict = PRESETS[preset]["config"]
    import hashlib

    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:10]
    model_dir = cache_root / f"{preset}-{digest}"
    if (model_dir / ".complete").is_file():
        return model_dir
    import shutil

    import torch
    import transformers

    print(f"compare: saving random-weight {preset} to {model_dir} ...", flush=True)
    tmp_dir = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    config = transformers.Qwen2Config(**{k: v for k, v in config_dict.items() if k not in ("model_type",)})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build directly in bf16 (no fp32 copy of 1.5B params)
    try:
        model = transformers.Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(tmp_dir)
    del model
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SRC / "memtune" / "assets" / "tiny"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"compare: tokenizer has {len(tokenizer)} tokens, more than the vocab {config.vocab_size}")
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / ".complete").write_text(now_iso())
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.rename(model_dir)
    return model_dir


# =========================================================================== worker (one run, in a subprocess)


def first_batches(spec: dict, tokenizer, n: int) -> list[dict]:
    """The batches memtune's own loop would draw for --data random (same seed, same tokens)."""
    import torch

    try:
        from memtune.config import from_dict
        from memtune.data import iterate_batches, load_data

        cfg = from_dict({"data": "random", "seq_len": spec["seq_len"], "seed": spec["seed"], "batch_size": 1,
                         "model": spec["model_dir"], "eval": False})
        bundle = load_data(cfg, tokenizer, spec["max_positions"])
        it = iterate_batches(bundle, cfg, cfg.seed)
        batches = [next(it) for _ in range(n)]
        return [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches]
    except ImportError:  # memtune not importable: a seeded equivalent
        g = torch.Generator().manual_seed(spec["seed"])
        out = []
        for _ in range(n):
            ids = torch.randint(0, len(tokenizer), (1, spec["seq_len"]), generator=g)
            out.append({"input_ids": ids, "labels": ids.clone()})
        return out


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "cuda_error_out_of_memory" in text)


def worker(spec: dict) -> int:
    """Train `spec['steps']` steps of one stack; write the result JSON to spec['result']."""
    result: dict[str, Any] = {"status": "error"}
    try:
        result.update(_worker_run(spec))
        result["status"] = "ok"
        code = 0
    except BaseException as exc:  # noqa: BLE001 - everything is reported in the record
        oom = _is_oom(exc)
        result["status"] = "oom" if oom else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        if not oom:
            result["traceback"] = traceback.format_exc()[-4000:]
        code = 3 if oom else 1
    write_json_atomic(Path(spec["result"]), result)
    return code


def _worker_run(spec: dict) -> dict:
    stack = spec["stack"]
    if stack == "unsloth":
        import unsloth  # noqa: F401 - must come before transformers and peft to patch them
    import torch

    info: dict[str, Any] = {"versions": package_versions()}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        info["gpu_name"] = torch.cuda.get_device_name(device)
        if spec.get("gpu_memory_cap_bytes"):
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["gpu_memory_cap_bytes"] / total), device)
    else:
        info["gpu_name"] = None
    torch.manual_seed(spec["seed"])

    targets = TARGETS[spec["lora_targets"]]
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec.get("grad_file"):
        return {**info, **_gradient_pass(spec, tokenizer, device)}
    model, autocast = _build_stack(stack, spec, targets, device)
    batches = first_batches(spec, tokenizer, spec["steps"])
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    model.train()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        info["model_allocated_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for batch in batches:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=labels, use_cache=False)
        loss = out.loss
        del out
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float().item()))
        del loss
        sync()
        times.append(time.perf_counter() - start)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {len(losses)}")
    if cuda:
        info["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    info["losses"] = losses
    info["step_times_s"] = times
    return info


_LORA_KEY = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])\b")


def lora_key(name: str) -> str | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight' -> '3.q_proj.A' (any stack)."""
    m = _LORA_KEY.search(name)
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def set_common_lora_weights(model) -> int:
    """Give every LoRA tensor the same seeded values in every stack (B non-zero, so A gets a gradient too)."""
    import zlib

    import torch

    count = 0
    for name, param in model.named_parameters():
        key = lora_key(name) if param.requires_grad else None
        if key is None:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        values = torch.randn(param.shape, generator=g)
        values *= (1 / math.sqrt(param.shape[1])) if key.endswith("A") else 0.02
        with torch.no_grad():
            param.copy_(values.to(param.dtype))
        count += 1
    return count


def _gradient_pass(spec: dict, tokenizer, device) -> dict:
    """One forward + backward from common LoRA weights; saves the LoRA gradients (fp32, by lora_key)."""
    import torch

    stack, targets = spec["stack"], TARGETS[spec["lora_targets"]]
    batch = first_batches(spec, tokenizer, 1)[0]
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    if spec.get("memtune_argv"):
        from memtune.cli import build_verb_parser, config_from_args
        from memtune.models import build_model
        from memtune.train import forward_loss

        parser, _module = build_verb_parser("train")
        cfg = config_from_args(parser.parse_args(spec["memtune_argv"]))
        model = build_model(cfg).model
        model.train()

        def loss_fn():
            return forward_loss(model, {"input_ids": ids, "labels": labels}, cfg)
    else:
        model, autocast = _build_stack(stack, spec, targets, device)
        model.train()

        def loss_fn():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return model(input_ids=ids, labels=labels, use_cache=False).loss
    n = set_common_lora_weights(model)
    loss = loss_fn()
    loss.backward()
    grads = {lora_key(name): p.grad.detach().float().cpu() for name, p in model.named_parameters()
             if p.requires_grad and p.grad is not None and lora_key(name)}
    if not grads or len(grads) != n:
        raise RuntimeError(f"{len(grads)} LoRA gradients for {n} LoRA tensors")
    torch.save(grads, spec["grad_file"])
    return {"losses": [float(loss.detach().float())], "step_times_s": [], "lora_tensors": n}


def gradient_errors(grads: dict, reference: dict) -> dict[str, float]:
    """Relative L2 error of all LoRA gradients together, and of the worst single tensor."""
    import torch

    if grads.keys() != reference.keys():
        raise ValueError(f"LoRA tensors differ: {sorted(set(grads) ^ set(reference))[:5]}")
    diff = sum(float((grads[k] - reference[k]).pow(2).sum()) for k in reference)
    norm = sum(float(reference[k].pow(2).sum()) for k in reference)
    worst = max(float((grads[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)) for k in reference)
    return {"grad_rel_error": math.sqrt(diff / max(norm, 1e-30)), "grad_worst_tensor_rel_error": worst}


def _build_stack(stack: str, spec: dict, targets: list[str], device) -> tuple[Any, bool]:
    """The model as each stack's users set it up; returns (model, run forward under autocast)."""
    import torch

    if stack == "unsloth":
        from unsloth import FastLanguageModel

        model, _tok = FastLanguageModel.from_pretrained(
            model_name=spec["model_dir"], max_seq_length=spec["seq_len"], dtype=torch.bfloat16,
            load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(
            model, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=targets,
            bias="none", use_gradient_checkpointing="unsloth", random_state=spec["seed"],
            max_seq_length=spec["seq_len"])
        for_training = getattr(FastLanguageModel, "for_training", None)
        if callable(for_training):
            for_training(model)
        return model, True

    if stack not in ("seed", "seed-autocast", "liger", "seed-fp32"):
        raise ValueError(f"unknown stack {stack!r}")
    if stack == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()  # rope, rms_norm, swiglu, fused linear cross-entropy
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    precision = torch.float32 if stack == "seed-fp32" else torch.bfloat16

    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], quantization_config=quant, dtype=precision, attn_implementation="sdpa",
        device_map={"": device.index if device.type == "cuda" else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=targets,
        bias="none", task_type="CAUSAL_LM"))
    return model, stack not in ("seed", "seed-fp32")


# =========================================================================== one run (parent side)


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int | None, int]:
    """Wait for the child with os.wait4: (exit status or None on timeout, its peak RSS in bytes)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, int(usage.ru_maxrss) * 1024
        if time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
            except ProcessLookupError:
                pass
            pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, int(usage.ru_maxrss) * 1024
        time.sleep(0.5)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def memtune_train_args(args: argparse.Namespace, model_dir: Path, seq_len: int, out_dir: Path, extra: str) -> list[str]:
    """The flags of `memtune train` for one memtune row (the same settings as the other stacks, plus `extra`)."""
    targets = ",".join(TARGETS[args.lora_targets])
    cmd = ["--model", str(model_dir) if args.memtune_model == "dir" else args.memtune_model,
           "--data", "random", "--seq-len", str(seq_len), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup), "--no-eval", "--out", str(out_dir),
           "--batch-size", "1", "--seed", str(args.seed), "--lora-rank", str(LORA["r"]),
           "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", "0", "--lora-targets", targets,
           "--learning-rate", str(LEARNING_RATE), "--max-grad-norm", str(MAX_GRAD_NORM)]
    if args.memtune_model != "dir":
        cmd.append("--random-init")
    if args.gpu_memory:
        cmd += ["--gpu-memory", args.gpu_memory]
    return cmd + shlex.split(extra)


def run_one(args: argparse.Namespace, stack: str, seq_len: int, model_dir: Path, mode: str,
            repeat: dict | None = None) -> dict:
    """One subprocess; returns the record (also appended to args.out)."""
    record: dict[str, Any] = {
        "stack": stack, "seq_len": seq_len, "lora_targets": args.lora_targets,
        "gpu_memory_cap": args.gpu_memory or None,
        "gpu_memory_cap_bytes": parse_size(args.gpu_memory) if args.gpu_memory else None,
        "preset": args.preset, "mode": mode, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "date": now_iso(), **(repeat or {}),
    }
    work = Path(tempfile.mkdtemp(prefix=f"compare-{stack}-{seq_len}-", dir=args.work_dir))
    log = work / "log.txt"
    extra = args.memtune_args if stack == "memtune" else args.variants.get(stack)
    train_args = None
    if extra is not None:  # a memtune row
        record["stack_args"] = extra
        run_dir = work / "run"
        train_args = memtune_train_args(args, model_dir, seq_len, run_dir, extra)
    # memtune rows train through its CLI; the other stacks, and every gradient check, in this
    # script's worker (which builds a memtune row in-process from train_args)
    via_cli = train_args is not None and mode != "grad"
    if via_cli:
        cmd = [sys.executable, "-m", "memtune", "train", *train_args]
    else:
        grad = mode == "grad"
        spec = {"stack": stack, "seq_len": seq_len, "lora_targets": args.lora_targets, "seed": args.seed,
                "steps": 1 if grad else args.steps, "model_dir": str(model_dir), "result": str(work / "result.json"),
                "max_positions": PRESETS[args.preset]["config"]["max_position_embeddings"],
                "gpu_memory_cap_bytes": None if grad else record["gpu_memory_cap_bytes"]}
        if grad:
            spec.update(grad_file=str(work / "grads.pt"), memtune_argv=train_args)
            record.update(grad_file=spec["grad_file"], grad_reference=args.grad_reference)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    record["command"] = shlex.join(cmd)
    print(f"compare: {stack} @ {seq_len} ...", flush=True)
    started = time.perf_counter()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=subprocess_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code, rss = _wait(proc, args.timeout)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["peak_host_rss_bytes"] = rss
    record["exit_code"] = code

    if via_cli:
        _fill_from_memtune(record, run_dir / "metrics.json", code, log, args)
    else:
        _fill_from_worker(record, work / "result.json", code, log, args)
    if code is None:
        record["status"] = "timeout"
        record["error"] = f"killed after {args.timeout:.0f}s"
    if record["status"] != "ok":
        record.setdefault("log_tail", _tail(log))
    record["log"] = str(log)
    append_record(args.out, record)
    print(f"compare: {stack} @ {seq_len}: {summary_line(record)}", flush=True)
    return record


def _median_after_warmup(times: list[float], warmup: int) -> float | None:
    if not times:
        return None
    kept = times[min(warmup, len(times) - 1):]
    return statistics.median(kept)


def _fill_from_worker(record: dict, path: Path, code: int | None, log: Path, args) -> None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        record["status"] = "oom" if "out of memory" in _tail(log, 20000).lower() else "error"
        record["error"] = f"no result from the worker (exit {code})"
        return
    record["status"] = result.get("status", "error")
    if result.get("error"):
        record["error"] = result["error"]
    for key in ("gpu_name", "versions", "peak_allocated_bytes", "peak_reserved_bytes", "model_allocated_bytes",
                "trainable_params", "losses", "step_times_s", "traceback"):
        if key in result:
            record[key] = result[key]
    if record["status"] == "ok" and record.get("mode") == "grad":
        record["loss_step1"] = result["losses"][0]
    elif record["status"] == "ok":
        step = _median_after_warmup(result["step_times_s"], args.warmup)
        record["step_time_s"] = step
        record["tokens_per_s"] = record["seq_len"] / step if step else None
        record["loss_step1"] = result["losses"][0]


def _fill_from_memtune(record: dict, path: Path, code: int | None, log: Path, args) -> None:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        metrics = None
    if metrics is None:
        tail = _tail(log, 20000).lower()
        record["status"] = "oom" if code == 3 or "out of memory" in tail else "error"
        record["error"] = f"memtune train exited {code} without metrics.json"
        return
    status = metrics.get("status", "error")
    record["status"] = status if status in ("ok", "oom") else "error"
    if record["status"] != "ok":
        record["error"] = str(metrics.get("error") or metrics.get("message") or f"memtune status {status}")
    for key in ("gpu_name", "versions", "peak_allocated_bytes", "peak_reserved_bytes", "trainable_params",
                "losses", "step_times_s", "step_time_s", "tokens_per_s", "memory_breakdown", "git_commit"):
        if key in metrics:
            record[key] = metrics[key]
    record["memtune_peak_rss_bytes"] = metrics.get("peak_rss_bytes")
    if record["status"] == "ok":
        record["loss_step1"] = metrics.get("loss_first", (metrics.get("losses") or [None])[0])
        if metrics.get("seq_len") and metrics["seq_len"] != record["seq_len"]:
            record["note"] = f"memtune trained {metrics['seq_len']} tokens (capped)"


def summary_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {str(r.get('error', ''))[:200]}"
    return (f"peak {gb(r.get('peak_allocated_bytes'))} GB allocated, {gb(r.get('peak_reserved_bytes'))} GB reserved, "
            f"{fmt(r.get('tokens_per_s'), '.0f')} tok/s, loss1 {fmt(r.get('loss_step1'), '.4f')}")


def gb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# =========================================================================== reports


def _key(r: dict) -> tuple:
    return (r.get("preset"), r.get("mode", "fixed"), r.get("lora_targets"), r.get("gpu_memory_cap"), r.get("stack"),
            r.get("seq_len"), r.get("grad_reference", DEFAULT_GRAD_REFERENCE) if r.get("mode") == "grad" else None)


def merge_rounds(rounds: list[dict]) -> dict:
    """One row for the rounds of a `--repeat` run: the newest record with the median speed and the highest peaks."""
    row = dict(rounds[-1])
    ok = [r for r in rounds if r.get("status") == "ok" and r.get("tokens_per_s")]
    row["runs"] = len(rounds)
    if len(ok) != len(rounds):
        row["status"] = next(r.get("status") for r in rounds if r.get("status") != "ok")
    if ok:
        row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in ok]
        row["tokens_per_s"] = statistics.median(row["tokens_per_s_runs"])
        steps = [r["step_time_s"] for r in ok if r.get("step_time_s")]
        row["step_time_s"] = statistics.median(steps) if steps else row.get("step_time_s")
        for field in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_host_rss_bytes"):
            values = [r[field] for r in ok if r.get(field) is not None]
            if values:
                row[field] = max(values)
    return row


def latest_records(records: list[dict], preset: str) -> list[dict]:
    """The newest row per (targets, cap, stack, seq_len) for this preset; the rounds of a `--repeat`
    run count as one row (`merge_rounds`)."""
    latest: dict[tuple, dict | tuple] = {}  # a record, or the key of its rounds in `rounds`
    rounds: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("preset", "r1-1.5b") == preset and r.get("stack") and r.get("seq_len"):
            if r.get("repeat_group"):
                group = (_key(r), r["repeat_group"])
                rounds.setdefault(group, []).append(r)
                latest[_key(r)] = group
            else:
                latest[_key(r)] = r
    rows = [merge_rounds(rounds[row]) if isinstance(row, tuple) else row for row in latest.values()]
    return sorted(rows, key=lambda r: (str(r.get("lora_targets")), str(r.get("gpu_memory_cap")), r["seq_len"],
                                       r["stack"]))


def loss_agreement(records: list[dict], tolerance: float) -> list[str]:
    """Stacks whose first-step loss differs from the median of the others at the same length."""
    problems = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("loss_step1") is not None:
            groups.setdefault((r.get("lora_targets"), r.get("gpu_memory_cap"), r["seq_len"]), []).append(r)
    for (targets, cap, seq_len), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(group) < 2:
            continue
        median = statistics.median(r["loss_step1"] for r in group)
        for r in group:
            if abs(r["loss_step1"] - median) > tolerance:
                problems.append(f"{r['stack']} @ {seq_len} ({targets}, cap {cap}): first-step loss "
                                f"{r['loss_step1']:.4f} vs median {median:.4f} (tolerance {tolerance})")
    return problems


def is_memtune_row(record: dict) -> bool:
    """memtune's own stack or one of its --variant stacks (any name), by the command that ran it."""
    return record.get("stack", "").startswith("memtune") or " -m memtune train " in record.get("command", "")


def ratio_section(rows: list[dict]) -> list[str]:
    """Each memtune row against the leanest and the fastest other stack at the same length, cap and targets."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("peak_allocated_bytes") and r.get("tokens_per_s"):
            groups.setdefault((r.get("lora_targets"), r.get("gpu_memory_cap"), r["seq_len"]), []).append(r)
    out = []
    for (targets, cap, seq_len), group in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2])):
        others = [r for r in group if not is_memtune_row(r)]
        ours = [r for r in group if is_memtune_row(r)]
        if not others or not ours:
            continue
        lean = min(others, key=lambda r: r["peak_allocated_bytes"])
        fast = max(others, key=lambda r: r["tokens_per_s"])
        for r in sorted(ours, key=lambda r: r["stack"]):
            out.append(f"| {targets} | {cap or '-'} | {seq_len} | {r['stack']} "
                       f"| {r['peak_allocated_bytes'] / lean['peak_allocated_bytes']:.2f}x ({lean['stack']}) "
                       f"| {r['tokens_per_s'] / fast['tokens_per_s']:.2f}x ({fast['stack']}) |")
    if not out:
        return []
    return ["", "## memtune against the other stacks", "",
            "Peak allocated memory as a multiple of the leanest other stack's, tokens/s as a multiple of the "
            "fastest other stack's, at the same length, cap and LoRA targets.", "",
            "| targets | cap | seq_len | memtune row | memory vs leanest other | speed vs fastest other |",
            "|---|---|---:|---|---:|---:|"] + out


def search_summary(records: list[dict], preset: str) -> dict[tuple, dict]:
    """Longest ok length (and shortest failing one) per (targets, cap, stack) over search records."""
    out: dict[tuple, dict] = {}
    for r in records:
        if r.get("mode") != "search" or r.get("preset", "r1-1.5b") != preset:
            continue
        key = (r.get("lora_targets"), r.get("gpu_memory_cap"), r["stack"])
        entry = out.setdefault(key, {"max_ok": 0, "min_fail": None})
        if r.get("status") == "ok":
            entry["max_ok"] = max(entry["max_ok"], r["seq_len"])
        elif entry["min_fail"] is None or r["seq_len"] < entry["min_fail"]:
            entry["min_fail"] = r["seq_len"]
    return out


def _rounds(row: dict) -> str:
    """' (median of 33,220 / 35,856)' for a row merged from rounds, else ''."""
    runs = row.get("tokens_per_s_runs") or []
    return f" (median of {' / '.join(format(v, ',.0f') for v in runs)})" if len(runs) > 1 else ""


def write_reports(out: Path, preset: str, tolerance: float) -> tuple[Path, Path | None]:
    records = load_records(out)
    rows = latest_records([r for r in records if r.get("mode", "fixed") == "fixed"], preset)
    md = out.with_suffix(".md")
    lines = [f"# memtune vs LoRA/QLoRA stacks ({preset})", ""]
    gpu = next((r.get("gpu_name") for r in reversed(rows) if r.get("gpu_name")), None)
    versions = next((r.get("versions") for r in reversed(rows) if r.get("versions")), None)
    lines.append(f"GPU: {gpu or 'none (CPU)'}; versions: "
                 + (", ".join(f"{k} {v}" for k, v in versions.items() if v) if versions else "-"))
    lines += ["", "NF4 double-quant, bf16 compute, LoRA r=8 alpha=16 dropout 0, batch 1, AdamW; "
              "peak memory over the training steps (model included); tokens/s and step time are "
              "medians after warm-up; the newest record per row (a row run in several rounds, "
              "`--repeat`: the median of its rounds' tokens/s and their highest peaks).", ""]
    lines.append("| targets | cap | seq_len | stack | status | peak alloc GB | peak reserved GB | host RSS GB "
                 "| tokens/s | step s | loss step 1 |")
    lines.append("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        status = r.get("status", "?")
        if status != "ok" and r.get("error"):
            status += f" ({str(r['error'])[:60].replace('|', '/')})"
        if r.get("note"):
            status += " (note)"
        lines.append(
            f"| {r.get('lora_targets')} | {r.get('gpu_memory_cap') or '-'} | {r['seq_len']} | {r['stack']} | {status} "
            f"| {gb(r.get('peak_allocated_bytes'))} | {gb(r.get('peak_reserved_bytes'))} "
            f"| {gb(r.get('peak_host_rss_bytes'))} | {fmt(r.get('tokens_per_s'), ',.0f')}{_rounds(r)} "
            f"| {fmt(r.get('step_time_s'), '.3f')} | {fmt(r.get('loss_step1'), '.4f')} |")
    noted = [r for r in rows if r.get("note")]
    if noted:
        lines += [""] + [f"(note) {r['stack']} @ {r['seq_len']}: {r['note']}" for r in noted]
    variants = {}
    for r in records:
        if is_memtune_row(r) and r.get("preset", "r1-1.5b") == preset:
            variants[r["stack"]] = (r.get("stack_args") or "", r.get("date", "")[:16])
    if variants:
        lines += ["", "memtune rows: `memtune train` with the defaults of the code at the row's date, plus:", ""]
        lines += [f"- `{name}` (last run {date}): `{flags or '(no extra flags)'}`"
                  for name, (flags, date) in sorted(variants.items())]
    lines += ratio_section(rows)
    problems = loss_agreement(rows, tolerance)
    lines += ["", "## First-step loss agreement", ""]
    lines += [f"- MISMATCH: {p}" for p in problems] or [f"All stacks agree within {tolerance} at every length."]
    checks = latest_records([r for r in records if r.get("mode") == "grad"], preset)
    if checks:
        lines += ["", "## LoRA gradients against a reference stack (one step from common LoRA weights)", "",
                  "seed runs its 4-bit matmuls in bf16; seed-fp32 is the same model in fp32 throughout.", "",
                  "| targets | seq_len | reference | stack | status | relative error (all LoRA tensors) "
                  "| worst tensor | loss |",
                  "|---|---:|---|---|---|---:|---:|---:|"]
        for r in checks:
            lines.append(f"| {r.get('lora_targets')} | {r['seq_len']} | {r.get('grad_reference', DEFAULT_GRAD_REFERENCE)} "
                         f"| {r['stack']} | {r.get('status')} "
                         f"| {fmt(r.get('grad_rel_error'), '.2e')} | {fmt(r.get('grad_worst_tensor_rel_error'), '.2e')} "
                         f"| {fmt(r.get('loss_step1'), '.4f')} |")
    found = search_summary(records, preset)
    if found:
        lines += ["", "## Longest trainable length (search)", "",
                  "| targets | cap | stack | longest ok | shortest failing |", "|---|---|---|---:|---:|"]
        for (targets, cap, stack), entry in sorted(found.items(), key=lambda kv: str(kv[0])):
            lines.append(f"| {targets} | {cap or '-'} | {stack} | {entry['max_ok'] or 'none'} "
                         f"| {entry['min_fail'] or '-'} |")
    write_text_atomic(md, "\n".join(lines) + "\n")
    png = _plot(out.with_suffix(".png"), rows, preset)
    return md, png


def _plot(path: Path, rows: list[dict], preset: str) -> Path | None:
    """Memory and speed by length for the stacks themselves (memtune's defaults included), and a bar
    chart of every memtune variant at the most measured length: one figure, legend outside the data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    series: dict[tuple, list[dict]] = {}
    for r in ok:
        if r["stack"] in BUILTIN_STACKS:
            series.setdefault((r["stack"], r.get("lora_targets"), r.get("gpu_memory_cap")), []).append(r)
    variants = _variant_rows(ok)
    if not series and not variants:  # only gradient checks (or failures): nothing to draw
        return None
    fig, (ax_mem, ax_tps, ax_var) = plt.subplots(1, 3, figsize=(18, 5.5))
    on_gpu = any(r.get("peak_allocated_bytes") is not None for r in rows)
    markers = "osD^v<>ph*"
    for i, ((stack, targets, cap), group) in enumerate(sorted(series.items(), key=lambda kv: str(kv[0]))):
        group.sort(key=lambda r: r["seq_len"])
        label = f"{stack} ({targets}{', cap ' + cap if cap else ''})"
        xs = [r["seq_len"] for r in group]
        mem = [(r.get("peak_allocated_bytes") or r.get("peak_host_rss_bytes") or 0) / 1e9 for r in group]
        style = dict(marker=markers[i % len(markers)], label=label, linewidth=2.5 if stack == "memtune" else 1.2)
        ax_mem.plot(xs, mem, **style)
        ax_tps.plot(xs, [r["tokens_per_s"] for r in group], **style)
    mem_title, mem_label = ("peak GPU memory", "GB allocated") if on_gpu else ("peak host memory (CPU run)", "GB RSS")
    for ax, title, ylabel in ((ax_mem, mem_title, mem_label), (ax_tps, "throughput", "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({preset})")
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_yscale("log")
    ax_mem.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_mem.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if v in (2, 3, 5, 20, 30, 50) else ""))
    if series:
        ax_tps.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.15), ncol=2, frameon=False)
    _plot_variants(ax_var, variants, mem_label)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _variant_rows(ok: list[dict]) -> list[dict]:
    """memtune's rows (defaults and variants), q/v, no cap, at the length with the most of them."""
    rows = [r for r in ok if is_memtune_row(r) and r.get("lora_targets") == "qv" and not r.get("gpu_memory_cap")]
    if not rows:
        return []
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["seq_len"]] = counts.get(r["seq_len"], 0) + 1
    length = max(counts, key=lambda n: (counts[n], -n))
    return sorted((r for r in rows if r["seq_len"] == length), key=lambda r: r["tokens_per_s"])


def _plot_variants(ax, variants: list[dict], mem_label: str) -> None:
    if not variants:
        ax.axis("off")
        return
    names = [r["stack"] + (" *" if r.get("note") else "") for r in variants]
    ax.barh(names, [r["tokens_per_s"] for r in variants], color="tab:blue")
    for y, r in enumerate(variants):
        mem = (r.get("peak_allocated_bytes") or r.get("peak_host_rss_bytes") or 0) / 1e9
        ax.text(r["tokens_per_s"], y, f" {mem:.2f} GB", va="center", fontsize=8)
    ax.set_xlabel(f"tokens / s (labels: {mem_label})")
    ax.set_title(f"memtune rows at {variants[0]['seq_len']} tokens (* memory not valid)", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)


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
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.out = args.out.resolve()
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
    md, png = write_reports(args.out, args.preset, args.loss_tolerance)
    print(f"compare: records {args.out}; table {md}; plot {png}")
    fixed = [r for r in load_records(args.out) if r.get("mode", "fixed") == "fixed"]
    problems = loss_agreement(latest_records(fixed, args.preset), args.loss_tolerance)
    for problem in problems:
        print(f"compare: warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
