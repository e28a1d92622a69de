"""memtune train on the tiny model: every quantization mode, checkpointing on/off, LoRA and full FT."""

import json
import math

import pytest
import torch

from memtune import train
from memtune.config import RunConfig
from memtune.models import build_model, count_parameters, trainable_line

LEARNABLE = "the cat sat on the mat and the dog sat on the log"


@pytest.fixture()
def learnable_data(tmp_path):
    """One short text repeated: any working training loop drives its loss down fast."""
    path = tmp_path / "learnable.jsonl"
    path.write_text("\n".join(json.dumps({"text": LEARNABLE}) for _ in range(8)) + "\n")
    return str(path)


def tiny_cfg(data, **changes):
    base = dict(data=data, steps=15, learning_rate=1e-2, warmup_steps=0, eval=False, seq_len=64,
                lora_rank=8, lora_targets="all-linear", seed=0, device="cpu")
    base.update(changes)
    return RunConfig(**base)


def train_losses(cfg):
    session = train.setup(cfg, log=lambda _: None)
    losses, _, _ = train.train_loop(session, progress=False)
    return session, losses


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8", "none"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_lora_loss_goes_down(learnable_data, quantization, checkpointing):
    cfg = tiny_cfg(learnable_data, quantization=quantization, gradient_checkpointing=checkpointing)
    _, losses = train_losses(cfg)
    assert losses[-1] < 0.8 * losses[0], losses


def test_full_finetuning_loss_goes_down(learnable_data):
    cfg = tiny_cfg(learnable_data, lora=False, quantization="none", learning_rate=1e-3)
    session, losses = train_losses(cfg)
    trainable, total = count_parameters(session.built.model)
    assert trainable == total
    assert losses[-1] < 0.8 * losses[0], losses


def test_chunked_and_full_loss_agree(learnable_data):
    cfg = tiny_cfg(learnable_data, quantization="none", compute_dtype="fp32")
    session = train.setup(cfg, log=lambda _: None)
    from memtune.data import iterate_batches

    cfg = session.cfg  # batch size resolved from the data
    batch = next(iterate_batches(session.bundle, cfg, 0))
    chunked = train.forward_loss(session.built.model, batch, cfg.replace(loss_chunk_tokens=7))
    full = train.forward_loss(session.built.model, batch, cfg.replace(loss="full"))
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_trainable_count_equals_peft(learnable_data):
    cfg = tiny_cfg(learnable_data, lora_targets="all-linear", lora_rank=4)
    built = build_model(cfg)
    peft_trainable, peft_total = built.model.get_nb_trainable_parameters()
    ours = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    assert ours == peft_trainable == count_parameters(built.model)[0]
    assert trainable_line(peft_trainable, peft_total).startswith(f"trainable params: {peft_trainable:,d} || all params:")


def test_run_directory_and_adapter_round_trip(learnable_data, tmp_path):
    from peft import PeftModel

    cfg = tiny_cfg(learnable_data, steps=3, quantization="none", compute_dtype="fp32")
    out = tmp_path / "run"
    metrics = train.run(cfg, out, log=lambda _: None, progress=False)
    for name in ("config.yaml", "metrics.json", "report.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    stored = json.loads((out / "metrics.json").read_text())
    for key in ("trainable_params", "total_params", "step_time_s", "tokens_per_s", "peak_rss_bytes", "device",
                "versions", "memory_breakdown", "status"):
        assert key in stored, key
    assert stored["status"] == "ok" and stored["device"] == "cpu"
    assert metrics["trainable_params"] == stored["trainable_params"]

    trained = train.setup(cfg, log=lambda _: None)  # fresh base model, same seed
    reloaded = PeftModel.from_pretrained(trained.built.model.get_base_model(), str(out / "adapter"))
    ids = torch.randint(0, 300, (1, 16))
    fresh_base = build_model(cfg.replace(lora=True)).model
    with torch.no_grad():
        after_load = reloaded(input_ids=ids).logits
    # The adapter changed the model (B is no longer zero) and loads back to the saved weights.
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(("lora_B" in k) and v.abs().sum() > 0 for k, v in saved.items())
    state = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved)
    with torch.no_grad():
        assert not torch.allclose(after_load, fresh_base(input_ids=ids).logits)


