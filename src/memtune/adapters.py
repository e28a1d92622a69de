"""A peft adapter directory (`memtune eval --adapter`, `memtune merge --adapter`), checked before any model loads.

Each problem is one line naming the file and what is wrong: no directory, no
or invalid adapter_config.json, no weights, a damaged (truncated, overwritten)
adapter_model.safetensors, or an adapter made for another model. The files are
read with peft and safetensors themselves, so what passes here is what peft loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtune.errors import UserError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's save_pretrained writes


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: Any  # peft.PeftConfig
    weights: Path


def open_adapter(text: str | Path, field: str = "adapter") -> Adapter:
    """The adapter directory `text`, its config parsed and its weights' header checked; UserError otherwise."""
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{field}: {path} does not exist (expected a peft adapter directory, e.g. RUN/adapter)")
    if not path.is_dir():
        raise UserError(f"{field}: {path} is a file; expected a peft adapter directory (e.g. RUN/adapter)")
    config = _read_config(path / CONFIG_NAME, field)
    weights = next((path / name for name in WEIGHT_NAMES if (path / name).is_file()), None)
    if weights is None:
        raise UserError(f"{field}: {path} has no {WEIGHT_NAMES[0]} (the adapter's weights)")
    if weights.suffix == ".safetensors":
        _check_safetensors(weights, field)
    return Adapter(path, config, weights)


def _read_config(config_file: Path, field: str) -> Any:
    from peft import PeftConfig

    if not config_file.is_file():
        raise UserError(f"{field}: no {CONFIG_NAME} in {config_file.parent} (expected a peft adapter directory)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{field}: {config_file} is not a text file (expected JSON)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{field}: {config_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{field}: {config_file}: expected a JSON object of peft settings; got {type(data).__name__}")
    try:
        config = PeftConfig.from_pretrained(str(config_file.parent))
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{field}: {config_file} is not a peft adapter config ({_first_line(exc)})") from None
    rank = getattr(config, "r", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"{field}: {config_file}: r: expected an integer >= 1; got {rank!r}")
    return config


def _check_safetensors(weights: Path, field: str) -> None:
    """The header parses and covers the whole file (a truncated or overwritten file fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{field}: {weights} is damaged or not a safetensors file ({_first_line(exc)})") from None
    if not names:
        raise UserError(f"{field}: {weights} holds no tensors")


def attach(model: Any, adapter: Adapter, model_name: str, field: str = "adapter") -> Any:
    """`model` with `adapter` loaded (peft); an adapter made for another model is one line, not a traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter.path), config=adapter.config, is_trainable=False)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise UserError(f"{field}: {adapter.path} does not fit model {model_name}: {_mismatch(exc)}") from None


def _mismatch(exc: BaseException) -> str:
    """The line of torch's load_state_dict report that says what differs (its first line says nothing)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("size mismatch"):
            return line.replace("base_model.model.", "")
    return lines[0] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
