"""The bad-input audit, table-driven: each failure is one line on stderr, the right exit code, no
traceback, and a directory that says only what is true afterwards; and the good cases stay good.

The CLI runs in-process (`memtune.cli.main`); a subprocess only where a kill matters.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from memtune import run_dir
from memtune.cli import main
from memtune.config import RunConfig

FAST = ["--steps", "2", "--seq-len", "64", "--no-eval", "--device", "cpu", "--quiet", "--quantization", "none",
        "--compute-dtype", "fp32", "--warmup-steps", "0", "--checkpoint-every", "1"]
EVAL_FAST = ["--eval-examples", "2", "--max-new-tokens", "4", "--eval-batch-size", "2"]
TINY_LIMIT = 64  # the tiny model's v_proj: 128 -> 2 kv heads x 32


def one_line(capsys, code, expected_code, expected):
    """The call's stderr is exactly one line holding `expected`, and its exit code is `expected_code`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert expected in lines[0], lines[0]
    return lines[0]


def listing(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (the lock file aside: it holds a pid)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != run_dir.LOCK_NAME}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": "the cat sat on the mat"}) + "\n" for _ in range(8)))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_file):
    """A good case that must stay good: a fast run ends with exit 0 and a complete run directory."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *FAST, "--data", data_file, "--out", str(out)]) == 0
    run_dir.unlock(out)
    for name in ("config.yaml", "metrics.json", "report.md", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
    return out


@pytest.fixture()
def finished_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# --- numbers and ranges, refused before anything loads --------------------------------------

FLOAT_FIELDS = [f.name for f in fields(RunConfig) if f.type in ("float", float)]

NUMBER_CASES = [
    (["train", "--learning-rate", "inf"], "learning_rate: expected a finite number"),
    (["train", "--lora-alpha", "1e400"], "lora_alpha: expected a finite number"),
    (["train", "--learning-rate", "-1e-4"], "learning_rate: expected a number > 0; got -0.0001"),
    (["train", "--learning-rate", "-inf"], "learning_rate: expected a finite number"),
    (["train", "--weight-decay", "nan"], "weight_decay: expected a finite number"),
    (["train", "--lora-dropout", "-0.5"], "lora_dropout: expected a number in [0, 1)"),
    (["train", "--seq-len", "-5"], "seq_len: expected an integer >= 1; got -5"),
    (["estimate", "--max-grad-norm", "inf"], "max_grad_norm: expected a finite number"),
    (["train", "--lora-rank", "10000000000"], f"lora_rank: expected at most {TINY_LIMIT} for tiny"),
    (["train", "--lora-rank", "129", "--lora-targets", "q_proj"], "lora_rank: expected at most 128"),
    (["eval", "--lora-rank", "10000000000"], f"lora_rank: expected at most {TINY_LIMIT}"),
    (["estimate", "--lora-rank", "10000000000"], f"lora_rank: expected at most {TINY_LIMIT} for tiny"),
    (["estimate", "--model", "llama-3.1-8b", "--lora-rank", "1025", "--lora-targets", "k_proj"],
     "lora_rank: expected at most 1024"),  # 8 kv heads x 128
    (["estimate", "--gpu-memory", "9" * 400 + "GiB"], "gpu_memory: expected a finite size"),
    (["fit", "--gpu-memory", "24GiB", "--host-memory", "9" * 400 + "GiB"], "host_memory: expected a finite size"),
]


@pytest.mark.parametrize("argv,expected", NUMBER_CASES, ids=[" ".join(c[0]) for c in NUMBER_CASES])
def test_numbers_out_of_range_are_one_line(argv, expected, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*argv, "--out", str(out)] if argv[0] == "train" else argv)
    one_line(capsys, code, 2, expected)
    assert not out.exists()


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_every_float_field_refuses_non_finite_values_by_name(name, value, capsys):
    code = main(["estimate", "--" + name.replace("_", "-"), value])
    line = one_line(capsys, code, 2, f"{name}: expected a finite number")
    assert line.count("expected") == 1  # no other field blamed


@pytest.mark.parametrize("model", ["tiny", "llama-3.2-1b", "qwen3-1.7b"])
@pytest.mark.parametrize("targets", ["default", "all-linear", ("o_proj", "down_proj")])
def test_the_rank_bound_of_the_built_model_and_of_the_estimator_agree(model, targets):
    """train checks the meta-device model, estimate the estimator's shapes: the same limit for both."""
    from memtune import bounds
    from memtune.estimate import load_model_config, model_shape

    cfg = RunConfig(model=model, random_init=True, lora_targets=targets)
    built = bounds.lora_rank_limit(bounds.meta_model(cfg), bounds._targets(cfg, load_model_config(model)["model_type"]))
    for rank, refused in ((built.rank, False), (built.rank + 1, True)):
        for check in (lambda c: bounds.check_lora_rank(c), lambda c: bounds.check_lora_rank_for_shape(
                c, model_shape(load_model_config(model)))):
            if refused:
                with pytest.raises(bounds.UserError, match=f"lora_rank: expected at most {built.rank} "):
                    check(cfg.replace(lora_rank=rank))
            else:
                check(cfg.replace(lora_rank=rank))