def test_int8_backward_matches_bitsandbytes_and_saves_no_input():
    import bitsandbytes as bnb

    from memtune.kernels import enable_frozen_int8_backward

    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    layers = []
    for _ in range(2):
        layer = bnb.nn.Linear8bitLt(64, 96, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        layers.append(layer.to("cpu"))
    assert enable_frozen_int8_backward(layers[1]) == 1
    x = torch.randn(5, 64)
    grads, saved = [], []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        saved.append(getattr(out.grad_fn, "tensors", None))
        out.square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    assert saved[1] is None  # ours keeps no input tensor on the graph node


def test_available_host_memory_reads_meminfo(tmp_path):
    from memtune.measure import available_host_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   2000000 kB\n")
    assert available_host_memory(meminfo) == 2000000 * 1024
    assert available_host_memory(tmp_path / "missing") is None
    # what train does with it (plan_host_memory): tests/test_fit_search.py


def test_fp32_residual_stream_trains_with_bf16_matmuls(learnable_data):
    cfg = tiny_cfg(learnable_data, compute_dtype="bf16", residual_dtype="fp32", lora_targets="default")
    session = train.setup(cfg, log=lambda _: None)
    model = session.built.model
    layer = model.get_base_model().model.layers[0]
    seen = {}

    def layer_input(module, args, kwargs):
        seen.setdefault("layer_input", (args[0] if args else kwargs["hidden_states"]).dtype)

    def q_proj_input(module, args):
        seen.setdefault("q_proj_input", args[0].dtype)

    layer.register_forward_pre_hook(layer_input, with_kwargs=True)
    layer.self_attn.q_proj.register_forward_pre_hook(q_proj_input)
    losses, _, _ = train.train_loop(session, progress=False)
    assert seen == {"layer_input": torch.float32, "q_proj_input": torch.bfloat16}
    assert losses[-1] < 0.5 * losses[0]
    # the same first loss as the bf16 stream, to bf16 rounding
    _, plain = train_losses(cfg.replace(residual_dtype="compute", steps=1))
    assert abs(plain[0] - losses[0]) < 0.05 * plain[0]


def test_dequantize_once_trains_as_bitsandbytes_does(learnable_data, monkeypatch):
    # tiled in 4 chunks and offloaded (on a CPU the offload keeps the tensors): the short path's
    # scopes are all in play; the losses follow bitsandbytes' own path step for step
    from memtune.kernels import frozen_4bit

    cfg = tiny_cfg(learnable_data, quantization="nf4", steps=6, tiled_mlp_chunk=16, lora_dropout=0.0)
    _, reference = train_losses(cfg)
    calls = {"n": 0}
    apply = frozen_4bit._Frozen4bitLinear.apply

    def counting(*args):
        calls["n"] += 1
        return apply(*args)

    monkeypatch.setattr(frozen_4bit._Frozen4bitLinear, "apply", counting)
    session, short = train_losses(cfg.replace(dequantize_once=True))
    assert any("short path" in note for note in session.built.notes)
    assert calls["n"] > 0
    assert short == pytest.approx(reference, rel=2e-3)
    assert short[-1] < short[0]


def test_random_weights_are_drawn_on_the_cpu_when_the_full_model_would_not_fit_the_gpu():
    from memtune.models import random_init_fits

    gb = 10**9
    assert random_init_fits(3 * gb, free_bytes=80 * gb, cap_bytes=None, allocated_bytes=0)
    assert not random_init_fits(16 * gb, free_bytes=15 * gb, cap_bytes=None, allocated_bytes=0)  # an 8B, a 16 GB card
    # under a gpu_memory cap, what the cap leaves counts, however large the card
    assert not random_init_fits(16 * gb, free_bytes=130 * gb, cap_bytes=16 * gb, allocated_bytes=0)
    assert random_init_fits(16 * gb, free_bytes=130 * gb, cap_bytes=24 * gb, allocated_bytes=2 * gb)
    assert not random_init_fits(16 * gb, free_bytes=130 * gb, cap_bytes=18 * gb, allocated_bytes=2 * gb)


def test_training_loop_freezes_long_lived_objects_for_the_collector_and_undoes_it():
    import gc

    from memtune.train import long_lived_objects_frozen

    gc.unfreeze()
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > 0  # what existed before the loop is never scanned again
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with long_lived_objects_frozen():
            raise RuntimeError("a failing step")
    assert gc.get_freeze_count() == 0


def test_each_micro_batch_is_prepared_during_the_previous_backward(learnable_data, monkeypatch):
    from memtune.data import iterate_batches

    cfg = tiny_cfg(learnable_data, steps=2, grad_accum=2)
    session = train.setup(cfg, log=lambda _: None)
    taken = []
    source = iterate_batches(session.bundle, session.cfg, cfg.seed)

    def batches():
        for batch in source:
            taken.append(batch)
            yield batch

    import weakref

    from memtune.batch_feed import BatchFeed

    events, handed_out = [], []
    take = BatchFeed.take
    monkeypatch.setattr(BatchFeed, "take", lambda self: handed_out.append(weakref.ref(r := take(self))) or r)
    backward = torch.Tensor.backward

    def recording_backward(self, *args, **kwargs):
        # the batch is let go before backward: its embeddings would add to the backward's peak
        events.append((len(taken), handed_out[-1]() is None))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", recording_backward)
    stream = batches()
    session.built.model.train()
    loss = train.train_step(session, stream)
    # two micro-batches: the second was drawn (and prepared) right after the first one's backward,
    # the next step's first right after the second's
    assert events == [(1, True), (2, True)] and len(taken) == 3
    assert math.isfinite(loss)
    # the prepared batch is what the next step trains on, and a new iterator starts afresh
    assert session.feed.take().host is taken[2]
    fresh = iter(list(taken[:2]))
    train.train_step(session, fresh)
    assert session.feed.batches is fresh
    with pytest.raises(StopIteration):  # its data ended with the step: nothing was prepared
        session.feed.take()


def test_the_loss_chunk_kernel_follows_fuse_loss_and_loss_kernel(monkeypatch):
    # triton (the default) or the compiled chunk where kernels can be compiled; unfused elsewhere
    from memtune import loss
    from memtune.config import RunConfig

    cuda = torch.device("cuda")
    monkeypatch.setattr(loss, "compile_unavailable_reason", lambda device: None if device.type == "cuda" else "cpu")
    assert loss.loss_chunk_kernel(RunConfig(), cuda) == "triton"
    assert loss.loss_chunk_kernel(RunConfig(loss_kernel="compiled"), cuda) is True
    assert loss.loss_chunk_kernel(RunConfig(fuse_loss=False), cuda) is False
    assert loss.loss_chunk_kernel(RunConfig(), torch.device("cpu")) is False
