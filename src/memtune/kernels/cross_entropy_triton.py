"""One loss chunk's softmax cross-entropy and its gradient as a hand-written Triton kernel.

Why not only torch.compile (`chunk_loss_and_grad`): in the profiled 16384-token
H200 step (profile-16k-graph-h200.txt) the compiled kernel took 286 us a chunk
of 512 x 151936 bf16 logits. The least a chunk must move is one read for the
log-sum-exp, one for the gradient and one write of the gradient: 467 MB, about
120 us at the 4 TB/s an H200 streams. This kernel does exactly that, one
program per row:

    pass 1: running max and rescaled sum of exp over the row (online softmax, fp32)
    pass 2: (exp(z - lse) - onehot(label)) / n, written over the logits in place

With a final-logit softcap s (Gemma 2), each z read is first capped, s * tanh(z / s), and pass 2
multiplies the gradient by 1 - tanh^2: the same two reads and one write.

Writing in place also drops the compiled path's separate [C, V] gradient
buffer (156 MB a 512-token chunk). It is the same scheme as Liger-Kernel's
cross-entropy kernel; the chunking, the ignored labels and the matmuls stay in
`cross_entropy.py`. CUDA with Triton only (memtune.loss.compile_unavailable_reason).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["chunk_loss_and_grad_triton"]

# 4096 bf16 logits a loop iteration: 8 warps, 16 per thread, loaded 8 at a time (16 bytes).
_BLOCK = 4096
_NUM_WARPS = 8


@functools.cache
def _kernel():
    # Built on first use so that importing memtune never needs triton (CPU installs have none).
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_ce_kernel(logits_ptr, row_stride, labels_ptr, row_loss_ptr, inv_n_ptr, vocab, cap,
                        BLOCK: tl.constexpr, HAS_CAP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        inv_n = tl.load(inv_n_ptr)
        offsets = tl.arange(0, BLOCK)

        # pass 1: the row's log-sum-exp, rescaling the running sum whenever the max grows
        run_max = float("-inf")
        run_sum = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            z = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            if HAS_CAP:  # capped, the masked lanes would be -cap: keep them at -inf
                z = tl.where(cols < vocab, cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)), float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        target = tl.load(row_ptr + label).to(tl.float32)  # read before pass 2 overwrites it
        if HAS_CAP:
            target = cap * (1.0 - 2.0 / (tl.exp(2.0 * target / cap) + 1.0))
        tl.store(row_loss_ptr + row, lse - target)

        # pass 2: d(mean loss)/d logits, over the logits
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            mask = cols < vocab
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                # tanh as 1 - 2 / (exp(2x) + 1): exact limits at +-inf (exp overflows to inf, or to 0)
                t = 1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)
                grad = tl.exp(cap * t - lse) * inv_n
                grad = tl.where(cols == label, grad - inv_n, grad) * (1.0 - t * t)
            else:
                grad = tl.exp(z - lse) * inv_n
                grad = tl.where(cols == label, grad - inv_n, grad)
            tl.store(row_ptr + cols, grad.to(row_ptr.dtype.element_ty), mask=mask)

    return chunk_ce_kernel


def chunk_loss_and_grad_triton(logits: torch.Tensor, labels: torch.Tensor, inv_n: torch.Tensor,
                               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_loss_and_grad`'s contract (summed fp32 loss, gradient in the logits' dtype), with the
    gradient written over `logits`: the caller must not read the logits afterwards.

    logits [C, V] (rows contiguous), labels [C] int64 in [0, V), inv_n a 0-dim fp32 tensor (1 / tokens),
    softcap: the loss of softcap * tanh(logits / softcap) (None: the logits as they are).
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _kernel()[(rows,)](logits, logits.stride(0), labels, row_loss, inv_n, vocab,
                           float(softcap) if softcap is not None else 1.0,
                           BLOCK=_BLOCK, HAS_CAP=softcap is not None, num_warps=_NUM_WARPS)
    return row_loss.sum(), logits
