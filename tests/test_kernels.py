"""memtune.kernels against references: full-logits cross-entropy, HF checkpointing, untiled MLP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from memtune.kernels import (
    chunked_linear_cross_entropy,
    disable_offloaded_checkpointing,
    disable_tiled_mlp,
    effective_chunk_tokens,
    enable_offloaded_checkpointing,
    enable_tiled_mlp,
    is_offloaded_checkpointing,
    tiled_mlp_chunk,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# --------------------------------------------------------------------------- chunked loss


def _reference(hidden, weight, labels, bias):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return F.cross_entropy(logits, labels, ignore_index=-100)


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [None if t.grad is None else t.grad.detach().clone() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n_tokens,chunk", [(37, 8), (64, 64), (50, 1000), (9, 1)])
@pytest.mark.parametrize("mask", ["strided", "prompt", "none"])
@pytest.mark.parametrize("fused", [False, "eager"], ids=["plain", "fused-math"])
def test_chunked_ce_matches_full_logits(dtype, with_bias, n_tokens, chunk, mask, fused):
    torch.manual_seed(0)
    hidden_size, vocab = 24, 61
    hidden = torch.randn(n_tokens, hidden_size, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(vocab, dtype=dtype, requires_grad=True) if with_bias else None
    labels = torch.randint(0, vocab, (n_tokens,))
    if mask == "strided":
        labels[::4] = -100
    elif mask == "prompt":  # one labelled run in the middle: the slice path
        labels[: n_tokens // 3] = -100
        labels[-1] = -100
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    loss, grads = _grads(lambda: chunked_linear_cross_entropy(hidden, weight, labels, bias, chunk_tokens=chunk,
                                                              fused=fused), tensors)
    ref, ref_grads = _grads(lambda: _reference(hidden, weight, labels, bias), tensors)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), **TOL[dtype])


@pytest.mark.parametrize("mask", ["strided", "prompt", "none"])
def test_chunked_ce_reads_the_labelled_tokens_from_host_labels(monkeypatch, mask):
    # the training step hands over its host copy of the labels so the GPU never waits for their count
    from memtune.kernels import cross_entropy as ce

    torch.manual_seed(3)
    hidden = torch.randn(29, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    labels = torch.randint(0, 40, (29,))
    if mask == "strided":
        labels[1::3] = -100
    elif mask == "prompt":
        labels[:10] = -100
    host = labels.clone()
    seen = []
    real = ce._label_layout
    monkeypatch.setattr(ce, "_label_layout", lambda lab, ignore: seen.append(lab) or real(lab, ignore))
    loss, (grad,) = _grads(lambda: chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=6,
                                                                fused="eager", host_labels=host), [hidden])
    assert len(seen) == 1 and seen[0].data_ptr() == host.data_ptr()
    ref, (ref_grad,) = _grads(lambda: _reference(hidden, weight, labels, None), [hidden])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="host_labels"):
        chunked_linear_cross_entropy(hidden, weight, labels, host_labels=host[:-1])


def test_chunked_ce_frozen_weight_and_grad_output_scaling():
    torch.manual_seed(1)
    hidden = torch.randn(2, 13, 16, requires_grad=True)  # [B, T, H] is flattened
    weight = torch.randn(40, 16)  # frozen lm_head: no grad_weight is computed
    labels = torch.randint(0, 40, (2, 13))
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=5)
    (loss * 3.0).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    (3.0 * _reference(hidden.reshape(-1, 16), weight, labels.reshape(-1), None)).backward()
    torch.testing.assert_close(grad, hidden.grad)
    assert weight.grad is None


def test_chunked_ce_all_ignored_is_zero_with_zero_grads():
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((7,), -100)
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=3)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_chunked_ce_custom_ignore_index_and_no_grad():
    torch.manual_seed(2)
    hidden, weight = torch.randn(10, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (10,))
    labels[3] = 5
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4, ignore_index=5)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=5)
    torch.testing.assert_close(loss, ref)


def test_chunked_ce_under_autocast_matches_bf16_logits():
    torch.manual_seed(3)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(30, 16)
    labels = torch.randint(0, 30, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=7)
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    ref = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().t()).float(), labels)
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-2)


def test_effective_chunk_caps_fp32_logits():
    assert effective_chunk_tokens(4096, 151936) == 1728  # 1 GiB / (151936 * 4 B) = 1766 -> multiple of 64
    assert effective_chunk_tokens(4096, 151936, None) == 4096
    assert effective_chunk_tokens(512, 151936) == 512
    assert effective_chunk_tokens(4096, 10**9, 1024) == 1


# --------------------------------------------------------------------------- tiny Qwen2 + LoRA


def _tiny_lora_model(dtype, dropout=0.0, targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
                     family="qwen2"):
    torch.manual_seed(0)
    config_class, model_class = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    config = config_class(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model = model_class(config).to(dtype)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets),
                           init_lora_weights=False)  # random A and B: every LoRA tensor gets a gradient
    model = peft.get_peft_model(model, lora)
    model.train()
    return model


def _batch(seq=19, batch=1, vocab=97):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def _step(model, ids, labels, seed=123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach().float(), grads


def _assert_same(a, b, dtype):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **TOL[dtype])
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    return request.param


def test_offloaded_checkpointing_matches_plain_and_hf_checkpointing(dtype):
    base = _tiny_lora_model(dtype)
    ids, labels = _batch()
    plain = _step(base, ids, labels)

    hf = copy.deepcopy(base)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same(_step(hf, ids, labels), plain, dtype)

    off = copy.deepcopy(base)
    off.gradient_checkpointing_enable()  # as prepare_model_for_kbit_training leaves it; ours replaces it
    assert enable_offloaded_checkpointing(off) == 2
    assert enable_offloaded_checkpointing(off) == 2  # idempotent
    assert is_offloaded_checkpointing(off)
    _assert_same(_step(off, ids, labels), plain, dtype)
    _assert_same(_step(off, ids, labels), plain, dtype)  # a second step

    # transformers' checkpointing switched on again afterwards (as a Trainer does): ours still rules
    off.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same(_step(off, ids, labels), plain, dtype)
    assert not any(layer.gradient_checkpointing for layer in off.get_base_model().model.layers)


class _Count:
    n = 0


@pytest.fixture()
def replays(monkeypatch):
    """How many attention calls a recompute took from the forward's record (kernels/saved_attention.py)."""
    from memtune.kernels import saved_attention

    count, replay = _Count(), saved_attention._Replay.apply

    def counting(*args):
        count.n += 1
        return replay(*args)

    monkeypatch.setattr(saved_attention._Replay, "apply", staticmethod(counting))
    return count


