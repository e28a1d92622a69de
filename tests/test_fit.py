"""memtune fit: only configurations within the budget, each at its longest length, ranked; a clear miss
when nothing fits. The bisection and the host budget on synthetic estimates: test_fit_search.py."""

from __future__ import annotations

import pytest

from memtune.config import RunConfig
from memtune.errors import UserError
from memtune.estimate import GIB, estimate_memory
from memtune.fit import fit_configurations, seq_len_grid

PRESET = "deepseek-r1-distill-qwen-1.5b"


def test_only_configurations_under_the_budget():
    budget = 24 * GIB
    result = fit_configurations(RunConfig(model=PRESET), budget)
    assert result.fits and result.searched == len(result.fits) == 12  # 3 quantizations x 4 checkpointings
    assert any(c.estimate.seq_len < 131072 for c in result.fits)
    for cand in result.fits:
        assert cand.estimate.total_bytes + cand.estimate.cuda_context_bytes <= budget
        assert cand.headroom_bytes >= 0
        if cand.estimate.seq_len < 131072:  # the longest: 1024 more tokens miss
            longer = estimate_memory(cand.cfg.replace(seq_len=cand.estimate.seq_len + 1024))
            assert longer.total_bytes + longer.cuda_context_bytes > budget


def test_ranked_longest_sequence_then_least_quantization():
    result = fit_configurations(RunConfig(model=PRESET), 40 * GIB)
    seqs = [c.estimate.seq_len for c in result.fits]
    assert seqs == sorted(seqs, reverse=True)
    top_seq = [c for c in result.fits if c.estimate.seq_len == seqs[0]]
    order = {"none": 0, "int8": 1, "nf4": 2}
    quants = [order[c.cfg.quantization] for c in top_seq]
    assert quants == sorted(quants)


def test_fixed_seq_len_asks_which_settings_fit():
    result = fit_configurations(RunConfig(model=PRESET, seq_len=32768), 24 * GIB, fixed={"seq_len"})
    assert result.fits
    assert {c.estimate.seq_len for c in result.fits} == {32768}


def test_fixed_knobs_are_kept():
    result = fit_configurations(RunConfig(model=PRESET, quantization="nf4", lora_rank=32), 24 * GIB,
                                fixed={"quantization", "lora_rank"})
    assert {c.cfg.quantization for c in result.fits} == {"nf4"}
    assert {c.cfg.lora_rank for c in result.fits} == {32}


def test_nothing_fits_names_the_closest():
    result = fit_configurations(RunConfig(model="llama-3.1-8b"), 2 * GIB)
    assert not result.fits and result.closest is not None
    assert result.closest.headroom_bytes < 0


def test_seq_len_grid_steps_1024_up_to_max_positions():
    assert seq_len_grid(40960) == list(range(1024, 40961, 1024))
    assert seq_len_grid(5000)[-2:] == [4096, 5000]  # the limit itself when it is not a multiple
    assert seq_len_grid(131072, upper=4096) == [1024, 2048, 3072, 4096]


def test_fit_verb(capsys):
    from memtune.cli import main

    assert main(["fit", "--model", PRESET, "--gpu-memory", "24GiB", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "headroom" in out and "configurations fit" in out
    assert main(["fit", "--model", "llama-3.1-8b", "--gpu-memory", "2GiB"]) == 2
    err = capsys.readouterr().err
    assert "no configuration fits" in err and "closest" in err and "over the budget" in err
    assert main(["fit", "--model", PRESET]) == 2  # no budget given


def test_host_memory_is_shown_and_can_be_a_limit(capsys):
    from memtune.cli import main

    free = fit_configurations(RunConfig(model=PRESET), 24 * GIB)
    offloaded = [c for c in free.fits if c.cfg.offloads_checkpoints]
    assert offloaded and all(c.host_bytes > 0 for c in offloaded)
    # offloaded checkpoints: layers x tokens x hidden x 2 bytes, plus the host-held embedding table
    longest = max(offloaded, key=lambda c: c.estimate.seq_len)
    assert longest.estimate.host_bytes["offloaded_checkpoints"] >= 28 * longest.estimate.seq_len * 1536 * 2
    limited = fit_configurations(RunConfig(model=PRESET), 24 * GIB, host_budget_bytes=2 * GIB)
    assert limited.fits and all(c.host_bytes <= 2 * GIB for c in limited.fits)
    # the host budget, not the card, sets how long an offloaded configuration gets
    assert max(c.estimate.seq_len for c in limited.fits if c.cfg.offloads_checkpoints) < longest.estimate.seq_len
    assert main(["fit", "--model", PRESET, "--gpu-memory", "24GiB", "--host-memory", "2GiB", "--top", "3"]) == 0
    assert "host" in capsys.readouterr().out
    assert main(["fit", "--model", PRESET, "--gpu-memory", "24GiB", "--host-memory", "lots"]) == 2
    assert "host_memory" in capsys.readouterr().err


def test_offloading_with_and_without_saved_attention_and_host_budget():
    result = fit_configurations(RunConfig(model="llama-3.1-8b"), 24 * GIB)
    at_131k = {c.checkpointing(): c for c in result.fits if c.estimate.seq_len == 131072 and c.cfg.quantization == "nf4"}
    assert {"offload", "offload-ra"} <= at_131k.keys()
    assert result.max_seq_len == 131072 and result.fits[0].estimate.seq_len == 131072
    # attention kept from the forward: more host memory (and a little more GPU memory), ranked first
    assert at_131k["offload"].host_bytes > at_131k["offload-ra"].host_bytes
    assert at_131k["offload"].needed_bytes > at_131k["offload-ra"].needed_bytes
    assert result.fits.index(at_131k["offload"]) < result.fits.index(at_131k["offload-ra"])
    # a host budget between the two leaves only the recomputing one
    budget = (at_131k["offload"].host_bytes + at_131k["offload-ra"].host_bytes) // 2
    capped = fit_configurations(RunConfig(model="llama-3.1-8b"), 24 * GIB, host_budget_bytes=budget)
    assert {c.checkpointing() for c in capped.fits if c.estimate.seq_len == 131072} == {"offload-ra"}
    # fixed by the user: not varied
    fixed = fit_configurations(RunConfig(model="llama-3.1-8b", save_attention=False), 24 * GIB, fixed={"save_attention"})
    assert all(c.checkpointing() != "offload" for c in fixed.fits)
