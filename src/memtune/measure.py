"""Memory probes, timers, and the facts every result records (device, versions, commit).

Memory is stored in bytes everywhere and shown as GiB with two decimals.
On CUDA the peak is `max_memory_allocated` (what tensors used) and
`max_memory_reserved` (what the caching allocator held). A CPU has no such
counter, so there `TensorMemoryTracker` counts the bytes of the tensor storages
alive over the training steps (`peak_tensor_bytes`, the quantity the estimator
predicts); the process's peak resident set size (`peak_rss_bytes`: Python,
libraries, allocator slack included) is kept beside it.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# --- peaks -------------------------------------------------------------------

class TensorMemoryTracker(TorchDispatchMode):
    """The peak of live tensor-storage bytes on one device type, for devices without a counter.

    Every storage an operator returns is counted once (by its data pointer) until
    its Python storage object dies: torch keeps that object alive as long as any
    tensor, view or autograd-saved copy holds the storage, so a weak reference's
    callback marks the moment the memory goes back. Storages alive when tracking
    starts (weights, buffers, optimizer states) are found by a walk over the
    garbage collector's tensors. Backward on a CPU runs in the calling thread and
    inherits the dispatch mode, so its gradients and temporaries are counted.
    Scratch memory a kernel frees before returning is not a tensor and is not seen.
    """

    def __init__(self, device_type: str = "cpu", owners: tuple = ()):
        super().__init__()
        self.device_type = device_type
        self.owners = owners  # what the run holds (model, optimizer); empty = every tensor alive
        self._cpu = device_type == "cpu"
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # data_ptr -> (storage ref, bytes)
        self._allocates: dict[Any, bool] = {}  # operator -> whether its outputs can be new storages

    def __enter__(self) -> "TensorMemoryTracker":
        # With owners, the tensors alive at the start are theirs only: a process that built other
        # models before (a notebook, a test session) does not add their memory to this run's.
        found = _tensors_of(self.owners) if self.owners else (
            obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no proxy __class__
        for obj in found:
            self._track(obj)
        self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        allocates = self._allocates.get(func)
        if allocates is None:
            allocates = self._allocates[func] = _may_allocate(func)
        if not allocates:
            return out
        if type(out) is torch.Tensor:  # the common cases without a tree walk (pytree costs more than the rest)
            self._track(out)
        elif type(out) is tuple:
            for item in out:
                if type(item) is torch.Tensor:
                    self._track(item)
                elif item is not None and not isinstance(item, (int, float, bool)):
                    self._track_tree(item)
        else:
            self._track_tree(out)
        return out

    def _track_tree(self, out: Any) -> None:
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)

    def _track(self, tensor: torch.Tensor) -> None:
        if not (tensor.is_cpu if self._cpu else tensor.device.type == self.device_type):
            return
        if tensor.layout != torch.strided:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage
            return
        key = storage.data_ptr()
        if key == 0:
            return
        known = self._live.get(key)
        if known is not None:
            ref, counted = known
            if ref() is storage:
                return
            self._free(key, ref)  # the old storage died without its callback having run yet
        nbytes = storage.nbytes()
        self._live[key] = (weakref.ref(storage, lambda ref, key=key: self._free(key, ref)), nbytes)
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current

    def _free(self, key: int, ref: weakref.ref) -> None:
        known = self._live.get(key)
        if known is not None and known[0] is ref:
            del self._live[key]
            self.current -= known[1]


def _may_allocate(func: Any) -> bool:
    """False for operators whose every output aliases an input (views, in-place and out= kernels):
    their storages are counted already. Skipping them halves the tracker's cost a step."""
    try:
        returns = func._schema.returns
    except AttributeError:
        return True
    return not returns or any(r.alias_info is None for r in returns)


_tracker: TensorMemoryTracker | None = None


def _tensors_of(owners: tuple) -> list[torch.Tensor]:
    """The tensors a run's model and optimizer hold: parameters, buffers, plain tensor attributes
    (an embedding table kept in host memory), optimizer states."""
    found: list[torch.Tensor] = []
    for owner in owners:
        if isinstance(owner, torch.nn.Module):
            for module in owner.modules():
                found += [t for t in module.__dict__.values() if isinstance(t, torch.Tensor)]
                params = [t for t in module._parameters.values() if t is not None]
                found += params
                for param in params:  # bitsandbytes keeps its scales beside the codes (quant_state, SCB)
                    found += _attached_tensors(param)
                found += [t for t in module._buffers.values() if t is not None]
        elif isinstance(owner, torch.optim.Optimizer):
            found += [t for state in owner.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return found


def _attached_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors held in an object's attributes, through nested quantization states (double quant)."""
    found = []
    for value in getattr(obj, "__dict__", {}).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif depth < 2 and type(value).__name__ == "QuantState":
            found += _attached_tensors(value, depth + 1)
    return found


def reset_peak(device: torch.device, owners: tuple = ()) -> None:
    """Start a peak measurement; on a CPU this starts the tensor tracker (peak_memory stops it).
    owners: the run's model and optimizer, whose tensors alive now count from the start."""
    global _tracker
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    _reset_peak_rss()
    stop_tracking()
    _tracker = TensorMemoryTracker(device.type, owners)
    _tracker.__enter__()


def stop_tracking() -> int | None:
    """Stop the CPU tensor tracker if one runs; its peak in bytes (None when none ran)."""
    global _tracker
    tracker, _tracker = _tracker, None
    if tracker is None:
        return None
    tracker.__exit__(None, None, None)
    return tracker.peak


def peak_memory(device: torch.device) -> dict[str, int]:
    """The peaks since the last reset, under keys that say what they are."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    peaks = {"peak_rss_bytes": peak_rss_bytes()}
    tensor_peak = stop_tracking()
    if tensor_peak is not None:
        peaks["peak_tensor_bytes"] = int(tensor_peak)
    return peaks


def peak_bytes(peaks: dict[str, Any]) -> int | None:
    """The measured peak the estimate predicts: allocated on CUDA, tensor bytes on a CPU (else RSS)."""
    for key in ("peak_allocated_bytes", "peak_tensor_bytes", "peak_rss_bytes"):
        if isinstance(peaks.get(key), int):
            return peaks[key]
    return None


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
