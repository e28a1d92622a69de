"""`memtune study --gpus`: one run per GPU at a time, on CPUs with a fake GPU list.

The fake train command records the CUDA_VISIBLE_DEVICES it was given and when it ran, then
behaves as the study tests' fake (tests/studyfakes.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memtune.cli import main
from memtune.errors import UserError
from memtune.study import parse_gpus
from studyfakes import FAKE_TRAIN, write_small_study

RECORDING = '''
import atexit, json, os, sys, time
_out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(_out, exist_ok=True)
_seen = {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": time.time(),
         "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "multicast": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST"),
         "nvshmem": os.environ.get("NVSHMEM_DISABLE_NVLS")}
def _done():
    _seen["end"] = time.time()
    with open(os.path.join(_out, "gpu.json"), "w") as fh:
        json.dump(_seen, fh)
atexit.register(_done)
'''


def study_args(tmp_path: Path, *extra: str) -> list[str]:
    fake = tmp_path / "fake_train.py"
    fake.write_text(RECORDING + FAKE_TRAIN)
    return ["study", str(write_small_study(tmp_path)), "--out", str(tmp_path / "out"), "--only", "seq_len,rank",
            "--train-command", f"{sys.executable} {fake}", "--scale", "none", "--no-report", *extra]


def seen(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "runs").glob("*/gpu.json"))]


def test_runs_go_one_per_gpu_at_a_time_with_the_same_store_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    # rank axis 4, 8, 13: 13 is the fake's out-of-memory run; the seq_len axis adds 3 more (one shared)
    code = main(study_args(tmp_path, "--gpus", "0,1"))
    out = capsys.readouterr().out
    assert code == 0, out
    runs = seen(tmp_path)
    assert len(runs) == 5
    assert {r["gpu"] for r in runs} == {"0", "1"}  # both used, each run sees one
    assert all((r["nvls"], r["multicast"], r["nvshmem"]) == ("0", "1", "1") for r in runs)
    for gpu in ("0", "1"):  # never two runs on one GPU at once
        spans = sorted((r["start"], r["end"]) for r in runs if r["gpu"] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    starts = sorted(r["start"] for r in runs)
    ends = sorted(r["end"] for r in runs)
    assert starts[1] < ends[0]  # two at once: the GPUs ran side by side
    assert "(GPU 0)" in out and "(GPU 1)" in out and "1 oom" in out

    # the same store: a second study stores nothing new and runs nothing
    code = main(study_args(tmp_path, "--gpus", "1,0"))
    again = capsys.readouterr().out
    assert code == 0 and again.count("(stored, skipped)") == 5 and "(GPU" not in again
    assert len(seen(tmp_path)) == 5


def test_a_wrong_gpu_list_is_one_line():
    assert parse_gpus(None) is None and parse_gpus("0, 2,3") == ["0", "2", "3"]
    for bad in ("", "0,0", "a,b", "-1"):
        with pytest.raises(UserError, match="--gpus: expected distinct GPU indices"):
            parse_gpus(bad)