@pytest.mark.parametrize("copies", [False, True], ids=["kept", "copied-and-rebuilt"])
def test_saved_attention_matches_plain_and_skips_the_recomputed_attention(dtype, copies, monkeypatch, replays):
    from memtune.kernels import saved_attention

    # copied-and-rebuilt: what a GPU does (storages parked and rebuilt), here with clones on the CPU
    monkeypatch.setattr(saved_attention, "COPY_OFF_CUDA", copies)
    if copies:
        monkeypatch.setattr(saved_attention, "_KEEP_BELOW_BYTES", 0)
    base = _tiny_lora_model(dtype, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))
    ids, labels = _batch(seq=33)
    plain = _step(base, ids, labels)
    off = copy.deepcopy(base)
    enable_offloaded_checkpointing(off, save_attention=True)
    calls = replays
    _assert_same(_step(off, ids, labels), plain, dtype)
    assert calls.n == 2  # one per layer: the recompute took attention from the forward's record
    _assert_same(_step(off, ids, labels), plain, dtype)  # a second step
    with torch.no_grad():  # eval and no-grad forwards run attention as usual
        off(input_ids=ids)
    assert calls.n == 4  # eval and no-grad forwards run attention as usual: nothing replayed

    recomputing = copy.deepcopy(base)
    enable_offloaded_checkpointing(recomputing)
    calls.n = 0
    _step(recomputing, ids, labels)
    assert calls.n == 0  # without it: forward and recompute both run attention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: host copies on side streams")
def test_saved_attention_on_a_gpu_matches_recomputing(monkeypatch, replays):
    from memtune.kernels import saved_attention

    monkeypatch.setattr(saved_attention, "_KEEP_BELOW_BYTES", 0)  # park every saved tensor, however small
    base = _tiny_lora_model(torch.bfloat16, targets=("q_proj", "k_proj", "v_proj", "o_proj")).cuda()
    ids, labels = (t.cuda() for t in _batch(seq=512))
    recomputing = copy.deepcopy(base)
    enable_offloaded_checkpointing(recomputing)
    saving = copy.deepcopy(base)
    enable_offloaded_checkpointing(saving, save_attention=True)
    expected = _step(recomputing, ids, labels)
    calls = replays
    for _ in range(2):
        _assert_same(_step(saving, ids, labels), expected, torch.bfloat16)
    assert calls.n == 4


@pytest.fixture()
def attention_records(monkeypatch):
    """Every AttentionRecord made during the test, in order; storages parked (as on a GPU) however small."""
    from memtune.kernels import saved_attention

    monkeypatch.setattr(saved_attention, "COPY_OFF_CUDA", True)
    monkeypatch.setattr(saved_attention, "_KEEP_BELOW_BYTES", 0)
    records = []
    init = saved_attention.AttentionRecord.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        records.append(self)

    monkeypatch.setattr(saved_attention.AttentionRecord, "__init__", keep)
    return records


def test_saved_attention_keeps_one_copy_per_storage_and_no_q_k_v(attention_records):
    records = attention_records
    model = _tiny_lora_model(torch.bfloat16)
    enable_offloaded_checkpointing(model, save_attention=True)
    ids, labels = _batch(seq=33)
    model(input_ids=ids, labels=labels, use_cache=False)  # forward only: the records stay filled
    assert len(records) == 2
    for record in records:
        (entry,) = record.entries
        # the output (the layer's and the kernel's saved one share memory) and the log-sum-exp;
        # q, k and v are referred to, rebuilt from the recompute
        assert len(entry.blobs) == 2
        parked = sorted(tuple(b.copy.host.shape) for b in entry.blobs.values())
        assert parked == sorted([(33 * 4 * 16 * 2,), (4 * 33 * 4,)])  # bytes: bf16 [33, 4, 16], fp32 [4, 33]

    records.clear()
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    blobs = [blob for record in records for blob in record.entries[0].blobs.values()]
    loss.backward()  # `loss` (and with it the autograd graph) still alive, as in a training step
    assert len(records) == 2 and all(not record.entries for record in records)  # each let go after its layer
    assert all(blob.on_device is None for blob in blobs)