def test_non_finite_yaml_values_name_the_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora_alpha: .inf\nlearning_rate: 1.0e+400\n")
    line = one_line(capsys, main(["estimate", "--config", str(config)]), 2, "lora_alpha: expected a finite number")
    assert "learning_rate: expected a finite number" in line


@pytest.mark.parametrize("argv", [["estimate", "--learning-rate", "1e-4", "--lora-rank", str(TINY_LIMIT)],
                                  ["estimate", "--lora-alpha", "-0"], ["estimate", "--weight-decay", "0"]])
def test_good_numbers_stay_good_or_get_the_range_message(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    if argv[2] == "-0":  # a negative-looking zero is a value, refused by the range check
        assert code == 2 and "lora_alpha: expected a number > 0" in err
    else:
        assert code == 0, err


def test_unknown_model_type_is_one_short_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "frobnicator", "hidden_size": 64}))
    out = tmp_path / "run"
    line = one_line(capsys, main(["train", "--model", str(model), "--random-init", "--out", str(out)]), 2,
                    "frobnicator")
    assert len(line) < 400, len(line)
    assert not out.exists()


# --- output paths that exist as something else ---------------------------------------------

def test_train_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine\n")
    one_line(capsys, main(["train", "--out", str(target)]), 2, f"out: {target} is a file")
    assert target.read_text() == "mine\n"
    one_line(capsys, main(["train", "--out", str(target / "run")]), 2, f"{target} is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_study_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine\n")
    one_line(capsys, main(["study", "seed", "--model", "tiny", "--out", str(target)]), 2, f"out: {target} is a file")
    assert target.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_eval_predictions_that_is_a_directory(tmp_path, capsys):
    target = tmp_path / "preds"
    target.mkdir()
    one_line(capsys, main(["eval", *EVAL_FAST, "--predictions", str(target)]), 2,
             f"predictions: {target} is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds"] and not any(target.iterdir())
    (tmp_path / "afile").write_text("")
    one_line(capsys, main(["eval", *EVAL_FAST, "--predictions", str(tmp_path / "afile" / "p.jsonl")]), 2,
             f"predictions: cannot create {tmp_path / 'afile' / 'p.jsonl'}: {tmp_path / 'afile'} is a file")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where even root cannot create files")
@pytest.mark.parametrize("argv,field", [
    (["train", "--out", "/proc/memtune-run"], "out"),
    (["study", "seed", "--model", "tiny", "--out", "/proc/memtune-study"], "out"),
    (["eval", *EVAL_FAST, "--predictions", "/proc/memtune-p.jsonl"], "predictions"),
    (["merge", "--adapter", "ADAPTER", "--merged-out", "/proc/memtune-merged"], "merged_out"),
])
def test_an_unwritable_output_is_one_line_before_anything_loads(argv, field, finished_run, capsys):
    argv = [str(finished_run / "adapter") if a == "ADAPTER" else a for a in argv]
    one_line(capsys, main(argv), 2, f"{field}: cannot write into /proc")


# --- a run directory that never lies ----------------------------------------------------------

def test_a_finished_run_is_refused_and_left_as_it_was(finished_copy, data_file, capsys):
    before = listing(finished_copy)
    code = main(["train", *FAST, "--data", data_file, "--out", str(finished_copy)])
    line = one_line(capsys, code, 2, "holds a finished run (metrics.json, status ok)")
    assert "--resume" in line and "--out" in line and "--overwrite" in line
    assert listing(finished_copy) == before


