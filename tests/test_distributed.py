"""--strategy ddp|fsdp on CPUs: two gloo processes under torchrun against one process, same global batch.

One torchrun launch (this file run as a script) does every distributed part; the tests read what
rank 0 wrote. GPU-only parts (NCCL, context parallelism) are at the end, skipped without 2 GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memtune import distributed, train
from memtune.config import RunConfig
from memtune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on the mat and the dog sat on the log while a bird sang".split()
QUANTIZATIONS = ("nf4", "none")
STRATEGIES = ("ddp", "fsdp")


def write_data(path: Path) -> str:
    """Texts of different lengths: the ranks' shares of labelled tokens differ, so the loss weights matter."""
    lines = [json.dumps({"text": " ".join(WORDS[: 3 + (5 * i) % 14])}) for i in range(8)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def parity_cfg(data: str, quantization: str, strategy: str = "single") -> RunConfig:
    return RunConfig(data=data, quantization=quantization, strategy=strategy, steps=1, batch_size=4, grad_accum=2,
                     seq_len=64, lora_rank=4, lora_targets="all-linear", lora_dropout=0.0, compute_dtype="fp32",
                     learning_rate=1e-2, warmup_steps=0, eval=False, device="cpu", seed=0)


def one_step(cfg: RunConfig, parallel=None) -> dict:
    """One optimizer step: its loss, the trained parameters' gradients and values after it (whole)."""
    from memtune.data import iterate_batches

    session = train.setup(cfg, log=lambda _: None, parallel=parallel)
    batches = distributed.rank_stream(parallel, iterate_batches(session.bundle, session.cfg, session.cfg.seed))
    loss = train.train_step(session, batches)
    model = session.built.model
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    result = {"loss": loss, "grads": {n: distributed.full(p.grad).cpu().clone() for n, p in trained},
              "params": {n: distributed.full(p.detach()).cpu().clone() for n, p in trained}}
    from torch.distributed.tensor import DTensor

    # under fsdp a 4-bit weight holds half its bytes on each rank
    result["sharded_4bit"] = any(isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                                 for n, p in model.named_parameters() if p.dtype == torch.uint8)
    return result


def train_args(out: Path, data: str, strategy: str, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--data", data, "--strategy", strategy, "--device", "cpu", "--steps", "3",
            "--batch-size", "4", "--seq-len", "64", "--lora-rank", "4", "--lora-dropout", "0",
            "--compute-dtype", "fp32", "--learning-rate", "1e-2", "--warmup-steps", "0", "--no-eval",
            "--checkpoint-every", "2", "--checkpoint-keep", "3", "--quiet", *extra]


def memtune_train(argv: list[str]) -> int:
    from memtune.cli import build_verb_parser

    parser, module = build_verb_parser(argv[0])
    return module.run(parser.parse_args(argv[1:]))


def losses(out: Path) -> list[float]:
    return json.loads((out / "metrics.json").read_text())["losses"]


def resumable_copy(out: Path, copy: Path) -> Path:
    """The run as it stood after its step-2 checkpoint: later files and the step-3 checkpoint gone."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(out, copy)
    for name in ("metrics.json", "adapter", "report.md", "checkpoints/step-3"):
        target = copy / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return copy


# --- the torchrun side ---------------------------------------------------------------------------

def launch_env() -> dict[str, str]:
    """What the launched processes need beside the test's environment: offline, one thread each."""
    return {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **distributed.SAFE_ENV}


def worker(work: Path) -> None:
    """Rank r of `torchrun --nproc-per-node 2 tests/test_distributed.py WORK`."""
    data = str(work / "data.jsonl")
    for strategy in STRATEGIES:
        for quantization in QUANTIZATIONS:
            cfg = parity_cfg(data, quantization, strategy)
            result = one_step(cfg, distributed.init(cfg))
            if distributed.launched_world() and int(os.environ["RANK"]) == 0:
                torch.save(result, work / f"{strategy}-{quantization}.pt")
    # a whole fsdp run with checkpoints, and an fsdp resume of the single-process run's checkpoint
    assert memtune_train(train_args(work / "fsdp-run", data, "fsdp")) == 0
    assert memtune_train(["train", "--out", str(work / "single-copy"), "--resume", "--strategy", "fsdp",
                          "--quiet"]) == 0
    assert memtune_train(train_args(work / "ddp-run", data, "ddp")) == 0
    distributed.shutdown()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Single-process references, then one torchrun launch of two gloo processes."""
    work = tmp_path_factory.mktemp("distributed")
    data = write_data(work / "data.jsonl")
    single = {q: one_step(parity_cfg(data, q)) for q in QUANTIZATIONS}
    assert memtune_train(train_args(work / "single-run", data, "single")) == 0
    resumable_copy(work / "single-run", work / "single-copy")
    (work / "tmp").mkdir()
    env = {**os.environ, **launch_env(), "TMPDIR": str(work / "tmp")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               __file__, str(work)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return work, single


@pytest.mark.slow
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_gradients_and_step_equal_one_process_with_the_same_global_batch(launched, strategy, quantization):
    work, single = launched
    ref, got = single[quantization], torch.load(work / f"{strategy}-{quantization}.pt")
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 0
    assert any(g.abs().max() > 1e-4 for g in ref["grads"].values())  # something to compare
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(got["params"][name], ref["params"][name], rtol=0, atol=1e-5, msg=name)
    if strategy == "fsdp" and quantization == "nf4":
        assert got["sharded_4bit"]  # the 4-bit weights themselves are split across the ranks


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process_and_the_reverse(launched, tmp_path):
    work, _ = launched
    expected = losses(work / "single-run")
    assert losses(work / "fsdp-run") == pytest.approx(expected, abs=1e-5)
    # saved by one process at step 2, resumed by two under fsdp
    assert losses(work / "single-copy") == pytest.approx(expected, abs=1e-5)
    # saved under fsdp at step 2, resumed by one process
    copy = resumable_copy(work / "fsdp-run", tmp_path / "fsdp-copy")
    assert memtune_train(["train", "--out", str(copy), "--resume", "--strategy", "single", "--quiet"]) == 0
    assert losses(copy) == pytest.approx(expected, abs=1e-5)
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2


@pytest.mark.slow
def test_rank_zero_writes_the_run_directory_with_per_rank_measurements(launched):
    work, _ = launched
    for name in ("fsdp-run", "ddp-run"):
        metrics = json.loads((work / name / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and [r["rank"] for r in metrics["ranks"]] == [0, 1]
        assert metrics["peak_rss_total_bytes"] == sum(r["peak_rss_bytes"] for r in metrics["ranks"])
        assert (work / name / "adapter" / "adapter_model.safetensors").is_file()
        assert losses(work / name) == pytest.approx(losses(work / "single-run"), abs=1e-5)
    assert not list((work / "tmp").glob("memtune-rank1-*"))  # rank 1's scratch copies removed


# --- without processes ----------------------------------------------------------------------------

def parallel(world: int = 2, strategy: str = "ddp", device: str = "cpu") -> distributed.Parallel:
    return distributed.Parallel(strategy, 0, world, 0, torch.device(device))


def test_the_global_batch_must_divide_into_the_ranks():
    with pytest.raises(UserError, match="batch_size: 3 is the global batch and must divide into 2"):
        distributed.plan(RunConfig(batch_size=3, strategy="ddp"), parallel())


def test_a_strategy_outside_torchrun_and_torchrun_without_one_are_one_line(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="strategy: ddp runs one process per GPU under torchrun"):
        distributed.init(RunConfig(strategy="ddp"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="strategy: torchrun started 2 processes; give --strategy ddp or fsdp"):
        distributed.init(RunConfig())


def test_fsdp_turns_off_what_it_cannot_take_and_refuses_int8():
    cfg, notes = distributed.plan(RunConfig(strategy="fsdp", batch_size=4), parallel(strategy="fsdp"))
    assert not cfg.eval and not cfg.dequantize_graph and not cfg.embeddings_on_host
    assert len(notes) == 3 and all(": off" in n or "not generated" in n for n in notes)
    with pytest.raises(UserError, match="quantization: int8"):
        distributed.plan(RunConfig(strategy="fsdp", quantization="int8"), parallel(strategy="fsdp"))
    kept, _ = distributed.plan(RunConfig(strategy="ddp", batch_size=4), parallel())
    assert kept.dequantize_graph and kept.offload_activations  # ddp takes every technique


def test_context_parallel_on_cpus_is_one_line():
    with pytest.raises(UserError, match="context_parallel: ring attention .* needs CUDA GPUs and NCCL"):
        distributed.plan(RunConfig(strategy="ddp", context_parallel=2, batch_size=2), parallel())


def test_each_rank_takes_its_rows_and_the_weights_average_to_one():
    labels = torch.tensor([[1, 2, 3, -100], [1, 2, -100, -100], [1, 2, 3, 4], [1, -100, -100, -100]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    shares = [distributed.shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(shares[1]["labels"], labels[2:])
    # labelled tokens after the shift: 2 + 1 on rank 0, 3 + 0 on rank 1, of 6
    assert [float(s[distributed.LOSS_SCALE]) for s in shares] == [1.0, 1.0]
    uneven = {"input_ids": batch["input_ids"], "labels": labels[[0, 2, 1, 3]]}
    scales = [float(distributed.shard_batch(uneven, r, 2)[distributed.LOSS_SCALE]) for r in range(2)]
    assert scales == pytest.approx([2 * 5 / 6, 2 * 1 / 6]) and sum(scales) == pytest.approx(2)


# --- the estimate over several GPUs ----------------------------------------------------------------

def test_per_gpu_estimate_divides_weights_under_fsdp_and_batch_under_both():
    from memtune.estimate import estimate_memory
    from memtune.estimate_parallel import estimate_parallel, longest_seq_len

    cfg = RunConfig(model="llama-3.1-8b", seq_len=4096, batch_size=4, lora_rank=16)
    one = estimate_memory(cfg.replace(batch_size=2))  # one rank's share of the global batch
    ddp = estimate_parallel(cfg, 2, "ddp")
    fsdp = estimate_parallel(cfg, 2, "fsdp")
    assert ddp.local.breakdown == one.breakdown
    assert ddp.breakdown["ddp_gradient_buckets"] == one.breakdown["gradients"]
    assert fsdp.breakdown["decoder_weights"] == -(-one.breakdown["decoder_weights"] // 2)
    assert fsdp.breakdown["optimizer_states"] < one.breakdown["optimizer_states"]
    assert fsdp.per_gpu_bytes < ddp.per_gpu_bytes < estimate_memory(cfg).total_bytes + ddp.breakdown["ddp_gradient_buckets"]
    assert fsdp.total_bytes == 2 * fsdp.per_gpu_bytes
    # 8B in 4 bits on 4 x 4 GiB: it fits sharded (2.0 GiB at 1024 tokens) and not replicated (5.1 GiB)
    budget = 4 * 2**30
    assert longest_seq_len(cfg.replace(batch_size=4), 4, budget, "fsdp") is not None
    assert longest_seq_len(cfg.replace(batch_size=4), 4, budget, "ddp") is None
    split = estimate_parallel(cfg.replace(strategy="ddp", context_parallel=2, seq_len=8192), 2)
    assert split.local.seq_len == 4096 and split.notes
    with pytest.raises(UserError, match="batch_size: 4 is the global batch and must divide into 3"):
        estimate_parallel(cfg, 3, "ddp")


# --- GPUs ---------------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nccl_run_matches_one_gpu(tmp_path, strategy):
    """The same comparison on two GPUs over NCCL (bf16 off: fp32, so the bound stays tight)."""
    data = write_data(tmp_path / "data.jsonl")
    assert memtune_train(train_args(tmp_path / "one", data, "single", "--device", "cuda")) == 0
    env = {**os.environ, **launch_env()}
    argv = train_args(tmp_path / "two", data, strategy, "--device", "cuda")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "memtune", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)


@pytest.mark.gpu
@two_gpus
def test_context_parallel_on_two_gpus_matches_one_gpu(tmp_path):
    """--context-parallel 2: each sequence split over the two GPUs (ring attention over SDPA), the
    same losses as one GPU with the whole sequences (fp32; SDPA's memory-efficient kernel)."""
    data = write_data(tmp_path / "data.jsonl")
    gpu = ("--device", "cuda", "--attention", "sdpa", "--no-save-attention")
    assert memtune_train(train_args(tmp_path / "one", data, "single", *gpu)) == 0
    env = {**os.environ, **launch_env()}
    argv = train_args(tmp_path / "two", data, "ddp", *gpu, "--context-parallel", "2")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "memtune", *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)


if __name__ == "__main__":
    from memtune.cli import quiet_libraries

    quiet_libraries()
    worker(Path(sys.argv[1]))