def _step_with(model, ids, labels, mask=None, positions=None, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone()
                                   for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("copies", [False, True], ids=["kept", "copied-and-rebuilt"])
def test_saved_attention_with_padding_masks_packing_and_lora_dropout(copies, monkeypatch):
    from memtune.kernels import saved_attention

    monkeypatch.setattr(saved_attention, "COPY_OFF_CUDA", copies)
    monkeypatch.setattr(saved_attention, "_KEEP_BELOW_BYTES", 0 if copies else 1 << 20)
    base = _tiny_lora_model(torch.float32, dropout=0.2)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: a mask tensor reaches sdpa, k and v are repeated per head
    labels = ids.masked_fill(mask == 0, -100)
    saving = copy.deepcopy(base)
    enable_offloaded_checkpointing(saving, save_attention=True)
    _assert_same(_step_with(saving, ids, labels, mask), _step_with(base, ids, labels, mask), torch.float32)
    positions = torch.cat([torch.arange(9), torch.arange(12)])[None].repeat(2, 1)  # two packed documents
    _assert_same(_step_with(saving, ids, ids, positions=positions), _step_with(base, ids, ids, positions=positions),
                 torch.float32)


def test_saved_attention_with_the_math_kernel_and_its_many_saved_tensors(attention_records):
    # sdpa's math path saves several intermediates, some freed during the call: a freed address
    # reused by a later saved tensor must not be taken for the earlier one's parked copy
    from torch.nn.attention import SDPBackend, sdpa_kernel

    base = _tiny_lora_model(torch.float32, targets=("q_proj", "k_proj", "v_proj"))
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    saving = copy.deepcopy(base)
    enable_offloaded_checkpointing(saving, save_attention=True)
    with sdpa_kernel(SDPBackend.MATH):
        expected = _step_with(base, ids, labels, mask)
        _assert_same(_step_with(saving, ids, labels, mask), expected, torch.float32)
    assert attention_records and all(not r.entries for r in attention_records)


def test_saved_attention_recomputes_layers_with_attention_dropout(monkeypatch, replays):
    base = _tiny_lora_model(torch.float32, dropout=0.2)
    base.get_base_model().config.attention_dropout = 0.3
    for layer in base.get_base_model().model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids, labels = _batch()
    plain = _step_with(base, ids, labels)
    saving = copy.deepcopy(base)
    enable_offloaded_checkpointing(saving, save_attention=True)
    calls = replays
    _assert_same(_step_with(saving, ids, labels), plain, torch.float32)
    assert calls.n == 0  # forward and recompute: the dropout masks are drawn again, in order


def test_saved_attention_under_autocast_with_an_fp32_residual_stream(attention_records):
    records = attention_records
    base = _tiny_lora_model(torch.bfloat16)
    ids, labels = _batch(seq=33)

    def step(model):
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(ids).float()  # fp32 residual stream, bf16 matmuls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(inputs_embeds=embeds, labels=labels, use_cache=False).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                       if p.requires_grad}

    recomputing = copy.deepcopy(base)
    enable_offloaded_checkpointing(recomputing)
    saving = copy.deepcopy(base)
    enable_offloaded_checkpointing(saving, save_attention=True)
    expected = step(recomputing)
    records.clear()
    _assert_same(step(saving), expected, torch.bfloat16)
    # q and k (fp32 after the rotary embedding) are cast where the recompute casts them again:
    # still referred to, not parked; only the output and the log-sum-exp are
    assert len(records) == 2 and all(len(r.entries) == 0 for r in records)  # released after backward
    saving.zero_grad(set_to_none=True)
    records.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saving(inputs_embeds=saving.get_input_embeddings()(ids).float(), labels=labels, use_cache=False)
    assert [len(r.entries[0].blobs) for r in records] == [2, 2]


def test_saved_attention_falls_back_to_recomputing_eager_attention(monkeypatch):
    from memtune.kernels import saved_attention_skip_reason

    model = _tiny_lora_model(torch.float32)
    model.get_base_model().config._attn_implementation = "eager"
    assert "eager" in saved_attention_skip_reason(model)
    plain = _step(model, *_batch())
    off = copy.deepcopy(model)
    enable_offloaded_checkpointing(off, save_attention=True)  # refused inside: layers recompute
    _assert_same(_step(off, *_batch()), plain, torch.float32)


def test_saved_attention_refuses_an_in_place_write_to_its_output(monkeypatch):
    from memtune.kernels import saved_attention

    model = _tiny_lora_model(torch.float32)
    enable_offloaded_checkpointing(model, save_attention=True)
    replay = saved_attention._Replay.apply

    def replay_then_write(*args):
        out = replay(*args)
        out.mul_(1.0)
        return out

    monkeypatch.setattr(saved_attention._Replay, "apply", staticmethod(replay_then_write))
    with pytest.raises(RuntimeError, match="inplace"):
        _step(model, *_batch())


def test_offloaded_checkpointing_runs_the_recompute(monkeypatch):
    from memtune.kernels import offload

    calls = {"forward": 0, "backward": 0}
    fwd, bwd = offload._OffloadedCheckpoint.forward, offload._OffloadedCheckpoint.backward

    def counting_forward(*a, **k):
        calls["forward"] += 1
        return fwd(*a, **k)

    def counting_backward(*a, **k):
        calls["backward"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(offload._OffloadedCheckpoint, "forward", staticmethod(counting_forward))
    monkeypatch.setattr(offload._OffloadedCheckpoint, "backward", staticmethod(counting_backward))
    model = _tiny_lora_model(torch.float32)
    enable_offloaded_checkpointing(model)
    _step(model, *_batch())
    assert calls == {"forward": 2, "backward": 2}
    with torch.no_grad():  # no grad: the original forward, no Function
        model(input_ids=_batch()[0])
    model.eval()
    model(input_ids=_batch()[0])  # eval mode with grad: original forward too
    assert calls == {"forward": 2, "backward": 2}


def test_offloaded_checkpointing_replays_dropout():
    base = _tiny_lora_model(torch.float32, dropout=0.3)
    ids, labels = _batch()
    plain = _step(base, ids, labels, seed=7)
    off = copy.deepcopy(base)
    enable_offloaded_checkpointing(off)
    _assert_same(_step(off, ids, labels, seed=7), plain, torch.float32)


def test_offloaded_checkpointing_frozen_embeddings_still_train_first_layer():
    # the embedding output does not require grad (no enable_input_require_grads):
    # LoRA parameters of layer 0 must still get their gradients
    model = _tiny_lora_model(torch.float32)
    plain = _step(model, *_batch())
    off = copy.deepcopy(model)
    enable_offloaded_checkpointing(off)
    emb_out = off.get_input_embeddings()(_batch()[0])
    assert not emb_out.requires_grad
    _assert_same(_step(off, *_batch()), plain, torch.float32)


def test_offloaded_checkpointing_disable_restores():
    model = _tiny_lora_model(torch.float32)
    model.gradient_checkpointing_enable()
    layers = model.get_base_model().model.layers
    enable_offloaded_checkpointing(model)
    assert all("forward" in layer.__dict__ for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert disable_offloaded_checkpointing(model) == 2
    assert not any("forward" in layer.__dict__ for layer in layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not is_offloaded_checkpointing(model)


def test_tiled_mlp_matches_untiled(dtype):
    base = _tiny_lora_model(dtype)
    ids, labels = _batch(seq=23, batch=2)
    plain = _step(base, ids, labels)
    tiled = copy.deepcopy(base)
    assert enable_tiled_mlp(tiled, 5) == 2
    assert tiled_mlp_chunk(tiled) == 5
    _assert_same(_step(tiled, ids, labels), plain, dtype)


def test_tiled_mlp_chunks_the_no_grad_forward_too():
    # the first (no-grad) pass of a checkpointed layer must not build [tokens, intermediate] whole
    model = _tiny_lora_model(torch.float32)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 11, 64)
    with torch.no_grad():
        expected = mlp(x)
    seen = []
    hook = mlp.gate_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2]))
    enable_tiled_mlp(model, 4)
    with torch.no_grad():
        out = mlp(x)
    hook.remove()
    assert seen == [4, 4, 3]
    torch.testing.assert_close(out, expected)


def test_tiled_mlp_with_offloaded_checkpointing_matches_plain(dtype):
    base = _tiny_lora_model(dtype)
    ids, labels = _batch(seq=21)
    plain = _step(base, ids, labels)
    both = copy.deepcopy(base)
    enable_tiled_mlp(both, 4)
    enable_offloaded_checkpointing(both)
    _assert_same(_step(both, ids, labels), plain, dtype)


