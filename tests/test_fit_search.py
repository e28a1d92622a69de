"""memtune fit's search on synthetic estimates (bisection to 1,024 tokens, monotone, the host budget
respected) and the host-memory choice `train` and `fit` share."""

from __future__ import annotations

import json
import sys

import pytest

from memtune.config import RunConfig
from memtune.errors import UserError
from memtune.estimate import GIB, Estimate
from memtune.fit import SEQ_STEP, choose_host_plan, fit_configurations, longest_fitting, seq_len_grid

fit_module = sys.modules["memtune.fit"]  # the module (memtune.fit as an attribute is also the API function)

MB = 1 << 20


def test_bisection_finds_the_last_fitting_value_in_few_steps():
    grid = seq_len_grid(131072)
    for threshold in (1024, 1500, 2048, 65535, 65536, 98304 + 17, 131071, 131072, 10**9):
        calls = []

        def fits(seq: int) -> bool:
            calls.append(seq)
            return seq <= threshold

        assert longest_fitting(grid, fits) == max(g for g in grid if g <= threshold)
        assert len(calls) <= 2 + 7  # first, last, then log2(128) halvings
    assert longest_fitting(grid, lambda seq: False) is None
    assert longest_fitting([], lambda seq: True) is None


def synthetic(per_token: dict[tuple[str, str], int], host_per_token: dict[str, int], base: int = 2 * GIB):
    """An estimate linear in seq_len: GPU bytes by (quantization, checkpointing), host bytes by checkpointing."""
    def estimate(cfg: RunConfig, shape, device: str = "cuda") -> Estimate:
        seq = min(cfg.seq_len, cfg.position_limit(shape.max_positions))
        ckpt = fit_module.checkpointing_name(cfg)
        host = host_per_token.get(ckpt, 0) * seq
        return Estimate(total_bytes=base + per_token[(cfg.quantization, ckpt)] * seq, breakdown={},
                        cuda_context_bytes=0, host_bytes={"offloaded": host} if host else {}, seq_len=seq)
    return estimate


PER_TOKEN = {(q, c): b for q, scale in (("none", 4), ("int8", 2), ("nf4", 1))
             for c, b in (("off", 400_000 * scale), ("on", 100_000 * scale), ("offload", 30_000 * scale),
                          ("offload-ra", 28_000 * scale))}
HOST = {"offload": 600_000, "offload-ra": 300_000}


def expected_max(budget: int, per_token: int, limit: int = 131072) -> int | None:
    longest = (budget - 2 * GIB) // per_token
    multiple = min(longest, limit) // SEQ_STEP * SEQ_STEP
    return multiple if multiple >= 1024 else None


def test_each_configuration_gets_the_largest_multiple_of_1024_that_fits(monkeypatch):
    monkeypatch.setattr(fit_module, "estimate_for_shape", synthetic(PER_TOKEN, HOST))
    budget = 10 * GIB
    result = fit_configurations(RunConfig(model="deepseek-r1-distill-qwen-1.5b"), budget, include_context=False)
    assert result.searched == 12
    got = {(c.cfg.quantization, c.checkpointing()): c.estimate.seq_len for c in result.fits}
    want = {key: expected_max(budget, b) for key, b in PER_TOKEN.items() if expected_max(budget, b)}
    assert got == want
    assert all(seq % SEQ_STEP == 0 for seq in got.values())
    assert result.max_seq_len == result.fits[0].estimate.seq_len == max(want.values())
    # ties at the longest: the least aggressive quantization, then the fewest techniques first
    assert (result.fits[0].cfg.quantization, result.fits[0].checkpointing()) == ("int8", "offload")


def test_the_host_budget_caps_each_offloaded_configuration(monkeypatch):
    monkeypatch.setattr(fit_module, "estimate_for_shape", synthetic(PER_TOKEN, HOST))
    host_budget = 30 * GIB
    result = fit_configurations(RunConfig(model="deepseek-r1-distill-qwen-1.5b", quantization="nf4"), 10 * GIB,
                                {"quantization"}, include_context=False, host_budget_bytes=host_budget)
    rows = {c.checkpointing(): c for c in result.fits}
    assert all(c.host_bytes <= host_budget for c in result.fits)
    # offload (600 KB a token on the host) stops where the host budget ends (53,687 tokens), not the card
    assert rows["offload"].estimate.seq_len == host_budget // HOST["offload"] // SEQ_STEP * SEQ_STEP
    assert rows["offload-ra"].estimate.seq_len == host_budget // HOST["offload-ra"] // SEQ_STEP * SEQ_STEP
    assert result.fits[0].checkpointing() == "offload-ra" and result.max_seq_len == 106496  # 30 GiB / 300 KB
    # the line: saved attention given up for the host budget, numbers in GiB
    assert result.host_note and "recomputed" in result.host_note and "30.00 GiB of --host-memory" in result.host_note
    # the budget from the config (--host-memory) when the argument is not given
    same = fit_configurations(RunConfig(model="deepseek-r1-distill-qwen-1.5b", quantization="nf4",
                                        host_memory="30GiB"), 10 * GIB, {"quantization"}, include_context=False)
    assert same.max_seq_len == result.max_seq_len


def test_the_cap_follows_rope_scaling(monkeypatch):
    monkeypatch.setattr(fit_module, "estimate_for_shape", synthetic(PER_TOKEN, {}))
    plain = fit_configurations(RunConfig(model="deepseek-r1-distill-qwen-1.5b"), 200 * GIB, include_context=False)
    assert plain.max_seq_len == 131072  # the model's max_position_embeddings
    scaled = fit_configurations(RunConfig(model="deepseek-r1-distill-qwen-1.5b", rope_scaling="yarn", rope_factor=4),
                                200 * GIB, include_context=False)
    assert scaled.max_seq_len == expected_max(200 * GIB, PER_TOKEN[("int8", "offload")], 4 * 131072)
    assert scaled.max_seq_len > 131072


