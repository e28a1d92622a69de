"""Linear + cross-entropy fused over token chunks: the [tokens, vocab] logits never exist whole.

Why: the logits are the single largest activation of a long-context fine-tune
with a large vocabulary. For the DeepSeek-R1-Distill-Qwen-1.5B shape
(vocab 151936):

    16384 tokens x 151936 x 4 B (fp32 logits)   = 9.96 GB  (+ the same again for their gradient)
    65536 tokens x 151936 x 4 B                 = 39.8 GB
    131072 tokens                                = 79.7 GB

A chunk of C tokens holds, at its peak, the chunk logits in fp32 (C x V x 4 B)
plus, briefly, one copy in the input dtype (C x V x 2 B for bf16):

    C = 4096: 2.49 GB fp32 + 1.24 GB bf16 = 3.7 GB peak
    C = 1728: 1.05 GB fp32 + 0.53 GB bf16 = 1.6 GB peak   (the 1 GiB default cap below)
    C = 1024: 0.62 GB fp32 + 0.31 GB bf16 = 0.9 GB peak

The trade-off: every chunk is two matmuls against the full lm_head
([C, H] x [H, V] for the logits, [C, V] x [V, H] for grad_hidden), so a
chunk reads the whole 467 MB bf16 lm_head twice. Above about 1024 tokens per
chunk these matmuls are compute bound on an H200 (2*C*H*V flops = 478 GFLOP at
C = 1024 against 0.9 GB of weight traffic), so smaller chunks cost launch
overhead only, not throughput. `max_chunk_bytes` therefore caps the chunk so
that its fp32 logits stay within 1 GiB, whatever `chunk_tokens` asks for.

The gradient wrt the hidden states (and the weight / bias, when they require
it) is computed chunk by chunk during the forward, as Liger-Kernel's fused
linear cross-entropy does; only grad_hidden [N, H] (input dtype) is kept, plus
grad_weight [V, H] fp32 when the weight is trainable (a frozen lm_head, the
LoRA case, allocates nothing for it). Backward only scales the stored
gradients by grad_output.

Tokens whose label is `ignore_index` are dropped before the first matmul
(prompt tokens of an SFT example cost nothing); their hidden gradient is zero.

Final-logit softcapping (Gemma 2: `final_logit_softcapping` 30): the loss is
taken over s * tanh(logits / s), and the gradient passes through the cap,
d/dlogits = (softmax - onehot) * (1 - tanh^2). The unfused path then holds one
more fp32 [C, V] tensor (the tanh) a chunk; the fused one computes it in the kernel.
"""

from __future__ import annotations

import functools

from typing import Callable

import torch

__all__ = ["chunked_linear_cross_entropy", "effective_chunk_tokens", "chunk_loss_and_grad"]

_DEFAULT_MAX_CHUNK_BYTES = 1 << 30  # fp32 chunk logits at most 1 GiB


