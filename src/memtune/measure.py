"""Memory probes, timers, and the facts every result records (device, versions, commit).

Memory is stored in bytes everywhere and shown as GiB with two decimals.
On CUDA the peak is `max_memory_allocated` (what tensors used) and
`max_memory_reserved` (what the caching allocator held). On a CPU the only
honest number is the process's peak resident set size, labelled as such.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn


# --- peaks -------------------------------------------------------------------

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()


def peak_memory(device: torch.device) -> dict[str, int]:
    """The peaks since the last reset, under keys that say what they are."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    return {"peak_rss_bytes": peak_rss_bytes()}


def current_allocated_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak_rss() -> None:
    # Linux resets the process's high-water mark (VmHWM) when 5 is written to
    # clear_refs; elsewhere the peak stays the whole process's, which is still
    # an upper bound.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_host_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable); None off Linux."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cap_gpu_memory(device: torch.device, cap_bytes: int) -> float:
    """Let this process allocate at most cap_bytes on the GPU; return the fraction used."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


# --- what the model and optimizer hold ---------------------------------------

def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel())
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The scales that bitsandbytes keeps beside a quantized weight."""
    tensors = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        tensors += [getattr(state, name, None) for name in ("absmax", "code", "offset")]
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if scb is not None:
        tensors.append(scb)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def model_bytes(model: nn.Module) -> dict[str, int]:
    frozen, trainable = [], []
    for param in model.parameters():
        (trainable if param.requires_grad else frozen).append(param)
        frozen += _quant_state_tensors(param)
    frozen += list(model.buffers())
    return {"frozen_weights_bytes": tensor_bytes(frozen), "trainable_params_bytes": tensor_bytes(trainable)}


def gradient_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the gradients `params` hold now."""
    return tensor_bytes(p.grad for p in params if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = []
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return tensor_bytes(tensors)


def memory_breakdown(peak_bytes: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     grads_bytes: int) -> dict[str, int]:
    """Peak split into what is held for the whole run and the rest (activations, logits, workspace)."""
    held = model_bytes(model)
    held["gradients_bytes"] = grads_bytes
    held["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    held["activations_and_rest_bytes"] = max(0, peak_bytes - sum(held.values()))
    return held


# --- time --------------------------------------------------------------------

class StepTimer:
    """Wall time per optimizer step; CUDA work is synchronised before each reading."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a CPU-GPU sync point: kernels are asynchronous

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        elapsed = time.perf_counter() - self._start
        self.times.append(elapsed)
        return elapsed

    def median(self, skip: int) -> float:
        """Median after the warm-up steps (compilation, allocator growth, cache fills)."""
        kept = self.times[skip:] if len(self.times) > skip else self.times[-1:]
        return statistics.median(kept) if kept else float("nan")


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU.
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                    "RTX 4090": 165e12, "RTX 3090": 71e12, "L4": 121e12, "A6000": 155e12}


def peak_flops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key, flops in _PEAK_BF16_FLOPS.items():
        if key in gpu_name:
            return flops
    return None


def train_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int,
                          lora: bool, recompute: bool) -> float:
    """Model FLOPs per token (PaLM appendix B): 2N forward, 2N input-grad, 2N weight-grad.

    LoRA skips the frozen weights' gradient (the adapters' is negligible);
    recomputation is not counted, as MFU counts useful work only. Attention
    adds 6 * layers * hidden * seq_len for causal masking (half of 12).
    """
    per_param = 4 if lora else 6
    attention = 6 * num_layers * hidden * seq_len * (2 / 3 if lora else 1)
    return per_param * num_params + attention


# --- facts every result records (versions, commit, time: memtune.provenance) --

def device_info(device: torch.device) -> dict[str, str | None]:
    if device.type == "cuda":
        return {"device": "cuda", "gpu_name": torch.cuda.get_device_name(device)}
    return {"device": "cpu", "gpu_name": None, "cpu": platform.processor() or platform.machine()}
