"""Answer extraction, normalization and batched greedy evaluation on the tiny model."""

from types import SimpleNamespace

import pytest
import torch

from memtune.evaluate import EvalResult, evaluate_accuracy, extract_answer, is_correct, normalize_answer
from memtune.presets import TINY_DIR
from memtune.tasks import arith


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7. Tom has 7 apples. #### 7", "7"),
    ("#### 1,234", "1,234"),
    ("so 12 - 15 = -3 #### -3", "-3"),
    ("the answer is 2.5 kg", "2.5"),
    ("first 3 then 10 and finally 42.", "42"),
    ("costs $1,000,000.50 in total", "1,000,000.50"),
    ("5-3=2", "2"),
    ("x = -5", "-5"),
    ("####  8 apples #### 9", "8"),       # the first `####` is the answer given
    ("no number here", None),
    ("", None),
    ("#### none", None),                  # a `####` without a number is no answer
    ("item abc123 only", None),           # digits inside a word are no number
    ("3, 4 and 5", "5"),                  # a list is not one number with commas
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_with_custom_regex():
    assert extract_answer("The answer is (B) 12", r"\(([A-D])\)") == "B"
    assert extract_answer("Result: 17 #### 3", r"Result: (\d+)") == "17"
    assert extract_answer("nothing", r"Result: (\d+)") is None


@pytest.mark.parametrize("a, b", [
    ("7", "7.0"), ("1,234", "1234"), ("$5", "5"), ("7.", "7"), (" 42 ", "42"),
    ("-3", "-3.00"), ("0.50", ".5"), ("1e2", "100"),
])
def test_normalize_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_keeps_differences():
    assert normalize_answer("7") != normalize_answer("-7")
    assert normalize_answer("2.5") != normalize_answer("25")
    assert normalize_answer(None) == ""
    assert normalize_answer("B") == "B"
    assert not is_correct(None, "7")
    assert is_correct("7.0", "7")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(TINY_DIR)


def _examples(n):
    return [SimpleNamespace(prompt=f"Question: {r['question']}\nAnswer: ", reference=arith.final_answer(r))
            for r in arith.generate("test", n)]


def _cfg(batch_size, max_new_tokens=12, regex=""):
    return SimpleNamespace(eval_batch_size=batch_size, max_new_tokens=max_new_tokens, answer_regex=regex)


def test_batched_and_unbatched_agree(tiny):
    model, tokenizer = tiny
    examples = _examples(6)
    one = evaluate_accuracy(model, tokenizer, examples, _cfg(1))
    many = evaluate_accuracy(model, tokenizer, examples, _cfg(4))
    assert [p["generated"] for p in one.predictions] == [p["generated"] for p in many.predictions]
    assert (one.correct, one.total) == (many.correct, many.total)
    assert tokenizer.padding_side == "right"  # restored


def test_result_and_prediction_fields(tiny):
    model, tokenizer = tiny
    result = evaluate_accuracy(model, tokenizer, _examples(3), _cfg(2, max_new_tokens=4))
    assert isinstance(result, EvalResult) and result.total == 3
    assert result.accuracy == result.correct / 3
    assert set(result.predictions[0]) == {"prompt", "reference", "generated", "extracted", "correct"}
    assert evaluate_accuracy(model, tokenizer, [], _cfg(2)).total == 0


class _Scripted(torch.nn.Module):
    """A 'model' whose generate returns fixed continuations: tests scoring and stopping text."""

    def __init__(self, tokenizer, texts):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts[: len(input_ids)]]
        self.texts = self.texts[len(input_ids):]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_scoring_cuts_after_the_answer_line(tiny):
    _, tokenizer = tiny
    texts = ["3 + 4 = 7. #### 7\nQuestion: 99", "5 - 1 = 4. Tom has 4 pens and 12 cups", "#### 8"]
    examples = [SimpleNamespace(prompt="Q", reference=r) for r in ("7", "12", "9")]
    result = evaluate_accuracy(_Scripted(tokenizer, texts), tokenizer, examples, _cfg(2))
    assert [p["extracted"] for p in result.predictions] == ["7", "12", "8"]
    assert result.predictions[0]["generated"] == "3 + 4 = 7. #### 7"
    assert (result.correct, result.total) == (2, 3)
