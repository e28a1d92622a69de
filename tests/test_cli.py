"""A user's mistake: one line naming the field or file, exit code 2, no traceback, no run directory."""

import pytest

from memtune.cli import main

CASES = [
    (["train", "--lora-rank", "0"], "lora_rank"),
    (["train", "--quantization", "q3"], "quantization: expected one of nf4, fp4, int8, none"),
    (["train", "--seq-len", "0"], "seq_len"),
    (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["train", "--model", "some-org/not-cached-model"], "--random-init"),
    (["train", "--model", "deepseek-r1-distill-qwen-1.5b"], "add --random-init"),
    (["train", "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["train", "--no-lora"], "cannot be trained directly"),
    (["frobnicate"], "unknown verb"),
]


@pytest.mark.parametrize("argv,expected", CASES)
def test_mistakes_give_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*argv, "--out", str(out)] if argv[0] == "train" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing half-written for a later run to trust


def test_unknown_yaml_key_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora_rnk: 4\n")
    assert main(["train", "--config", str(config)]) == 2
    assert f"{config}: unknown key 'lora_rnk'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "study", "report", "estimate", "fit", "eval", "merge"])
def test_every_verb_prints_its_help(verb, capsys):
    from memtune.cli import main

    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: memtune " + verb)
    if verb == "train":  # on-by-default switches show how to turn them off
        assert "--no-offload-activations" in out and "--no-fuse-elementwise" in out


def test_cuda_allocator_grows_segments_in_place_unless_the_user_chose(monkeypatch, capsys):
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # recorded, so teardown restores what was there
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    main(["estimate", "--help"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    main(["estimate", "--help"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
