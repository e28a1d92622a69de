"""The random-weight model every stack of a comparison loads: one shape, saved once, seeded.

Memory and speed do not depend on the weight values; first-step losses agree between stacks
because they all load the same saved weights and see the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

from memtune.presets import PRESETS as MEMTUNE_PRESETS  # noqa: E402  (no torch)
from memtune.provenance import now_iso  # noqa: E402

# a CPU-sized Qwen2 for testing the benchmarks' plumbing
_TINY_TEST = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 576, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "use_sliding_window": False,
}
PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B (its published config.json)
    "r1-1.5b": {
        "config": dict(MEMTUNE_PRESETS["deepseek-r1-distill-qwen-1.5b"]),
        "seq_lens": [4096, 16384, 32768, 65536, 131072],
        "search": (4096, 131072, 8192),  # start, max, bisection granularity
    },
    "tiny-test": {"config": _TINY_TEST, "seq_lens": [64, 128], "search": (64, 256, 64)},
    # the same, 28 layers deep like the 1.5B shape: how bf16 rounding grows with depth (--grad-check on a CPU)
    "tiny-deep-test": {"config": {**_TINY_TEST, "num_hidden_layers": 28}, "seq_lens": [64, 128],
                       "search": (64, 256, 64)},
    # a CPU-sized model of each other family, for the families comparison's plumbing
    "tiny-gemma2-test": {"config": {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 96,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "head_dim": 16, "vocab_size": 576, "max_position_embeddings": 1024,
                                    "sliding_window": 32, "attn_logit_softcapping": 50.0,
                                    "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16},
                         "seq_lens": [64], "search": (64, 256, 64)},
}
# every family preset of memtune's own (llama-3.1-8b, qwen3-8b, gemma-2-9b, ...) under its own name
PRESETS.update({name: {"config": dict(config), "seq_lens": [16384],
                       "search": (4096, int(config.get("max_position_embeddings") or 131072), 4096)}
                for name, config in MEMTUNE_PRESETS.items() if name != "deepseek-r1-distill-qwen-1.5b"})


def family_of(preset: str) -> str:
    """The preset's model_type (qwen2, llama, gemma2, ...)."""
    return PRESETS[preset]["config"]["model_type"]


def prepare_model_dir(preset: str, cache_root: Path) -> Path:
    """Save the preset's shape once with seeded random bf16 weights, plus memtune's small tokenizer."""
    config_dict = PRESETS[preset]["config"]
    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:10]
    model_dir = cache_root / f"{preset}-{digest}"
    if (model_dir / ".complete").is_file():
        return model_dir
    import torch
    import transformers

    print(f"benchmarks: saving random-weight {preset} to {model_dir} ...", flush=True)
    tmp_dir = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    config = transformers.AutoConfig.for_model(config_dict["model_type"], **fields)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build directly in bf16 (no fp32 copy of 8B params)
    # initialise on the GPU where there is one: an 8B random init takes minutes on a CPU, seconds there
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with device:
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(tmp_dir)
    del model
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SRC / "memtune" / "assets" / "tiny"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"benchmarks: tokenizer has {len(tokenizer)} tokens, more than the vocab {config.vocab_size}")
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / ".complete").write_text(now_iso())
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.rename(model_dir)
    return model_dir


def drop_model_dir(preset: str, cache_root: Path) -> None:
    """Delete the saved model (an 8B shape is 16 GB: a comparison over families keeps one at a time)."""
    for path in cache_root.glob(f"{preset}-*"):
        shutil.rmtree(path, ignore_errors=True)


def random_batches(model_dir: str, seq_len: int, seed: int, max_positions: int, tokenizer, n: int) -> list[dict]:
    """The batches memtune's own loop draws for --data random (same seed, same tokens), batch 1."""
    from memtune.config import from_dict
    from memtune.data import iterate_batches, load_data

    cfg = from_dict({"data": "random", "seq_len": seq_len, "seed": seed, "batch_size": 1,
                     "model": model_dir, "eval": False})
    bundle = load_data(cfg, tokenizer, max_positions)
    it = iterate_batches(bundle, cfg, cfg.seed)
    return [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in (next(it) for _ in range(n))]
