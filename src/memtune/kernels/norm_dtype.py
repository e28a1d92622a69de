"""RMSNorm outputs handed to the matmuls in the compute dtype, for an fp32 residual stream.

With residual_dtype fp32 the hidden states between the sublayers stay fp32; a
bitsandbytes linear returns its input's dtype, so without this every
[tokens, intermediate] MLP activation would be fp32 too (measured: 1.6x the
saved bytes a layer). Each norm's output is cast once, where it enters the
matmuls; the layer's saved tensors then stay as they were.
"""

from __future__ import annotations

import torch
from torch import nn

from memtune.kernels._common import base_model, restore_forwards, swap_forward
from memtune.kernels.fused import is_rms_norm

_ATTR = "_memtune_norm_dtype"


def enable_norm_output_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Every RMSNorm of `model` returns `dtype`; returns how many. Idempotent."""
    def make_forward(norm: nn.Module, original):
        def forward(hidden: torch.Tensor) -> torch.Tensor:
            return original(hidden).to(dtype)
        return forward

    norms = [m for m in base_model(model).modules() if is_rms_norm(m)]
    for norm in norms:
        swap_forward(norm, _ATTR, make_forward)
    return len(norms)


def disable_norm_output_dtype(model: nn.Module) -> int:
    return restore_forwards(base_model(model).modules(), _ATTR)
