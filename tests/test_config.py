"""Config validation: every field's bad value gets a message naming it."""

import pytest

from memtune.config import RunConfig, from_dict, load_yaml, parse_memory_size
from memtune.errors import UserError

BAD_VALUES = [
    ("lora_rank", 0, "lora_rank"),
    ("lora_rank", "eight", "lora_rank"),
    ("lora_alpha", -1, "lora_alpha"),
    ("lora_dropout", 1.5, "lora_dropout"),
    ("quantization", "q3", "nf4, fp4, int8, none"),
    ("compute_dtype", "fp8", "compute_dtype"),
    ("optimizer", "sgd", "optimizer"),
    ("seq_len", 0, "seq_len"),
    ("batch_size", -1, "batch_size"),
    ("grad_accum", 0, "grad_accum"),
    ("steps", 0, "steps"),
    ("learning_rate", 0, "learning_rate"),
    ("gradient_checkpointing", "maybe", "gradient_checkpointing"),
    ("double_quant", 3, "double_quant"),
    ("lora_targets", [], "lora_targets"),
    ("loss", "sparse", "loss"),
    ("attention", "magic", "attention"),
    ("data_format", "xml", "data_format"),
    ("long_examples", "wrap", "long_examples"),
    ("gpu_memory", "lots", "gpu_memory"),
    ("answer_regex", "(", "answer_regex"),
    ("answer_regex", "no group", "answer_regex"),
    ("tiled_mlp_chunk", -1, "tiled_mlp_chunk"),
    ("device", "tpu", "device"),
    ("model", " ", "model"),
]


@pytest.mark.parametrize("field,value,expected", BAD_VALUES)
def test_bad_value_names_the_field(field, value, expected):
    with pytest.raises(UserError, match=expected):
        from_dict({field: value})


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(UserError, match="unknown key 'lora_rnk'.*lora_rank"):
        from_dict({"lora_rnk": 4})


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserError) as info:
        from_dict({"lora_rank": 0, "seq_len": -1, "quantization": "q3"})
    message = str(info.value)
    assert "lora_rank" in message and "seq_len" in message and "quantization" in message


def test_full_finetuning_needs_unquantized_weights():
    with pytest.raises(UserError, match="cannot be trained directly"):
        from_dict({"lora": False, "quantization": "nf4"})
    assert from_dict({"lora": False, "quantization": "none"}).lora is False


def test_offload_acts_only_with_checkpointing():
    # on by default, so turning checkpointing off must not be an error; there is just nothing to offload
    cfg = from_dict({"gradient_checkpointing": False})
    assert cfg.offload_activations and not cfg.offloads_checkpoints
    assert from_dict({}).offloads_checkpoints
    assert not from_dict({"offload_activations": False}).offloads_checkpoints


def test_stored_configs_read_back_as_they_ran():
    from memtune.config import from_stored_dict

    old = from_stored_dict({"seq_len": 1024, "offload_activations": False})  # stored before the newer fields
    assert old.lora_matmul == "fp32" and not old.embeddings_on_host and not old.fuse_elementwise
    assert from_stored_dict({"lora_matmul": "compute"}).lora_matmul == "compute"


def test_flag_strings_are_coerced():
    cfg = from_dict({"lora_rank": "16", "gradient_checkpointing": "off", "lora_targets": "q_proj,k_proj",
                     "learning_rate": "1e-3"})
    assert cfg.lora_rank == 16 and cfg.gradient_checkpointing is False
    assert cfg.lora_targets == ("q_proj", "k_proj") and cfg.learning_rate == 1e-3


def test_defaults_are_the_seed_study():
    cfg = RunConfig()
    assert (cfg.quantization, cfg.double_quant, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == ("nf4", True, 8, 16, 0.05)
    assert cfg.gradient_checkpointing and cfg.seq_len == 16384 and cfg.trust_remote_code is False


def test_hash_ignores_output_directory_only():
    a = RunConfig(out="x")
    assert a.config_hash() == RunConfig(out="y").config_hash()
    assert a.config_hash() != RunConfig(lora_rank=4).config_hash()


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("lora_rank: [1,\n")
    with pytest.raises(UserError, match="run.yaml.*not valid YAML"):
        load_yaml(bad)
    with pytest.raises(UserError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(bad)


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20),
                                            ("1.5GiB", int(1.5 * 2**30))])
def test_memory_sizes(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "24 parsecs", "-3GiB", "0GiB"])
def test_bad_memory_sizes(text):
    with pytest.raises(ValueError):
        parse_memory_size(text)


@pytest.mark.parametrize("requested,effective,expected", [(16384, 175, 8), (16384, 16384, 1), (64, 29, 2),
                                                          (100, 200, 1)])
def test_auto_batch_fills_the_token_budget(requested, effective, expected):
    assert RunConfig(seq_len=requested).resolved_batch_size(effective) == expected
    assert RunConfig(seq_len=requested, batch_size=3).resolved_batch_size(effective) == 3
