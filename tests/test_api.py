"""memtune from Python: load_model, apply (with Trainer and TRL's SFTTrainer), estimate, fit."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import memtune
from memtune.config import RunConfig
from memtune.presets import TINY_DIR

STEPS = 20
CPU_SETTINGS = dict(compute_dtype="fp32", lora_dropout=0.0, lora_rank=8, learning_rate=2e-3, steps=STEPS,
                    warmup_steps=2, seed=0, device="cpu")


def _user_model(lora: bool = True) -> nn.Module:
    """A model as a Trainer user builds it: transformers, then peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(TINY_DIR), dtype=torch.float32, attn_implementation="sdpa")
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model


def _examples(n: int = STEPS) -> list[dict[str, list[int]]]:
    """The built-in task, tokenized as memtune trains it (prompt masked), one example a step."""
    from memtune.data import load_data
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_DIR))
    bundle = load_data(RunConfig(seq_len=256, eval=False, train_examples=n), tokenizer, 2048)
    return [{"input_ids": list(ex.input_ids), "labels": list(ex.labels)} for ex in bundle.train[:n]]


def _memtune_train_losses(model: nn.Module, cfg: RunConfig, examples: list[dict]) -> list[float]:
    """memtune train's own step (train.train_step) over `examples` in order."""
    from memtune import train
    from memtune.models import BuiltModel

    built = BuiltModel(model, None, torch.device("cpu"), torch.float32, 2048)
    optimizer = train.make_optimizer(cfg, model, built.device)
    session = train.Session(cfg, built, None, optimizer, train.make_scheduler(cfg, optimizer), None)
    model.train()
    batches = iter([{k: torch.tensor([v]) for k, v in ex.items()} for ex in examples])
    losses = []
    for _ in examples:
        losses.append(train.train_step(session, batches))
        optimizer.zero_grad(set_to_none=True)
    return losses


def _trainer_losses(trainer_cls, model: nn.Module, cfg: RunConfig, examples: list[dict], tmp_path, **args) -> list[float]:
    from memtune import train

    losses: list[float] = []

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    optimizer = train.make_optimizer(cfg, model, torch.device("cpu"))
    trainer = Recording(model=model, args=args.pop("training_args"), train_dataset=examples,
                        optimizers=(optimizer, train.make_scheduler(cfg, optimizer)), **args)
    trainer.train()
    return losses


def _training_args(tmp_path, cls=None, **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return cls(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=1, max_steps=STEPS,
               max_grad_norm=1.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=50,
               train_sampling_strategy="sequential", seed=0, disable_tqdm=True, **extra)


@pytest.mark.slow
def test_a_trainer_after_apply_trains_as_memtune_train_does(tmp_path):
    from transformers import Trainer, default_data_collator

    cfg = RunConfig(**CPU_SETTINGS)
    examples = _examples()
    mine, theirs = _user_model(), None
    theirs = copy.deepcopy(mine)
    memtune.apply(mine, compute_dtype="fp32")
    memtune.apply(theirs, compute_dtype="fp32")
    expected = _memtune_train_losses(mine, cfg, examples)
    got = _trainer_losses(Trainer, theirs, cfg, examples, tmp_path, training_args=_training_args(tmp_path),
                          data_collator=default_data_collator)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, abs=1e-5)
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5  # it learns


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU test: TRL's fused LM head takes its Triton kernel "
                                                     "wherever Triton is installed, also for a model on the CPU")
