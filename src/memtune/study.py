"""`memtune study NAME_OR_FILE`: run named grids of configurations, store, report.

A study is a YAML file (or a built-in name: `seed`, `seed-full`, see
`memtune/studies/`):

    name: seed                      # defaults to the file name
    description: ...
    extends: seed                   # optional: start from another study (built-in name or path);
                                    # base keys merge, experiments with the same name are replaced
    base:                           # any `memtune train` key, shared by every run
      model: deepseek-r1-distill-qwen-1.5b
      seq_len: 16384
    cpu_scale:                      # optional: how to shrink the study on a machine without CUDA
      max_seq_len: 512              # lengths divided by a power of two until the longest fits
                                    # (and fits the model's max_position_embeddings)
      min_data_seq_len: 128         # ... but runs on real data (not random tokens) keep this many
      steps: 2                      # steps (and warmup_steps, eval_examples) capped at these
      warmup_steps: 1
      eval_examples: 16
      eval_steps: 2                 # accuracy runs' steps
      lora_learning_rate: 0         # LoRA accuracy runs' learning rate (0: their own)
    experiments:                    # each one is a table of the report
      - name: seq_len
        title: Sequence length (4-bit, rank 8)
        kind: memory                # memory | result | accuracy (default: accuracy if eval else memory)
        set: {data: random, eval: false}      # experiment-wide keys over the base
        grid: {seq_len: [1024, 4096, 16384]}  # the cartesian product of the axes
      - name: lora
        kind: accuracy
        variants:                   # an explicit list; `label` names the row
          - {label: with LoRA (r=8), lora: true}
          - {label: without LoRA (full FT), lora: false, quantization: none}

A run's config is base <- experiment `set` <- command-line overrides
(`--model`, `--random-init`, `--set k=v`) <- variant <- grid point <- CPU
scaling <- `--gpu-memory`. Every expanded config is validated
(`memtune.config.from_dict`) before the first run starts. Runs are keyed by
their config hash: a configuration shared by several experiments runs once.

Each run is its own process (`python -m memtune train --config C --out D`),
so its peak memory is its own and a crash is only that run's. Results go to
`DIR/results.sqlite` (see `memtune.store`): `ok` and `oom` rows are final and
skipped when the study runs again; `error` and `timeout` rows are retried
(`--skip-failed` keeps them). A study killed at any moment, SIGKILL included,
resumes where it stopped. Exit code: 0 when every run is ok or oom, 1 when a
run ended in error or timeout, 2 for a user error.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import itertools
import json
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from memtune.config import FIELD_NAMES, RunConfig, from_dict, parse_memory_size, parse_yaml_file, save_yaml
from memtune import provenance
from memtune.errors import UserError
from memtune.store import DB_NAME, FINAL_STATUSES, PlanEntry, ResultStore, RunRecord

STUDIES_DIR = Path(__file__).parent / "studies"
TOP_KEYS = ("name", "description", "extends", "base", "cpu_scale", "experiments")
EXPERIMENT_KEYS = ("name", "title", "kind", "description", "set", "grid", "variants")
KINDS = ("memory", "result", "accuracy")
# eval_steps: runs that measure accuracy keep enough steps for the accuracy to mean something.
# lora_learning_rate: the learning rate of accuracy runs with LoRA on a CPU (0: their own), so that fewer
# steps still lift; full fine-tuning keeps its own (a rate LoRA needs makes it worse).
CPU_SCALE_DEFAULTS: dict[str, int | float] = {"max_seq_len": 512, "min_data_seq_len": 128, "steps": 2,
                                              "warmup_steps": 1, "eval_examples": 16, "eval_steps": 2,
                                              "lora_learning_rate": 0}
_CPU_SCALE_FLOATS = ("lora_learning_rate",)
# Keys a study may not set: the study decides where each run writes.
RESERVED_KEYS = ("out",)
STDERR_TAIL_LINES = 25


# --------------------------------------------------------------------------
# Study description
# --------------------------------------------------------------------------
@dataclass
class Experiment:
    name: str
    title: str
    kind: str
    description: str = ""
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "kind": self.kind, "description": self.description,
                "set": self.set, "grid": self.grid, "variants": self.variants}

    @property
    def axis_keys(self) -> list[str]:
        keys: list[str] = []
        for variant in self.variants:
            keys += [k for k in variant if k != "label" and k not in keys]
        keys += [k for k in self.grid if k not in keys]
        return keys


@dataclass
class StudySpec:
    name: str
    description: str
    base: dict[str, Any]
    experiments: list[Experiment]
    cpu_scale: dict[str, int]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "base": self.base,
                "cpu_scale": self.cpu_scale, "source": self.source,
                "experiments": [e.to_dict() for e in self.experiments]}


def builtin_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def _suggest(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_config_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or key not in FIELD_NAMES:
        raise UserError(
            f"{where}: unknown key {key!r}{_suggest(str(key), FIELD_NAMES)}; allowed: the `memtune train` "
            f"keys ({', '.join(FIELD_NAMES)})"
        )
    if key in RESERVED_KEYS:
        raise UserError(f"{where}: key '{key}' is set by the study (each run writes under --out DIR/runs/)")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of `memtune train` keys to values; got {value!r}")
    for key in value:
        _check_config_key(key, where)
    return dict(value)


def resolve_study_path(name_or_file: str, relative_to: Path | None = None) -> Path:
    path = Path(name_or_file)
    if relative_to is not None and not path.is_absolute():
        candidate = relative_to / path
        if candidate.is_file():
            return candidate
    if path.is_file():
        return path
    builtin = STUDIES_DIR / f"{name_or_file}.yaml"
    if "/" not in name_or_file and builtin.is_file():
        return builtin
    raise UserError(
        f"unknown study {name_or_file!r}: expected a YAML file or a built-in study "
        f"({', '.join(builtin_studies())})"
    )


def _read_study_yaml(path: Path) -> dict[str, Any]:
    data = parse_yaml_file(path, "study")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping with keys {', '.join(TOP_KEYS)}")
    return data


def load_study(name_or_file: str, _seen: tuple[Path, ...] = ()) -> StudySpec:
    """Read, merge (`extends`) and check a study; raise UserError on the first problem."""
    path = resolve_study_path(name_or_file, relative_to=_seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        raise UserError(f"{path}: extends: circular ({' -> '.join(str(p) for p in (*_seen, path))})")
    data = _read_study_yaml(path)
    for key in data:
        if key not in TOP_KEYS:
            raise UserError(f"{path}: unknown key {key!r}{_suggest(str(key), TOP_KEYS)}; allowed: {', '.join(TOP_KEYS)}")
    parent = None
    if data.get("extends") is not None:
        if not isinstance(data["extends"], str):
            raise UserError(f"{path}: extends: expected a study name or file; got {data['extends']!r}")
        parent = load_study(data["extends"], (*_seen, path))
    return parse_study(data, source=str(path), parent=parent, default_name=path.stem)


def parse_study(data: dict[str, Any], source: str = "study", parent: StudySpec | None = None,
                default_name: str = "study") -> StudySpec:
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise UserError(f"{source}: name: expected a non-empty name without '/'; got {name!r}")
    description = data.get("description") or (parent.description if parent else "")
    base = {**(parent.base if parent else {}), **_mapping(data.get("base"), f"{source}: base")}

    cpu_scale = dict(parent.cpu_scale if parent else CPU_SCALE_DEFAULTS)
    raw_scale = data.get("cpu_scale") or {}
    if not isinstance(raw_scale, dict):
        raise UserError(f"{source}: cpu_scale: expected a mapping with keys {', '.join(CPU_SCALE_DEFAULTS)}")
    for key, value in raw_scale.items():
        if key not in CPU_SCALE_DEFAULTS:
            raise UserError(f"{source}: cpu_scale: unknown key {key!r}; allowed: {', '.join(CPU_SCALE_DEFAULTS)}")
        if key in _CPU_SCALE_FLOATS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise UserError(f"{source}: cpu_scale.{key}: expected a number >= 0 (0: keep the run's own); "
                                f"got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "warmup_steps" else 1):
            raise UserError(f"{source}: cpu_scale.{key}: expected a positive integer; got {value!r}")
        cpu_scale[key] = value

    raw_experiments = data.get("experiments")
    if raw_experiments is None and parent is not None:
        raw_experiments = []
    if not isinstance(raw_experiments, list) or (not raw_experiments and parent is None):
        raise UserError(f"{source}: experiments: expected a non-empty list of experiments "
                        f"(each with keys {', '.join(EXPERIMENT_KEYS)})")
    experiments = list(parent.experiments) if parent else []
    seen: set[str] = set()
    for index, raw in enumerate(raw_experiments):
        exp = _parse_experiment(raw, index, source, base)
        if exp.name in seen:
            raise UserError(f"{source}: experiments: name '{exp.name}' used twice; each experiment needs its own name")
        seen.add(exp.name)
        names = [e.name for e in experiments]
        if exp.name in names:
            experiments[names.index(exp.name)] = exp
        else:
            experiments.append(exp)
    return StudySpec(name=name, description=str(description).strip(), base=base, experiments=experiments,
                     cpu_scale=cpu_scale, source=source)


def _parse_experiment(raw: Any, index: int, source: str, base: dict[str, Any]) -> Experiment:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: experiments[{index}]: expected a mapping with keys {', '.join(EXPERIMENT_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\ "):
        raise UserError(f"{source}: experiments[{index}]: name: expected a name without spaces or '/'; got {name!r}")
    where = f"{source}: experiment '{name}'"
    for key in raw:
        if key not in EXPERIMENT_KEYS:
            raise UserError(f"{where}: unknown key {key!r}{_suggest(str(key), EXPERIMENT_KEYS)}; "
                            f"allowed: {', '.join(EXPERIMENT_KEYS)}")
    settings = _mapping(raw.get("set"), f"{where}: set")

    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise UserError(f"{where}: grid: expected a mapping of key -> list of values; got {grid_raw!r}")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        _check_config_key(key, f"{where}: grid")
        if not isinstance(values, list):
            raise UserError(f"{where}: grid.{key}: expected a list of values, e.g. [{values!r}]; got {values!r}")
        if not values:
            raise UserError(f"{where}: grid.{key}: empty list; give at least one value")
        grid[key] = list(values)

    variants_raw = raw.get("variants")
    variants: list[dict[str, Any]] = []
    if variants_raw is not None:
        if not isinstance(variants_raw, list) or not variants_raw:
            raise UserError(f"{where}: variants: expected a non-empty list of mappings of `memtune train` keys")
        for i, variant in enumerate(variants_raw):
            if not isinstance(variant, dict) or not variant:
                raise UserError(f"{where}: variants[{i}]: expected a non-empty mapping of `memtune train` keys "
                                f"(plus an optional label); got {variant!r}")
            label = variant.get("label")
            if label is not None and not isinstance(label, (str, int, float)):
                raise UserError(f"{where}: variants[{i}].label: expected text; got {label!r}")
            rest = _mapping({k: v for k, v in variant.items() if k != "label"}, f"{where}: variants[{i}]")
            if label is not None:
                rest = {"label": str(label), **rest}
            variants.append(rest)
    if not grid and not variants:
        raise UserError(f"{where}: needs a grid (key -> list of values) or a list of variants")

    kind = raw.get("kind")
    if kind is None:
        values = {**base, **settings}
        eval_on = values.get("eval", True)
        kind = "accuracy" if eval_on not in (False, "false", "no", "off", 0) else "memory"
    if kind not in KINDS:
        raise UserError(f"{where}: kind: expected one of {', '.join(KINDS)}; got {kind!r}")
    title = raw.get("title") or name
    return Experiment(name=name, title=str(title), kind=kind, description=str(raw.get("description") or ""),
                      set=settings, grid=grid, variants=variants)


# --------------------------------------------------------------------------
# Expansion into runs
# --------------------------------------------------------------------------
@dataclass
class PlannedRun:
    config: RunConfig
    config_hash: str
    label: str                       # "experiment: axis=value ..." of the first experiment using it
    experiments: list[str] = field(default_factory=list)


@dataclass
class Plan:
    study: StudySpec
    runs: list[PlannedRun]
    entries: list[PlanEntry]
    notes: list[str]
    reference: dict[str, Any]        # base <- overrides: what the plots compare against
    only: list[str] | None = None    # --only: the plan covers these experiments, not the study
    # cpu scale: config hash -> the estimate for the study's own model at full size (see full_size_prediction)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _points(exp: Experiment) -> list[tuple[str | None, dict[str, Any]]]:
    """(label, axis values) of every row of the experiment, in order."""
    variants: list[dict[str, Any]] = exp.variants or [{}]
    keys = list(exp.grid)
    out = []
    for variant in variants:
        label = variant.get("label")
        fixed = {k: v for k, v in variant.items() if k != "label"}
        for combo in itertools.product(*(exp.grid[k] for k in keys)) if keys else [()]:
            out.append((label, {**fixed, **dict(zip(keys, combo))}))
    return out


def model_max_positions(model: str) -> int | None:
    """max_position_embeddings of a preset or a local model directory, without loading anything heavy."""
    try:
        from memtune.presets import is_preset, preset_config_dict

        if is_preset(model):
            value = preset_config_dict(model).get("max_position_embeddings")
        else:
            path = Path(model) / "config.json"
            value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings") \
                if path.is_file() else None
    except Exception:  # a config we cannot read here is the run's problem, not the plan's
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _cpu_scale(configs: list[RunConfig], rules: dict[str, int]) -> tuple[int, int, list[str]]:
    """(length divisor, longest length allowed, what was shrunk) for a study run on a CPU."""
    longest = max(c.seq_len for c in configs)
    cap = rules["max_seq_len"]
    limits = [m for m in (model_max_positions(name) for name in {c.model for c in configs}) if m]
    if limits and min(limits) < cap:
        cap = min(limits)
    factor = 1
    while longest // factor > cap:
        factor *= 2
    parts = []
    if factor > 1:
        floor = min(rules["min_data_seq_len"], cap)
        parts.append(f"lengths divided by {factor} (longest {longest} -> {longest // factor}"
                     f"{'; the model allows ' + str(cap) if cap < rules['max_seq_len'] else ''}"
                     f"; runs on real data keep >= {floor})")
    steps = max((c.steps for c in configs if not c.eval), default=0)
    if steps > rules["steps"]:
        parts.append(f"steps {steps} -> {rules['steps']} (warmup <= {rules['warmup_steps']})")
    eval_steps = max((c.steps for c in configs if c.eval), default=0)
    if eval_steps > rules["eval_steps"]:
        parts.append(f"accuracy runs' steps {eval_steps} -> {rules['eval_steps']}")
    evals = max((c.eval_examples for c in configs if c.eval), default=0)
    if evals > rules["eval_examples"]:
        parts.append(f"eval examples {evals} -> {rules['eval_examples']}")
    rates = sorted({c.learning_rate for c in configs if c.eval and c.lora})
    if rules.get("lora_learning_rate") and rates and rates != [rules["lora_learning_rate"]]:
        parts.append(f"LoRA accuracy runs' learning rate {'/'.join(f'{r:g}' for r in rates)} -> "
                     f"{rules['lora_learning_rate']:g} (full fine-tuning keeps its own)")
    return factor, cap, parts


def _scaled(cfg: RunConfig, factor: int, cap: int, rules: dict[str, int]) -> RunConfig:
    steps = min(cfg.steps, rules["eval_steps"] if cfg.eval else rules["steps"])
    changes: dict[str, Any] = {
        "steps": steps,
        "warmup_steps": min(cfg.warmup_steps, rules["warmup_steps"], max(0, steps - 1)),
        "eval_examples": min(cfg.eval_examples, rules["eval_examples"]),
    }
    if cfg.eval and cfg.lora and rules.get("lora_learning_rate"):
        changes["learning_rate"] = float(rules["lora_learning_rate"])
    if factor > 1:
        # Real examples must still fit: a run on data (not random tokens) keeps min_data_seq_len.
        floor = 16 if cfg.data == "random" else min(cfg.seq_len, rules["min_data_seq_len"], cap)
        changes["seq_len"] = max(floor, cfg.seq_len // factor)
        changes["loss_chunk_tokens"] = max(16, cfg.loss_chunk_tokens // factor)
        if cfg.tiled_mlp_chunk:
            changes["tiled_mlp_chunk"] = max(16, cfg.tiled_mlp_chunk // factor)
    return cfg.replace(**changes)


def expand(study: StudySpec, overrides: dict[str, Any] | None = None, *, scale: bool = False,
           gpu_memory: str = "", only: list[str] | None = None) -> Plan:
    """Every run of the study, validated, deduplicated by config hash. No run starts here."""
    overrides = dict(overrides or {})
    notes: list[str] = []
    experiments = study.experiments
    if only:
        names = [e.name for e in experiments]
        for name in only:
            if name not in names:
                raise UserError(f"--only: unknown experiment {name!r}; this study has {', '.join(names)}")
        experiments = [e for e in experiments if e.name in only]
    for key in overrides:
        _check_config_key(key, "--set")
        shadowed = [e.name for e in experiments if key in e.axis_keys]
        if shadowed:
            notes.append(f"override {key}={_format_value(overrides[key])} does not apply where '{key}' is an axis "
                         f"({', '.join(shadowed)})")
    if gpu_memory:
        try:
            parse_memory_size(gpu_memory)
        except ValueError as exc:
            raise UserError(f"--gpu-memory: {exc}") from None

    reference = {**study.base, **overrides}
    try:
        from_dict(reference, source=f"{study.source}: base")
    except UserError as exc:
        raise UserError(f"study {study.name}: base (with overrides): {exc}") from None

    rows: list[tuple[Experiment, str | None, list[str], RunConfig]] = []
    for exp in experiments:
        for label, axes in _points(exp):
            values = {**study.base, **exp.set, **overrides, **axes}
            try:
                cfg = from_dict(values, source=f"experiment {exp.name}")
            except UserError as exc:
                text = label or " ".join(f"{k}={_format_value(v)}" for k, v in axes.items())
                raise UserError(f"study {study.name}: experiment '{exp.name}' ({text}): {exc}") from None
            rows.append((exp, label, list(axes), cfg))

    unscaled = [r[3] for r in rows]
    if scale:
        factor, cap, parts = _cpu_scale([r[3] for r in rows], study.cpu_scale)
        notes.insert(0, "cpu scale: no CUDA GPU, so the study is shrunk to finish on a CPU: "
                        + ("; ".join(parts) if parts else "nothing to shrink")
                        + " (--scale none runs it full size)")
        rows = [(e, lab, keys, _scaled(c, factor, cap, study.cpu_scale)) for e, lab, keys, c in rows]
    if gpu_memory:
        rows = [(e, lab, keys, c if "gpu_memory" in keys else c.replace(gpu_memory=gpu_memory))
                for e, lab, keys, c in rows]
        notes.append(f"gpu memory cap: {gpu_memory} per run")
    predictions: dict[str, dict[str, Any]] = {}
    if scale:
        for (exp, _, _, cfg), full in zip(rows, unscaled):
            if exp.kind in ("memory", "result"):
                predicted = full_size_prediction(full, study.base.get("model", full.model))
                if predicted:
                    predictions.setdefault(cfg.config_hash(), predicted)

    runs: dict[str, PlannedRun] = {}
    entries: list[PlanEntry] = []
    positions: dict[str, int] = {}
    for exp, label, keys, cfg in rows:
        values = cfg.to_dict()
        axes = {k: values[k] for k in keys}  # as run (after scaling), not as written
        text = label or " ".join(f"{k}={_format_value(v)}" for k, v in axes.items())
        digest = cfg.config_hash()
        if any(e.experiment == exp.name and e.config_hash == digest for e in entries):
            notes.append(f"experiment '{exp.name}': {text} is the same configuration as an earlier row; run once")
            continue
        run = runs.get(digest)
        if run is None:
            run = runs[digest] = PlannedRun(config=cfg, config_hash=digest, label=f"{exp.name}: {text}")
        if exp.name not in run.experiments:
            run.experiments.append(exp.name)
        positions[exp.name] = positions.get(exp.name, -1) + 1
        entries.append(PlanEntry(study=study.name, experiment=exp.name, position=positions[exp.name],
                                 config_hash=digest, label=text, axes=axes))
    return Plan(study=study, runs=list(runs.values()), entries=entries, notes=notes, reference=reference,
                only=[e.name for e in experiments] if only else None, predictions=predictions)


def full_size_prediction(cfg: RunConfig, model: str) -> dict[str, Any] | None:
    """What the estimator predicts on a GPU for a shrunk run's configuration before shrinking, with the
    study's own model: beside a CPU row of the tiny model, the number the seed's setting would take
    (the estimator is checked against the H200 in benchmarks/results/estimate-vs-measured-h200.md)."""
    from memtune.estimate import estimate_memory

    try:
        full = cfg.replace(model=model, random_init=True)
        estimate = estimate_memory(full)
    except (UserError, ValueError):  # a model without a readable config here: no prediction, not a failure
        return None
    return {"model": model, "seq_len": estimate.seq_len, "total_bytes": int(estimate.total_bytes)}


# --------------------------------------------------------------------------
# Running one configuration in its own process
# --------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str
    metrics: dict[str, Any] | None
    error: str | None
    exit_code: int | None
    started_at: str
    finished_at: str
    elapsed_s: float


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: own process group, and die with the study.

    A study killed by SIGKILL cannot stop its run; the kernel does it
    (PR_SET_PDEATHSIG), so no orphaned run keeps the GPU or writes later.
    """
    def setup() -> None:
        os.setsid()
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            except OSError:
                pass
            if os.getppid() != parent_pid:  # the study died before prctl took effect
                os._exit(1)
    return setup