def effective_chunk_tokens(chunk_tokens: int, vocab_size: int, max_chunk_bytes: int | None = _DEFAULT_MAX_CHUNK_BYTES) -> int:
    """The chunk length actually used: `chunk_tokens`, capped so fp32 logits fit `max_chunk_bytes`."""
    chunk = max(1, int(chunk_tokens))
    if max_chunk_bytes:
        cap = max(1, int(max_chunk_bytes) // (4 * max(1, vocab_size)))
        if cap < chunk:
            # round down to a multiple of 64 (tensor-core friendly) when that leaves something
            chunk = cap - cap % 64 if cap >= 64 else cap
    return chunk


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        pass
    return hidden.dtype


def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, inv_n: torch.Tensor,
                        softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and d(mean loss)/d logits, in the logits' dtype, as one function.

    Compiled (`fused=True` below), it becomes a reduction kernel and one pointwise
    kernel that read the [C, V] logits twice and write the gradient once; the
    fp32 [C, V] copy of the plain path never exists. `inv_n` is a 0-dim tensor
    so that a new token count does not recompile. `softcap` s: the loss of s * tanh(logits / s).
    """
    z = logits.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=1)
    target = z.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == labels[:, None]
    grad = (torch.exp(z - lse[:, None]) - onehot.to(z.dtype)) * inv_n
    if softcap is not None:
        grad = grad * (1 - t * t)
    return (lse - target).sum(), grad.to(logits.dtype)


def chunk_loss_and_grad_full(logits: torch.Tensor, labels: torch.Tensor, inv_n: torch.Tensor,
                             softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_loss_and_grad under its own code object: compiled for the full chunk's exact shape."""
    return chunk_loss_and_grad(logits, labels, inv_n, softcap)


@functools.cache
def _fused_chunk_fn(static_full_chunks: bool = False, chunk: int = 0) -> Callable:
    """The compiled chunk function; with static_full_chunks, chunks of exactly `chunk` rows run a
    kernel compiled for that shape (the last, shorter chunk and any other keep the any-length one)."""
    general = torch.compile(chunk_loss_and_grad, dynamic=True)
    if not static_full_chunks:
        return general
    full = torch.compile(chunk_loss_and_grad_full, dynamic=False)

    def dispatch(logits: torch.Tensor, labels: torch.Tensor, inv_n: torch.Tensor, softcap: float | None = None):
        return (full if logits.shape[0] == chunk else general)(logits, labels, inv_n, softcap)

    return dispatch


def _chunk_fn(fused: bool | str, static_full_chunks: bool, chunk: int) -> Callable | None:
    """What computes each chunk's loss and gradient: None (the plain fp32 path), the math uncompiled
    ("eager"), the hand-written Triton kernel ("triton") or the compiled function (True). Each takes
    the softcap as its fourth argument."""
    if not fused:
        return None
    if fused == "eager":
        return chunk_loss_and_grad
    if fused == "triton":
        from memtune.kernels.cross_entropy_triton import chunk_loss_and_grad_triton
        return chunk_loss_and_grad_triton
    if fused is not True:
        raise ValueError(f"fused must be False, True, 'eager' or 'triton'; got {fused!r}")
    return _fused_chunk_fn(static_full_chunks, chunk if static_full_chunks else 0)


def _label_layout(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, int, int, bool]:
    """(indices of the labelled tokens, their count, the first one, whether they form one run).

    Labelled tokens forming one run (all of them, or a masked prompt / the
    shifted-out last position) are a slice: no gather of hidden, no scatter of
    its gradient. On a GPU tensor this reads the count back (a host sync); on
    a host copy of the labels it costs the GPU nothing.
    """
    valid_idx = (labels != ignore_index).nonzero().squeeze(1)
    n_valid = int(valid_idx.numel())
    first = 0
    contiguous = n_valid == labels.numel()
    if n_valid and not contiguous:
        first, last = valid_idx[[0, -1]].tolist()
        contiguous = last - first + 1 == n_valid
    return valid_idx, n_valid, first, contiguous


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, ignore_index, compute_dtype, fused, layout,
                softcap):
        vocab = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]

        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)  # one copy, only if dtypes differ
        b = None if bias is None else (bias if bias.dtype == compute_dtype else bias.to(compute_dtype))

        valid_idx, n_valid, first, contiguous = layout or _label_layout(labels, ignore_index)
        if valid_idx.device != hidden.device and not contiguous:
            # only a scattered layout needs the indices on the GPU; pinned, so the copy does not sync
            valid_idx = valid_idx.pin_memory().to(hidden.device, non_blocking=True)

        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(vocab, weight.shape[1], dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)

        if n_valid:
            if contiguous:
                h_all, y_all = hidden[first:first + n_valid], labels[first:first + n_valid]
            else:  # [Nv, H]: only the tokens with a label
                h_all, y_all = hidden.index_select(0, valid_idx), labels.index_select(0, valid_idx)
            inv_n = 1.0 / n_valid
            # made on the device: torch.tensor(x, device=cuda) copies from pageable host memory and
            # synchronizes the stream, which (once per chunk) left the GPU idle while the host caught up
            inv_n_t = torch.full((), inv_n, dtype=torch.float32, device=hidden.device) if fused is not None else None
            for start in range(0, n_valid, chunk_tokens):
                h = h_all[start:start + chunk_tokens]
                if h.dtype != compute_dtype:
                    h = h.to(compute_dtype)
                y = y_all[start:start + chunk_tokens].long()
                rows = torch.arange(h.shape[0], device=h.device)

                # logits in the compute dtype: C x V x 2 B (bf16)
                logits = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
                if fused is not None:
                    chunk_sum, g = (fused(logits, y, inv_n_t) if softcap is None
                                    else fused(logits, y, inv_n_t, softcap))
                    loss_sum += chunk_sum
                    del logits
                    if need_b:
                        grad_bias += g.float().sum(dim=0)
                    _accumulate_grads(g, h, w, grad_hidden, grad_weight, valid_idx, first, start, contiguous,
                                      need_h, need_w)
                    del g
                    continue
                # fp32 from here on, in place: C x V x 4 B (for fp32 inputs .float() is the same tensor)
                z = logits.float()
                del logits
                cap_grad = None
                if softcap is not None:  # z = s * tanh(z / s); 1 - tanh^2 kept for the gradient
                    t = z.div_(softcap).tanh_()  # in place: z is this chunk's own fp32 copy
                    z = t.mul(softcap)
                    cap_grad = t.mul_(t).neg_().add_(1)
                    del t
                target = z[rows, y]                       # [C]
                z_max = z.amax(dim=1, keepdim=True)       # [C, 1]
                z.sub_(z_max).exp_()                      # exp(z - max)
                sum_exp = z.sum(dim=1, keepdim=True)      # [C, 1]
                lse = z_max.squeeze(1) + sum_exp.squeeze(1).log()
                loss_sum += (lse - target).sum()

                if need_h or need_w or need_b:
                    # d(mean loss)/d logits = (softmax - onehot) / n_valid, built in place in z
                    z.mul_(sum_exp.reciprocal_().mul_(inv_n))
                    z[rows, y] -= inv_n
                    if cap_grad is not None:
                        z.mul_(cap_grad)
                        del cap_grad
                    g = z if compute_dtype == torch.float32 else z.to(compute_dtype)  # C x V x 2 B
                    if need_b:
                        grad_bias += z.sum(dim=0)
                    del z
                    _accumulate_grads(g, h, w, grad_hidden, grad_weight, valid_idx, first, start, contiguous,
                                      need_h, need_w)
                    del g
                else:
                    del z

        loss = loss_sum / n_valid if n_valid else loss_sum  # no labelled token: loss 0, gradients 0
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        gh = gw = gb = None
        if grad_hidden is not None:
            gh = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            gw = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            gb = (grad_bias * grad_output).to(ctx.bias_dtype)
        return gh, gw, gb, None, None, None, None, None, None, None