def test_tiled_mlp_skips_its_forward_in_an_offloaded_recompute():
    # forward (3 chunks), the offloaded recompute (skipped: its output is discarded), the tiled
    # backward (3 chunks) = 6 down_proj calls per layer, not 9
    model = _tiny_lora_model(torch.float32)
    ids, labels = _batch(seq=21)
    plain = _step(copy.deepcopy(model), ids, labels)
    enable_tiled_mlp(model, 8)
    enable_offloaded_checkpointing(model)
    calls = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
             for layer in model.get_base_model().model.layers]
    _assert_same(_step(model, ids, labels), plain, torch.float32)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2 * 2 * 3


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "nf4"])
def test_tiled_mlp_backward_skips_a_frozen_down_proj_product(quantized):
    # LoRA on q/v only: in the tiled backward down_proj's output is never read, only grad @ W_down,
    # so its product runs in the forward's 3 chunks per layer and not again in backward
    model = _tiny_lora_model(torch.float32, targets=("q_proj", "v_proj"))
    if quantized:
        model = _with_4bit_mlps(model)
    ids, labels = _batch(seq=21)
    plain = _step(copy.deepcopy(model), ids, labels)
    enable_tiled_mlp(model, 8)
    enable_offloaded_checkpointing(model)
    calls = []
    for layer in model.get_base_model().model.layers:
        down = layer.mlp.down_proj
        down.forward = (lambda original: lambda x: calls.append(1) or original(x))(down.forward)
    _assert_same(_step(model, ids, labels), plain, torch.float32)
    assert len(calls) == 2 * 3
    if not quantized:  # a trainable down_proj needs its product in backward: it runs there again
        for layer in model.get_base_model().model.layers:
            layer.mlp.down_proj.weight.requires_grad_(True)
        calls.clear()
        _step(model, ids, labels)
        assert len(calls) == 2 * 3 * 2


def test_tiled_mlp_recompute_replays_dropout():
    # with dropout the tiled forward draws per-chunk masks; its backward must replay them:
    # compare against the same chunked computation differentiated directly
    model = _tiny_lora_model(torch.float32, dropout=0.3, targets=("gate_proj", "up_proj", "down_proj"))
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 17, 64, requires_grad=True)
    grad_out = torch.randn(1, 17, 64)
    params = [p for p in mlp.parameters() if p.requires_grad]

    torch.manual_seed(11)
    ref = torch.cat([mlp(piece) for piece in x.split(6, dim=-2)], dim=-2)
    ref_grads = torch.autograd.grad(ref, [x, *params], grad_out)

    enable_tiled_mlp(model, 6)
    torch.manual_seed(11)
    out = mlp(x)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert disable_tiled_mlp(model) == 2
    assert tiled_mlp_chunk(model) == 0


def test_kernels_survive_eval_and_generation():
    model = _tiny_lora_model(torch.float32)
    prompt = _batch(seq=6)[0]
    model.eval()
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected_logits = model(input_ids=prompt).logits
    enable_offloaded_checkpointing(model)
    enable_tiled_mlp(model, 2)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, expected), mode
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=prompt).logits, expected_logits)
    model.train()
    _step(model, *_batch())  # and back to training
    # training forward with use_cache requested: the checkpointed layers drop the cache
    loss = model(input_ids=_batch()[0], labels=_batch()[1], use_cache=True).loss
    loss.backward()


def _with_4bit_mlps(model, dtype=torch.float32, attention=(), weight_dtype=torch.float32):
    """The tiny model with its (non-LoRA) MLP linears, and the `attention` ones named, quantized to NF4
    from `weight_dtype` weights, as a quantized load leaves them."""
    bnb = pytest.importorskip("bitsandbytes")
    base = model.get_base_model()
    for layer in base.model.layers:
        for owner, name in [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")] + \
                [(layer.self_attn, n) for n in attention]:
            lin = getattr(owner, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to(weight_dtype).clone(), requires_grad=False,
                                         quant_type="nf4")
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data.to(dtype).clone(), requires_grad=False)
            try:
                q = q.to("cpu")
                q(torch.randn(1, lin.in_features, dtype=dtype))
            except Exception as exc:  # noqa: BLE001 - a build without CPU 4-bit kernels
                pytest.skip(f"bitsandbytes 4-bit does not run on this CPU build: {exc}")
            setattr(owner, name, q)
    model.train()
    return model


def _count_dequantize(monkeypatch):
    import bitsandbytes.functional as bnbf

    calls = {"n": 0}
    original = bnbf.dequantize_4bit

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(bnbf, "dequantize_4bit", counting)
    return calls


def test_frozen_4bit_short_path_matches_bitsandbytes_and_dequantizes_once_per_tiled_pass(dtype, monkeypatch):
    from memtune.kernels import disable_frozen_4bit_linears, enable_frozen_4bit_linears

    # k_proj (with a bias) and o_proj quantized too; q and v carry LoRA
    model = _with_4bit_mlps(_tiny_lora_model(dtype, targets=("q_proj", "v_proj")), dtype, ("k_proj", "o_proj"))
    ids, labels = _batch(seq=40)
    plain = _step(model, ids, labels)
    short = copy.deepcopy(model)
    assert enable_frozen_4bit_linears(short) == 10
    enable_offloaded_checkpointing(short, save_attention=True)
    enable_tiled_mlp(short, 10)  # 4 chunks
    _assert_same(_step(short, ids, labels), plain, dtype)
    calls = _count_dequantize(monkeypatch)
    _step(short, ids, labels)
    # per layer: forward k, o once each and the MLP's three once for all chunks; backward (recompute
    # and gradients together) the same five once: 10 a layer, where per call it would be
    # 2 + 3 x 4 forward and 2 x 2 + 3 x 4 x 2 backward = 42
    assert calls["n"] == 2 * 10
    assert disable_frozen_4bit_linears(short) == 10
    with torch.no_grad():  # eval and generation keep bitsandbytes' own path
        short.eval()
        short(input_ids=ids[:, :1])


