"""The measuring loop every non-memtune stack runs, one run per subprocess (a fresh CUDA context).

`python benchmarks/compare.py --worker SPEC_JSON` lands here: build the stack's model, train
`spec['steps']` steps on memtune's random batches with AdamW and grad-norm clipping, time each
step between synchronizations, take the peaks, and write the result JSON to `spec['result']`.
With `spec['grad_file']` it runs one forward + backward from common LoRA weights instead and
saves the LoRA gradients (`--grad-check`).
"""

from __future__ import annotations

import importlib
import math
import re
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable

import stacks
from compare_records import write_json_atomic
from memtune.provenance import git_commit, package_versions
from shared_model import random_batches
from stacks.common import LEARNING_RATE, MAX_GRAD_NORM, lora_targets

OTHER_PACKAGES = ("unsloth", "trl")  # recorded beside memtune's own


def worker(spec: dict) -> int:
    """Run one stack as `spec` says; write the result JSON to spec['result']; exit 0, 1 (error) or 3 (OOM)."""
    return report_result(spec, _worker_run)


def report_result(spec: dict, run: Callable[[dict], dict]) -> int:
    """`run(spec)`'s result, or its error (an out-of-memory is a result), written to spec['result']."""
    result: dict[str, Any] = {"status": "error"}
    try:
        result.update(run(spec))
        result["status"] = "ok"
        code = 0
    except BaseException as exc:  # noqa: BLE001 - everything is reported in the record
        oom = is_oom(exc)
        result["status"] = "oom" if oom else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        if not oom:
            result["traceback"] = traceback.format_exc()[-4000:]
        code = 3 if oom else 1
    write_json_atomic(Path(spec["result"]), result)
    return code


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "cuda_error_out_of_memory" in text)


def _worker_run(spec: dict) -> dict:
    stack = None if spec.get("memtune_argv") else stacks.get(spec["stack"])
    if stack and stack.preload:
        importlib.import_module(stack.preload)  # before torch and transformers: it patches them
    import torch

    info: dict[str, Any] = {"versions": package_versions(OTHER_PACKAGES), "git_commit": git_commit()}
    device = _device(spec, info)
    torch.manual_seed(spec["seed"])
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model_dir"])

    def batches(n: int) -> list[dict]:
        return random_batches(spec["model_dir"], spec["seq_len"], spec["seed"], spec["max_positions"], tokenizer, n)

    if spec.get("grad_file"):
        return {**info, **_gradient_pass(spec, stack, batches(1)[0], device)}
    model, autocast = stack.build(spec, lora_targets(spec["lora_targets"], spec.get("model_type")), device)  # before the batches, as always
    return {**info, **_train_steps(model, autocast, batches(spec["steps"]), device)}


def _device(spec: dict, info: dict):
    """CUDA device 0 (capped to spec's bytes) or the CPU; records the GPU's name."""
    import torch

    if not torch.cuda.is_available():
        info["gpu_name"] = None
        return torch.device("cpu")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    info["gpu_name"] = torch.cuda.get_device_name(device)
    if spec.get("gpu_memory_cap_bytes"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["gpu_memory_cap_bytes"] / total), device)
    return device


def _train_steps(model, autocast: bool, batches: list[dict], device) -> dict:
    """Each step timed between synchronizations; the peaks over all steps, model included."""
    import torch

    cuda = device.type == "cuda"
    info: dict[str, Any] = {}
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


def _gradient_pass(spec: dict, stack, batch: dict, device) -> dict:
    """One forward + backward from common LoRA weights; saves the LoRA gradients (fp32, by lora_key)."""
    import torch

    from stacks import memtune_stack

    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    if stack is None:  # a memtune row, built in-process as `memtune train` would
        model, loss_fn = memtune_stack.build_for_gradients(spec["memtune_argv"], {"input_ids": ids, "labels": labels})
    else:
        model, autocast = stack.build(spec, lora_targets(spec["lora_targets"], spec.get("model_type")), device)
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
    if grads.keys() != reference.keys():
        raise ValueError(f"LoRA tensors differ: {sorted(set(grads) ^ set(reference))[:5]}")
    diff = sum(float((grads[k] - reference[k]).pow(2).sum()) for k in reference)
    norm = sum(float(reference[k].pow(2).sum()) for k in reference)
    worst = max(float((grads[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)) for k in reference)
    return {"grad_rel_error": math.sqrt(diff / max(norm, 1e-30)), "grad_worst_tensor_rel_error": worst}
