"""Training and evaluation data: read records, render them, tokenize, mask, batch.

`load_data(cfg, tokenizer, max_positions)` turns `cfg.data` into a `DataBundle`:
token-level training examples whose labels are -100 wherever no loss is taken
(the prompt, unless `cfg.train_on_prompt`), held-out evaluation prompts with
their gold final answer, the effective sequence length and human-readable
notes about everything that was capped, truncated, dropped or skipped.
`iterate_batches(bundle, cfg, seed)` is the endless, seeded batch stream.

Sources: "builtin" (the shipped arithmetic task), "random" (random token ids
for memory/speed measurement), a JSONL / JSON / CSV / Parquet file, a local
dataset directory or a `datasets` name already in the local cache.

Record formats (auto-detected from the fields; `cfg.data_format` overrides):
    text               {"text"}                          loss on everything
    prompt_completion  {"prompt", "completion"}          loss on the completion
    gsm8k              {"question", "answer"}            answer = reasoning + "#### N"
    alpaca             {"instruction", "input"?, "output"}
    messages           {"messages": [{"role", "content"}, ...]}  loss on assistant turns
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from memtune.errors import UserError

IGNORE_INDEX = -100
DEFAULT_BUILTIN_TRAIN = 2000
# Random data has no natural size. Rows beyond one batch change neither memory nor
# speed, and at 100k+ tokens each row costs host memory, so keep only a few.
MIN_RANDOM_EXAMPLES = 8
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# A user file gets a held-out eval split of at most this fraction of its records,
# so a small file is never mostly eval.
MAX_EVAL_FRACTION = 0.2

GSM8K_PROMPT = "Question: {question}\nAnswer: "
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# Fields that identify each format, in detection priority order.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


# --------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    # Only for packed sequences: positions restart at 0 for each packed example,
    # which is how transformers detects packing and blocks cross-example attention.
    position_ids: list[int] | None = None


@dataclass
class EvalExample:
    prompt: str
    reference: str  # the gold final answer


@dataclass
class DataBundle:
    train: list[TrainExample]
    eval: list[EvalExample]
    seq_len: int
    notes: list[str]
    pad_token_id: int = 0  # what iterate_batches pads input_ids with
    packed: bool = False
    # Held-out examples for the validation loss (val_split or val_data), masked as training is.
    val: list[TrainExample] = field(default_factory=list)


@dataclass
class _Record:
    """One raw record and where it came from, for file:line error messages."""

    where: str
    fields: dict[str, Any]


@dataclass
class _Rendered:
    """A record split into (text, trainable) segments, plus its eval view."""

    segments: list[tuple[str, bool]]
    eval_prompt: str | None = None
    reference: str | None = None
    # A chat template writes its own special tokens: no BOS prefix, no EOS suffix added.
    templated: bool = False


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def load_data(cfg, tokenizer, max_positions: int | None) -> DataBundle:
    """Build the training and evaluation data that `cfg.data` names."""
    limit = _length_limit(cfg.seq_len, max_positions)
    if cfg.data == "random":
        return _random_bundle(cfg, tokenizer, limit, max_positions)
    notes: list[str] = []
    train_records, eval_records, skipped, source_notes = _read_source(cfg)
    notes += source_notes
    _require_records(cfg, train_records, skipped)
    fmt = _resolve_format(cfg, train_records)
    if fmt == "messages":
        _require_chat_template(tokenizer)
    train_rendered, bad_train = _render_all(train_records, fmt, cfg.skip_bad_lines, tokenizer)
    eval_rendered, bad_eval = _render_all(eval_records, fmt, cfg.skip_bad_lines, tokenizer)
    skipped += bad_train + bad_eval
    _require_records(cfg, train_rendered, skipped)
    if skipped:
        notes.append(f"skipped {len(skipped)} bad record(s) (skip_bad_lines); first: {skipped[0]}")
    notes.append(f"data: {_describe_source(cfg)}, format {fmt}, {len(train_rendered) + len(eval_rendered)} records")
    train_rendered, evals = _split_eval(cfg, fmt, train_rendered, eval_rendered, notes)
    if cfg.train_examples and len(train_rendered) > cfg.train_examples:
        notes.append(f"train_examples: using the first {cfg.train_examples} of {len(train_rendered)} training records")
        train_rendered = train_rendered[: cfg.train_examples]
    examples = tokenize_rendered(train_rendered, tokenizer, cfg.train_on_prompt)
    examples = _drop_untrainable(examples, notes, "had no trainable tokens")
    seq_len = _effective_seq_len(cfg, examples, limit, max_positions, notes)
    examples = _apply_long_policy(examples, seq_len, cfg.long_examples, notes)
    if not examples:
        why = [n for n in notes if n.startswith(("skipped", "dropped", "long_examples"))]
        raise UserError(f"data: no training examples left in {cfg.data} after filtering: {'; '.join(why)}")
    examples, val = _split_val(cfg, examples, notes)
    if cfg.val_data:
        val = _read_val_file(cfg, fmt, tokenizer, seq_len, notes)
    if cfg.packing:
        examples = pack_examples(examples, seq_len, cfg.seed, notes)
    return DataBundle(train=examples, eval=evals, seq_len=seq_len, notes=notes,
                      pad_token_id=_pad_id(tokenizer), packed=cfg.packing, val=val)


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def _read_source(cfg) -> tuple[list[_Record], list[_Record], list[str], list[str]]:
    """Raw records for training and (when the source has its own) evaluation, the
    unreadable lines skipped on the way (skip_bad_lines) and notes about the source."""
    if cfg.data == "builtin":
        return _builtin_records(cfg)
    path = Path(cfg.data).expanduser()
    if path.is_file():
        records, skipped = _read_file(path, cfg.skip_bad_lines)
        return records, [], skipped, []
    if path.is_dir():
        return _read_dataset_dir(path)
    if path.suffix.lower() in FILE_SUFFIXES or ("/" in cfg.data and not _looks_like_hub_id(cfg.data)):
        raise UserError(f"data: file not found: {path}")
    return _read_cached_dataset(cfg.data)


def _builtin_records(cfg) -> tuple[list[_Record], list[_Record], list[str], list[str]]:
    """The shipped arithmetic task: its train split to train on, its test split to evaluate."""
    from memtune.tasks import arith

    n_train = cfg.train_examples or DEFAULT_BUILTIN_TRAIN
    train = [_Record(f"builtin train #{i}", r) for i, r in enumerate(arith.generate("train", n_train, cfg.seed))]
    n_eval = cfg.eval_examples if cfg.eval else 0
    test_rows = arith.generate("test", n_eval, cfg.seed) if n_eval else []
    test = [_Record(f"builtin test #{i}", r) for i, r in enumerate(test_rows)]
    return train, test, [], []


def _looks_like_hub_id(name: str) -> bool:
    """'owner/name' with no path-only characters: may be a cached `datasets` name."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name