def test_dequantize_graphs_write_each_layer_once_a_pass_into_one_shared_buffer(dtype, monkeypatch):
    from memtune.kernels import dequantize_graph, disable_dequantize_graphs, enable_dequantize_graphs
    from memtune.kernels import enable_frozen_4bit_linears

    # as a quantized load leaves them: weights quantized from the compute dtype (on a CPU the
    # "graph" replays its dequantize calls eagerly: the same buffer, views and scopes as on a GPU)
    model = _with_4bit_mlps(_tiny_lora_model(dtype, targets=("q_proj", "v_proj")), dtype, ("k_proj", "o_proj"),
                            weight_dtype=dtype)
    ids, labels = _batch(seq=40)
    plain = _step(model, ids, labels)
    graphed = copy.deepcopy(model)
    enable_frozen_4bit_linears(graphed)
    enable_offloaded_checkpointing(graphed, save_attention=True)
    enable_tiled_mlp(graphed, 10)
    assert enable_dequantize_graphs(graphed, capture=False) == 2
    first, second = [layer._memtune_dequantize_graph for layer in graphed.get_base_model().model.layers]
    assert first.buffer is second.buffer and len(first.views) == 5  # k, o and the MLP's three
    replays = {"n": 0}
    weights = dequantize_graph.LayerDequantizeGraph.weights

    def counting(self):
        replays["n"] += 1
        return weights(self)

    monkeypatch.setattr(dequantize_graph.LayerDequantizeGraph, "weights", counting)
    _assert_same(_step(graphed, ids, labels), plain, dtype)
    calls = _count_dequantize(monkeypatch)
    _step(graphed, ids, labels)
    # one replay per layer and pass (forward, backward), each dequantizing the layer's five weights
    # and nothing dequantized outside them
    assert replays["n"] == 2 * 2 * 2 and calls["n"] == 2 * 2 * 5
    # a weight replaced after the capture: that layer falls back to dequantizing as it goes
    mlp = graphed.get_base_model().model.layers[0].mlp
    mlp.up_proj.weight.data = mlp.up_proj.weight.data.clone()
    replays["n"] = calls["n"] = 0
    _assert_same(_step(graphed, ids, labels), plain, dtype)
    assert replays["n"] == 4 and calls["n"] == 2 * 5 + 2 * 5
    assert disable_dequantize_graphs(graphed) == 2
    _assert_same(_step(graphed, ids, labels), plain, dtype)


def test_offloaded_checkpointing_with_4bit_layers():
    model = _with_4bit_mlps(_tiny_lora_model(torch.float32, targets=("q_proj", "v_proj")))
    ids, labels = _batch()
    plain = _step(model, ids, labels)
    off = copy.deepcopy(model)
    enable_offloaded_checkpointing(off)
    enable_tiled_mlp(off, 5)
    _assert_same(_step(off, ids, labels), plain, torch.float32)


# --------------------------------------------------------------------------- benchmarks/compare.py


def _compare_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("memtune_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_records_append_and_summaries(tmp_path):
    compare = _compare_module()
    out = tmp_path / "compare.json"
    base = {"preset": "r1-1.5b", "lora_targets": "qv", "gpu_memory_cap": None, "mode": "fixed"}
    compare.append_record(out, {**base, "stack": "seed", "seq_len": 4096, "status": "ok", "loss_step1": 11.9})
    compare.append_record(out, {**base, "stack": "memtune", "seq_len": 4096, "status": "ok", "loss_step1": 11.91})
    compare.append_record(out, {**base, "stack": "liger", "seq_len": 4096, "status": "ok", "loss_step1": 12.5})
    compare.append_record(out, {**base, "stack": "seed", "seq_len": 65536, "status": "oom", "error": "OOM"})
    search = {**base, "mode": "search", "stack": "memtune"}
    for seq_len, status in ((4096, "ok"), (8192, "ok"), (16384, "oom"), (12288, "ok")):
        compare.append_record(out, {**search, "seq_len": seq_len, "status": status})
    records = compare.load_records(out)
    assert len(records) == 8  # nothing lost
    problems = compare.loss_agreement(compare.latest_records(records, "r1-1.5b"), 0.05)
    assert len(problems) == 1 and problems[0].startswith("liger @ 4096")
    assert compare.search_summary(records, "r1-1.5b")[("qv", None, "memtune")] == {"max_ok": 12288, "min_fail": 16384}
    md, _png = compare.write_reports(out, "r1-1.5b", 0.05)
    text = md.read_text()
    assert "MISMATCH: liger @ 4096" in text and "| qv | - | memtune | 12288 | 16384 |" in text
    out.write_text("{broken")  # an unreadable file is moved aside, not overwritten
    compare.append_record(out, {**base, "stack": "seed", "seq_len": 1, "status": "ok"})
    assert len(compare.load_records(out)) == 1
    assert list(tmp_path.glob("compare.json.unreadable-*"))


def test_compare_repeated_rounds_report_their_median(tmp_path):
    compare = _compare_module()
    out = tmp_path / "compare.json"
    base = {"preset": "r1-1.5b", "lora_targets": "qv", "gpu_memory_cap": None, "mode": "fixed", "seq_len": 16384,
            "status": "ok", "peak_reserved_bytes": 3e9, "peak_host_rss_bytes": 5e9}
    compare.append_record(out, {**base, "stack": "memtune", "tokens_per_s": 30000.0, "step_time_s": 0.55,
                                "peak_allocated_bytes": 2.0e9})  # an earlier single run: not merged
    for group in ("g1", "g2"):
        for rnd, (tps, peak) in enumerate(((33000.0, 2.7e9), (36000.0, 2.6e9), (34000.0, 2.65e9)), 1):
            compare.append_record(out, {**base, "stack": "memtune", "tokens_per_s": tps + (group == "g2"),
                                        "step_time_s": 16384 / tps, "peak_allocated_bytes": peak,
                                        "repeat_group": group, "repeat_round": rnd})
        compare.append_record(out, {**base, "stack": "unsloth", "tokens_per_s": 33500.0, "step_time_s": 0.49,
                                    "peak_allocated_bytes": 3.4e9, "repeat_group": group, "repeat_round": 1})
    rows = {r["stack"]: r for r in compare.latest_records(compare.load_records(out), "r1-1.5b")}
    ours = rows["memtune"]
    assert ours["runs"] == 3 and ours["tokens_per_s"] == 34001.0  # the newest group's median, not its last round
    assert ours["peak_allocated_bytes"] == 2.7e9  # the highest peak of the rounds
    assert "runs" not in rows["unsloth"] or rows["unsloth"]["runs"] == 1
    text = compare.write_reports(out, "r1-1.5b", 0.05)[0].read_text()
    assert "34,001 (median of 33,001 / 36,001 / 34,001)" in text
    assert "| qv | - | 16384 | memtune | 0.79x (unsloth) | 1.01x (unsloth) |" in text
    with pytest.raises(SystemExit):
        compare.parse_args(["--repeat", "0"])


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("MEMTUNE_TEST_COMPARE"),
                    reason="a few minutes of subprocesses; set MEMTUNE_TEST_COMPARE=1")
