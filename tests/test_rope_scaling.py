"""Context extension by RoPE scaling: rope_scaling / rope_factor mapped onto transformers' rope_parameters;
a tiny Llama trains past its max_position_embeddings; bad combinations are one line."""

from __future__ import annotations

import json

import pytest
import torch

from memtune import train
from memtune.config import RunConfig, from_dict
from memtune.errors import UserError
from memtune.estimate import estimate_memory
from memtune.kernels._common import base_model

MAX_POSITIONS = 64


@pytest.fixture()
def tiny_llama(tmp_path):
    """A two-layer Llama shape with 64 positions (random weights, the built-in tokenizer)."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 576, "max_position_embeddings": MAX_POSITIONS, "rope_theta": 10000.0,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "tie_word_embeddings": False}
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "llama")


def llama_cfg(model: str, **changes) -> RunConfig:
    base = dict(model=model, random_init=True, data="random", seq_len=2 * MAX_POSITIONS, steps=2, warmup_steps=0,
                eval=False, lora_targets="all-linear", device="cpu", seed=0)
    return RunConfig(**{**base, **changes})


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_trains_past_max_position_embeddings(tiny_llama, kind):
    lines: list[str] = []
    session = train.setup(llama_cfg(tiny_llama, rope_scaling=kind, rope_factor=2), log=lines.append)
    assert session.bundle.seq_len == 2 * MAX_POSITIONS  # not capped at 64
    config = base_model(session.built.model).config
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 2
    # transformers' dynamic NTK takes max_position_embeddings as the trained length and scales past it
    assert config.max_position_embeddings == (MAX_POSITIONS if kind == "dynamic" else 2 * MAX_POSITIONS)
    if kind == "yarn":
        assert config.rope_parameters["original_max_position_embeddings"] == MAX_POSITIONS
    rotary = base_model(session.built.model).model.rotary_emb
    assert rotary.rope_type == kind
    if kind == "linear":  # the frequencies are the model's own, divided by the factor
        head_dim = 64 // 4
        plain = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        torch.testing.assert_close(rotary.inv_freq.float().cpu(), plain / 2)
    assert any(line.startswith(f"rope_scaling: {kind}") and "up to 128" in line for line in lines)
    losses, _, _ = train.train_loop(session, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_without_scaling_the_length_is_capped_with_how_to_extend(tiny_llama):
    lines: list[str] = []
    session = train.setup(llama_cfg(tiny_llama), log=lines.append)
    assert session.bundle.seq_len == MAX_POSITIONS
    hint = [line for line in lines if "--rope-scaling" in line]
    assert hint == [f"seq_len: to train past max_position_embeddings ({MAX_POSITIONS}), scale RoPE: "
                    f"--rope-scaling yarn --rope-factor 2"]


def test_a_model_already_scaled_is_rescaled_from_its_pretraining_length():
    from memtune.models import _hf_config, apply_rope_scaling, resolve_source

    cfg = RunConfig(model="llama-3.1-8b", random_init=True, rope_scaling="yarn", rope_factor=2)
    config = _hf_config(resolve_source(cfg), cfg)
    note = apply_rope_scaling(config, cfg, "llama-3.1-8b")
    # Llama 3.1: llama3 scaling from 8192 to 131072; yarn now covers 262144 from the same 8192
    assert config.rope_parameters == {"rope_type": "yarn", "factor": 32.0, "rope_theta": 500000.0,
                                      "original_max_position_embeddings": 8192}
    assert config.max_position_embeddings == 262144
    assert "replacing its llama3" in note and "262144" in note
    again = _hf_config(resolve_source(cfg), cfg)  # the preset itself is left as it was
    assert again.rope_parameters["rope_type"] == "llama3"
    dynamic = cfg.replace(rope_scaling="dynamic")
    with pytest.raises(UserError, match="^rope_scaling: dynamic cannot extend .*use --rope-scaling yarn"):
        apply_rope_scaling(_hf_config(resolve_source(dynamic), dynamic), dynamic, "llama-3.1-8b")


def test_the_estimate_follows_the_scaled_limit():
    plain = estimate_memory(RunConfig(model="llama-3.1-8b", seq_len=262144, batch_size=1))
    assert plain.seq_len == 131072 and any("capped at max_position_embeddings = 131072" in n for n in plain.notes)
    scaled = estimate_memory(RunConfig(model="llama-3.1-8b", seq_len=262144, batch_size=1, rope_scaling="yarn",
                                       rope_factor=2))
    assert scaled.seq_len == 262144 and scaled.total_bytes > plain.total_bytes
    assert not any("capped" in n for n in scaled.notes)
    assert estimate_memory(RunConfig(model="llama-3.1-8b", seq_len=10**6, rope_scaling="linear",
                                     rope_factor=3)).seq_len == 3 * 131072


@pytest.mark.parametrize("values, message", [
    ({"rope_factor": 2}, "rope_factor: 2 needs a rope_scaling type"),
    ({"rope_scaling": "yarn"}, "rope_factor: expected a number > 1 with rope_scaling yarn"),
    ({"rope_scaling": "yarn", "rope_factor": 0.5}, "rope_factor: expected a number > 1"),
    ({"rope_scaling": "ntk", "rope_factor": 2}, "rope_scaling: expected one of '' (none), linear, dynamic, yarn"),
    ({"rope_scaling": "linear", "rope_factor": "lots"}, "rope_factor: expected a number"),
])
def test_bad_combinations_are_one_line(values, message):
    with pytest.raises(UserError) as exc:
        from_dict(values)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_bad_combinations_exit_2_on_the_command_line(capsys):
    from memtune.cli import main

    assert main(["train", "--rope-factor", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rope-scaling yarn --rope-factor 4" in err
    assert main(["fit", "--model", "llama-3.1-8b", "--gpu-memory", "40GiB", "--rope-scaling", "yarn",
                 "--rope-factor", "1"]) == 2
    assert "rope_factor: expected a number > 1" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (fused RoPE, offloaded checkpoints)")
@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_trains_past_max_position_embeddings_on_a_gpu(tiny_llama, kind):
    session = train.setup(llama_cfg(tiny_llama, rope_scaling=kind, rope_factor=4, seq_len=4 * MAX_POSITIONS,
                                    device="cuda", steps=3), log=lambda _: None)
    assert session.bundle.seq_len == 4 * MAX_POSITIONS
    losses, _, _ = train.train_loop(session, progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