def _read_file(path: Path, skip_bad: bool) -> tuple[list[_Record], list[str]]:
    """Records of one file, and the lines skipped as unreadable (skip_bad_lines)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, skip_bad)
    if suffix == ".json":
        return _read_json(path, skip_bad)
    if suffix == ".csv":
        return _read_csv(path), []
    if suffix == ".parquet":
        return _read_parquet(path), []
    raise UserError(f"data: {path}: unsupported file type '{suffix or path.name}'; "
                    f"expected one of {', '.join(FILE_SUFFIXES)}")


def _read_jsonl(path: Path, skip_bad: bool) -> tuple[list[_Record], list[str]]:
    """One JSON object per line, parsed line by line so every error has its line number."""
    records, skipped = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                record = _parse_json_line(raw, f"{path}:{number}")
            except UserError as exc:
                if not skip_bad:
                    raise
                skipped.append(str(exc))
                continue
            if record is not None:
                records.append(_Record(f"{path}:{number}", record))
    return records, skipped


def _parse_json_line(raw: bytes, where: str) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: expected UTF-8 text; found byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1}") from None
    if not text.strip():
        return None  # blank lines are allowed
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: expected one JSON object per line; {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object {{...}}; got {type(value).__name__}")
    return value


def _read_json(path: Path, skip_bad: bool) -> tuple[list[_Record], list[str]]:
    """A JSON array of objects (or {"data": [...]}); each record is named by its line."""
    text = _decode_utf8(path.read_bytes(), path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level objects: it is JSON Lines named .json
            return _read_jsonl(path, skip_bad)
        raise UserError(f"{path}:{exc.lineno}: expected valid JSON; {exc.msg} at column {exc.colno}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
        return [_Record(f"{path}: data record {i}", item) for i, item in enumerate(value, start=1)
                if _is_object(item, f"{path}: data record {i}")], []
    if isinstance(value, dict):
        return [_Record(f"{path}:1", value)], []
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a JSON array of record objects; got {type(value).__name__}")
    records = []
    for line, item in zip(_array_item_lines(text), value):
        if _is_object(item, f"{path}:{line}"):
            records.append(_Record(f"{path}:{line}", item))
    return records, []


def _is_object(item: Any, where: str) -> bool:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object {{...}}; got {type(item).__name__}")
    return True


def _array_item_lines(text: str) -> Iterator[int]:
    """The line each item of a top-level JSON array starts on (the text is known to be valid)."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    line = 1 + text.count("\n", 0, index)
    while True:
        while text[index] in " \t\r\n,":
            line += text[index] == "\n"
            index += 1
        if text[index] == "]":
            return
        yield line
        _, end = decoder.raw_decode(text, index)
        line += text.count("\n", index, end)
        index = end


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: expected UTF-8 text; found byte 0x{raw[exc.start]:02x}") from None