def test_compare_plumbing_on_tiny_cpu_model(tmp_path):
    compare = _compare_module()
    out = tmp_path / "compare.json"
    code = compare.main(["--preset", "tiny-test", "--stacks", "seed,memtune", "--seq-lens", "64",
                         "--steps", "2", "--warmup", "1", "--out", str(out), "--model-cache", str(tmp_path / "m"),
                         "--work-dir", str(tmp_path)])
    assert code == 0
    records = compare.load_records(out)
    assert [r["stack"] for r in records] == ["seed", "memtune"]
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert abs(records[0]["loss_step1"] - records[1]["loss_step1"]) < 0.05
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_compare_ratio_section():
    compare = _compare_module()
    base = {"lora_targets": "qv", "gpu_memory_cap": None, "seq_len": 4096, "status": "ok"}
    rows = [{**base, "stack": "unsloth", "peak_allocated_bytes": 4e9, "tokens_per_s": 100.0},
            {**base, "stack": "liger", "peak_allocated_bytes": 8e9, "tokens_per_s": 120.0},
            {**base, "stack": "memtune", "peak_allocated_bytes": 2e9, "tokens_per_s": 90.0},
            {**base, "stack": "memtune", "seq_len": 8192, "peak_allocated_bytes": 2e9, "tokens_per_s": 90.0},
            # a --variant row, named anything: one of memtune's, never an "other stack"
            {**base, "stack": "tiled-8192", "command": "python -m memtune train --tiled-mlp-chunk 8192 ",
             "peak_allocated_bytes": 1e9, "tokens_per_s": 200.0}]
    lines = compare.ratio_section(rows)
    assert "| qv | - | 4096 | memtune | 0.50x (unsloth) | 0.75x (liger) |" in lines
    assert "| qv | - | 4096 | tiled-8192 | 0.25x (unsloth) | 1.67x (liger) |" in lines
    assert not any("| 8192 |" in line for line in lines)  # nothing to compare against at 8192


def test_compare_gradient_check_pieces():
    compare = _compare_module()
    assert compare.lora_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == "3.q_proj.A"
    assert compare.lora_key("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight") == "12.down_proj.B"
    assert compare.lora_key("base_model.model.model.embed_tokens.weight") is None
    # the same seeded LoRA weights in two differently initialised models
    a, b = _tiny_lora_model(torch.float32), _tiny_lora_model(torch.float32)
    with torch.no_grad():
        for p in b.parameters():
            if p.requires_grad:
                p.mul_(3)
    assert compare.set_common_lora_weights(a) == compare.set_common_lora_weights(b) == 20
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            assert torch.equal(pa, pb), na
            assert pa.abs().sum() > 0  # B is not zero: A gets a gradient too
    ref = {"0.q_proj.A": torch.ones(4), "0.q_proj.B": torch.ones(4)}
    off = {"0.q_proj.A": torch.ones(4) * 1.1, "0.q_proj.B": torch.ones(4)}
    errors = compare.gradient_errors(off, ref)
    assert errors["grad_rel_error"] == pytest.approx(0.1 / 2 ** 0.5, rel=1e-5)
    assert errors["grad_worst_tensor_rel_error"] == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="LoRA tensors differ"):
        compare.gradient_errors({"0.q_proj.A": torch.ones(4)}, ref)


