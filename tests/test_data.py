"""memtune.data: formats, masking token by token, lengths, packing isolation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memtune import data as D
from memtune.config import RunConfig
from memtune.data import IGNORE_INDEX, iterate_batches, load_data
from memtune.errors import UserError

FIXTURES = Path(__file__).parent / "data"
MAX_POSITIONS = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer trained here in milliseconds: decodes back to the exact text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [line for line in (FIXTURES / "gsm8k_sample.jsonl").read_text().splitlines()] * 5
    inner.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cfg(**fields) -> RunConfig:
    fields.setdefault("eval_examples", 0)
    return RunConfig(**fields)


def only(bundle):
    assert len(bundle.train) == 1, bundle.notes
    return bundle.train[0]


# --------------------------------------------------------------------------- formats


def test_text_format_trains_on_every_token(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Tom has 3 apples."}])
    example = only(load_data(cfg(data=str(path)), tok, MAX_POSITIONS))
    expected = ids(tok, "Tom has 3 apples.") + [tok.eos_token_id]
    assert example.input_ids == expected
    assert example.labels == expected


def test_prompt_completion_masks_the_prompt_token_by_token(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Tom has 3 apples and", "completion": " buys 4 more."}])
    example = only(load_data(cfg(data=str(path)), tok, MAX_POSITIONS))
    prompt, completion = ids(tok, "Tom has 3 apples and"), ids(tok, " buys 4 more.") + [tok.eos_token_id]
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_train_on_prompt_trains_on_the_prompt_too(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Tom has", "completion": " 7"}])
    example = only(load_data(cfg(data=str(path), train_on_prompt=True), tok, MAX_POSITIONS))
    assert example.labels == example.input_ids


def test_gsm8k_prompt_masking_and_reference(tok, tmp_path):
    record = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7. #### 7"}
    path = write_jsonl(tmp_path / "g.jsonl", [record] * 10)
    bundle = load_data(cfg(data=str(path), eval_examples=2), tok, MAX_POSITIONS)
    prompt_text = f"Question: {record['question']}\nAnswer: "
    prompt, answer = ids(tok, prompt_text), ids(tok, record["answer"]) + [tok.eos_token_id]
    assert bundle.train[0].input_ids == prompt + answer
    assert bundle.train[0].labels == [IGNORE_INDEX] * len(prompt) + answer
    assert bundle.eval == [D.EvalExample(prompt_text, "7")] * 2
    assert len(bundle.train) == 8


def test_alpaca_with_and_without_input(tok, tmp_path):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    bundle = load_data(cfg(data=str(path)), tok, MAX_POSITIONS)
    for example, record in zip(bundle.train, records):
        template = D.ALPACA_PROMPT_WITH_INPUT if record["input"] else D.ALPACA_PROMPT
        prompt = ids(tok, template.format(**record))
        assert example.input_ids[: len(prompt)] == prompt
        assert example.labels == [IGNORE_INDEX] * len(prompt) + ids(tok, record["output"]) + [tok.eos_token_id]
    assert "### Input:" not in tok.decode(bundle.train[1].input_ids)


def test_messages_loss_on_assistant_turns_only(tok):
    bundle = load_data(cfg(data=str(FIXTURES / "chat_sample.jsonl")), tok, MAX_POSITIONS)
    example = bundle.train[0]
    messages = json.loads((FIXTURES / "chat_sample.jsonl").read_text().splitlines()[0])["messages"]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(example.input_ids) == full
    # Token by token: which tokens are trained, in order, as text spans.
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(tok.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    spans += [tok.decode(current)] if current else []
    assert spans == ["5<|im_end|>\n", "8<|im_end|>\n"]
    assert bundle.eval == []  # chats have no reference answer to check


def test_messages_unknown_role_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ])
    with pytest.raises(UserError, match=rf"^{path}:2: message 0: unknown role 'robot'"):
        load_data(cfg(data=str(path)), tok, MAX_POSITIONS)


def test_messages_need_a_chat_template(tok, tmp_path):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    plain.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        load_data(cfg(data=str(FIXTURES / "chat_sample.jsonl")), plain, MAX_POSITIONS)


def test_unknown_fields_explain_the_formats(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": "bar"}])
    with pytest.raises(UserError, match=rf"{path}:1: cannot tell the data format .*prompt \+ completion"):
        load_data(cfg(data=str(path)), tok, MAX_POSITIONS)


def test_data_format_overrides_detection(tok, tmp_path):
    # Detected as prompt_completion; forced to text, the 'text' field is used.
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b", "text": "whole thing"}])
    example = only(load_data(cfg(data=str(path), data_format="text"), tok, MAX_POSITIONS))
    assert example.input_ids == ids(tok, "whole thing") + [tok.eos_token_id]


def test_json_csv_parquet_and_dataset_dir_match_jsonl(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(4)]
    expected = load_data(cfg(data=str(write_jsonl(tmp_path / "r.jsonl", records))), tok, MAX_POSITIONS).train
    (tmp_path / "r.json").write_text(json.dumps(records))
    with open(tmp_path / "r.csv", "w") as handle:
        handle.write("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name in ("r.json", "r.csv", "r.parquet", "saved"):
        got = load_data(cfg(data=str(tmp_path / name)), tok, MAX_POSITIONS).train
        assert got == expected, name


def test_folder_of_data_files_loads_through_datasets(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"line {i}"} for i in range(3)])
    bundle = load_data(cfg(data=str(folder)), tok, MAX_POSITIONS)
    assert [tok.decode(e.input_ids) for e in bundle.train] == [f"line {i}<|endoftext|>" for i in range(3)]


def test_records_all_bad_after_parsing_is_a_user_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": " "}])
    with pytest.raises(UserError, match=rf"no usable records; all 2 were bad .*first: {path}:1: expected a non-empty"):
        load_data(cfg(data=str(path), skip_bad_lines=True), tok, MAX_POSITIONS)


def test_dataset_dict_dir_uses_its_test_split_for_eval(tok, tmp_path):
    import datasets

    rows = [{"question": f"{i} + 1?", "answer": f"{i} + 1 = {i + 1}. #### {i + 1}"} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dd"))
    bundle = load_data(cfg(data=str(tmp_path / "dd"), eval_examples=10), tok, MAX_POSITIONS)
    assert len(bundle.train) == 4
    assert [e.reference for e in bundle.eval] == ["5", "6"]


# --------------------------------------------------------------------------- builtin and random


def test_builtin_uses_the_arith_train_and_test_splits(tok, monkeypatch):
    from memtune.tasks import arith

    calls = []

    def fake_generate(split, n, seed=0):
        calls.append((split, n, seed))
        return [{"question": f"{split} {i}?", "answer": f"so {i}. #### {i}"} for i in range(n)]

    monkeypatch.setattr(arith, "generate", fake_generate)
    bundle = load_data(cfg(data="builtin", train_examples=7, eval_examples=3, seed=5), tok, MAX_POSITIONS)
    assert calls == [("train", 7, 5), ("test", 3, 5)]
    assert len(bundle.train) == 7
    assert bundle.eval[2] == D.EvalExample("Question: test 2?\nAnswer: ", "2")


def test_builtin_default_size_with_the_real_task(tok):
    bundle = load_data(cfg(data="builtin", eval_examples=5), tok, MAX_POSITIONS)
    assert len(bundle.train) == D.DEFAULT_BUILTIN_TRAIN
    assert len(bundle.eval) == 5
    assert all(e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer: ") for e in bundle.eval)


def test_random_data_shape_labels_and_seed(tok):
    config = cfg(data="random", seq_len=48, train_examples=5, batch_size=2)
    bundle = load_data(config, tok, MAX_POSITIONS)
    assert bundle.seq_len == 48 and bundle.eval == [] and len(bundle.train) == 5
    assert all(len(e.input_ids) == 48 and e.labels == e.input_ids for e in bundle.train)
    assert all(0 <= t < len(tok) for e in bundle.train for t in e.input_ids)
    assert load_data(config, tok, MAX_POSITIONS).train == bundle.train
    assert load_data(config.replace(seed=1), tok, MAX_POSITIONS).train != bundle.train
    batch = next(iterate_batches(bundle, config, 0))
    assert batch["input_ids"].shape == (2, 48) and torch.equal(batch["labels"], batch["input_ids"])


def test_random_data_capped_by_model_positions(tok):
    bundle = load_data(cfg(data="random", seq_len=4096, train_examples=1), tok, 256)
    assert bundle.seq_len == 256 and len(bundle.train[0].input_ids) == 256
    assert any("capped from 4096 to 256" in note and "max_position" in note for note in bundle.notes)


# --------------------------------------------------------------------------- lengths


def _lengths_file(tmp_path):
    # Two short examples and one far longer than the others.
    long_text = " ".join("xyz" * 3 for _ in range(30))
    return write_jsonl(tmp_path / "l.jsonl", [{"text": "a b"}, {"text": "c d e"}, {"text": long_text}])


def test_seq_len_capped_by_the_longest_example(tok, tmp_path):
    bundle = load_data(cfg(data=str(_lengths_file(tmp_path))), tok, MAX_POSITIONS)
    longest = max(len(e.input_ids) for e in bundle.train)
    assert bundle.seq_len == longest < MAX_POSITIONS
    assert any(f"capped from 16384 to {longest} (the longest example" in note for note in bundle.notes)


def test_long_examples_truncate(tok, tmp_path):
    bundle = load_data(cfg(data=str(_lengths_file(tmp_path)), seq_len=8), tok, MAX_POSITIONS)
    assert len(bundle.train) == 3 and bundle.seq_len == 8
    assert max(len(e.input_ids) for e in bundle.train) == 8
    assert any("truncated 1 of 3 examples to 8 tokens" in note for note in bundle.notes)


def test_long_examples_drop(tok, tmp_path):
    bundle = load_data(cfg(data=str(_lengths_file(tmp_path)), seq_len=8, long_examples="drop"), tok, MAX_POSITIONS)
    assert len(bundle.train) == 2
    assert any("dropped 1 of 3 examples longer than 8 tokens" in note for note in bundle.notes)


def test_truncation_that_leaves_no_completion_drops_the_example(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a long prompt that fills everything", "completion": " 1"},
                                             {"prompt": "x", "completion": " 2"}])
    bundle = load_data(cfg(data=str(path), seq_len=4), tok, MAX_POSITIONS)
    assert len(bundle.train) == 1
    assert any("dropped 1 example(s) that had no trainable tokens" in note for note in bundle.notes)


def test_everything_dropped_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError, match="no training examples left"):
        load_data(cfg(data=str(_lengths_file(tmp_path)), seq_len=2, long_examples="drop"), tok, MAX_POSITIONS)


# --------------------------------------------------------------------------- eval split


def test_eval_hold_out_is_seeded_and_disjoint(tok):
    path = str(FIXTURES / "gsm8k_sample.jsonl")
    first = load_data(cfg(data=path, eval_examples=50, seed=3), tok, MAX_POSITIONS)
    again = load_data(cfg(data=path, eval_examples=50, seed=3), tok, MAX_POSITIONS)
    assert first.eval == again.eval
    assert len(first.eval) == 2 and len(first.train) == 8  # at most 20% is held out
    train_text = {tok.decode(e.input_ids) for e in first.train}
    assert not any(e.prompt in text for e in first.eval for text in train_text)


def test_no_eval_without_reference_answers(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"say {i}", "completion": " words"} for i in range(20)])
    bundle = load_data(cfg(data=str(path), eval_examples=5), tok, MAX_POSITIONS)
    assert bundle.eval == [] and len(bundle.train) == 20
    numeric = write_jsonl(tmp_path / "num.jsonl",
                          [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(20)])
    assert len(load_data(cfg(data=str(numeric), eval_examples=5), tok, MAX_POSITIONS).eval) == 4


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '], r":2: expected one JSON object per line"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], r":2: expected field 'completion'"),
    (['{"question": "q", "answer": "  "}'], r":1: expected a non-empty 'answer'"),
    (['{"text": "a"}', '["not", "an", "object"]'], r":2: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tok, tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{path}{message}") as info:
        load_data(cfg(data=str(path)), tok, MAX_POSITIONS)
    assert "\n" not in str(info.value)


def test_encoding_error_names_the_line(tok, tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: expected UTF-8 text"):
        load_data(cfg(data=str(path)), tok, MAX_POSITIONS)


def test_json_array_and_csv_errors_name_the_line(tok, tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n   "completion": ""}\n]\n')
    with pytest.raises(UserError, match=rf"^{array}:4: expected a non-empty 'completion'"):
        load_data(cfg(data=str(array)), tok, MAX_POSITIONS)
    table = tmp_path / "t.csv"
    table.write_text('prompt,completion\n"multi\nline",x\nonly a prompt\n')
    with pytest.raises(UserError, match=rf"^{table}:4: expected field 'completion'"):
        load_data(cfg(data=str(table)), tok, MAX_POSITIONS)
    table.write_bytes(b"text\nfine\nbad \xff byte\n")
    with pytest.raises(UserError, match=rf"^{table}:3: expected UTF-8 text"):
        load_data(cfg(data=str(table)), tok, MAX_POSITIONS)


def test_chat_template_rejection_names_the_line(tok, tmp_path):
    strict = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    strict.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user turn') }}"
                            "{% endif %}" + CHAT_TEMPLATE)
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "assistant", "content": "yo"}]},
    ])
    with pytest.raises(UserError, match=rf"^{path}:2: the tokenizer's chat template rejected .*start with a user turn"):
        load_data(cfg(data=str(path)), strict, MAX_POSITIONS)
    bundle = load_data(cfg(data=str(path), skip_bad_lines=True), strict, MAX_POSITIONS)
    assert len(bundle.train) == 1 and any(n.startswith("skipped 1 bad record(s)") for n in bundle.notes)


def test_skip_bad_lines_reports_how_many(tok):
    path = FIXTURES / "bad_lines.jsonl"
    with pytest.raises(UserError, match=rf"{path}:3: expected one JSON object"):
        load_data(cfg(data=str(path)), tok, MAX_POSITIONS)
    bundle = load_data(cfg(data=str(path), skip_bad_lines=True), tok, MAX_POSITIONS)
    assert len(bundle.train) == 2  # lines 1 and 6; line 2 is blank
    assert any(note.startswith("skipped 3 bad record(s)") and f"{path}:3" in note for note in bundle.notes)


def test_all_lines_bad_is_a_user_error(tok, tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_text('{"prompt": "a"\n{oops\n')
    with pytest.raises(UserError, match=rf"no usable records; all 2 were bad .*first: {path}:1: expected one JSON"):
        load_data(cfg(data=str(path), skip_bad_lines=True), tok, MAX_POSITIONS)


def test_empty_file_is_a_user_error(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="no records found"):
        load_data(cfg(data=str(path)), tok, MAX_POSITIONS)


def test_missing_file_names_the_data_field(tok, tmp_path):
    with pytest.raises(UserError, match=rf"^data: file not found: {tmp_path}/nope.jsonl"):
        load_data(cfg(data=str(tmp_path / "nope.jsonl")), tok, MAX_POSITIONS)


def test_uncached_dataset_name_is_a_user_error(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match=r"^data: 'someone/not-cached' is not a file or directory"):
        load_data(cfg(data="someone/not-cached"), tok, MAX_POSITIONS)


# --------------------------------------------------------------------------- batches


def test_batches_are_right_padded_seeded_and_endless(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p" * (i + 1), "completion": " c"} for i in range(5)])
    config = cfg(data=str(path), batch_size=2)
    bundle = load_data(config, tok, MAX_POSITIONS)
    stream = iterate_batches(bundle, config, seed=1)
    batches = [next(stream) for _ in range(10)]  # 20 examples drawn from 5: the stream never ends
    for batch in batches:
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 2
        # Every example ends with a trained EOS, so its length is its last trained position + 1.
        lengths = [max(i for i, t in enumerate(row) if t != IGNORE_INDEX) + 1 for row in batch["labels"].tolist()]
        assert batch["input_ids"].shape[1] == max(lengths)  # padded to the batch's own length
        for row, n in enumerate(lengths):
            assert (batch["input_ids"][row, n:] == bundle.pad_token_id).all()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    again = iterate_batches(bundle, config, seed=1)
    assert all(torch.equal(b["input_ids"], next(again)["input_ids"]) for b in batches)
    other = iterate_batches(bundle, config, seed=2)
    assert not all(torch.equal(b["input_ids"], next(other)["input_ids"]) for b in batches)


def test_packing_layout(tok):
    config = cfg(data=str(FIXTURES / "gsm8k_sample.jsonl"), packing=True, seq_len=160, batch_size=2)
    plain = load_data(config.replace(packing=False), tok, MAX_POSITIONS)
    bundle = load_data(config, tok, MAX_POSITIONS)
    assert bundle.seq_len == 160 and len(bundle.train) < len(plain.train)
    assert sum(len(p.input_ids) for p in bundle.train) == sum(len(e.input_ids) for e in plain.train)
    for pack in bundle.train:
        assert len(pack.input_ids) <= 160
        starts = [i for i, p in enumerate(pack.position_ids) if p == 0]
        assert all(pack.labels[s] == IGNORE_INDEX for s in starts)  # no example predicted from the previous one
    batch = next(iterate_batches(bundle, config, 0))
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 160)
    from transformers.masking_utils import find_packed_sequence_indices

    segments = find_packed_sequence_indices(batch["position_ids"])
    assert segments is not None
    for row in range(2):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        assert segments[row].unique().numel() == len(starts)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_never_attend_to_each_other(tok, tmp_path, attention):
    """The logits of an example packed after others equal its logits alone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(
        Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS),
        attn_implementation=attention,
    ).eval()
    records = [{"prompt": "Tom has 3 apples", "completion": " and 4 more."},
               {"prompt": "Anna", "completion": " has 10 pens."},
               {"prompt": "Ben buys 2 bags of 5 marbles.", "completion": " 10"}]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    config = cfg(data=str(path), packing=True, seq_len=128, batch_size=1)
    bundle = load_data(config, tok, MAX_POSITIONS)
    assert len(bundle.train) == 1  # all three share one sequence, followed by padding
    batch = next(iterate_batches(bundle, config, 0))
    singles = {tuple(e.input_ids) for e in load_data(config.replace(packing=False), tok, MAX_POSITIONS).train}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        positions = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
        checked = 0
        for start, end in zip(starts, starts[1:]):
            example = batch["input_ids"][0, start:end]
            if tuple(example.tolist()) not in singles:
                continue  # the padding tail
            alone = model(input_ids=example[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked == 3


# --------------------------------------------------------------------------- the shipped tokenizer

TINY = Path(__file__).parents[1] / "src" / "memtune" / "assets" / "tiny"


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="tiny model assets not present")
def test_shipped_tiny_tokenizer_builtin_and_chat():
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(str(TINY))
    bundle = load_data(cfg(data="builtin", train_examples=20, eval_examples=4), tiny, 512)
    for example in bundle.train:
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        text = tiny.decode(example.input_ids)
        assert text.startswith("Question: ") and "#### " in tiny.decode(trained)
        assert text.endswith(tiny.decode(trained)) and not tiny.decode(trained).startswith("Question")
    assert len(bundle.eval) == 4
    chats = load_data(cfg(data=str(FIXTURES / "chat_sample.jsonl")), tiny, 512)
    assert all(any(t != IGNORE_INDEX for t in e.labels) for e in chats.train)