def _read_csv(path: Path) -> list[_Record]:
    """CSV with a header row; a record is named by the line it starts on."""
    handle = io.StringIO(_decode_utf8(path.read_bytes(), path), newline="")
    reader = csv.DictReader(handle)
    records, start = [], 2
    try:
        for row in reader:
            records.append(_Record(f"{path}:{start}", {k: v for k, v in row.items() if k is not None}))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: expected valid CSV; {exc}") from None
    return records


def _read_parquet(path: Path) -> list[_Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: expected a Parquet file; {_one_line(exc)}") from None
    return [_Record(f"{path}: row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_dataset_dir(path: Path) -> tuple[list[_Record], list[_Record], list[str], list[str]]:
    """A `save_to_disk` directory, or a folder of data files `load_dataset` understands."""
    import datasets

    try:
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path), download_config=_local_files_only())
    except Exception as exc:
        raise UserError(f"data: {path}: expected a dataset directory (save_to_disk) or a folder of "
                        f"JSONL/JSON/CSV/Parquet files; {_one_line(exc)}") from None
    return _split_records(loaded, str(path))


def _read_cached_dataset(name: str) -> tuple[list[_Record], list[_Record], list[str], list[str]]:
    """A `datasets` name, only if it is already in the local hub cache: no network is used.

    The cached snapshot is found by huggingface_hub with local_files_only (which never asks the hub),
    then loaded as a local folder; the process's environment and `datasets.config` are left alone."""
    import datasets
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(name, repo_type="dataset", local_files_only=True)
        loaded = datasets.load_dataset(local, download_config=_local_files_only())
    except Exception as exc:
        raise UserError(f"data: '{name}' is not a file or directory, and not a dataset in the local cache "
                        f"(no network is used); {_one_line(exc)}") from None
    return _split_records(loaded, name)


def _local_files_only():
    """What keeps a `datasets` call off the network: its own setting, for this call only (the
    process's environment and `datasets.config` stay as the caller has them)."""
    import datasets

    return datasets.DownloadConfig(local_files_only=True)


def _split_records(loaded, name: str) -> tuple[list[_Record], list[_Record], list[str], list[str]]:
    """Train split to train on; a test/validation split, when there is one, to evaluate."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return _dataset_records(loaded, name, "train"), [], [], []
    splits = list(loaded.keys())
    train_name = "train" if "train" in loaded else splits[0]
    eval_name = next((s for s in ("test", "validation") if s in loaded and s != train_name), None)
    train = _dataset_records(loaded[train_name], name, train_name)
    evals = _dataset_records(loaded[eval_name], name, eval_name) if eval_name else []
    evaluating = f", evaluating on '{eval_name}'" if eval_name else ""
    notes = [f"data: {name}: training on split '{train_name}'{evaluating}"]
    return train, evals, [], notes


def _dataset_records(ds, name: str, split: str) -> list[_Record]:
    return [_Record(f"{name}[{split}] row {i}", row) for i, row in enumerate(ds, start=1)]


def _describe_source(cfg) -> str:
    return "built-in arithmetic task" if cfg.data == "builtin" else cfg.data


# --------------------------------------------------------------------------
# Formats: detection and rendering to (text, trainable) segments
# --------------------------------------------------------------------------


def _require_records(cfg, records: list, skipped: list[str]) -> None:
    """An empty data set is an error, never a run that trains on nothing."""
    if records:
        return
    if skipped:
        raise UserError(f"data: {cfg.data}: no usable records; all {len(skipped)} were bad and skipped "
                        f"(skip_bad_lines); first: {skipped[0]}")
    raise UserError(f"data: {cfg.data}: no records found (the data set is empty)")


def _resolve_format(cfg, records: list[_Record]) -> str:
    if cfg.data_format != "auto":
        return cfg.data_format
    return detect_format(records[0].fields, records[0].where)


def detect_format(record: dict, where: str = "data") -> str:
    """The format whose identifying fields the record has."""
    for fmt, names in FORMAT_FIELDS.items():
        if all(name in record for name in names):
            return fmt
    expected = "; ".join(f"{fmt}: {' + '.join(names)}" for fmt, names in FORMAT_FIELDS.items())
    raise UserError(f"{where}: cannot tell the data format from fields {sorted(record)}; expected one of "
                    f"{expected} (or set data_format)")


def _render_all(records: list[_Record], fmt: str, skip_bad: bool,
                tokenizer) -> tuple[list[_Rendered], list[str]]:
    """Render every record; collect (or raise) the problems, each as 'where: what'."""
    rendered, skipped = [], []
    for record in records:
        try:
            rendered.append(render_record(record.fields, fmt, record.where, tokenizer))
        except UserError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    return rendered, skipped


def render_record(record: dict, fmt: str, where: str, tokenizer=None) -> _Rendered:
    """One record -> its segments, eval prompt and reference. Raises UserError naming `where`.
    The tokenizer is needed only for chats (its chat template)."""
    if fmt == "text":
        return _Rendered([(_text_field(record, "text", where, fmt), True)])
    if fmt == "prompt_completion":
        prompt = _text_field(record, "prompt", where, fmt, allow_empty=True)
        completion = _text_field(record, "completion", where, fmt)
        return _Rendered([(prompt, False), (completion, True)], prompt, final_answer(completion))
    if fmt == "gsm8k":
        question = _text_field(record, "question", where, fmt)
        answer = _text_field(record, "answer", where, fmt)
        prompt = GSM8K_PROMPT.format(question=question)
        return _Rendered([(prompt, False), (answer, True)], prompt, final_answer(answer))
    if fmt == "alpaca":
        instruction = _text_field(record, "instruction", where, fmt)
        output = _text_field(record, "output", where, fmt)
        extra = _text_field(record, "input", where, fmt, allow_empty=True, required=False)
        template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=extra)
        return _Rendered([(prompt, False), (output, True)], prompt, final_answer(output))
    if fmt == "messages":
        messages = _check_messages(record, where)
        return _Rendered(chat_segments(messages, tokenizer, where), templated=True)
    raise UserError(f"data_format: unknown format {fmt!r}")


def _text_field(record: dict, name: str, where: str, fmt: str, allow_empty: bool = False,
                required: bool = True) -> str:
    if name not in record or record[name] is None:
        if not required:
            return ""
        raise UserError(f"{where}: expected field '{name}' ({fmt} format); found {sorted(record)}")
    value = record[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # CSV/Parquet numbers, e.g. an answer column of ints
    if not isinstance(value, str):
        raise UserError(f"{where}: expected field '{name}' to be a string; got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: expected a non-empty '{name}' ({fmt} format)")
    return value


def _check_messages(record: dict, where: str) -> list[dict]:
    """Validate a chat list before the template sees it, so errors name the record."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected 'messages' to be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: message {i}: expected an object with 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise UserError(f"{where}: message {i}: unknown role {message['role']!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            raise UserError(f"{where}: message {i}: expected 'content' to be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise UserError(f"{where}: message {i}: expected a non-empty assistant message")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: expected at least one assistant message to train on")
    return messages


def final_answer(text: str) -> str | None:
    """The gold answer of a completion: after '####', or the completion itself if it is one number."""
    if "####" in text:
        answer = text.rsplit("####", 1)[1].strip()
        return answer or None
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        return stripped
    return None


# --------------------------------------------------------------------------
# Eval split
# --------------------------------------------------------------------------


def _split_eval(cfg, fmt: str, train: list[_Rendered], given_eval: list[_Rendered],
                notes: list[str]) -> tuple[list[_Rendered], list[EvalExample]]:
    """Use the source's own eval split, else hold out a seeded slice when answers are checkable."""
    n_eval = cfg.eval_examples if cfg.eval else 0
    if given_eval:
        usable = [r for r in given_eval if r.reference is not None][:n_eval]
        return train, [EvalExample(r.eval_prompt, r.reference) for r in usable]
    if n_eval == 0 or not train or any(r.reference is None for r in train):
        if n_eval and train and cfg.data != "builtin":
            notes.append(f"eval: none; {fmt} records have no checkable final answer "
                         f"(needs gsm8k '#### N' answers or numeric completions)")
        return train, []
    n_eval = min(n_eval, int(len(train) * MAX_EVAL_FRACTION))
    if n_eval == 0:
        notes.append(f"eval: none; {len(train)} records are too few to hold any out")
        return train, []
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n_eval])
    notes.append(f"eval: held out {n_eval} of {len(train)} records (seed {cfg.seed}); training on the rest")
    evals = [EvalExample(train[i].eval_prompt, train[i].reference) for i in sorted(held)]
    return [r for i, r in enumerate(train) if i not in held], evals