def test_fit_json_reports_max_seq_len(capsys):
    from memtune.cli import main

    assert main(["fit", "--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--lora-targets", "all-linear",
                 "--lora-rank", "32", "--quantization", "nf4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_seq_len"] == out["fits"][0]["seq_len"] and out["max_seq_len"] % 1024 == 0
    assert out["max_seq_len"] > 65536  # the powers of two stopped at 65536 for this card
    assert {row["checkpointing"] for row in out["fits"]} == {"off", "on", "offload", "offload-ra"}
    assert main(["fit", "--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "max_seq" in text and "longest:" in text


# --- the host plan ------------------------------------------------------------------------

def plan_estimates(host: dict[str, int]):
    def estimate(cfg: RunConfig) -> Estimate:
        return Estimate(total_bytes=7 * GIB, breakdown={}, host_bytes={"t": host[fit_module.checkpointing_name(cfg)]})
    return estimate


HOST_PLAN = {"offload": 40 * GIB, "offload-ra": 20 * GIB, "on": 1 * GIB, "off": 1 * GIB}


@pytest.mark.parametrize("budget, chosen, words", [
    (64 * GIB, "offload", None),
    (30 * GIB, "offload-ra", "attention recomputed"),
    (10 * GIB, "on", "checkpoints kept on the GPU"),
])
def test_host_plan_gives_up_saved_attention_then_the_offload(budget, chosen, words):
    cfg = RunConfig(seq_len=131072)
    plan = choose_host_plan(cfg, budget, plan_estimates(HOST_PLAN), "--host-memory")
    assert fit_module.checkpointing_name(plan.cfg) == chosen and plan.fits
    if words is None:
        assert plan.cfg is cfg and plan.line is None
    else:
        assert words in plan.line and f"{budget / GIB:.2f} GiB of --host-memory" in plan.line
        assert "40.00 GiB" in plan.line and "\n" not in plan.line


def test_host_plan_over_budget_even_without_offload():
    plan = choose_host_plan(RunConfig(), GIB // 2, plan_estimates(HOST_PLAN), "--host-memory")
    assert not plan.fits and fit_module.checkpointing_name(plan.cfg) == "on"
    assert "even without offloading" in plan.line and "--no-embeddings-on-host" in plan.line


def test_train_plans_host_memory_before_the_build():
    from memtune.estimate import estimate_memory
    from memtune.train import _estimate, plan_host_memory

    cfg = RunConfig(model="deepseek-r1-distill-qwen-1.5b", seq_len=131072)
    est = _estimate(cfg, print)
    need = sum(est["host_bytes"].values())
    without = sum(estimate_memory(cfg.replace(save_attention=False)).host_bytes.values())
    lines: list[str] = []
    # plenty free: nothing changes, nothing said
    kept, kept_est = plan_host_memory(cfg, est, "cuda", lines.append, available=4 * need)
    assert kept is cfg and kept_est is est and not lines
    # the free memory as the budget: attention recomputed, said in one line, the estimate redone
    short, short_est = plan_host_memory(cfg, est, "cuda", lines.append, available=int((need + without) / 2 / 0.9))
    assert not short.saves_attention and short.offloads_checkpoints and "saved_attention" not in short_est["host_bytes"]
    assert len(lines) == 1 and "recomputed" in lines[0] and "free (no --host-memory)" in lines[0]
    # an explicit budget wins over the free memory; below the checkpoints: kept on the GPU
    small = cfg.replace(host_memory=f"{without // 2}")
    on_gpu, _ = plan_host_memory(small, est, "cuda", lines.append, available=10**15)
    assert on_gpu.gradient_checkpointing and not on_gpu.offloads_checkpoints and "on the GPU" in lines[-1]
    # nothing left to give up under an explicit budget: one line, before anything is built
    with pytest.raises(UserError, match="^host_memory: .*even without offloading"):
        plan_host_memory(cfg.replace(host_memory="1MiB"), est, "cuda", lines.append)
    # the same under the free memory only warns
    plan_host_memory(cfg, est, "cuda", lines.append, available=MB)
    assert lines[-1].startswith("warning: host memory") and lines[-1].endswith("it may be killed")
    # no GPU: nothing is offloaded to the host
    cpu, _ = plan_host_memory(small, est, "cpu", lines.append)
    assert cpu is small and lines[-1] == f"host_memory {small.host_memory} ignored: no CUDA GPU"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="offloading to the host needs a CUDA GPU")
def test_train_on_a_gpu_takes_the_host_choice_and_trains(tmp_path):
    from memtune.estimate import estimate_memory
    from memtune.train import run

    cfg = RunConfig(model="tiny", data="random", seq_len=4096, steps=2, warmup_steps=0, eval=False, device="cuda",
                    out=str(tmp_path / "run"))
    offload = sum(estimate_memory(cfg).host_bytes.values())
    recompute = sum(estimate_memory(cfg.replace(save_attention=False)).host_bytes.values())
    assert recompute < offload
    lines: list[str] = []
    metrics = run(cfg.replace(host_memory=str((offload + recompute) // 2)), tmp_path / "run", log=lines.append,
                  progress=False)
    assert metrics["status"] == "ok"
    assert any(line.startswith("host memory:") and "recomputed" in line for line in lines)
    import yaml

    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["save_attention"] is False and resolved["offload_activations"] is True
