#!/usr/bin/env python
"""Run one benchmark scenario: a YAML file of steps, each one benchmark command, in order.

    python benchmarks/run_scenario.py benchmarks/scenarios/defaults-16k.yaml --out $OUT
    python benchmarks/run_scenario.py defaults-16k --out $OUT        # a name in benchmarks/scenarios/
    python benchmarks/run_scenario.py defaults-16k --dry-run         # print the commands only
    python benchmarks/run_scenario.py --list                         # every scenario, its time and purpose

A scenario file:

    about: what it measures and why (one paragraph)
    minutes: 5                      # about how long it takes on an H200
    steps:                          # most wanted first: a step that fails or times out does not stop the rest
      - compare: {seq_lens: [16384], stacks: [memtune, unsloth], steps: 10, warmup: 3, repeat: 2}
      - compare: {seq_lens: [16384], stacks: [memtune, no-graph], variants: {no-graph: --no-dequantize-graph}}
      - trainer: {seq_len: 16384}
      - profile: {flags: --seq-len 16384 --lora-dropout 0, out: profile-16k-h200.txt}
      - pytest: {files: [tests/test_kernels.py], k: saved_attention}
      - script: {run: loss_kernel_bench.py}
      - train: {name: fp32, flags: --compute-dtype fp32 --seq-len 4096}
      - configs: {runs: {L1024: --seq-len 1024}, steps: 5}

Each step may also say `timeout_s` (the whole step is killed after it) and `show` (regular
expressions: only matching lines of its output are printed; all of it is in OUT/NN-KIND.log).
`{out}` in a string stands for the output folder. compare and trainer steps append to
OUT/compare-h200.json and OUT/trainer-h200.json (their .md and .png beside them), the files
committed under benchmarks/results/. A mistake in the file is one line naming the step and key.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCENARIOS = HERE / "scenarios"
sys.path[:0] = [str(ROOT / "src"), str(HERE)]

from child_process import child_env  # noqa: E402

MODEL_FLAGS = ["--model", "deepseek-r1-distill-qwen-1.5b", "--random-init", "--data", "random", "--no-eval"]
COMMON_KEYS = {"timeout_s": int, "show": list}


class ScenarioError(ValueError):
    """A mistake in a scenario file: one line naming the file, the step and the key."""


@dataclass(frozen=True)
class StepKind:
    keys: dict[str, type]  # allowed keys and their YAML types
    required: tuple[str, ...]
    argv: Callable[[dict, Path], list[str]]  # (the step's values, the output folder) -> command line


def _flags(values: dict, names: dict[str, str]) -> list[str]:
    """Mapped keys as command-line flags: a list is comma-joined, True is a bare flag, False is left out."""
    argv: list[str] = []
    for key, flag in names.items():
        value = values.get(key)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def _sub(text: str, out: Path) -> list[str]:
    return shlex.split(str(text).replace("{out}", str(out)))


_COMPARE = {"seq_lens": "--seq-lens", "stacks": "--stacks", "steps": "--steps", "warmup": "--warmup",
            "repeat": "--repeat", "timeout": "--timeout", "lora_targets": "--lora-targets",
            "gpu_memory": "--gpu-memory", "grad_check": "--grad-check", "grad_reference": "--grad-reference",
            "max_length_search": "--max-length-search", "search_start": "--search-start",
            "search_max": "--search-max", "memtune_args": "--memtune-args", "preset": "--preset",
            "lora_rank": "--lora-rank", "report": "--report", "drop_model": "--drop-model"}


def _compare(v: dict, out: Path) -> list[str]:
    records = v.get("records", "compare-h200.json")  # e.g. families-h200.json
    argv = [sys.executable, str(HERE / "compare.py"), "--out", str(out / records), *_flags(v, _COMPARE)]
    for name, flags in (v.get("variants") or {}).items():
        argv += ["--variant", f"{name}={flags}"]
    return argv


_TRAINER = {"stacks": "--stacks", "seq_len": "--seq-len", "steps": "--steps", "warmup": "--warmup",
            "repeat": "--repeat", "timeout": "--timeout", "preset": "--preset", "device": "--device"}


def _trainer(v: dict, out: Path) -> list[str]:
    argv = [sys.executable, str(HERE / "trainer_compare.py"), "--out", str(out / "trainer-h200.json"),
            *_flags(v, _TRAINER)]
    options = v.get("apply_options") or {}
    if options:
        argv += ["--apply-options", ",".join(f"{k}={str(val).lower() if isinstance(val, bool) else val}"
                                              for k, val in options.items())]
    return argv


def _profile(v: dict, out: Path) -> list[str]:
    argv = [sys.executable, str(HERE / "profile_step.py"), *MODEL_FLAGS, *_sub(v.get("flags", ""), out),
            "--profile-out", str(out / v["out"])]
    return argv + (["--trace-out", str(out / v["trace"])] if v.get("trace") else [])


def _pytest(v: dict, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(ROOT / f) for f in v["files"]]]
    return argv + (["-k", v["k"]] if v.get("k") else [])


def _script(v: dict, out: Path) -> list[str]:
    return [sys.executable, str(HERE / v["run"]), *_sub(v.get("args", ""), out)]


def _train(v: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "memtune", "train", *MODEL_FLAGS, *_sub(v.get("flags", ""), out),
            "--out", str(out / v["name"])]


def _configs(v: dict, out: Path) -> list[str]:
    runs = [f"{name}: {' '.join(MODEL_FLAGS)} --warmup-steps 2 {flags}" for name, flags in v["runs"].items()]
    return [sys.executable, str(HERE / "run_configs.py"), "--out", str(out / v.get("records", "train-1.5b.json")),
            *_flags(v, {"steps": "--steps", "timeout": "--timeout"}), *runs]


KINDS: dict[str, StepKind] = {
    "compare": StepKind({"seq_lens": list, "stacks": list, "steps": int, "warmup": int, "repeat": int, "timeout": int,
                         "lora_targets": str, "gpu_memory": str, "grad_check": bool, "grad_reference": str,
                         "max_length_search": bool, "search_start": int, "search_max": int, "memtune_args": str,
                         "preset": str, "variants": dict, "lora_rank": int, "report": str, "drop_model": bool,
                         "records": str}, ("stacks",), _compare),
    "trainer": StepKind({"stacks": list, "seq_len": int, "steps": int, "warmup": int, "repeat": int, "timeout": int,
                         "preset": str, "device": str, "apply_options": dict}, (), _trainer),
    "profile": StepKind({"flags": str, "out": str, "trace": str}, ("out",), _profile),
    "pytest": StepKind({"files": list, "k": str}, ("files",), _pytest),
    "script": StepKind({"run": str, "args": str}, ("run",), _script),
    "train": StepKind({"name": str, "flags": str}, ("name",), _train),
    "configs": StepKind({"runs": dict, "steps": int, "timeout": int, "records": str}, ("runs",), _configs),
}


@dataclass(frozen=True)
class Step:
    kind: str
    argv: list[str]
    timeout_s: int | None
    show: list[re.Pattern]


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    minutes: float
    steps: list[Step]


def resolve(name_or_file: str) -> Path:
    path = Path(name_or_file)
    if path.suffix not in (".yaml", ".yml"):
        path = SCENARIOS / f"{name_or_file}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.yaml")))
        raise ScenarioError(f"{name_or_file}: no such scenario file; the scenarios are: {known}")
    return path


def load(path: Path, out: Path) -> Scenario:
    """Read and check a scenario file; every step becomes its command line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"about", "minutes", "steps"} or not isinstance(data.get("steps"), list):
        raise ScenarioError(f"{path}: expected a mapping of about, minutes and steps (a list); got "
                            f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    steps = [_step(item, f"{path}: steps[{i}]", out) for i, item in enumerate(data["steps"])]
    return Scenario(path.stem, str(data.get("about", "")).strip(), float(data.get("minutes") or 0), steps)


def _step(item: Any, where: str, out: Path) -> Step:
    kinds = [k for k in item if k in KINDS] if isinstance(item, dict) else []
    if len(kinds) != 1:
        raise ScenarioError(f"{where}: expected one of {', '.join(KINDS)} (plus timeout_s, show); got {item!r}")
    kind = KINDS[kinds[0]]
    values = item[kinds[0]] or {}
    extra = set(item) - {kinds[0], *COMMON_KEYS}
    if not isinstance(values, dict) or extra:
        raise ScenarioError(f"{where}.{kinds[0]}: expected a mapping of its keys; unknown step keys {sorted(extra)}")
    for key, value in {**values, **{k: item[k] for k in COMMON_KEYS if k in item}}.items():
        wanted = kind.keys.get(key) or COMMON_KEYS.get(key)
        if wanted is None:
            raise ScenarioError(f"{where}.{kinds[0]}: unknown key {key!r}; allowed: {', '.join(kind.keys)}")
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ScenarioError(f"{where}.{kinds[0]}.{key}: expected {wanted.__name__}; got {value!r}")
    missing = [k for k in kind.required if k not in values]
    if missing:
        raise ScenarioError(f"{where}.{kinds[0]}: missing {', '.join(missing)}")
    try:
        show = [re.compile(p) for p in item.get("show", [])]
    except re.error as exc:
        raise ScenarioError(f"{where}.show: not a regular expression ({exc})") from None
    return Step(kinds[0], kind.argv(values, out), item.get("timeout_s"), show)


def run_step(step: Step, log: Path) -> int | None:
    """Run one step with its output in `log`, printed as it comes (or only the lines `show` asks for)."""
    with open(log, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(step.argv, cwd=str(ROOT), env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        timer = _Timer(proc, step.timeout_s) if step.timeout_s else None
        for line in proc.stdout:
            log_file.write(line)
            if not step.show or any(p.search(line) for p in step.show):
                print(line, end="", flush=True)
        code = proc.wait()
        if timer is not None:
            timer.cancel()
    return None if timer is not None and timer.fired else code


class _Timer:
    """Kills a step's process group after `seconds`; `fired` says whether it did."""

    def __init__(self, proc: subprocess.Popen, seconds: int):
        import threading

        self.fired = False
        self._proc = proc
        self._thread = threading.Timer(seconds, self._kill)
        self._thread.start()

    def _kill(self) -> None:
        import os
        import signal

        self.fired = True
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the step's own process group
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._thread.cancel()


def run(scenario: Scenario, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    print(f"scenario {scenario.name}: {len(scenario.steps)} steps, about {scenario.minutes:g} minutes on an H200",
          flush=True)
    failed = []
    for i, step in enumerate(scenario.steps, 1):
        log = out / f"{i:02d}-{step.kind}.log"
        print(f"== [{i}/{len(scenario.steps)}] {shlex.join(step.argv)}", flush=True)
        started = time.perf_counter()
        code = run_step(step, log)
        took = time.perf_counter() - started
        verdict = "timed out" if code is None else f"exit {code}"
        print(f"== [{i}/{len(scenario.steps)}] {step.kind}: {verdict} after {took:.0f} s (log {log.name})", flush=True)
        if code != 0:
            failed.append(i)
            if step.show:  # the lines `show` left out may say why
                print("".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:]), end="")
    print(f"scenario {scenario.name}: " + (f"steps {failed} failed" if failed else "every step exited 0"))
    return 1 if failed else 0


def select_steps(scenario: Scenario, only: str) -> Scenario:
    """The scenario with only the steps `only` names ("2,4-6", numbered from 1)."""
    wanted: set[int] = set()
    try:
        for part in only.split(","):
            first, _, last = part.strip().partition("-")
            wanted.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ScenarioError(f"--only: expected step numbers like 2,4-6; got {only!r}") from None
    bad = sorted(n for n in wanted if not 1 <= n <= len(scenario.steps))
    if bad:
        raise ScenarioError(f"--only: {scenario.name} has steps 1-{len(scenario.steps)}; got {bad}")
    steps = [step for i, step in enumerate(scenario.steps, 1) if i in wanted]
    return Scenario(scenario.name, scenario.about, scenario.minutes, steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("scenario", nargs="?", help="a file, or the name of one in benchmarks/scenarios/")
    p.add_argument("--out", type=Path, default=None, help="the output folder (on the GPU machine: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--list", action="store_true", help="list the scenarios")
    p.add_argument("--only", default="", metavar="N,M-K",
                   help="run only these steps, numbered from 1 (a long scenario split over several calls)")
    args = p.parse_args(argv)
    try:
        if args.list:
            for path in sorted(SCENARIOS.glob("*.yaml")):
                s = load(path, Path("OUT"))
                print(f"{s.name:<22} {s.minutes:>4g} min  {s.about.splitlines()[0] if s.about else ''}")
            return 0
        if not args.scenario or (args.out is None and not args.dry_run):
            p.error("give a scenario and --out DIR (or --dry-run, or --list)")
        scenario = load(resolve(args.scenario), (args.out or Path("OUT")).resolve())
        if args.only:
            scenario = select_steps(scenario, args.only)
    except ScenarioError as exc:
        print(f"run_scenario: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for step in scenario.steps:
            print(shlex.join(step.argv))
        return 0
    return run(scenario, args.out.resolve())


if __name__ == "__main__":
    sys.exit(main())