# --------------------------------------------------------------------------
# Validation set (a loss, not an accuracy: any format has one)
# --------------------------------------------------------------------------


def _split_val(cfg, examples: list[TrainExample], notes: list[str]) -> tuple[list[TrainExample], list[TrainExample]]:
    """Hold out a seeded val_split fraction of the training examples (before packing)."""
    if not cfg.val_split:
        return examples, []
    n_val = max(1, round(cfg.val_split * len(examples)))
    if n_val >= len(examples):
        raise UserError(f"val_split: {cfg.val_split} of {len(examples)} training examples leaves none to train on; "
                        f"expected a smaller fraction or more data")
    order = list(range(len(examples)))
    # its own stream: the eval split and the batch order keep theirs
    random.Random(f"val-{cfg.seed}").shuffle(order)
    held = set(order[:n_val])
    notes.append(f"val: held out {n_val} of {len(examples)} training examples (val_split {cfg.val_split}) "
                 f"for the validation loss")
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _read_val_file(cfg, fmt: str, tokenizer, seq_len: int, notes: list[str]) -> list[TrainExample]:
    """val_data: a file in the training data's format, tokenized, masked and cut as training is."""
    path = Path(cfg.val_data).expanduser()
    if path.is_dir():
        records = _read_dataset_dir(path)[0]
    elif path.is_file():
        records, _ = _read_file(path, cfg.skip_bad_lines)
    else:
        raise UserError(f"val_data: file not found: {path}")
    rendered, _ = _render_all(records, fmt, cfg.skip_bad_lines, tokenizer)
    examples = tokenize_rendered(rendered, tokenizer, cfg.train_on_prompt)
    examples = _drop_untrainable(examples, notes, "(val_data) had no trainable tokens")
    examples = _apply_long_policy(examples, seq_len, cfg.long_examples, notes)
    if not examples:
        raise UserError(f"val_data: {path}: no examples with trainable tokens (format {fmt})")
    notes.append(f"val: {len(examples)} examples from {path} for the validation loss")
    return examples