def test_overwrite_moves_the_old_run_aside_and_keeps_the_users_files(finished_copy, data_file, monkeypatch, capsys):
    import memtune.run_report

    (finished_copy / "notes.txt").write_text("my notes\n")
    old = listing(finished_copy)
    seen = {}
    original = memtune.run_report.write_run_report

    def report_then_look(out_dir, *args, **kwargs):
        seen["metrics_before_report"] = (Path(out_dir) / "metrics.json").exists()
        return original(out_dir, *args, **kwargs)

    monkeypatch.setattr(memtune.run_report, "write_run_report", report_then_look)
    code = main(["train", *FAST, "--data", data_file, "--out", str(finished_copy), "--overwrite", "--lora-rank", "4"])
    run_dir.unlock(finished_copy)
    assert code == 0, capsys.readouterr().err
    assert seen == {"metrics_before_report": False}  # metrics.json comes last, after report.md
    asides = list(finished_copy.glob(".previous-*"))
    assert len(asides) == 1
    kept = listing(asides[0])
    assert kept == {name: data for name, data in old.items() if name != "notes.txt"}  # the old run, whole
    assert (finished_copy / "notes.txt").read_text() == "my notes\n"
    new_metrics = json.loads((finished_copy / "metrics.json").read_text())
    old_metrics = json.loads(kept["metrics.json"])
    assert new_metrics["status"] == "ok" and new_metrics["config_hash"] != old_metrics["config_hash"]
    assert "lora_rank: 4" in (finished_copy / "config.yaml").read_text()
    assert "moved the previous run's files" in capsys.readouterr().out


