"""The CPU tensor tracker against known allocations, and the estimator against the tracker."""

import json

import pytest
import torch

from memtune import measure
from memtune.config import RunConfig
from memtune.estimate import estimate_memory

MIB = 2**20


def test_alive_at_the_peak_counted_freed_not():
    with measure.TensorMemoryTracker() as tracker:
        base = tracker.current
        kept = torch.empty(3 * MIB, dtype=torch.uint8)
        temp = torch.empty(2 * MIB, dtype=torch.uint8)
        del temp  # freed before the next allocation: its bytes go back
        after_free = tracker.current
        other = torch.ones(MIB // 4, dtype=torch.float32)  # 1 MiB, reuses nothing we count twice
        peak = tracker.peak
        view = other[: MIB // 8]  # a view is the same storage: not counted again
        assert tracker.current == base + 3 * MIB + MIB
        del view
    assert after_free == base + 3 * MIB
    assert peak == base + 5 * MIB  # kept + temp were alive together; other came after temp went
    assert kept.numel() and other.numel()


def test_storages_alive_at_start_are_counted_and_their_release_seen():
    held = torch.empty(4 * MIB, dtype=torch.uint8)
    with measure.TensorMemoryTracker() as tracker:
        start = tracker.current
        assert start >= 4 * MIB
        del held
        assert tracker.current == start - 4 * MIB


def test_backward_allocations_are_seen():
    weight = torch.randn(512, 512, requires_grad=True)  # 1 MiB, before tracking
    x = torch.randn(256, 512)
    with measure.TensorMemoryTracker() as tracker:
        base = tracker.current
        hidden = (x @ weight).relu()  # 0.5 MiB, saved for backward
        loss = hidden.square().sum()
        del hidden
        during = tracker.current
        loss.backward()
        after = tracker.current
    assert during >= base + 256 * 512 * 4  # held by the graph although no Python name holds it
    assert weight.grad is not None and after >= base + 512 * 512 * 4  # the gradient, made in backward
    assert after < during + 512 * 512 * 4  # the graph's saved tensors went back


def test_reset_and_peak_memory_on_cpu_start_and_stop_the_tracker():
    device = torch.device("cpu")
    measure.reset_peak(device)
    big = torch.zeros(8 * MIB, dtype=torch.uint8)
    del big
    peaks = measure.peak_memory(device)
    assert peaks["peak_tensor_bytes"] >= 8 * MIB and peaks["peak_rss_bytes"] > 0
    assert torch._C._len_torch_dispatch_stack() == 0  # the mode is gone: nothing tracks after
    assert measure.peak_bytes(peaks) == peaks["peak_tensor_bytes"]
    assert "peak_tensor_bytes" not in measure.peak_memory(device)  # no tracker ran since


def _cfg(**changes) -> RunConfig:
    base = dict(model="tiny", data="random", eval=False, steps=2, warmup_steps=1, batch_size=1, seq_len=256,
                quantization="nf4", lora=True, lora_rank=8, gradient_checkpointing=True, device="cpu", seed=0)
    return RunConfig(**{**base, **changes})


@pytest.mark.parametrize("changes", [
    {"seq_len": 32}, {"seq_len": 128}, {}, {"lora_rank": 1}, {"quantization": "int8"}, {"quantization": "none"},
    {"gradient_checkpointing": False}, {"lora": False, "quantization": "none", "batch_size": 4, "seq_len": 128},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "nf4-r8-256")
def test_estimate_within_10_percent_of_the_tracker(tmp_path, changes):
    from memtune import train

    cfg = _cfg(**changes)
    metrics = train.run(cfg, tmp_path / "run", log=lambda _: None, progress=False)
    measured = metrics["peak_tensor_bytes"]
    predicted = estimate_memory(cfg, device="cpu").total_bytes
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["peak_tensor_bytes"] == measured and stored["estimate"]["total_bytes"] == predicted
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_cpu_estimate_has_no_cuda_terms():
    cfg = _cfg()
    cpu, gpu = estimate_memory(cfg, device="cpu"), estimate_memory(cfg)
    assert cpu.cuda_context_bytes == 0 and "cuda_workspace" not in cpu.breakdown
    assert gpu.breakdown["cuda_workspace"] > 0 and cpu.total_bytes < gpu.total_bytes
