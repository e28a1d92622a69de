"""The built-in arithmetic task: format, determinism, disjoint splits."""

import re

import pytest

from memtune.errors import UserError
from memtune.tasks import arith


def test_records_are_gsm8k_style():
    for record in arith.generate("train", 50) + arith.generate("test", 50):
        assert set(record) == {"question", "answer"}
        assert record["question"].endswith("?")
        assert re.search(r"#### -?\d+$", record["answer"])


def test_answers_are_correct_arithmetic():
    for record in arith.generate("test", 300):
        for expr, value in re.findall(r"(\d+ [-+*] \d+) = (\d+)", record["answer"]):
            assert eval(expr) == int(value)  # noqa: S307 - our own digits and operators
        last_value = re.findall(r"= (\d+)", record["answer"])[-1]
        assert arith.final_answer(record) == last_value


def test_deterministic_and_prefix_stable():
    assert arith.generate("train", 100, seed=3) == arith.generate("train", 100, seed=3)
    assert arith.generate("test", 40, seed=1) == arith.generate("test", 80, seed=1)[:40]
    assert arith.generate("test", 40, seed=1) != arith.generate("test", 40, seed=2)


def test_splits_never_share_a_problem():
    train = arith.generate("train", 3000)
    test = arith.generate("test", 1000)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    # Not even the arithmetic: the expressions the reasoning computes.
    core = lambda r: tuple(re.findall(r"\d+ [-+*] \d+", r["answer"]))  # noqa: E731
    assert not {core(r) for r in train} & {core(r) for r in test}


def test_no_duplicates_within_a_split():
    test = arith.generate("test", 500)
    assert len({r["question"] for r in test}) == 500


def test_mix_of_one_and_two_step_problems():
    test = arith.generate("test", 400)
    steps = [r["answer"].count(" = ") for r in test]
    assert set(steps) == {1, 2}
    assert all(0 <= int(arith.final_answer(r)) <= 200 for r in test)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="split"):
        arith.generate("validation", 3)
    with pytest.raises(UserError, match="n:"):
        arith.generate("train", -1)
    assert arith.generate("train", 0) == []