def default_train_command() -> list[str]:
    return [sys.executable, "-m", "memtune", "train"]


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # progress bars (tqdm redraws with \r) are noise in an error message
    kept = [line for line in text.splitlines() if line.strip() and "%|" not in line]
    return "\n".join(kept[-lines:])[-4000:]


_OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")


class Runner:
    """Runs `COMMAND --config C --out D` and turns its exit into an Outcome."""

    def __init__(self, command: list[str] | None = None, timeout_s: float | None = None):
        self.command = list(command) if command else default_train_command()
        self.timeout_s = timeout_s or None

    def _env(self, gpu: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if gpu is not None:  # --gpus: the run sees this one GPU (as cuda:0)
            env["CUDA_VISIBLE_DEVICES"] = gpu
        from memtune.cli import MULTI_GPU_ENVIRONMENT

        for key, value in MULTI_GPU_ENVIRONMENT.items():  # NVLink multicast off (a user's own setting wins)
            env.setdefault(key, value)
        src = str(Path(__file__).resolve().parent.parent)  # so `-m memtune` works without an install
        parts = [src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, config_path: Path, run_dir: Path, gpu: str | None = None) -> Outcome:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / "metrics.json"
        # a stale result must never pass for this run's, and `memtune train` refuses a directory holding
        # another run's result or checkpoints: an earlier attempt's files move to run_dir/.previous-<time>/
        from memtune import run_dir as run_dirs

        run_dirs.set_aside(run_dir)
        cmd = [*self.command, "--config", str(config_path), "--out", str(run_dir)]
        started, t0 = _now(), time.monotonic()
        timed_out = False
        with open(run_dir / "stdout.log", "wb") as out, open(run_dir / "stderr.log", "wb") as err:
            try:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        env=self._env(gpu), preexec_fn=_child_setup(os.getpid()))
            except OSError as exc:
                raise UserError(f"cannot start the train command {shlex.join(cmd[:4])}: {exc.strerror}") from None
            try:
                code = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                code = proc.wait()
            except BaseException:
                _kill_group(proc)
                proc.wait()
                raise
        elapsed = time.monotonic() - t0
        finished = _now()
        metrics, problem = None, None
        if metrics_path.is_file():
            try:
                metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
                if not isinstance(metrics, dict):
                    metrics, problem = None, "metrics.json is not a JSON object"
            except (OSError, ValueError) as exc:
                problem = f"metrics.json unreadable ({exc})"
        tail = _tail(run_dir / "stderr.log")
        m_status = (metrics or {}).get("status")
        if timed_out:
            status, error = "timeout", f"no result after {self.timeout_s:g}s (--run-timeout); killed"
        elif code == 3 or m_status == "oom" or (code != 0 and any(k in tail for k in _OOM_MARKERS)):
            status, error = "oom", (metrics or {}).get("error") or tail or "out of memory"
        elif code == 0 and metrics is not None and m_status in (None, "ok"):
            status, error = "ok", None
        else:
            status = "error"
            if code == 0:
                error = problem or ("exited 0 without writing metrics.json" if metrics is None
                                    else f"metrics.json status {m_status!r}")
            elif code < 0:
                name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
                error = f"killed by {name}" + (" (the host may have run out of memory)" if -code == 9 else "")
                error += ("\n" + tail) if tail else ""
            else:
                error = tail or f"exit code {code}"
        return Outcome(status=status, metrics=metrics, error=error,
                       exit_code=code, started_at=started, finished_at=finished, elapsed_s=elapsed)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# Environment facts for rows whose run wrote no metrics