def test_trl_sft_trainer_after_apply_trains_as_it_does_without_memtune(tmp_path):
    """TRL's SFTTrainer (1.x) computes its loss with its own fused LM head (never the full logits) over
    the forward memtune installs, and its first step already differs from a plain forward of the same
    model on the same batch (by 4e-3 here, with or without memtune); so the reference is SFTTrainer on
    the model without memtune's techniques: memtune's offloaded checkpointing, tiled MLP and LoRA
    path must give the same per-step losses."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = RunConfig(**CPU_SETTINGS)
    examples = Dataset.from_list([{"input_ids": ex["input_ids"]} for ex in _examples()])
    args = dict(max_length=None, packing=False, gradient_checkpointing=False, dataset_num_proc=None)
    mine = _user_model()
    plain = copy.deepcopy(mine)
    report = memtune.apply(mine, compute_dtype="fp32")
    assert {"offload_activations", "tiled_mlp_chunk", "loss"} <= set(report.applied)
    got = _trainer_losses(SFTTrainer, mine, cfg, examples, tmp_path / "a",
                          training_args=_training_args(tmp_path / "a", SFTConfig, **args))
    expected = _trainer_losses(SFTTrainer, plain, cfg, examples, tmp_path / "b",
                               training_args=_training_args(tmp_path / "b", SFTConfig, **args))
    assert len(got) == STEPS
    assert got == pytest.approx(expected, abs=1e-5)
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5


def test_after_apply_no_tokens_by_vocab_tensor_is_made_and_the_loss_is_transformers():
    model = _user_model()
    reference = copy.deepcopy(model)
    report = memtune.apply(model, compute_dtype="fp32", loss_chunk_tokens=128)
    assert "loss" in report.applied
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 1024))
    seen: list[tuple[int, ...]] = []

    class Shapes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.append(tuple(t.shape))
            return out

    model.train()
    with Shapes():
        out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    assert not any(len(s) >= 2 and s[-1] == vocab and s[-2] > 128 for s in seen)  # chunks of 128 at most
    assert any(s[-1:] == (vocab,) for s in seen)  # the chunks were there
    reference.train()
    torch.testing.assert_close(out.loss, reference(input_ids=ids, labels=ids).loss, atol=1e-5, rtol=0)
    out.loss.backward()  # and it differentiates


def test_apply_reports_what_it_skipped_and_the_model_still_trains():
    model = _user_model()
    report = memtune.apply(model, compute_dtype="fp32")
    # on a CPU: the CUDA-only techniques are skipped, each with its reason
    for name in ("fuse_elementwise", "fuse_rope", "embeddings_on_host"):
        assert report.skipped[name] == "needs a CUDA GPU"
    assert {"offload_activations", "loss", "tiled_mlp_chunk"} <= set(report.applied)
    assert "skipped  fuse_rope: needs a CUDA GPU" in str(report).splitlines()
    # a quantization technique on an unquantized model is not asked for at all
    assert "dequantize_once" not in report.applied and "dequantize_once" not in report.skipped
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.tensor([_examples(1)[0]["input_ids"]])
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_apply_on_a_model_whose_lm_head_cannot_be_chunked_skips_the_loss_with_its_reason():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY_DIR), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    report = memtune.apply(model, compute_dtype="fp32")
    assert report.skipped["loss"].startswith("the lm_head is ")
    ids = torch.randint(0, 500, (1, 32))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.isfinite(out.loss)  # the model's own loss


@pytest.mark.parametrize("options, message", [
    (dict(lora_rnak=8), "'lora_rnak' is not an option"),
    (dict(steps=3), "'steps' is not a technique option"),
    (dict(tiled_mlp_chunk=-1), "tiled_mlp_chunk: expected an integer >= 0"),
    (dict(loss="sparse"), "loss: expected one of chunked, full"),
    (dict(memory={"lora_rank": 3}), "section 'memory' has no key 'lora_rank' (it belongs to 'lora')"),
])
def test_a_wrong_option_is_one_value_error_naming_it(options, message):
    model = _user_model(lora=False)
    with pytest.raises(ValueError) as info:
        memtune.apply(model, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_load_model_takes_config_keys_flat_or_by_section():
    model, tokenizer = memtune.load_model("tiny", compute_dtype="fp32", quantization="none",
                                          lora={"lora_rank": 4}, device="cpu")
    assert model.peft_config["default"].r == 4
    assert tokenizer("2 + 2").input_ids
    with pytest.raises(ValueError, match="lora_rank: expected an integer >= 1"):
        memtune.load_model("tiny", lora_rank=0)


def test_estimate_and_fit_return_the_objects_behind_the_cli_json():
    est = memtune.estimate(model="deepseek-r1-distill-qwen-1.5b", seq_len=16384)
    assert est.total_bytes == sum(est.breakdown.values()) and est.seq_len == 16384
    result = memtune.fit(gpu_memory="8GiB", model="deepseek-r1-distill-qwen-1.5b", seq_len=16384)
    assert result.fits and all(c.needed_bytes <= 8 * 2**30 for c in result.fits)
    assert result.fits[0].to_dict()["seq_len"] == 16384
    with pytest.raises(ValueError, match="gpu_memory"):
        memtune.fit(gpu_memory="lots", model="tiny")


def test_building_and_tearing_down_leaves_transformers_and_the_environment_as_they_were():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from memtune.techniques import remove_techniques

    before_attention = dict(ALL_ATTENTION_FUNCTIONS._global_mapping)
    before_env = dict(os.environ)
    model, _ = memtune.load_model("tiny", compute_dtype="fp32", device="cpu", save_attention=True)
    ids = torch.randint(0, 500, (1, 64))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    remove_techniques(model)
    del model
    assert dict(ALL_ATTENTION_FUNCTIONS._global_mapping) == before_attention
    assert dict(os.environ) == before_env
