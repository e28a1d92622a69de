"""Build the shipped `tiny` model: tokenizer, config.json and pretrained weights.

    python scripts/pretrain_tiny.py            # pretrain and write src/memtune/assets/tiny/
    python scripts/pretrain_tiny.py --init-only  # random weights (no training)

The base is pretrained on *related but different* synthetic text: bare
arithmetic facts ("12 + 7 = 19.") and short stories about quantities
("Tom has 3 apples and buys 4 more, so Tom has 3 + 4 = 7 apples."). It never
sees the task's format (no "Question:", "Answer:", "How many ...?", and
"####" only as a markdown heading), so before fine-tuning it cannot answer the built-in task in that
format; LoRA fine-tuning teaches the format. Stories only use the arithmetic
cores of the *train* split of `memtune.tasks.arith`, so no test problem is
seen in any form; bare facts cover all small sums and products, the way a
real base model knows its arithmetic.

Reproducible: fixed seeds, deterministic algorithms, a fixed thread count,
and tensors written in a fixed order, so a rerun on a CPU writes the same
bytes. The last steps train through simulated NF4 rounding of the decoder
weights (straight-through), so the weights survive 4-bit quantization.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memtune.tasks import arith  # noqa: E402

OUT_DIR = ROOT / "src" / "memtune" / "assets" / "tiny"
SEED = 1234
THREADS = 2  # CPU float sums depend on the thread split; fix it for same bytes

EOS, PAD, IM_START = "<|endoftext|>", "<|pad|>", "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)
# Words the tokenizer keeps whole besides those of the corpus: the prompt
# format, the chat roles and the task's questions (never trained on here).
EXTRA_WORDS = "Question: Answer: #### system user assistant How many does do have now left are is the a an of".split()

# Every dimension a multiple of 64: bitsandbytes quantizes in blocks of 64.
MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}

# Pretraining schedule: about 4 minutes on an idle 2-core CPU (2400 steps, 1.6M tokens).
SEQ_LEN = 96
BATCH = 16
STEPS = 2400
QAT_STEPS = 80  # the last steps train through NF4 rounding
LR = 3e-3
WARMUP = 50


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------

def arithmetic_facts() -> list[str]:
    """Every fact the task's reasoning can need (and a margin), in a fixed order."""
    facts = [f"{a} + {b} = {a + b}." for a in range(0, 49) for b in range(0, 16)]
    facts += [f"{a} - {b} = {a - b}." for a in range(0, 31) for b in range(0, a + 1)]
    facts += [f"{a} * {b} = {a * b}." for a in range(0, 10) for b in range(0, 10)]
    return facts


# Story phrasings: (template key of the arithmetic core, text). Fields as in
# arith.Template plus {e1} / {e2}: the reasoning steps "a + b = c".
STORIES = {
    "add": ["{name} has {a} {item_a} and buys {b} more, so {name} has {e1} {item_r}.",
            "{name} had {a} {item_a}. {name} bought {b} more {item_b}. Now {name} has {e1} {item_r}.",
            "After buying {b} more {item_b}, {name} has {e1} {item_r}."],
    "add_gift": ["{name} has {a} {item_a}. A friend gives {name} {b} more, so {name} has {e1} {item_r}.",
                 "A friend gave {name} {b} {item_b}. {name} had {a} before, so {name} now has {e1} {item_r}."],
    "sub": ["{name} has {a} {item_a} and gives away {b}, so {name} has {e1} {item_r} left.",
            "{name} had {a} {item_a} and gave {b} to a friend. {name} has {e1} {item_r} left."],
    "sub_lose": ["{name} had {a} {item_a} and lost {b} of them, so {e1} {item_r} are left.",
                 "Of {a} {item_a}, {name} lost {b}. That leaves {e1} {item_r}."],
    "mul": ["{name} has {a} boxes with {b} {item_b} in each box, so {name} has {e1} {item_r}.",
            "There are {b} {item_b} in each of {a} boxes. That is {e1} {item_r}."],
    "mul_add": ["{name} has {a} boxes with {b} {item_b} in each box and {c} more {item_c}. "
                "The boxes hold {e1} {items}, so {name} has {e2} {item_r}.",
                "In {a} boxes with {b} {item_b} each there are {e1} {items}. With {c} more, "
                "{name} has {e2} {item_r}."],
    "add_sub": ["{name} has {a} {item_a}, buys {b} more and gives away {c}. That is {e1} {items}, "
                "and {name} has {e2} {item_r} left.",
                "{name} had {a} {item_a} and bought {b} more, {e1}. Then {name} gave away {c}, "
                "so {e2} {item_r} are left."],
}


def story(rng: random.Random) -> str:
    """One short story on a *train* arithmetic core."""
    while True:
        template = rng.choice(arith.TEMPLATES)
        numbers = template.draw(rng)
        if arith.split_of(template, numbers) == "train":
            break
    name, item = rng.choice(arith.NAMES), rng.choice(arith.ITEMS)
    steps = template.steps(numbers)
    fields = dict(zip("abc", numbers), name=name, items=item + "s")
    fields.update({f"item_{k}": arith._noun(item, v) for k, v in zip("abc", numbers)})
    fields["item_r"] = arith._noun(item, steps[-1][1])
    for i, (expr, value) in enumerate(steps, 1):
        fields[f"e{i}"] = f"{expr} = {value}"
    return rng.choice(STORIES[template.key]).format(**fields)