# --------------------------------------------------------------------------
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------
# The study loop
# --------------------------------------------------------------------------
class _DirLock:
    """One study at a time per directory (released by the kernel if the process dies)."""

    def __init__(self, directory: Path):
        self.path = directory / ".study.lock"
        self.fh = None

    def __enter__(self) -> "_DirLock":
        import fcntl

        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise UserError(f"{self.path.parent}: a study is already running there (pid {holder}); "
                            f"wait for it or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh:
            self.fh.close()


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _gib(value: Any) -> str:
    return f"{value / 2**30:.2f} GiB" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _summary_of(outcome: Outcome) -> str:
    m = outcome.metrics or {}
    bits = [f"{outcome.status} {outcome.elapsed_s:.1f}s"]
    if outcome.status in ("ok", "oom"):
        peak = m.get("peak_allocated_bytes")
        if peak is not None:
            bits.append(f"peak {_gib(peak)}")
        elif m.get("peak_tensor_bytes") is not None:
            from memtune.findings import fmt_bytes

            bits.append(f"tensors {fmt_bytes(m['peak_tensor_bytes'])}")
        elif m.get("peak_rss_bytes") is not None:
            bits.append(f"rss {_gib(m['peak_rss_bytes'])}")
        if outcome.status == "ok" and m.get("tokens_per_s"):
            bits.append(f"{m['tokens_per_s']:.0f} tok/s")
        if m.get("accuracy_after") is not None:
            bits.append(f"acc {m.get('accuracy_before', float('nan')) or 0:.3f}->{m['accuracy_after']:.3f}")
    if outcome.error and outcome.status != "ok":
        last = outcome.error.strip().splitlines()[-1] if outcome.error.strip() else ""
        bits.append(f"({last[:160]})")
    return " ".join(bits)


@dataclass
class _Job:
    index: int
    run: Any  # a Plan run
    config_path: Path
    run_dir: Path


def parse_gpus(text: str | None) -> list[str] | None:
    """--gpus 0,1,3 -> ["0", "1", "3"] (None: one run at a time on whatever the run sees)."""
    if text is None:
        return None
    gpus = [item.strip() for item in text.split(",") if item.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus: expected distinct GPU indices such as 0,1,2; got {text!r}")
    return gpus


def _on_gpus(jobs: list[_Job], runner: Runner, gpus: list[str]):
    """Run the jobs one per GPU at a time, in order as GPUs free up; yield (job, gpu, outcome) as each
    ends. Daemon threads: a study stopped here ends them with it, and each run dies with its
    thread (PR_SET_PDEATHSIG in _child_setup)."""
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    done: queue.Queue = queue.Queue()

    def worker(gpu: str) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((job, gpu, runner.run(job.config_path, job.run_dir, gpu=gpu), None))
            except BaseException as exc:  # re-raised in the study's thread
                done.put((job, gpu, None, exc))

    for gpu in gpus:
        threading.Thread(target=worker, args=(gpu,), name=f"memtune-gpu-{gpu}", daemon=True).start()
    for _ in jobs:
        job, gpu, outcome, exc = done.get()
        if exc is not None:
            raise exc
        yield job, gpu, outcome


def run_study(plan: Plan, out_dir: Path, runner: Runner, *, skip_failed: bool = False,
              report: bool = True, gpus: list[str] | None = None) -> int:
    echo = print
    study = plan.study
    out_dir.mkdir(parents=True, exist_ok=True)
    with _DirLock(out_dir):
        with ResultStore(out_dir / DB_NAME) as store:
            spec = {**study.to_dict(), "reference": plan.reference, "full_size_predictions": plan.predictions}
            store.save_study(study.name, spec, plan.notes, _now())
            store.save_plan(study.name, plan.entries, experiments=plan.only)
            stored = store.statuses()
            versions, commit = provenance.package_versions(), provenance.git_commit()
            total = len(plan.runs)
            todo = sum(1 for r in plan.runs if stored.get(r.config_hash) not in FINAL_STATUSES)
            n_exp = len(plan.only) if plan.only else len(study.experiments)
            echo(f"study {study.name}: {total} runs in {n_exp} experiment{'s' if n_exp != 1 else ''}, "
                 f"{total - todo} already stored, results in {out_dir / DB_NAME}")
            t_start = time.monotonic()
            counts: dict[str, int] = {}

            def record(run: Any, run_dir: Path, outcome: Outcome) -> str:
                store.record_run(RunRecord(
                    config_hash=run.config_hash, study=study.name, experiments=run.experiments,
                    status=outcome.status, config=run.config.to_dict(), started_at=outcome.started_at,
                    finished_at=outcome.finished_at, metrics=outcome.metrics, error=outcome.error,
                    run_dir=str(run_dir), exit_code=outcome.exit_code, elapsed_s=outcome.elapsed_s,
                    versions=versions, git_commit=commit,
                ))
                counts[outcome.status] = counts.get(outcome.status, 0) + 1
                return _summary_of(outcome)

            jobs: list[_Job] = []
            for index, run in enumerate(plan.runs, 1):
                previous = stored.get(run.config_hash)
                if previous in FINAL_STATUSES or (skip_failed and previous is not None):
                    echo(f"[{index}/{total} {_fmt_elapsed(time.monotonic() - t_start)}] {run.label} ... "
                         f"{previous} (stored, skipped)")
                    counts[previous] = counts.get(previous, 0) + 1
                    continue
                config_path = out_dir / "configs" / f"{run.config_hash}.yaml"
                run_dir = out_dir / "runs" / run.config_hash
                save_yaml(run.config.replace(out=str(run_dir)), config_path)
                jobs.append(_Job(index, run, config_path, run_dir))
            if gpus:  # one run per GPU at a time; each line when its run ends
                echo(f"study {study.name}: {len(jobs)} runs over GPUs {','.join(gpus)}, one per GPU at a time")
                for job, gpu, outcome in _on_gpus(jobs, runner, gpus):
                    summary = record(job.run, job.run_dir, outcome)
                    print(f"[{job.index}/{total} {_fmt_elapsed(time.monotonic() - t_start)}] {job.run.label} "
                          f"(GPU {gpu}) ... {summary}", flush=True)
            for job in jobs if not gpus else []:
                print(f"[{job.index}/{total} {_fmt_elapsed(time.monotonic() - t_start)}] {job.run.label} ...",
                      end=" ", flush=True)
                print(record(job.run, job.run_dir, runner.run(job.config_path, job.run_dir)), flush=True)
            elapsed = _fmt_elapsed(time.monotonic() - t_start)
            parts = ", ".join(f"{counts[s]} {s}" for s in ("ok", "oom", "error", "timeout") if counts.get(s))
            echo(f"study {study.name}: done in {elapsed}: {parts or 'no runs'}")
            if report:
                from memtune.report import write_report

                path = write_report(store, out_dir, study=study.name)
                echo(f"report: {path}")
            failed = counts.get("error", 0) + counts.get("timeout", 0)
            if failed:
                echo(f"{failed} run(s) failed; their messages are in the report and in "
                     f"{out_dir / 'runs'}/<hash>/stderr.log; run the study again to retry them")
            return 1 if failed else 0


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", metavar="NAME_OR_FILE",
                        help=f"a study YAML file or a built-in study ({', '.join(builtin_studies())})")
    parser.add_argument("--out", metavar="DIR", help="results.sqlite, report.md, plots and run directories "
                                                     "(default: study-out/NAME)")
    parser.add_argument("--model", help="override the base's model (a preset, local directory or cached hub id)")
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="build the model with random weights (memory and speed only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any `memtune train` key in every run (repeatable); axis values win")
    parser.add_argument("--gpu-memory", default="", metavar="SIZE",
                        help="cap each run's GPU memory (e.g. 24GiB) to play a smaller card; "
                             "a run that does not fit is recorded as oom")
    parser.add_argument("--only", action="append", default=[], metavar="EXPERIMENT",
                        help="run only these experiments (repeatable or comma-separated)")
    parser.add_argument("--scale", choices=("auto", "cpu", "none"), default="auto",
                        help="cpu: shrink lengths/steps/eval to finish on a CPU; auto: cpu when no CUDA GPU")
    parser.add_argument("--run-timeout", type=float, default=0, metavar="SECONDS",
                        help="kill a run after this long and record it as timeout (default: no limit)")
    parser.add_argument("--skip-failed", action="store_true",
                        help="keep stored error/timeout rows instead of retrying them")
    parser.add_argument("--gpus", metavar="LIST",
                        help="run the configurations one per GPU at a time, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES each)")
    parser.add_argument("--train-command", metavar="CMD",
                        help="the command that runs one configuration; gets --config YAML --out DIR "
                             "appended (default: python -m memtune train)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the runs; run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    parser.add_argument("--list", action="store_true", help="list the built-in studies")


def parse_set(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set: expected KEY=VALUE; got {item!r}")
        key, _, text = item.partition("=")
        key = key.strip().replace("-", "_")
        _check_config_key(key, "--set")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        overrides[key] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    if args.list or not args.study:
        for name in builtin_studies():
            spec = load_study(name)
            print(f"{name:<12} {len(spec.experiments)} experiments  {spec.description.splitlines()[0] if spec.description else ''}")
        if not args.list:
            print("memtune study: give a study name (above) or a study YAML file; --help for options",
                  file=sys.stderr)
        return 0 if args.list else 2
    study = load_study(args.study)
    overrides = parse_set(args.set)
    if args.model:
        overrides["model"] = args.model
    if args.random_init:
        overrides["random_init"] = True
    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    if args.run_timeout < 0:
        raise UserError(f"--run-timeout: expected seconds >= 0; got {args.run_timeout:g}")
    if args.scale == "auto":
        device = overrides.get("device", study.base.get("device", "auto"))
        scale = device == "cpu" or not cuda_available()
    else:
        scale = args.scale == "cpu"
    plan = expand(study, overrides, scale=scale, gpu_memory=args.gpu_memory, only=only)
    for note in plan.notes:
        print(note)
    out_dir = Path(args.out or Path("study-out") / study.name)
    from memtune.run_dir import check_dir_target

    check_dir_target(out_dir, "out")  # a file there: one line now, not a traceback at the first run
    if args.dry_run:
        for index, item in enumerate(plan.runs, 1):
            also = f"  (also {', '.join(item.experiments[1:])})" if len(item.experiments) > 1 else ""
            print(f"[{index}/{len(plan.runs)}] {item.label}  {item.config_hash}{also}")
        print(f"study {study.name}: {len(plan.runs)} runs, all configurations valid; nothing run (--dry-run)")
        return 0
    gpus = parse_gpus(getattr(args, "gpus", None))
    command = shlex.split(args.train_command) if args.train_command else None
    if args.train_command is not None and not command:
        raise UserError("--train-command: empty command")
    runner = Runner(command, timeout_s=args.run_timeout or None)
    return run_study(plan, out_dir, runner, skip_failed=args.skip_failed, report=not args.no_report, gpus=gpus)