# --------------------------------------------------------------------------- LoRA in the compute dtype


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _bf16_model_fp32_adapters():
    model = _tiny_lora_model(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # what peft's autocast_adapter_dtype leaves: fp32 adapters on a bf16 model
    return model


def test_compute_dtype_lora_matches_peft_and_saves_less():
    from memtune.kernels import disable_compute_dtype_lora, enable_compute_dtype_lora

    base = _bf16_model_fp32_adapters()
    ids, labels = _batch(seq=32)
    ref = _step(base, ids, labels)
    _, ref_saved = _saved_bytes(lambda: base(input_ids=ids, labels=labels).loss)

    fast = copy.deepcopy(base)
    assert enable_compute_dtype_lora(fast) == 10  # q, v, gate, up, down in 2 layers
    assert enable_compute_dtype_lora(fast) == 10  # idempotent
    got = _step(fast, ids, labels)
    _assert_same(got, ref, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in got[1].values())
    _, saved = _saved_bytes(lambda: fast(input_ids=ids, labels=labels).loss)
    assert saved < ref_saved  # no fp32 copies of the adapted layers' inputs

    # composes with the other kernels
    enable_offloaded_checkpointing(fast)
    enable_tiled_mlp(fast, 7)
    _assert_same(_step(fast, ids, labels), ref, torch.bfloat16)
    assert disable_compute_dtype_lora(fast) == 10


def test_compute_dtype_lora_adds_the_adapter_in_place_where_autograd_allows(monkeypatch):
    # a base output that is not a view gets the adapter's product added in place (one GEMM,
    # no copy); a view (a linear with a bias) gets the out-of-place GEMM; both match peft
    from memtune.kernels import enable_compute_dtype_lora, lora

    base = _bf16_model_fp32_adapters()
    ids, labels = _batch(seq=32)
    ref = _step(base, ids, labels)
    fast = copy.deepcopy(base)
    enable_compute_dtype_lora(fast)
    decisions = []
    real = lora._adds_in_place
    monkeypatch.setattr(lora, "_adds_in_place", lambda *a: decisions.append(real(*a)) or decisions[-1])
    _assert_same(_step(fast, ids, labels), ref, torch.bfloat16)
    assert decisions.count(True) == 6 and decisions.count(False) == 4  # gate/up/down in place; q/v (bias) not
    enable_offloaded_checkpointing(fast)  # in place inside a no-grad forward and its recompute too
    enable_tiled_mlp(fast, 7)
    _assert_same(_step(fast, ids, labels), ref, torch.bfloat16)


def test_compute_dtype_lora_defers_to_peft_outside_the_plain_case():
    from memtune.kernels import enable_compute_dtype_lora

    model = _tiny_lora_model(torch.float32)  # fp32 activations: peft's own forward, bit for bit
    ids, labels = _batch()
    ref = _step(model, ids, labels)
    enable_compute_dtype_lora(model)
    got = _step(model, ids, labels)
    assert torch.equal(got[0], ref[0])
    with model.disable_adapter():
        with torch.no_grad():
            plain = model(input_ids=ids).logits
    assert not torch.equal(plain, model(input_ids=ids).logits)


def test_fused_elementwise_math_matches_transformers(dtype):
    # the uncompiled functions: the math torch.compile fuses on a GPU
    from memtune.kernels import disable_fused_elementwise, enable_fused_elementwise

    base = _tiny_lora_model(dtype)
    ids, labels = _batch()
    plain = _step(base, ids, labels)
    fused = copy.deepcopy(base)
    assert enable_fused_elementwise(fused, compile_fn=False) == 2 * 2 + 1 + 2  # 2 norms a layer, final norm, 2 MLPs
    _assert_same(_step(fused, ids, labels), plain, dtype)
    enable_tiled_mlp(fused, 4)  # tiling wraps the fused MLP forward
    enable_offloaded_checkpointing(fused)
    _assert_same(_step(fused, ids, labels), plain, dtype)
    disable_tiled_mlp(fused)
    assert disable_fused_elementwise(fused) == 7


def test_host_embeddings_match_and_train(dtype):
    from memtune.kernels import (disable_host_embeddings, enable_host_embeddings, host_embedding_weight,
                                 host_embeddings_skip_reason)
    from memtune.models import count_parameters

    base = _tiny_lora_model(dtype)
    ids, labels = _batch()
    plain = _step(base, ids, labels)
    moved = copy.deepcopy(base)
    assert host_embeddings_skip_reason(moved) == "the model is not on a CUDA GPU"
    counts = count_parameters(moved)
    assert enable_host_embeddings(moved, require_cuda=False) is None
    assert enable_host_embeddings(moved, require_cuda=False) is None  # idempotent
    table = host_embedding_weight(moved)
    assert table is not None and not isinstance(table, torch.nn.Parameter)
    assert all("embed_tokens" not in n for n, _ in moved.named_parameters())  # not a parameter any more
    assert count_parameters(moved) == counts  # still counted as the model's
    enable_offloaded_checkpointing(moved)
    _assert_same(_step(moved, ids, labels), plain, dtype)  # LoRA of the first layer still trains
    # the training step's path: rows looked up from the host copy of the ids, passed as inputs_embeds
    from memtune.config import RunConfig
    from memtune.kernels import lookup_on_host
    from memtune.train import forward_loss

    assert torch.equal(lookup_on_host(moved, ids, ids.device), table[ids])
    assert lookup_on_host(base, ids, ids.device) is None
    cfg = RunConfig(loss="full")
    torch.testing.assert_close(forward_loss(moved, {"input_ids": ids, "labels": labels}, cfg, host_batch={"input_ids": ids}),
                               forward_loss(base, {"input_ids": ids, "labels": labels}, cfg), **TOL[dtype])
    assert disable_host_embeddings(moved) and host_embedding_weight(moved) is None


def test_host_embeddings_refuse_a_tied_table():
    from memtune.kernels import enable_host_embeddings

    model = _tiny_lora_model(torch.float32)
    base = model.get_base_model()
    base.lm_head.weight = base.model.embed_tokens.weight
    assert "tied" in enable_host_embeddings(model, require_cuda=False)


def test_profile_stream_summary_counts_idle_and_categories(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("memtune_profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ms = 1000  # trace times are in microseconds
    events = [  # stream 7 computes with a 3 ms gap; stream 20 copies, overlapping it
        {"cat": "kernel", "name": "nvjet_sm90_tst_192x128", "ts": 0, "dur": 10 * ms, "args": {"stream": 7}},
        {"cat": "kernel", "name": "cudnn_sdpa_flash_fprop", "ts": 13 * ms, "dur": 5 * ms, "args": {"stream": 7}},
        {"cat": "kernel", "name": "triton_poi_fused_mul_silu_0", "ts": 18 * ms, "dur": 2 * ms,
         "args": {"stream": 7}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 1 * ms, "dur": 15 * ms,
         "args": {"stream": 20}},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50 * ms},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    text = module.stream_summary(trace)
    compute_line = next(line for line in text.splitlines() if "<- compute" in line)
    stream, count, busy, span, idle = compute_line.split()[:5]
    assert (stream, count) == ("7", "3") and (float(busy), float(span), float(idle)) == (17.0, 20.0, 3.0)
    copy_line = next(line for line in text.splitlines() if line.split()[0] == "20")
    assert float(copy_line.split()[2]) == 15.0
    categories = {line.split()[0] for line in text.split("by category")[1].split("compute-stream idle")[0]
                  .splitlines()[1:]}
    assert categories == {"matmul", "attention", "compiled"}  # the copy stream's memcpy is not counted


def test_profile_idle_summary_splits_host_late_from_waits():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("memtune_profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ms = 1000

    def kernel(ts, dur, corr):
        return {"cat": "kernel", "name": "k", "ts": ts * ms, "dur": dur * ms, "args": {"stream": 7, "correlation": corr}}

    def launch(ts, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts * ms, "dur": 1, "tid": 1,
                "args": {"correlation": corr}}

    compute = [kernel(0, 10, 1), kernel(13, 5, 2), kernel(20, 2, 3)]
    events = [*compute, launch(0, 1), launch(12, 2), launch(5, 3),  # kernel 2 launched late, kernel 3 in time
              {"cat": "cpu_op", "name": "_TiledMLPBackward", "ts": 11 * ms, "dur": 3 * ms, "tid": 1},
              {"cat": "cpu_op", "name": "autograd::engine::evaluate_function: _OffloadedCheckpointBackward",
               "ts": 0, "dur": 30 * ms, "tid": 1}]
    text = module.idle_summary(events, compute)
    assert "host launched late 3.0, waited on a dependency 2.0" in text
    assert text.splitlines()[1].split() == ["3.0", "_TiledMLPBackward"]  # the innermost range, not the outer one


# --------------------------------------------------------------------------- fused RoPE


def test_rope_reference_is_transformers_rope():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from memtune.kernels.fused_rope import rope_reference

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    cos, sin = torch.randn(2, 11, 16, generator=g), torch.randn(2, 11, 16, generator=g)
    for got, want in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_rope_forward_matches_transformers(family, dtype, monkeypatch):
    from memtune.kernels import fused_rope
    from memtune.kernels.fused_rope import disable_fused_rope, enable_fused_rope

    base = _tiny_lora_model(dtype, targets=("q_proj", "k_proj", "v_proj"), family=family)
    ids, labels = _batch()
    plain = _step(base, ids, labels)
    fused = copy.deepcopy(base)
    calls = []
    reference = fused_rope.rope_reference
    monkeypatch.setattr(fused_rope, "rope_reference", lambda *a: calls.append(1) or reference(*a))
    assert enable_fused_rope(fused, compile_fn=False) == 2
    assert enable_fused_rope(fused, compile_fn=False) == 2  # idempotent
    _assert_same(_step(fused, ids, labels), plain, dtype)
    assert len(calls) == 2  # the new forward ran, once per layer
    # with the other kernels: offloaded checkpoints with attention kept from the forward, tiled MLP
    enable_offloaded_checkpointing(fused, save_attention=True)
    enable_tiled_mlp(fused, 7)
    _assert_same(_step(fused, ids, labels), plain, dtype)
    # padding and packed positions go through the same attention function
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    positions = torch.cat([torch.arange(10), torch.arange(ids.shape[1] - 10)])[None]
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {"position_ids": positions}):
            torch.testing.assert_close(fused(input_ids=ids, **kwargs).logits.float(),
                                       base(input_ids=ids, **kwargs).logits.float(), **TOL[dtype])
    disable_tiled_mlp(fused)
    disable_offloaded_checkpointing(fused)
    assert disable_fused_rope(fused) == 2


def test_fused_rope_leaves_generation_with_a_cache_to_transformers():
    from memtune.kernels import fused_rope

    model = _tiny_lora_model(torch.float32)
    model.eval()
    ids, _ = _batch(seq=9)
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    fused_rope.enable_fused_rope(model, compile_fn=False)
    with torch.no_grad():  # a forward that ignored the KV cache would decode other tokens
        got = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_a_refused_dequantize_graph_capture_leaves_the_ordinary_path_with_a_note(monkeypatch):
    from memtune.config import RunConfig
    from memtune.kernels import dequantize_graph, enable_frozen_4bit_linears
    from memtune.techniques import BY_NAME, Target

    model = _with_4bit_mlps(_tiny_lora_model(torch.float32, targets=("q_proj", "v_proj")), weight_dtype=torch.float32)
    enable_frozen_4bit_linears(model)
    captured = []

    def capture_then_fail(fn, device):
        if captured:  # the second layer's capture is refused, after the first one's went in
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        captured.append(fn)
        return None

    monkeypatch.setattr(dequantize_graph, "_capture", capture_then_fail)
    target = Target(model, RunConfig(), torch.device("cpu"), torch.float32)
    notes = [BY_NAME["dequantize_graph"].enable(target)]
    assert notes == ["dequantize_graph: skipped, the capture failed (operation not permitted when stream is capturing)"]
    assert not any(dequantize_graph.has_dequantize_graph(layer) for layer in model.get_base_model().model.layers)
    monkeypatch.setattr(dequantize_graph, "_capture", lambda fn, device: None)
    notes = [BY_NAME["dequantize_graph"].enable(target)]
    assert notes == ["dequantize_graph: 2 decoder layers dequantize their frozen 4-bit weights by one CUDA graph replay"]


def test_static_shape_kernels_serve_training_mode_only(monkeypatch):
    # compile_static_shapes: training-mode calls go to a second compiled function (static shapes),
    # eval and generation keep the any-length one; the math is the same either way
    from memtune.kernels import fused, fused_rope

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None: compiled.append((fn.__name__, dynamic)) or fn)
    fused._compiled.cache_clear()
    try:
        base = _tiny_lora_model(torch.float32, targets=("q_proj", "v_proj"))
        ids, labels = _batch()
        plain = _step(base, ids, labels)
        model = copy.deepcopy(base)
        calls = {"training": 0}
        for module, name in ((fused, "rms_norm_training"), (fused, "silu_mul_training"),
                             (fused_rope, "rope_training")):
            original = getattr(module, name)

            def counting(*args, original=original):
                calls["training"] += 1
                return original(*args)
            counting.__name__ = name
            monkeypatch.setattr(module, name, counting)
        fused.enable_fused_elementwise(model, static_training=True)
        fused_rope.enable_fused_rope(model, static_training=True)
        assert sorted(compiled) == [("rms_norm_reference", True), ("rms_norm_training", False),
                                    ("rope_reference", True), ("rope_training", False),
                                    ("silu_mul_reference", True), ("silu_mul_training", False)]
        _assert_same(_step(model, ids, labels), plain, torch.float32)
        assert calls["training"] == 2 * 2 + 1 + 2 + 2  # norms, final norm, MLPs, RoPE: all in training mode
        calls["training"] = 0
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        assert calls["training"] == 0
    finally:
        fused._compiled.cache_clear()


def test_chunked_ce_full_chunks_take_the_static_shape_kernel(monkeypatch):
    from memtune.kernels import cross_entropy

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None: compiled.append((fn.__name__, dynamic)) or fn)
    calls = {"full": 0, "any": 0}
    full, any_length = cross_entropy.chunk_loss_and_grad_full, cross_entropy.chunk_loss_and_grad

    def counting(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        run.__name__ = fn.__name__
        return run

    monkeypatch.setattr(cross_entropy, "chunk_loss_and_grad_full", counting("full", full))
    monkeypatch.setattr(cross_entropy, "chunk_loss_and_grad", counting("any", any_length))
    cross_entropy._fused_chunk_fn.cache_clear()
    try:
        torch.manual_seed(0)
        hidden = torch.randn(37, 24, requires_grad=True)
        weight = (torch.randn(61, 24) * 0.3).requires_grad_()
        labels = torch.randint(0, 61, (37,))
        loss, grads = _grads(lambda: chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=8, fused=True,
                                                                  static_full_chunks=True), [hidden, weight])
        ref, ref_grads = _grads(lambda: _reference(hidden, weight, labels, None), [hidden, weight])
        torch.testing.assert_close(loss, ref.float(), **TOL[torch.float32])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, **TOL[torch.float32])
        # 37 tokens in chunks of 8: four full chunks on the static kernel, the last 5 on the any-length one
        assert calls == {"full": 4, "any": 4 + 1}  # the full-shape function calls the general math inside
        assert sorted(compiled) == [("chunk_loss_and_grad", True), ("chunk_loss_and_grad_full", False)]
    finally:
        cross_entropy._fused_chunk_fn.cache_clear()


def test_static_shape_kernels_stop_compiling_after_a_few_shapes():
    # unpacked data pads each batch to its longest example: past STATIC_SHAPES_PER_FUNCTION new
    # shapes, calls go to the any-length kernel instead of compiling once more for every length
    from memtune.kernels import fused

    served = []
    static = lambda x: served.append(("static", x.shape[0])) or x  # noqa: E731
    general = lambda x: served.append(("general", x.shape[0])) or x  # noqa: E731
    run = fused._static_then_general(static, general)
    limit = fused.STATIC_SHAPES_PER_FUNCTION
    for n in [*range(1, limit + 3), 1, limit]:
        run(torch.zeros(n))
    assert served == ([("static", n) for n in range(1, limit + 1)] + [("general", limit + 1), ("general", limit + 2)]
                      + [("static", 1), ("static", limit)])
