"""Long runs: checkpoints, exact resume after SIGKILL / SIGINT / SIGTERM, epochs, validation, the log.

The subprocess tests run `python -m memtune train` on the tiny model (LoRA with
dropout, so the RNG states matter) and compare against one uninterrupted run
of the same config, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memtune import checkpoint, train
from memtune.config import RunConfig
from memtune.data import DataBundle, TrainExample, iterate_batches

STEPS = 12


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"the cat sat on the mat and the dog sat on the log {i}"}) + "\n"
                            for i in range(40)))
    return str(path)


def train_args(data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "memtune", "train", "--data", data, "--seq-len", "64", "--quantization", "none",
            "--compute-dtype", "fp32", "--lora-targets", "all-linear", "--no-eval", "--device", "cpu", "--quiet",
            "--steps", str(STEPS), "--checkpoint-every", "2", "--val-split", "0.2", "--val-every", "3",
            "--out", str(out), *extra]


def env() -> dict[str, str]:
    # one thread: the machine's cores are shared, and every run of a comparison must use the same count
    # the package's source first, then whatever PYTHONPATH the caller had (a GPU machine's wheels)
    path = os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def resume_args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "memtune", "train", "--out", str(out), "--resume", "--quiet", *extra]


def run_to_end(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def stop_at(args: list[str], out: Path, at_step: int, sig: int) -> tuple[int, str]:
    """Start a run and send `sig` once its log shows step `at_step`; its exit code and stderr."""
    started = time.time_ns()
    process = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    while process.poll() is None:
        # the log of this process (a resume first cuts the old one back), at the step wanted
        if log.exists() and log.stat().st_mtime_ns > started and _last_step(log) >= at_step:
            process.send_signal(sig)
            break
        time.sleep(0.01)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _last_step(log: Path) -> int:
    lines = log.read_text().splitlines()
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:
        return 0  # a line being written


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(data_file, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(train_args(data_file, out))
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = metrics(out), metrics(reference)
    assert len(ours["losses"]) == STEPS
    assert ours["losses"] == theirs["losses"]  # bitwise: floats compared exactly
    assert ours["val_losses"] == theirs["val_losses"]
    assert adapter_bytes(out) == adapter_bytes(reference)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in logged] == ours["losses"]


@pytest.mark.slow
def test_three_sigkills_then_resume_reproduce_the_uninterrupted_run(data_file, reference, tmp_path):
    out = tmp_path / "run"
    # from step 3 on: the first checkpoint (step 2) is complete before step 3 is logged
    kills = sorted(random.sample(range(3, STEPS - 1), 3))
    args = train_args(data_file, out)
    for at in kills:
        code, stderr = stop_at(args, out, at, signal.SIGKILL)
        assert code == -signal.SIGKILL, f"ended ({code}) before the kill at step {at} (kills {kills}): {stderr}"
        args = resume_args(out)
    run_to_end(args)
    assert_same_run(out, reference)
    assert metrics(out)["resumed_from_step"] >= kills[-1] - 2  # at most the steps since the last checkpoint lost


@pytest.mark.slow
def test_sigint_and_sigterm_checkpoint_and_exit_130_and_143(data_file, reference, tmp_path):
    out = tmp_path / "run"
    first, second = sorted(random.sample(range(2, STEPS - 1), 2))  # SIGINT checkpoints itself
    code, stderr = stop_at(train_args(data_file, out), out, first, signal.SIGINT)
    assert code == 130, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert "stopped by SIGINT" in line and f"memtune train --out {out} --resume" in line
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert stopped >= first and (out / "checkpoints" / f"step-{stopped}" / checkpoint.MANIFEST).is_file()
    assert not (out / "metrics.json").exists()  # no result yet
    code, stderr = stop_at(resume_args(out), out, max(second, stopped + 1), signal.SIGTERM)
    assert code == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    done = run_to_end(resume_args(out))
    assert_same_run(out, reference)
    assert "resumed from" in done.stdout


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_and_more_steps_extend_the_run(data_file, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / f"step-{STEPS}"
    assert newest.is_dir() and (out / "checkpoints" / f"step-{STEPS - 2}").is_dir()  # keep 2
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as a full disk would
    done = run_to_end(resume_args(out, "--steps", str(STEPS + 4)))
    assert f"checkpoint {newest} is damaged (adapter/adapter_model.safetensors does not match its checksum)" \
        in done.stdout
    ours, theirs = metrics(out), metrics(reference)
    assert ours["resumed_from_step"] == STEPS - 2
    assert len(ours["losses"]) == STEPS + 4
    assert ours["losses"][:STEPS - 2] == theirs["losses"][:STEPS - 2]
    # from the checkpoint on, the schedule is the new total's: the same rate as a fresh 16-step schedule
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    cfg = RunConfig(steps=STEPS + 4, learning_rate=2e-3)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    schedule = train.make_scheduler(cfg, optimizer)
    rates = []
    for _ in range(STEPS + 4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [r["lr"] for r in logged[STEPS - 2:]] == pytest.approx(rates[STEPS - 2:], rel=1e-12)
    assert [r["lr"] for r in logged[:STEPS - 2]] != pytest.approx(rates[:STEPS - 2], rel=1e-12)


@pytest.mark.slow
def test_a_resume_that_changes_the_result_is_refused(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    done = subprocess.run(resume_args(out, "--lora-rank", "4"), env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtune train: error: resume: lora_rank is 4 but the run in")
    assert "Traceback" not in done.stderr
    assert metrics(out)["status"] == "ok"  # the finished result is left as it was


def test_epochs_and_val_split_give_the_steps_val_points_and_log(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"a short line number {i}"}) + "\n" for i in range(12)))
    cfg = RunConfig(data=str(data), seq_len=32, quantization="none", compute_dtype="fp32", eval=False, device="cpu",
                    batch_size=2, epochs=2, val_split=0.25, val_every=4, checkpoint_every=5, log="tensorboard")
    out = tmp_path / "run"
    result = train.run(cfg, out, log=lambda _: None, progress=False)
    # 12 records: 3 held out for validation, 9 to train on; 2 epochs at 2 a step: ceil(18 / 2) = 9 steps
    assert len(result["losses"]) == 9
    assert [v["step"] for v in result["val_losses"]] == [4, 8, 9]
    assert result["val_loss"] == result["val_losses"][-1]["loss"]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == result["losses"]
    assert [{"step": r["step"], "loss": r["val_loss"]} for r in logged if "val_loss" in r] == result["val_losses"]
    assert logged[-1]["epoch"] == 2.0 and all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in logged)
    assert all(r["peak_memory_bytes"] > 0 for r in logged)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5", "step-9"]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())


def test_the_validation_loss_is_the_training_loss_of_the_held_out_examples(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i} ", "completion": "answer" * (i % 3 + 1)}) + "\n"
                            for i in range(10)))
    cfg = RunConfig(data=str(data), seq_len=32, quantization="none", compute_dtype="fp32", eval=False,
                    device="cpu", batch_size=3, val_split=0.5, steps=1, lora_dropout=0.5)
    session = train.setup(cfg, log=lambda _: None)
    assert len(session.bundle.val) == 5 and len(session.bundle.train) == 5
    # token-weighted over batches of 3 and 2, in eval mode (no dropout): one batch of all 5 gives the same mean
    from memtune.data import collate
    from memtune.loss import forward_loss

    expected = session.cfg.replace(batch_size=5)
    whole = collate(session.bundle.val, session.bundle.pad_token_id, None, False)
    session.built.model.eval()
    with torch.no_grad():
        reference = float(forward_loss(session.built.model, whole, expected))
    session.built.model.train()
    assert train.validation_loss(session) == pytest.approx(reference, rel=1e-5)
    assert train.validation_loss(session) == train.validation_loss(session)
    assert session.built.model.training
    # prompts stay masked: a loss on the completion tokens only
    assert all(-100 in e.labels for e in session.bundle.val)


def test_the_batch_stream_starts_anywhere_as_the_uninterrupted_one_goes_on():
    bundle = DataBundle(train=[TrainExample([i, i], [i, i]) for i in range(7)], eval=[], seq_len=2, notes=[])
    cfg = RunConfig(batch_size=3, data="x.jsonl")
    whole = iterate_batches(bundle, cfg, seed=5)
    batches = [next(whole)["input_ids"] for _ in range(12)]  # 36 examples: five epochs, batches across them
    for start in (0, 1, 2, 7, 11):
        stream = iterate_batches(bundle, cfg, seed=5, start=start)
        assert all(torch.equal(next(stream)["input_ids"], b) for b in batches[start:])
    assert whole.position(12) == {"seed": 5, "epoch": 5, "index": 1, "batches": 12}


def test_damaged_checkpoints_are_named_and_pruning_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        path = checkpoint.step_dir(tmp_path, step)
        path.mkdir(parents=True)
        for name in (checkpoint.TRAINER_STATE, checkpoint.TENSOR_STATE):
            (path / name).write_text(json.dumps({"state": {"step": step}}))
        (path / checkpoint.MANIFEST).write_text(json.dumps(checkpoint._manifest(path)))
    (checkpoint.step_dir(tmp_path, 8) / checkpoint.TENSOR_STATE).write_text("changed")
    (checkpoint.step_dir(tmp_path, 6) / checkpoint.MANIFEST).unlink()
    (tmp_path / "checkpoints" / ".step-10.tmp").mkdir()  # a write a kill cut short: never read
    lines = []
    found = checkpoint.latest(tmp_path, lines.append)
    assert found.step == 4
    assert lines == [f"checkpoint {checkpoint.step_dir(tmp_path, 8)} is damaged ({checkpoint.TENSOR_STATE} does "
                     f"not match its checksum); using the one before",
                     f"checkpoint {checkpoint.step_dir(tmp_path, 6)} is damaged (no manifest.json (written last: "
                     f"the checkpoint is incomplete)); using the one before"]
    checkpoint.prune(tmp_path, keep=2, best_step=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step-10.tmp", "step-2", "step-6",
                                                                            "step-8"]


def test_full_fine_tuning_resumes_bitwise_from_a_saved_model(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"a short line number {i}"}) + "\n" for i in range(8)))
    cfg = RunConfig(data=str(data), seq_len=32, quantization="none", compute_dtype="fp32", eval=False, device="cpu",
                    lora=False, learning_rate=1e-3, steps=4, checkpoint_every=2, lora_dropout=0.0)
    whole, part = tmp_path / "whole", tmp_path / "part"
    expected = train.run(cfg, whole, log=lambda _: None, progress=False)
    assert (whole / "checkpoints" / "step-2" / "model").is_dir()
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step-4")
    shutil.rmtree(part / "model")
    found = checkpoint.latest(part, print)
    resumed = train.run(cfg, part, log=lambda _: None, progress=False, resume_from=found)
    assert resumed["resumed_from_step"] == 2 and resumed["losses"] == expected["losses"]
    from safetensors.torch import load_file

    ours = load_file(str(part / "model" / "model.safetensors"))
    theirs = load_file(str(whole / "model" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_resume_on_changed_data_is_refused(tmp_path):
    from memtune.errors import UserError

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"a short line number {i}"}) + "\n" for i in range(8)))
    cfg = RunConfig(data=str(data), seq_len=32, quantization="none", compute_dtype="fp32", eval=False, device="cpu",
                    steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    train.run(cfg, out, log=lambda _: None, progress=False)
    data.write_text(data.read_text().replace("number 3", "number three"))  # same size, other tokens
    with pytest.raises(UserError, match=r"^resume: the training data are not those of .*step-2"):
        train.run(cfg.replace(steps=3), out, log=lambda _: None, progress=False,
                  resume_from=checkpoint.latest(out, print))


def test_checkpoint_keep_0_leaves_no_checkpoint_once_the_run_has_finished(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"a short line number {i}"}) + "\n" for i in range(8)))
    cfg = RunConfig(data=str(data), seq_len=32, quantization="none", compute_dtype="fp32", eval=False, device="cpu",
                    steps=3, checkpoint_every=1, checkpoint_keep=0)
    out = tmp_path / "run"
    seen = []
    original = checkpoint.prune
    with pytest.MonkeyPatch.context() as patch:  # while it runs, the newest checkpoint is always there
        patch.setattr(checkpoint, "prune", lambda *a, **k: (original(*a, **k),
                                                            seen.append(sorted(p.name for p in
                                                                               (out / "checkpoints").iterdir()))))
        train.run(cfg, out, log=lambda _: None, progress=False)
    assert seen == [["step-1"], ["step-2"], ["step-3"]]
    assert not (out / "checkpoints").exists() and (out / "adapter").is_dir()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_resumed_run_agrees_within_the_run_to_run_spread(tmp_path):
    """bf16 kernels need not be bitwise repeatable: a SIGTERM-resumed run against two uninterrupted ones.

    Writes the numbers to MEMTUNE_RESUME_REPORT (a JSON path) when set.
    """
    steps = 40
    args = ["--model", "deepseek-r1-distill-qwen-1.5b", "--random-init", "--data", "random", "--seq-len", "2048",
            "--steps", str(steps), "--checkpoint-every", "10", "--no-eval", "--quiet", "--device", "cuda"]

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "memtune", "train", *args, "--out", str(out)]

    first, second, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (first, second):
        subprocess.run(command(out), env=env(), check=True, timeout=600)
    code, stderr = stop_at(command(resumed), resumed, 25, signal.SIGTERM)
    assert code == 143, stderr[-2000:]
    run_to_end(resume_args(resumed))
    a, b, c = (metrics(out)["losses"] for out in (first, second, resumed))
    at = metrics(resumed)["resumed_from_step"]
    spread = max(abs(x - y) for x, y in zip(a[at:], b[at:]))
    gap = max(abs(x - y) for x, y in zip(a[at:], c[at:]))
    report = {"resumed_from_step": at, "run_to_run_max_abs": spread, "resume_max_abs": gap,
              "before_resume_equal": c[:at] == a[:at] or c[:at] == b[:at], "loss_last": a[-1]}
    if os.environ.get("MEMTUNE_RESUME_REPORT"):
        Path(os.environ["MEMTUNE_RESUME_REPORT"]).write_text(json.dumps(report, indent=2))
    # within the spread two uninterrupted runs show (or 1e-3 of the loss, where the kernels repeat exactly)
    assert gap <= max(2 * spread, 1e-3 * abs(a[-1])), report


def test_val_data_is_read_in_the_training_format_and_a_missing_file_is_one_line(tmp_path):
    from transformers import AutoTokenizer

    from memtune.data import load_data
    from memtune.errors import UserError

    tok = AutoTokenizer.from_pretrained(str(Path(train.__file__).parent / "assets" / "tiny"))
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": "yes"}) + "\n" for i in range(6)))
    val_file.write_text("".join(json.dumps({"prompt": f"v{i} ", "completion": "no"}) + "\n" for i in range(3)))
    cfg = RunConfig(data=str(train_file), val_data=str(val_file), eval=False, seq_len=32)
    bundle = load_data(cfg, tok, 256)
    assert len(bundle.train) == 6 and len(bundle.val) == 3
    prompt_ids = tok("v0 ", add_special_tokens=False)["input_ids"]
    assert bundle.val[0].labels[:len(prompt_ids)] == [-100] * len(prompt_ids)  # masked as training is
    with pytest.raises(UserError, match=r"^val_data: file not found: .*nope\.jsonl$"):
        load_data(cfg.replace(val_data=str(tmp_path / "nope.jsonl")), tok, 256)
