"""The technique registry: every entry can be enabled and disabled, leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memtune.config import FIELD_NAMES, LEGACY_VALUES, RunConfig
from memtune.techniques import BY_NAME, TECHNIQUES, Target

# A configuration that asks for every technique (each entry's `wanted`), on the model it suits.
_WANTS = {"int8_backward": dict(quantization="int8"), "residual_dtype": dict(residual_dtype="fp32"),
          "gradient_checkpointing": dict(offload_activations=False), "tiled_mlp_chunk": dict(tiled_mlp_chunk=16)}


# What a technique needs installed before it (its supports() says so otherwise).
_BEFORE = {"dequantize_graph": ("dequantize_once", "offload_activations")}


def _model(quantization: str, dtype: torch.dtype, device: torch.device, untie: bool = False) -> nn.Module:
    from memtune.models import add_lora, quantize_decoder_linears
    from memtune.presets import TINY_DIR
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(TINY_DIR), dtype=dtype, attn_implementation="sdpa")
    cfg = RunConfig(quantization=quantization, lora_dropout=0.0, lora_targets="all-linear")
    if quantization != "none":
        quantize_decoder_linears(model, cfg, dtype)
    if untie:  # a table tied to the lm_head stays on the device (embeddings_on_host says so)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model._tied_weights_keys = None  # transformers would tie them again as the model moves
    model.to(device)  # bitsandbytes quantizes as the weights move
    return add_lora(model, cfg)


def _forwards(model: nn.Module) -> dict[tuple[str, str], object]:
    """Every module's instance-level forward (a swapped one) and memtune attribute, by module name
    (a module's list of its 4-bit linears is a cache, made when first needed, and not compared)."""
    return {(name, key): value for name, m in model.named_modules() for key, value in m.__dict__.items()
            if key == "forward" or (key.startswith("_memtune") and key != "_memtune_4bit_linears")}


def _outputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():  # bitsandbytes' own 4-bit backward on a CPU is not what is compared here
        loss = model(input_ids=ids, labels=ids).loss
    return logits, loss


@pytest.mark.parametrize("technique", TECHNIQUES, ids=[t.name for t in TECHNIQUES])
def test_enable_then_disable_restores_the_forwards_and_the_outputs(technique):
    cfg = RunConfig(**_WANTS.get(technique.name, {}))
    assert technique.wanted(cfg), f"{technique.name}: the test's configuration does not ask for it"
    if technique.cuda_only and not torch.cuda.is_available():
        pytest.skip("a CUDA-only technique")
    device = torch.device("cuda" if technique.cuda_only else "cpu")
    quantization = cfg.quantization if technique.name not in ("residual_dtype",) else "none"
    dtype = torch.float32 if quantization == "none" and technique.name != "residual_dtype" else torch.bfloat16
    model = _model(quantization, dtype, device, untie=technique.name == "embeddings_on_host")
    target = Target(model, cfg, device, torch.bfloat16 if technique.name == "residual_dtype" else dtype)
    for name in _BEFORE.get(technique.name, ()):
        BY_NAME[name].enable(target)
    ids = torch.randint(0, 500, (1, 48), device=device)
    before_forwards, before = _forwards(model), _outputs(model, ids)
    assert technique.skip_reason(target) is None
    note = technique.enable(target)
    assert note.startswith(technique.name) and "skipped" not in note
    assert _forwards(model) != before_forwards or technique.name == "gradient_checkpointing"
    technique.disable(model)
    assert _forwards(model) == before_forwards
    after = _outputs(model, ids)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)


def test_every_switch_is_a_config_field_with_a_stored_default():
    for technique in TECHNIQUES:
        for name in (technique.name, *technique.fields):
            assert name in FIELD_NAMES or name == "int8_backward", name
        if technique.legacy_value is not None:
            assert LEGACY_VALUES[technique.name] == technique.legacy_value


def test_the_estimate_terms_of_a_technique_come_and_go_with_it():
    from memtune.estimate import estimate_memory

    base = RunConfig(model="deepseek-r1-distill-qwen-1.5b", seq_len=16384)
    on = estimate_memory(base)
    for name, off in (("offload_activations", dict(offload_activations=False)),
                      ("embeddings_on_host", dict(embeddings_on_host=False))):
        terms = BY_NAME[name].estimate_terms
        without = estimate_memory(base.replace(**off))
        # each term exists with the technique and not without it, or moves between GPU and host
        assert any((t in on.breakdown) != (t in without.breakdown) or (t in on.host_bytes) != (t in without.host_bytes)
                   for t in terms), name


def test_help_is_one_or_two_lines_and_every_technique_has_its_docs_section():
    from pathlib import Path

    from memtune.cli import HELP_CHARS, short_help
    from memtune.config import field_help

    helps = field_help()
    assert all(len(short_help(helps.get(name, ""))) <= HELP_CHARS + 4 for name in FIELD_NAMES)
    docs = (Path(__file__).parents[1] / "docs" / "techniques.md").read_text()
    for technique in TECHNIQUES:
        assert f"## `{technique.name}`" in docs, technique.name