# --------------------------------------------------------------------------
# Tokenization and masking
# --------------------------------------------------------------------------


def tokenize_rendered(rendered: list[_Rendered], tokenizer, train_on_prompt: bool) -> list[TrainExample]:
    """Segments -> ids and labels. Each segment is tokenized alone, so the prompt's tokens
    are exactly those the model sees at generation time and the mask boundary is exact.
    All segments go to the tokenizer in one batched call: fast tokenizers parallelise it."""
    texts = [text for r in rendered for text, _ in r.segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix = _special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for record in rendered:
        head, tail = ([], []) if record.templated else (prefix, eos)
        input_ids, labels = list(head), [IGNORE_INDEX] * len(head)
        for _, trainable in record.segments:
            ids = next(encoded)
            input_ids += ids
            labels += ids if (trainable or train_on_prompt) else [IGNORE_INDEX] * len(ids)
        # EOS ends the completion and is trained on, so the model learns to stop.
        examples.append(TrainExample(input_ids + tail, labels + tail))
    return examples


def _special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (BOS for Llama-style models, none for Qwen)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data: the messages format needs a tokenizer with a chat template; this one has none "
                        "(use data_format prompt_completion, or a model whose tokenizer has one)")


def chat_segments(messages: list[dict], tokenizer, where: str = "data") -> list[tuple[str, bool]]:
    """Render a chat with the tokenizer's template; the assistant turns are the trainable spans.

    Each assistant turn spans from the end of the conversation-so-far rendered with the
    generation prompt to the end of the conversation including that turn, so the turn's
    end-of-turn token is trained (the model learns to stop) and the role header is not.
    """
    _require_chat_template(tokenizer)
    full = _render_chat(tokenizer, messages, False, where)
    segments, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, messages[:i], True, where)
        upto = _render_chat(tokenizer, messages[: i + 1], False, where)
        start, end = len(before), len(upto)
        if start < done or not upto.startswith(before) or not full.startswith(upto):
            raise UserError(f"{where}: the tokenizer's chat template rewrites earlier turns, so assistant "
                            f"turns cannot be located for masking; use data_format prompt_completion instead")
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return [(text, trainable) for text, trainable in segments if text]