def test_an_unfinished_run_without_checkpoints_is_moved_aside(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lora_rank: 999\n")  # what a run killed before its result left
    (out / ".adapter.tmp").mkdir()
    code = main(["train", *FAST, "--data", data_file, "--out", str(out)])
    run_dir.unlock(out)
    assert code == 0, capsys.readouterr().err
    aside = next(out.glob(".previous-*"))
    assert (aside / "config.yaml").read_text() == "lora_rank: 999\n" and (aside / ".adapter.tmp").is_dir()
    assert "lora_rank: 999" not in (out / "config.yaml").read_text() and not (out / ".adapter.tmp").exists()
    assert "unfinished run" in capsys.readouterr().out


@pytest.mark.parametrize("flags,expected", [
    ([], "holds an unfinished run with checkpoints; use --resume to continue it"),
    (["--overwrite", "--resume"], "choose one"),
])
def test_an_unfinished_run_with_checkpoints_is_not_started_over(tmp_path, flags, expected, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "config.yaml").write_text("steps: 2\n")
    before = listing(out)
    one_line(capsys, main(["train", "--out", str(out), *flags]), 2, expected)
    assert listing(out) == before


def test_resume_needs_a_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_line(capsys, main(["train", "--resume"]), 2, "resume: expected --out DIR")
    assert not any(tmp_path.iterdir())


def test_resume_needs_checkpoints(finished_copy, capsys):
    shutil.rmtree(finished_copy / "checkpoints", ignore_errors=True)
    before = listing(finished_copy)
    one_line(capsys, main(["train", "--out", str(finished_copy), "--resume"]), 2, "no checkpoints to resume from")
    assert listing(finished_copy) == before


def test_run_dir_states():
    """check() on each kind of directory: what is refused, what passes, and for --resume what moves aside."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assert run_dir.check(root / "new").run_files == ()
        finished = root / "finished"
        (finished / "checkpoints" / "step-2").mkdir(parents=True)
        (finished / "metrics.json").write_text('{"status": "oom"}')
        (finished / "report.md").write_text("r")
        (finished / "config.yaml").write_text("c")
        with pytest.raises(run_dir.UserError, match="status oom"):
            run_dir.check(finished)
        assert run_dir.check(finished, overwrite=True).status == "oom"
        assert run_dir.check(finished, resume=True).checkpoints
        # resuming a finished run: its old result leaves first, the checkpoints and config stay
        aside = run_dir.prepare(finished, resume=True, log=lambda _: None)
        run_dir.unlock(finished)
        assert sorted(p.name for p in aside.iterdir()) == ["metrics.json", "report.md"]
        assert (finished / "config.yaml").is_file() and (finished / "checkpoints" / "step-2").is_dir()


def test_a_second_run_into_a_directory_being_written_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from memtune import run_dir; run_dir.lock(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line(capsys, main(["train", "--out", str(out)]), 2, f"another run is writing {out} (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_rerun_leaves_no_result_that_disagrees_with_its_config(finished_run, finished_copy, data_file):
    """SIGKILL mid-run after --overwrite: the old result sits whole beside, the directory claims none."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    argv = [sys.executable, "-m", "memtune", "train", *FAST, "--steps", "100000", "--checkpoint-every", "100000",
            "--data", data_file, "--out", str(finished_copy), "--overwrite", "--lora-rank", "4"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # the new run's config, written once the old run's files moved aside
        while not (any(finished_copy.glob(".previous-*")) and (finished_copy / "config.yaml").is_file()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # into the training steps
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (finished_copy / "metrics.json").exists()
    assert "lora_rank: 4" in (finished_copy / "config.yaml").read_text()
    aside = next(finished_copy.glob(".previous-*"))
    for name in ("metrics.json", "config.yaml", "report.md"):  # the old run's result and config, together
        assert (aside / name).read_bytes() == (finished_run / name).read_bytes(), name


# --- out of memory is exit 3 on a CPU too -----------------------------------------------------

def _cpu_allocator_failure(*_args, **_kwargs):
    return torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses 4 EiB at once


@pytest.mark.parametrize("where,failure", [("train_loop", _cpu_allocator_failure),
                                           ("setup", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))],
                         ids=["allocator-in-training", "MemoryError-in-setup"])
def test_out_of_memory_on_a_cpu_is_exit_3_with_an_oom_result(where, failure, tmp_path, data_file, monkeypatch,
                                                             capsys):
    import memtune.train

    monkeypatch.setattr(memtune.train, where, failure)
    out = tmp_path / "run"
    code = main(["train", *FAST, "--data", data_file, "--out", str(out)])
    run_dir.unlock(out)
    line = one_line(capsys, code, 3, "memtune train: out of memory: ")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "oom" and metrics["device"] == "cpu" and metrics["peak_rss_bytes"] > 0
    assert (out / "config.yaml").is_file()  # the result says what ran
    assert ("DefaultCPUAllocator" in line) == (where == "train_loop")


def test_out_of_memory_in_another_verb_is_exit_3(monkeypatch, tmp_path, capsys):
    import memtune.evaluate_cmd

    monkeypatch.setattr(memtune.evaluate_cmd, "_load_model", _cpu_allocator_failure)
    code = main(["eval", *EVAL_FAST, "--predictions", str(tmp_path / "p.jsonl")])
    one_line(capsys, code, 3, "memtune eval: out of memory: ")
    assert not any(tmp_path.iterdir())


# --- damaged or mismatched adapters, in eval and merge ------------------------------------------

def _other_models_adapter(path: Path) -> None:
    """A LoRA adapter saved for a Qwen2 of another width (64, not tiny's 128)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=576, max_position_embeddings=64)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(path))


def _damage(kind: str, adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    if kind == "missing":
        shutil.rmtree(adapter)
    elif kind == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif kind == "bad-json":
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA",\n  "r": 8,,\n}')
    elif kind == "not-peft":
        (adapter / "adapter_config.json").write_text('{"foo": 1}')
    elif kind == "bad-rank":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    elif kind == "no-weights":
        weights.unlink()
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "random":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif kind == "other-model":
        shutil.rmtree(adapter)
        _other_models_adapter(adapter)


ADAPTER_CASES = [
    ("missing", "does not exist"),
    ("no-config", "no adapter_config.json in"),
    ("bad-json", "adapter_config.json:2: not valid JSON"),
    ("not-peft", "adapter_config.json is not a peft adapter config"),
    ("bad-rank", "r: expected an integer >= 1; got 'eight'"),
    ("no-weights", "has no adapter_model.safetensors"),
    ("truncated", "adapter_model.safetensors is damaged"),
    ("random", "adapter_model.safetensors is damaged"),
    ("other-model", "does not fit model tiny: size mismatch for"),
]


@pytest.mark.parametrize("verb", ["eval", "merge"])
@pytest.mark.parametrize("kind,expected", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_damaged_or_mismatched_adapters_are_one_line(verb, kind, expected, finished_run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    _damage(kind, adapter)
    target = tmp_path / "out"
    if verb == "eval":
        argv = ["eval", *EVAL_FAST, "--adapter", str(adapter), "--predictions", str(target / "p.jsonl")]
    else:
        argv = ["merge", "--adapter", str(adapter), "--merged-out", str(target)]
    one_line(capsys, main(argv), 2, expected)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["adapter"] if adapter.exists() else [])  # no temp left


def test_eval_with_a_good_adapter_stays_good(finished_run, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    assert main(["eval", *EVAL_FAST, "--adapter", str(finished_run / "adapter"), "--predictions", str(preds)]) == 0
    assert len(preds.read_text().splitlines()) == 2 and json.loads(preds.with_suffix(".score.json").read_text())


# --- merge never deletes what it did not write ------------------------------------------------

def test_merge_into_a_file_is_one_line_and_leaves_no_temporary(finished_run, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine\n")
    code = main(["merge", "--adapter", str(finished_run / "adapter"), "--merged-out", str(target)])
    one_line(capsys, code, 2, f"merged_out: {target} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and target.read_text() == "mine\n"


def test_merge_refuses_a_non_empty_directory_without_overwrite(finished_run, tmp_path, capsys):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "a.txt").write_text("a")
    (target / "b.txt").write_text("b")
    code = main(["merge", "--adapter", str(finished_run / "adapter"), "--merged-out", str(target)])
    line = one_line(capsys, code, 2, f"merged_out: {target} is not empty (a.txt, b.txt)")
    assert "--overwrite" in line
    assert listing(target) == {"a.txt": b"a", "b.txt": b"b"} and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_writes_a_new_directory_and_overwrite_replaces_only_its_files(finished_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    fresh = tmp_path / "fresh"
    assert main(["merge", "--adapter", str(finished_run / "adapter"), "--merged-out", str(fresh)]) == 0
    written = set(listing(fresh))
    assert {"config.json", "model.safetensors"} <= written
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text("{}")  # an earlier model's, replaced
    (target / "model.safetensors.index.json").write_text("{}")  # a stale sharded index, read instead of the new file
    code = main(["merge", "--adapter", str(finished_run / "adapter"), "--merged-out", str(target), "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert set(listing(target)) == written | {"notes.txt"}
    assert (target / "notes.txt").read_text() == "mine"
    assert listing(target)["model.safetensors"] == listing(fresh)["model.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(str(target)).config.hidden_size == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "merged"]


def test_a_diverged_loss_is_one_line_and_leaves_no_result(tmp_path, data_file, capsys, monkeypatch):
    # A loss that turns nan at the second step. (A huge learning rate was the trigger once; whether it
    # reaches nan or saturates at a finite loss within three steps depends on the installed versions.)
    from memtune import train as train_module

    real, calls = train_module.forward_loss, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(train_module, "forward_loss", diverging)
    out = tmp_path / "run"
    code = main(["train", *FAST, "--steps", "3", "--data", data_file, "--out", str(out)])
    run_dir.unlock(out)
    one_line(capsys, code, 2, "loss became nan at step")
    assert (out / "config.yaml").is_file() and not (out / "metrics.json").exists()  # not a result


def test_a_study_retry_starts_over_in_a_directory_a_killed_attempt_left(tmp_path, data_file):
    """A study reruns a killed run in the same directory: the attempt's files (checkpoints too) move aside."""
    from memtune.config import save_yaml
    from memtune.study import Runner

    directory = tmp_path / "runs" / "abc"
    (directory / "checkpoints" / "step-1").mkdir(parents=True)
    (directory / "config.yaml").write_text("lora_rank: 999\n")
    (directory / "metrics.json").write_text('{"status": "ok"}')  # stale: must not pass for the retry's result
    config = tmp_path / "abc.yaml"
    save_yaml(RunConfig(data=data_file, steps=2, seq_len=64, eval=False, device="cpu", quantization="none",
                        compute_dtype="fp32", warmup_steps=0, out=str(directory)), config)
    outcome = Runner(timeout_s=300).run(config, directory)
    assert outcome.status == "ok", outcome.error
    aside = next(directory.glob(".previous-*"))
    assert (aside / "config.yaml").read_text() == "lora_rank: 999\n" and (aside / "checkpoints" / "step-1").is_dir()
    assert outcome.metrics["trainable_params"] > 0  # the retry's own result


def test_good_directories_stay_good(finished_run, tmp_path, data_file, capsys):
    """An empty --out, an --out holding only a user's files, an empty --merged-out: no refusal, nothing moved."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["train", *FAST, "--data", data_file, "--out", str(out)])
    run_dir.unlock(out)
    assert code == 0, capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob(".previous-*"))
    merged = tmp_path / "merged"
    merged.mkdir()
    assert main(["merge", "--adapter", str(out / "adapter"), "--merged-out", str(merged)]) == 0
    assert (merged / "config.json").is_file()


@pytest.mark.parametrize("argv,expected", [
    (["train", "--learning-rate", "-1e-4"], "memtune train: error: learning_rate: expected a number > 0"),
    (["merge", "--adapter", "/no/such/adapter", "--merged-out", "/nonexistent-memtune-dir/merged"],
     "memtune merge: error: adapter:"),
])
def test_the_installed_command_exits_2_with_one_line(argv, expected):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    done = subprocess.run([sys.executable, "-m", "memtune", *argv], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), done.stderr
