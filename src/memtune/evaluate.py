"""Accuracy of a causal LM on question/answer examples: greedy generation, exact match.

Generation is batched with left padding and the KV cache, greedy
(`do_sample=False`), and stops a row at eos or at the end of the line that
holds its `#### <answer>`, so a model that has learned the format costs a few
tokens per example instead of `max_new_tokens`. The answer is the number after
`####` when there is one, else the last number of the generated text (or group
1 of a custom regex); both sides are normalized (`$`, commas, `7.0` == `7`)
before an exact match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

import torch

# A number as people write it: -3, 1,234, 0.5, 1,234.50. Not the tail of a word
# or of another number ("abc123", "5-3" gives 3, not -3).
NUMBER_PATTERN = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(NUMBER_PATTERN)
_MARKER = "####"
# A row is done once its "#### <answer>" line has ended.
_ANSWER_LINE_DONE = re.compile(r"####[^\n]*\S[^\n]*\n")


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[dict[str, Any]] = field(default_factory=list)


def extract_answer(text: str, regex: str = "") -> str | None:
    """The answer in generated text: regex group 1, else the number after `####`,
    else the last number; None when there is none."""
    if regex:
        match = re.search(regex, text)
        return match.group(1).strip() if match and match.group(1) is not None else None
    if _MARKER in text:
        match = _NUMBER.search(text.split(_MARKER, 1)[1])
        return match.group(0) if match else None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(text: str | None) -> str:
    """Canonical form for exact match: no `$`, commas, spaces or trailing `.`; `7.0` -> `7`."""
    if text is None:
        return ""
    value = str(text).strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        number = Decimal(value)
    except InvalidOperation:
        return value
    if not number.is_finite():
        return value
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def is_correct(extracted: str | None, reference: str) -> bool:
    return extracted is not None and normalize_answer(extracted) == normalize_answer(reference)


class _StopAfterAnswer:
    """Stopping criterion: per row, True once the generated text ends the `####` line."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [bool(_ANSWER_LINE_DONE.search(text)) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _field(example: Any, name: str) -> str:
    return example[name] if isinstance(example, dict) else getattr(example, name)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _cut(text: str) -> str:
    """The generated answer up to the end of its `####` line (what the stop criterion saw)."""
    match = _ANSWER_LINE_DONE.search(text)
    return text[: match.end() - 1] if match else text


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (left padded, KV cache), decoded without specials."""
    from transformers import StoppingCriteriaList

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(_model_device(model)) for k, v in enc.items()}
    prompt_len = enc["input_ids"].shape[1]
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        use_cache=True,  # training may have switched it off for gradient checkpointing
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_StopAfterAnswer(tokenizer, prompt_len)]),
        temperature=None, top_p=None, top_k=None,  # greedy: silence sampling defaults
    )
    return tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


def evaluate_accuracy(model, tokenizer, examples: Sequence[Any], cfg, progress: bool = True) -> EvalResult:
    """Exact-match accuracy of greedy answers to `examples` (each with prompt, reference)."""
    from tqdm.auto import tqdm

    if not examples:
        return EvalResult(accuracy=0.0, correct=0, total=0, predictions=[])
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    predictions = []
    try:
        batch_size = cfg.eval_batch_size
        starts = range(0, len(examples), batch_size)
        for start in tqdm(starts, desc="eval", unit="batch", leave=False, disable=not progress):
            batch = examples[start:start + batch_size]
            prompts = [_field(e, "prompt") for e in batch]
            texts = generate_batch(model, tokenizer, prompts, cfg.max_new_tokens)
            for example, prompt, text in zip(batch, prompts, texts):
                predictions.append(_prediction(prompt, _field(example, "reference"), _cut(text),
                                               cfg.answer_regex))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
        unpack_cpu_inference_weights(model)
        model.train(was_training)
    correct = sum(p["correct"] for p in predictions)
    return EvalResult(accuracy=correct / len(predictions), correct=correct,
                      total=len(predictions), predictions=predictions)


def unpack_cpu_inference_weights(model) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights; return how many.

    In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit
    weight into a layout that only its inference kernel reads, and never packs
    it back: a training step after an evaluation then fails inside that kernel
    ("a view of a leaf Variable ... in-place operation"). Evaluation is followed
    by training (accuracy before), so put the weights back as they were.
    """
    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse as inverse
    except ImportError:  # a bitsandbytes without CPU repacking has nothing to undo
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = inverse(weight.data, state)
            count += 1
    return count


def _prediction(prompt: str, reference: str, generated: str, regex: str) -> dict[str, Any]:
    extracted = extract_answer(generated, regex)
    return {"prompt": prompt, "reference": reference, "generated": generated,
            "extracted": extracted, "correct": is_correct(extracted, reference)}
