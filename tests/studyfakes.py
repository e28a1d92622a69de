"""Test helpers for the study tests: a fake `memtune train` and small study files.

The fake reads the resolved config the study wrote and behaves by its values:
`lora_rank: 13` runs out of memory (exit 3, metrics status oom), `lora_rank: 7`
crashes (exit 1, a traceback on stderr), `lora_rank: 11` hangs; every other
config writes a metrics.json whose numbers follow from the config, so tests can
check the stored rows against them. FAKE_SLEEP (seconds) slows every run.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

FAKE_TRAIN = textwrap.dedent('''
    import argparse, json, os, sys, time
    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--out")
    args = parser.parse_args()
    cfg = yaml.safe_load(open(args.config))
    out = args.out
    os.makedirs(out, exist_ok=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    rank, seq = cfg["lora_rank"], cfg["seq_len"]
    if rank == 7:
        print("Traceback (most recent call last):", file=sys.stderr)
        print("RuntimeError: simulated crash in the model", file=sys.stderr)
        sys.exit(1)
    if rank == 11:
        time.sleep(3600)
    peak = seq * 1_000_000 + rank * 1000 + (0 if cfg["gradient_checkpointing"] else 5 * 2**30)
    metrics = {
        "status": "ok", "config_hash": "x", "device": "cuda", "gpu_name": "Fake GPU 24GB",
        "versions": {"torch": "0.0-fake", "python": "3"}, "git_commit": "deadbeef" * 5,
        "trainable_params": rank * 136192, "total_params": 1_000_000,
        "peak_allocated_bytes": peak, "peak_reserved_bytes": peak + 2**28, "peak_rss_bytes": 2**30,
        "memory_breakdown": {"frozen_weights_bytes": 2**29, "activations_and_rest_bytes": peak},
        "step_time_s": seq / 10000, "tokens_per_s": 10000.0 + rank, "tokens_per_step": seq,
        "seq_len": min(seq, 4096) if cfg["data"] != "random" else seq,
        "losses": [2.0, 1.0], "loss_first": 2.0, "loss_last": 1.0,
        "accuracy_before": 0.1 if cfg["eval"] else None,
        "accuracy_after": (0.2 + rank / 100) if cfg["eval"] else None,
        "eval_examples": cfg["eval_examples"] if cfg["eval"] else 0,
        "estimate": {"total_bytes": int(peak * 1.1), "breakdown": {}},
        "started_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T00:00:01+00:00",
        "wall_time_s": 1.0,
    }
    if rank == 13:
        metrics.update(status="oom", error="CUDA out of memory. Tried to allocate 2.00 GiB")
        metrics.update(step_time_s=None, tokens_per_s=None)
    tmp = os.path.join(out, ".metrics.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(metrics, fh)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    sys.exit(3 if rank == 13 else 0)
''')


def expected_peak(seq_len: int, rank: int, checkpointing: bool = True) -> int:
    return seq_len * 1_000_000 + rank * 1000 + (0 if checkpointing else 5 * 2**30)


def write_fake_train(directory: Path) -> list[str]:
    """Write the fake train script; return the command that runs it."""
    path = directory / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return [sys.executable, str(path)]


SMALL_STUDY = textwrap.dedent('''
    name: small
    description: a small study for tests
    base:
      model: tiny
      seq_len: 256
      steps: 2
      warmup_steps: 0
    experiments:
      - name: seq_len
        title: Sequence length
        set: {data: random, eval: false}
        grid: {seq_len: [64, 128, 256]}
      - name: rank
        title: LoRA rank
        set: {data: random, eval: false}
        grid: {lora_rank: [4, 8, RANK_X]}
      - name: ckpt
        kind: result
        set: {data: random, eval: false}
        grid: {gradient_checkpointing: [false, true]}
      - name: acc
        kind: accuracy
        variants:
          - {label: with LoRA, lora_rank: 8}
          - {label: rank 2, lora_rank: 2}
''')


def write_small_study(directory: Path, extra_rank: int = 13) -> Path:
    path = directory / "small.yaml"
    path.write_text(SMALL_STUDY.replace("RANK_X", str(extra_rank)))
    return path
