"""GSM8K-style arithmetic word problems, generated deterministically.

Each problem is one of a few templates (one or two operations on small
numbers) filled with a name, an item and numbers. The answer is short
reasoning that ends in `#### <number>`, as in GSM8K, for example

    question: "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"
    answer:   "Tom has 3 + 4 = 7 apples. #### 7"

Train and test never share a problem: the split of a problem is a hash of its
arithmetic core (the expressions it computes, e.g. "3 * 4; 12 + 2"), so the
test split does not even hold a train computation with other words, names or
items. Problems are small on purpose: the
built-in `tiny` model has well under a million parameters.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Literal

from memtune.errors import UserError

Split = Literal["train", "test"]
SPLITS = ("train", "test")

# One problem in TEST_BUCKETS of HASH_BUCKETS goes to the test split.
HASH_BUCKETS = 10
TEST_BUCKETS = 2

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe",
         "Max", "Ella", "Noah", "Ava", "Liam", "Ivy")
ITEMS = ("apple", "pear", "book", "pen", "card", "ball", "cookie", "shell",
         "stamp", "coin", "toy", "egg", "flower", "marble", "sticker", "cup")


@dataclass(frozen=True)
class Template:
    """A problem shape: how to draw its numbers and how to phrase it."""

    key: str
    draw: Callable[[random.Random], tuple[int, ...]]
    # str.format fields: name, a, b, c, items (plural) and item_a, item_b,
    # item_c, item_r (the noun agreeing with a, b, c and the result r)
    question: str
    steps: Callable[[tuple[int, ...]], list[tuple[str, int]]]  # [(expression, value)]
    summary: str  # the last sentence of the reasoning; fields as question + r


# Number ranges: every intermediate and result stays below 50, small enough
# for a model of under a million parameters to know all the facts involved.
def _add(rng):
    return rng.randint(1, 15), rng.randint(1, 15)


def _sub(rng):
    a = rng.randint(2, 25)
    return a, rng.randint(1, a - 1)


def _mul(rng):
    return rng.randint(2, 6), rng.randint(2, 6)


def _mul_add(rng):
    return rng.randint(2, 6), rng.randint(2, 6), rng.randint(1, 12)


def _add_sub(rng):
    a, b = rng.randint(1, 15), rng.randint(1, 15)
    return a, b, rng.randint(1, a + b - 1)


TEMPLATES = (
    Template("add", _add,
             "{name} has {a} {item_a} and buys {b} more. How many {items} does {name} have now?",
             lambda n: [(f"{n[0]} + {n[1]}", n[0] + n[1])],
             "{name} has {r} {item_r}."),
    Template("add_gift", _add,
             "{name} has {a} {item_a}. A friend gives {name} {b} more. How many {items} does {name} have?",
             lambda n: [(f"{n[0]} + {n[1]}", n[0] + n[1])],
             "{name} has {r} {item_r}."),
    Template("sub", _sub,
             "{name} has {a} {item_a} and gives away {b}. How many {items} does {name} have left?",
             lambda n: [(f"{n[0]} - {n[1]}", n[0] - n[1])],
             "{name} has {r} {item_r} left."),
    Template("sub_lose", _sub,
             "{name} had {a} {item_a} and lost {b} of them. How many {items} are left?",
             lambda n: [(f"{n[0]} - {n[1]}", n[0] - n[1])],
             "{name} has {r} {item_r} left."),
    Template("mul", _mul,
             "{name} has {a} boxes with {b} {item_b} in each box. How many {items} does {name} have?",
             lambda n: [(f"{n[0]} * {n[1]}", n[0] * n[1])],
             "{name} has {r} {item_r}."),
    Template("mul_add", _mul_add,
             "{name} has {a} boxes with {b} {item_b} in each box and {c} more {item_c}. "
             "How many {items} does {name} have?",
             lambda n: [(f"{n[0]} * {n[1]}", n[0] * n[1]), (f"{n[0] * n[1]} + {n[2]}", n[0] * n[1] + n[2])],
             "{name} has {r} {item_r}."),
    Template("add_sub", _add_sub,
             "{name} has {a} {item_a}, buys {b} more and gives away {c}. How many {items} does {name} have left?",
             lambda n: [(f"{n[0]} + {n[1]}", n[0] + n[1]), (f"{n[0] + n[1]} - {n[2]}", n[0] + n[1] - n[2])],
             "{name} has {r} {item_r} left."),
)


def arithmetic_core(template: Template, numbers: tuple[int, ...]) -> str:
    """What a problem computes, whatever its wording: "3 + 4", "3 * 4; 12 + 2"."""
    return "; ".join(expr for expr, _ in template.steps(numbers))


def split_of(template: Template, numbers: tuple[int, ...]) -> Split:
    """The split a problem belongs to: a stable hash of its arithmetic core, so
    two wordings of the same computation always land in the same split."""
    core = arithmetic_core(template, numbers)
    bucket = int.from_bytes(hashlib.sha256(core.encode()).digest()[:8], "big") % HASH_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def _noun(item: str, count: int) -> str:
    return item if count == 1 else item + "s"


def render(template: Template, numbers: tuple[int, ...], name: str, item: str) -> dict:
    """One record: the question and its reasoning, ending in `#### <result>`."""
    steps = template.steps(numbers)
    result = steps[-1][1]
    fields = dict(zip("abc", numbers), name=name, items=item + "s")
    fields.update({f"item_{k}": _noun(item, v) for k, v in zip("abc", numbers)}, item_r=_noun(item, result))
    reasoning = " ".join(f"{expr} = {value}." for expr, value in steps)
    summary = template.summary.format(**fields, r=result)
    return {"question": template.question.format(**fields),
            "answer": f"{reasoning} {summary} #### {result}"}


def _draw(rng: random.Random) -> tuple[Template, tuple[int, ...], str, str]:
    template = rng.choice(TEMPLATES)
    return template, template.draw(rng), rng.choice(NAMES), rng.choice(ITEMS)


def generate(split: Split, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems of `split`; the same (split, n, seed) gives the same list.

    A larger `n` with the same seed extends the smaller list (a prefix), so a
    run that asks for more examples keeps the ones it had.
    """
    if split not in SPLITS:
        raise UserError(f"split: expected one of {', '.join(SPLITS)}; got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise UserError(f"n: expected an integer >= 0; got {n!r}")
    rng = random.Random(f"memtune-arith:{split}:{seed}")  # str seeds are stable across runs
    records, seen = [], set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:  # the space holds tens of thousands of problems
            raise UserError(f"n: cannot draw {n} distinct {split} problems; ask for fewer")
        template, numbers, name, item = _draw(rng)
        if split_of(template, numbers) != split:
            continue
        record = render(template, numbers, name, item)
        if record["question"] in seen:
            continue
        seen.add(record["question"])
        records.append(record)
    return records


def final_answer(record: dict) -> str:
    """The gold number of a record: the text after its last `####`."""
    return record["answer"].rsplit("####", 1)[-1].strip()
