"""The benchmark runner, its scenario files and the trainer comparison's plumbing (no GPU needed).

compare.py's own tests are in test_kernels.py."""

import importlib
import json
import shlex
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

run_scenario = importlib.import_module("run_scenario")
trainer_compare = importlib.import_module("trainer_compare")
compare = importlib.import_module("compare")


def _train_parser():
    from memtune.cli import build_verb_parser

    return build_verb_parser("train")[0]


def _check_parses(step, out: Path) -> None:
    """The step's command line is accepted by the parser of the script it runs."""
    script = Path(step.argv[1]).name if len(step.argv) > 1 else ""
    if step.kind == "compare":
        compare.parse_args(step.argv[2:])
    elif step.kind == "trainer":
        trainer_compare.parse_args(step.argv[2:])
    elif step.kind == "train":
        _train_parser().parse_args(step.argv[4:])
    elif step.kind == "configs":
        runs = [a for a in step.argv if ": --" in a]
        assert runs
        for run in runs:
            _train_parser().parse_args(shlex.split(run.partition(":")[2]))
    elif step.kind == "profile":
        flags = step.argv[2:step.argv.index("--profile-out")]
        flags = [f for i, f in enumerate(flags) if f != "--rows" and (i == 0 or flags[i - 1] != "--rows")]
        _train_parser().parse_args(flags)
    elif step.kind in ("script", "pytest"):
        paths = [Path(a) for a in step.argv[1:] if a.endswith(".py")]
        assert paths and all(p.is_file() for p in paths), (script, step.argv)


