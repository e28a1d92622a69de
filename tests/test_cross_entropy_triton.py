"""The Triton loss-chunk kernel against the reference math and full-logits cross-entropy.

Runs on a CUDA GPU, or on the CPU under Triton's interpreter where triton is installed
(it is not part of the CPU install, so there this file is skipped).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # triton reads this when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from memtune.kernels import cross_entropy_triton  # noqa: E402
from memtune.kernels.cross_entropy import chunk_loss_and_grad, chunked_linear_cross_entropy  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(5, 61), (3, 4096), (7, 9001), (1, 1)])
def test_triton_chunk_matches_the_reference_math_and_writes_over_the_logits(dtype, rows, vocab):
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype)
    logits[0, : min(vocab, 7)] += 30  # a row whose max sits far above the rest: the online rescale matters
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    inv_n = torch.full((), 1.0 / (rows + 3), device=DEVICE)
    ref_sum, ref_grad = chunk_loss_and_grad(logits.clone(), labels, inv_n)
    loss_sum, grad = cross_entropy_triton.chunk_loss_and_grad_triton(logits, labels, inv_n)
    assert grad.data_ptr() == logits.data_ptr() and grad.dtype == dtype
    torch.testing.assert_close(loss_sum, ref_sum, atol=1e-4, rtol=1e-5)
    # bf16 gradients may differ by one rounding step of the stored value
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mask", ["strided", "none"])
def test_chunked_loss_with_the_triton_kernel_equals_full_logits_cross_entropy(mask, with_bias):
    torch.manual_seed(1)
    hidden = torch.randn(37, 24, device=DEVICE, requires_grad=True)
    weight = (torch.randn(61, 24, device=DEVICE) * 0.3).requires_grad_()
    bias = torch.randn(61, device=DEVICE, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 61, (37,), device=DEVICE)
    if mask == "strided":
        labels[::4] = -100
    tensors = [t for t in (hidden, weight, bias) if t is not None]

    def grads(fn):
        for t in tensors:
            t.grad = None
        loss = fn()
        loss.backward()
        return [loss.detach()] + [t.grad.clone() for t in tensors]

    got = grads(lambda: chunked_linear_cross_entropy(hidden, weight, labels, bias, chunk_tokens=8, fused="triton"))
    ref = grads(lambda: F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(5, 61), (3, 4099)])
def test_triton_chunk_with_a_softcap_matches_the_reference_math(dtype, rows, vocab):
    torch.manual_seed(2)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 20).to(dtype)  # far past the cap: tanh saturates
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    inv_n = torch.full((), 1.0 / rows, device=DEVICE)
    ref_sum, ref_grad = chunk_loss_and_grad(logits.clone(), labels, inv_n, 5.0)
    loss_sum, grad = cross_entropy_triton.chunk_loss_and_grad_triton(logits, labels, inv_n, 5.0)
    torch.testing.assert_close(loss_sum, ref_sum, atol=1e-4, rtol=1e-5)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)


def test_chunked_loss_with_the_triton_kernel_and_a_softcap_equals_full_logits():
    torch.manual_seed(4)
    hidden = (torch.randn(37, 24, device=DEVICE) * 2).requires_grad_()
    weight = torch.randn(61, 24, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 61, (37,), device=DEVICE)
    labels[::3] = -100

    def grads(fn):
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
        return [loss.detach(), hidden.grad.clone(), weight.grad.clone()]

    got = grads(lambda: chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=8, fused="triton",
                                                     softcap=3.0))
    ref = grads(lambda: F.cross_entropy(3.0 * torch.tanh(F.linear(hidden, weight) / 3.0), labels))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