def _render_chat(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 TemplateError, or raise_exception() inside the template
        raise UserError(f"{where}: the tokenizer's chat template rejected this conversation: "
                        f"{_one_line(exc)}") from None


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


# --------------------------------------------------------------------------
# Lengths: effective seq_len, truncate / drop
# --------------------------------------------------------------------------


def _length_limit(seq_len: int, max_positions: int | None) -> int:
    return min(seq_len, max_positions) if max_positions else seq_len


def _effective_seq_len(cfg, examples: list[TrainExample], limit: int, max_positions: int | None,
                       notes: list[str]) -> int:
    """min(seq_len, model positions), and without packing also the longest example: no
    point padding every batch to a length no example reaches."""
    caps = [(cfg.seq_len, "")]
    if max_positions and cfg.seq_len > max_positions:
        caps.append((max_positions, "the model's max_position_embeddings"))
    if not cfg.packing and examples:
        caps.append((max(len(e.input_ids) for e in examples), "the longest example; packing is off"))
    seq_len, why = min(caps, key=lambda cap: cap[0])
    if seq_len < cfg.seq_len:
        notes.append(f"seq_len: capped from {cfg.seq_len} to {seq_len} ({why})")
    return seq_len


def _apply_long_policy(examples: list[TrainExample], seq_len: int, policy: str,
                       notes: list[str]) -> list[TrainExample]:
    long = [e for e in examples if len(e.input_ids) > seq_len]
    if not long:
        return examples
    if policy == "drop":
        notes.append(f"long_examples: dropped {len(long)} of {len(examples)} examples longer than {seq_len} tokens")
        return [e for e in examples if len(e.input_ids) <= seq_len]
    notes.append(f"long_examples: truncated {len(long)} of {len(examples)} examples to {seq_len} tokens")
    cut = [TrainExample(e.input_ids[:seq_len], e.labels[:seq_len]) if len(e.input_ids) > seq_len else e
           for e in examples]
    return _drop_untrainable(cut, notes, f"had no trainable tokens left within {seq_len} tokens (the prompt fills it)")


def _drop_untrainable(examples: list[TrainExample], notes: list[str], why: str) -> list[TrainExample]:
    # labels[0] never counts: the loss predicts token t from the tokens before it.
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels[1:])]
    if len(kept) < len(examples):
        notes.append(f"dropped {len(examples) - len(kept)} example(s) that {why}")
    return kept


# --------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------