def _accumulate_grads(g, h, w, grad_hidden, grad_weight, valid_idx, first, start, contiguous, need_h, need_w):
    """grad_hidden rows of this chunk = g @ w; grad_weight += g^T @ h (accumulated in fp32)."""
    if need_h:
        gh = g @ w  # [C, H]
        if contiguous:
            grad_hidden[first + start:first + start + gh.shape[0]] = gh
        else:
            grad_hidden.index_copy_(0, valid_idx[start:start + gh.shape[0]], gh.to(grad_hidden.dtype))
    if need_w:
        grad_weight.add_(g.t() @ h)  # [V, H] in the compute dtype


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    ignore_index: int = -100,
    *,
    max_chunk_bytes: int | None = _DEFAULT_MAX_CHUNK_BYTES,
    fused: bool | str = False,
    host_labels: torch.Tensor | None = None,
    static_full_chunks: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, without the full logits.

    hidden [N, H] (or [..., H], flattened), weight [V, H], labels [N] aligned
    with hidden (shift them first for next-token prediction), bias [V] or None.
    Returns a float32 scalar: the mean over tokens whose label is not
    `ignore_index`; 0 (with zero gradients) when there is none. Logits are
    computed in the input dtype (the autocast dtype under autocast), softmax
    and log-sum-exp in fp32. The chunk is `chunk_tokens`, capped so the fp32
    chunk logits stay within `max_chunk_bytes` (None: no cap). fused=True runs
    each chunk's softmax and gradient as one compiled function
    (`chunk_loss_and_grad`, torch.compile); fused="eager" runs the same
    function uncompiled (for testing it anywhere); fused="triton" runs a
    hand-written Triton kernel that writes the gradient over the chunk logits
    (`cross_entropy_triton`, CUDA). `host_labels`: the same
    labels in host memory, if the caller has them; which tokens are labelled
    is then read there, and the GPU is not made to wait for that mid-step
    (the host keeps running ahead into backward). `static_full_chunks` (with
    fused=True): full chunks run a kernel compiled for their exact shape.
    `softcap` s (the model's final_logit_softcapping, memtune.families.final_logit_softcap): the
    loss of s * tanh(logits / s), as Gemma 2 computes its logits; None: the logits as they are.
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None; got {softcap!r}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden states")
    layout = None
    if host_labels is not None and host_labels.device.type == "cpu":
        host_labels = host_labels.reshape(-1)
        if host_labels.shape != labels.shape:
            raise ValueError(f"host_labels has {host_labels.shape[0]} labels, labels {labels.shape[0]}")
        layout = _label_layout(host_labels, ignore_index)
    if labels.device != hidden.device:
        labels = labels.to(hidden.device)
    chunk = effective_chunk_tokens(chunk_tokens, weight.shape[0], max_chunk_bytes)
    compute_dtype = _compute_dtype(hidden, weight)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        fn = _chunk_fn(fused, static_full_chunks, chunk)
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, ignore_index, compute_dtype, fn,
                                                layout, None if softcap is None else float(softcap))