@pytest.mark.parametrize("path", sorted((BENCH / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_scenario_loads_and_its_commands_parse(path, tmp_path):
    scenario = run_scenario.load(path, tmp_path)
    assert scenario.about and scenario.minutes > 0 and scenario.steps
    for step in scenario.steps:
        _check_parses(step, tmp_path)
        assert "{out}" not in " ".join(step.argv)


def test_the_headline_scenario_runs_memtune_beside_unsloth(tmp_path):
    (step,) = run_scenario.load(run_scenario.resolve("defaults-16k"), tmp_path).steps
    args = compare.parse_args(step.argv[2:])
    assert args.stack_list == ["memtune", "unsloth"] and args.seq_lens == [16384] and args.repeat == 2
    assert args.out == (tmp_path / "compare-h200.json").resolve()


@pytest.mark.parametrize("text, message", [
    ("steps: [{comapre: {stacks: [memtune]}}]", "steps[0]: expected one of compare"),
    ("steps: [{compare: {stacks: [memtune], seq_len: 4}}]", "steps[0].compare: unknown key 'seq_len'"),
    ("steps: [{compare: {stacks: memtune}}]", "steps[0].compare.stacks: expected list"),
    ("steps: [{compare: {stacks: [memtune], steps: true}}]", "steps[0].compare.steps: expected int"),
    ("steps: [{profile: {flags: --seq-len 4}}]", "steps[0].profile: missing out"),
    ("steps: [{script: {run: x.py}, show: ['(']}]", "steps[0].show: not a regular expression"),
    ("steps: {compare: {}}", "expected a mapping of about, minutes and steps"),
    ("steps: [", "not valid YAML"),
])
def test_a_mistake_in_a_scenario_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run_scenario.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_an_unknown_scenario_name_lists_the_known_ones(capsys):
    assert run_scenario.main(["no-such-scenario", "--dry-run"]) == 2
    assert "defaults-16k" in capsys.readouterr().err


def test_the_runner_filters_output_keeps_logs_and_goes_on_after_a_timeout(tmp_path, capsys):
    python = sys.executable
    steps = [run_scenario.Step("script", [python, "-c", "import time; time.sleep(30)"], 1, []),
             run_scenario.Step("script", [python, "-c", "print('keep me'); print('drop me')"], None,
                               [run_scenario.re.compile("keep")])]
    code = run_scenario.run(run_scenario.Scenario("t", "", 0, steps), tmp_path)
    printed = capsys.readouterr().out
    assert code == 1  # the first step timed out; the second still ran
    assert "script: timed out after" in printed and "steps [1] failed" in printed
    assert "\nkeep me\n" in printed and "\ndrop me\n" not in printed
    assert (tmp_path / "02-script.log").read_text() == "keep me\ndrop me\n"


def test_a_compare_scenario_runs_end_to_end_on_a_cpu(tmp_path, capsys):
    path = tmp_path / "cpu.yaml"
    path.write_text("about: plumbing\nminutes: 1\nsteps:\n"
                    "  - compare: {preset: tiny-test, stacks: [seed], seq_lens: [64], steps: 2, warmup: 1}\n")
    out = tmp_path / "out"
    assert run_scenario.main([str(path), "--out", str(out)]) == 0
    (record,) = compare.load_records(out / "compare-h200.json")
    assert record["stack"] == "seed" and record["status"] == "ok" and record["preset"] == "tiny-test"
    assert (out / "compare-h200.md").is_file() and "seed @ 64" in (out / "01-compare.log").read_text()
    assert "every step exited 0" in capsys.readouterr().out


def test_trainer_compare_arguments():
    args = trainer_compare.parse_args(["--stacks", "unsloth,memtune", "--apply-options",
                                       "offload_activations=false,tiled_mlp_chunk=4096"])
    assert args.stack_list == ["unsloth", "memtune"] and args.seq_len == 16384
    assert args.apply_options == {"offload_activations": False, "tiled_mlp_chunk": 4096}
    for bad in (["--stacks", "memtune,liger"], ["--steps", "3", "--warmup", "3"], ["--apply-options", "x"],
                ["--preset", "tiny-test", "--seq-len", "4096"]):
        with pytest.raises(SystemExit):
            trainer_compare.parse_args(bad)


def _record(stack, peak, step_times, **extra):
    return {"stack": stack, "seq_len": 16384, "lora_targets": "qv", "gpu_memory_cap": None,
            "preset": "r1-1.5b", "mode": "trainer", "status": "ok", **extra,
            "result": {"status": "ok", "peak_allocated_bytes": peak, "peak_reserved_bytes": peak * 1.2,
                       "step_times_s": step_times, "losses": [12.2, 12.1, 12.0, 11.9], "gpu_name": "H200"}}


def test_trainer_records_report_the_median_after_warmup_and_the_target(tmp_path):
    out = tmp_path / "trainer.json"
    for stack, peak, times, extra in (
            ("memtune", 2.6e9, [9.0, 0.40, 0.44, 0.42], {"applied": ["offload_activations"],
                                                         "skipped": {"host_embeddings": "not CUDA"}}),
            ("unsloth", 3.5e9, [9.0, 0.50, 0.48, 0.49], {})):
        record = _record(stack, peak, times)
        result = {**record.pop("result"), **extra}
        path = tmp_path / f"{stack}.json"
        path.write_text(json.dumps(result))
        trainer_compare.fill_record(record, path, 0, "", warmup=1)
        trainer_compare.append_record(out, record)
    rows = {r["stack"]: r for r in trainer_compare.load_records(out)}
    assert rows["memtune"]["step_time_s"] == 0.42 and rows["memtune"]["tokens_per_s"] == 16384 / 0.42
    assert rows["memtune"]["loss_step1"] == 12.2 and rows["memtune"]["applied"] == ["offload_activations"]
    text = trainer_compare.write_report(out, "r1-1.5b").read_text()
    assert "| 16384 | memtune | ok | 2.60 | 3.12 |" in text
    assert "memory 0.74x, speed 1.17x Unsloth's: target (<= 0.8x, >= 1.1x) met" in text
    assert "- skipped host_embeddings: not CUDA" in text


def test_a_trainer_run_without_enough_timed_steps_is_not_a_result(tmp_path):
    record = _record("memtune", 2e9, [1.0])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record.pop("result")))
    trainer_compare.fill_record(record, path, 0, "", warmup=3)
    assert record["status"] == "error" and "tokens_per_s" not in record
    missing = _record("unsloth", 2e9, [])
    missing.pop("result")
    trainer_compare.fill_record(missing, tmp_path / "absent.json", 3, "CUDA out of memory", warmup=3)
    assert missing["status"] == "oom"


def test_stack_registry():
    stacks = importlib.import_module("stacks")
    assert set(stacks.BUILTIN_STACKS) - {"memtune"} <= set(stacks.STACKS)
    assert stacks.get("unsloth").preload == "unsloth"
    with pytest.raises(ValueError, match="unknown stack"):
        stacks.get("nope")


@pytest.mark.skipif(not hasattr(importlib.import_module("memtune"), "apply"), reason="memtune.apply not built yet")
def test_trainer_compare_memtune_side_on_a_tiny_cpu_model(tmp_path):
    out = tmp_path / "trainer.json"
    code = trainer_compare.main(["--device", "cpu", "--preset", "tiny-test", "--seq-len", "64", "--steps", "3",
                                 "--warmup", "1", "--stacks", "memtune", "--out", str(out),
                                 "--model-cache", str(tmp_path / "m"), "--work-dir", str(tmp_path)])
    (record,) = trainer_compare.load_records(out)
    assert code == 0, record.get("error")
    assert record["status"] == "ok" and len(record["step_times_s"]) == 3 and len(record["losses"]) == 3
    assert record["tokens_per_s"] > 0 and isinstance(record["applied"], list)
    assert record["loss_forward"].endswith("forward")  # whose: TRL's fused LM head or memtune's loss
    assert out.with_suffix(".md").is_file()


def test_only_selects_steps_and_rejects_numbers_outside_the_scenario(tmp_path):
    scenario = run_scenario.load(run_scenario.resolve("families-16k"), tmp_path)
    picked = run_scenario.select_steps(scenario, "2,4-5")
    assert [s.argv for s in picked.steps] == [scenario.steps[i].argv for i in (1, 3, 4)]
    with pytest.raises(run_scenario.ScenarioError, match="has steps 1-8"):
        run_scenario.select_steps(scenario, "9")
    with pytest.raises(run_scenario.ScenarioError, match="step numbers"):
        run_scenario.select_steps(scenario, "two")


def test_every_family_preset_is_a_benchmark_preset_with_its_lora_names():
    shared_model = importlib.import_module("shared_model")
    common = importlib.import_module("stacks.common")
    from memtune.presets import PRESETS as MEMTUNE_PRESETS

    for name in ("llama-3.1-8b", "llama-3.2-3b", "qwen2.5-7b", "qwen3-8b", "mistral-7b", "gemma-2-9b",
                 "gemma-3-1b", "phi-3.5-mini"):
        assert shared_model.PRESETS[name]["config"] == MEMTUNE_PRESETS[name]
    assert common.lora_targets("all", "phi3") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert common.lora_targets("all", "llama") == common.TARGETS["all"]
    assert common.lora_settings({"lora_rank": 16}) == {"r": 16, "alpha": 32, "dropout": 0.0}


def _family_record(stack, preset, alloc, tps, status="ok", estimate=None):
    return {"stack": stack, "preset": preset, "family": "llama", "seq_len": 16384, "lora_targets": "all",
            "lora_rank": 16, "mode": "fixed", "status": status, "peak_allocated_bytes": alloc,
            "tokens_per_s": tps, "estimate_bytes": estimate, "error": "boom" if status != "ok" else None}


def test_the_families_report_compares_against_the_first_stack_that_trained(tmp_path):
    families_report = importlib.import_module("families_report")
    out = tmp_path / "families.json"
    records = [_family_record("memtune", "a", 8e9, 9000, estimate=8.2e9), _family_record("unsloth", "a", 10e9, 8000),
               _family_record("memtune", "b", 4e9, 5000, estimate=5e9), _family_record("unsloth", "b", None, None, "error"),
               _family_record("liger", "b", 6e9, 4000)]
    out.write_text(json.dumps(records))
    rows = {r["preset"]: r for r in families_report.family_rows(records)}
    a, b = rows["a"], rows["b"]
    assert a["other"]["stack"] == "unsloth" and a["memory_ratio"] == pytest.approx(0.8)
    assert a["speed_ratio"] == pytest.approx(1.125) and a["estimate_error"] == pytest.approx(0.025)
    assert a["misses"] == []
    assert b["other"]["stack"] == "liger" and b["other_failed"][0].startswith("unsloth: error")
    assert any("estimate +25.0%" in m for m in b["misses"]) and any("memory 0.67x" not in m for m in b["misses"])
    md, _png = families_report.write_reports(out)
    text = md.read_text()
    assert "| llama | a | 16384 | all r=16 | unsloth |" in text and "Stacks that did not train" in text