def pack_examples(examples: list[TrainExample], seq_len: int, seed: int,
                  notes: list[str] | None = None) -> list[TrainExample]:
    """Concatenate shuffled examples into sequences of at most seq_len tokens.

    position_ids restart at 0 for each example: transformers (find_packed_sequence_indices)
    turns that into a block-diagonal causal mask, so no example attends to another. It
    does so only when the model gets no attention_mask and no cache: call it with
    use_cache=False, or a DynamicCache is created and the examples do see each other.

    The first token of each example gets label -100: the model's label shift would
    otherwise train it to predict that token from the previous example's last token.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packs: list[TrainExample] = []
    current = TrainExample([], [], [])
    for index in order:
        example = examples[index]
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > seq_len:
            packs.append(current)
            current = TrainExample([], [], [])
        current.input_ids += example.input_ids
        current.labels += [IGNORE_INDEX] + example.labels[1:]
        current.position_ids += list(range(len(example.input_ids)))
    if current.input_ids:
        packs.append(current)
    if notes is not None:
        filled = sum(len(p.input_ids) for p in packs) / (len(packs) * seq_len)
        notes.append(f"packing: {len(examples)} examples into {len(packs)} sequences of {seq_len} tokens "
                     f"({filled:.0%} filled)")
    return packs


# --------------------------------------------------------------------------
# Random data
# --------------------------------------------------------------------------


def _random_bundle(cfg, tokenizer, limit: int, max_positions: int | None) -> DataBundle:
    """Seeded random token ids of exactly seq_len tokens: memory and speed do not depend on the text."""
    import torch

    notes: list[str] = []
    _effective_seq_len(cfg, [], limit, max_positions, notes)
    vocab = len(tokenizer) if tokenizer is not None else 32000
    count = cfg.train_examples or max(MIN_RANDOM_EXAMPLES, cfg.batch_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (count, limit), generator=generator).tolist()
    examples = [TrainExample(row, list(row)) for row in ids]
    if cfg.packing:  # one sequence per row; positions keep the keys the same as real packed data
        for example in examples:
            example.position_ids = list(range(limit))
    notes.append(f"data: random token ids, {count} sequences of {limit} tokens (seed {cfg.seed}); no eval set")
    pad = _pad_id(tokenizer) if tokenizer is not None else 0
    return DataBundle(train=examples, eval=[], seq_len=limit, notes=notes, pad_token_id=pad, packed=cfg.packing)


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def iterate_batches(bundle: DataBundle, cfg, seed: int, start: int = 0) -> "BatchStream":
    """Endless stream of batches: each epoch is a fresh seeded shuffle; every batch is full.

    Non-packed batches are right-padded to the batch's longest example (causal attention
    never looks right, so no attention_mask is needed and none is given, which also
    keeps transformers' packed-sequence detection working). Packed and random batches
    are padded to bundle.seq_len so every step has the same shape. `start`: the number
    of batches to skip, so a resumed run sees exactly the batches it would have seen.
    """
    if not bundle.train:
        raise UserError("data: no training examples to iterate over")
    if cfg.batch_size < 1:
        # batch_size 0 (auto) is resolved by the trainer once the data's length is known.
        raise ValueError(f"iterate_batches needs a resolved batch_size >= 1; got {cfg.batch_size}")
    return BatchStream(bundle, cfg, seed, start)


class BatchStream:
    """The batch iterator of `iterate_batches`, which can start at any batch and say where one is.

    A batch may span two epochs (every batch is full): example k of the stream is
    index k % n of epoch k // n's shuffled order. Each epoch's order comes from one
    random.Random(seed) shuffling a fresh list per epoch, so starting at epoch e
    replays e shuffles (cheap) and reproduces the uninterrupted stream exactly.
    """

    def __init__(self, bundle: DataBundle, cfg, seed: int, start: int = 0):
        self.bundle, self.seed, self.batch_size = bundle, seed, cfg.batch_size
        self.packed = bundle.packed or cfg.packing
        self.fixed = bundle.seq_len if (self.packed or cfg.data == "random") else None
        self._rng = random.Random(seed)
        self.taken = start  # batches handed out so far, the skipped ones included
        epoch, self._index = divmod(start * self.batch_size, len(bundle.train))
        for _ in range(epoch + 1):
            self._order = self._next_order()

    def _next_order(self) -> list[int]:
        order = list(range(len(self.bundle.train)))
        self._rng.shuffle(order)
        return order

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict:
        indices = []
        while len(indices) < self.batch_size:
            if self._index == len(self._order):
                self._order, self._index = self._next_order(), 0
            indices.append(self._order[self._index])
            self._index += 1
        self.taken += 1
        return collate([self.bundle.train[i] for i in indices], self.bundle.pad_token_id, self.fixed, self.packed)

    def position(self, batches: int) -> dict[str, int]:
        """Where the stream stands after `batches` batches: what a checkpoint records."""
        epoch, index = divmod(batches * self.batch_size, len(self.bundle.train))
        return {"seed": self.seed, "epoch": epoch, "index": index, "batches": batches}


def collate(examples: list[TrainExample], pad_id: int, length: int | None, with_positions: bool) -> dict:
    """Right-pad to `length` (or the longest example); labels -100 on padding."""
    import torch

    width = length or max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        own = example.position_ids if example.position_ids is not None else range(n)
        positions[row, :n] = torch.tensor(list(own), dtype=torch.long)
        # The padding is its own "sequence" starting at 0, so it is a separate block too.
        positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if with_positions:
        batch["position_ids"] = positions
    return batch


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