# Markdown-style headings that open some documents. They teach the base the
# "####" token as text (a heading), not as the task's answer marker: a token
# the base never saw has an untrained output row (tied embeddings), which
# q/v LoRA cannot make the model emit.
HEADINGS = ("#### Notes", "#### Stories", "#### Facts", "#### Numbers", "#### Boxes")


def documents(rng: random.Random, n_docs: int, facts: list[str]) -> list[str]:
    """Documents of a few stories and facts each; eos only between documents."""
    docs = []
    for _ in range(n_docs):
        parts = [story(rng) if rng.random() < 0.5 else rng.choice(facts) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.5:  # mid-text too, so " ####" (with its space) is learned
            parts.insert(rng.randint(0, len(parts)), rng.choice(HEADINGS))
        docs.append(" ".join(parts))
    return docs


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

# The pipeline of transformers' Qwen2Tokenizer, which AutoTokenizer forces for
# model_type qwen2 whatever tokenizer.json says: building the same pipeline
# here makes the saved file and the loaded tokenizer agree. Digits split one
# per token; a word keeps its leading space.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tokenizer(corpus_sample: list[str]):
    """Byte-level BPE trained until every corpus word is one token.

    Numbers are one token per digit and any other text falls back to bytes,
    so every string can be encoded.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,  # more than the corpus words need: training stops when all are whole
        min_frequency=1,
        special_tokens=[EOS, PAD, IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = [" ".join(EXTRA_WORDS), "\n".join(EXTRA_WORDS)]
    tok.train_from_iterator([*corpus_sample, *words], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=EOS,
                                   model_max_length=MODEL_CONFIG["max_position_embeddings"])
    fast.add_special_tokens({"additional_special_tokens": [IM_START]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    # Readable by older transformers too: a known class and the chat template inline.
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

def model_config(tokenizer) -> dict:
    config = dict(MODEL_CONFIG)
    config["vocab_size"] = math.ceil(len(tokenizer) / 64) * 64
    config["bos_token_id"] = tokenizer.eos_token_id
    config["eos_token_id"] = tokenizer.eos_token_id
    config["pad_token_id"] = tokenizer.pad_token_id
    return config


def build_model(config: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg.architectures = config["architectures"]
    return Qwen2ForCausalLM(cfg)


def save_weights(model, out_dir: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in sorted(model.state_dict().items())
             if k != "lm_head.weight"}  # tied to the embeddings
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_config(config: dict, out_dir: Path) -> None:
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-only", action="store_true", help="write random weights, no training")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--qat-steps", type=int, default=QAT_STEPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    facts = arithmetic_facts()
    docs = documents(rng, 16000, facts)
    tokenizer = build_tokenizer(docs + facts)
    config = model_config(tokenizer)
    model = build_model(config)
    if not args.init_only:
        print(pretrain(model, tokenizer, docs, args.steps, min(args.qat_steps, args.steps)))
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, args.out)
    write_config(config, args.out)
    save_weights(model, args.out)
    print(f"wrote {args.out} (vocab {len(tokenizer)}, "
          f"{sum(p.numel() for p in model.parameters())} parameters)")
    return 0


# NF4 code book of bitsandbytes (normal-float quantiles), for simulated rounding.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_round(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The weight as bitsandbytes NF4 stores it: blocks of 64 scaled by their absmax."""
    flat = weight.reshape(-1, block)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    index = ((flat / scale).unsqueeze(-1) - NF4_CODE).abs().argmin(dim=-1)
    return (NF4_CODE[index] * scale).reshape(weight.shape)


class NF4StraightThrough(torch.nn.Module):
    """Parametrization: forward through NF4 rounding, gradient to the full weight."""

    def forward(self, weight):
        return weight + (nf4_round(weight.detach()) - weight).detach()


def decoder_linears(model):
    return [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]


def token_blocks(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents, eos after each, cut into rows of SEQ_LEN + 1 tokens."""
    ids = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(ids) // (SEQ_LEN + 1)
    return torch.tensor(ids[: rows * (SEQ_LEN + 1)]).view(rows, SEQ_LEN + 1)


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, tokenizer, docs, steps: int, qat_steps: int) -> dict:
    """Next-token training on the packed corpus; the last qat_steps through NF4 rounding."""
    from torch.nn.utils import parametrize

    blocks = token_blocks(tokenizer, docs)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start, losses = time.time(), []
    for step in range(steps):
        if step == steps - qat_steps:
            for linear in decoder_linears(model):
                parametrize.register_parametrization(linear, "weight", NF4StraightThrough())
        rows = blocks[torch.randint(len(blocks), (BATCH,), generator=gen)]
        loss = _loss(model, rows)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    for linear in decoder_linears(model):
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    model.eval()
    return {"tokens": int(blocks.numel()), "loss_last": losses[-1], "seconds": time.time() - start}


def _loss(model, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             rows[:, 1:].reshape(-1))


if __name__ == "__main__":
    sys.exit(main())
