"""Memory kernels for long-context LoRA fine-tuning: plain PyTorch, torch.compile where it pays, and
one hand-written Triton kernel (the loss chunk's softmax and gradient, CUDA only).

    chunked_linear_cross_entropy(hidden, weight, labels, bias=None, chunk_tokens=4096,
                                 ignore_index=-100, *, max_chunk_bytes=1 GiB, fused=False) -> scalar
                                 # fused: True (compiled), "triton" (cross_entropy_triton) or "eager"
    enable_offloaded_checkpointing(model, save_attention=False) -> int  # disable_offloaded_checkpointing(model)
    enable_tiled_mlp(model, chunk_tokens) -> int     # disable_tiled_mlp(model)
    enable_compute_dtype_lora(model) -> int          # disable_compute_dtype_lora(model)
    enable_fused_elementwise(model) -> int           # compiled RMSNorm and silu(gate) * up (CUDA)
    enable_fused_rope(model) -> int                  # compiled RoPE of q and k (Qwen2/Llama attention)
    enable_host_embeddings(model) -> str | None      # disable_host_embeddings(model); None = moved

    enable_frozen_int8_backward(model) -> int        # int8 linears keep no input for backward
    enable_frozen_4bit_linears(model) -> int         # frozen 4-bit linears on a short path (dequantize_once)
    enable_dequantize_graphs(model) -> int           # each layer's frozen 4-bit dequantizes as one CUDA graph

All patches act on module instances, never on library classes.
"""

from memtune.kernels.cross_entropy import chunked_linear_cross_entropy, effective_chunk_tokens
from memtune.kernels.dequantize_graph import disable_dequantize_graphs, enable_dequantize_graphs
from memtune.kernels.frozen_4bit import dequantized_once, disable_frozen_4bit_linears, enable_frozen_4bit_linears
from memtune.kernels.fused import disable_fused_elementwise, enable_fused_elementwise
from memtune.kernels.fused_rope import disable_fused_rope, enable_fused_rope
from memtune.kernels.host_embedding import (
    disable_host_embeddings,
    enable_host_embeddings,
    host_embedding_weight,
    host_embeddings_skip_reason,
    lookup_on_host,
)
from memtune.kernels.lora import disable_compute_dtype_lora, enable_compute_dtype_lora
from memtune.kernels.int8_backward import enable_frozen_int8_backward
from memtune.kernels.offload import (
    disable_offloaded_checkpointing,
    enable_offloaded_checkpointing,
    is_offloaded_checkpointing,
    saved_attention_skip_reason,
)
from memtune.kernels.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp, tiled_mlp_chunk

__all__ = [
    "dequantized_once",
    "enable_dequantize_graphs",
    "disable_dequantize_graphs",
    "enable_frozen_4bit_linears",
    "disable_frozen_4bit_linears",
    "enable_frozen_int8_backward",
    "chunked_linear_cross_entropy",
    "effective_chunk_tokens",
    "enable_offloaded_checkpointing",
    "disable_offloaded_checkpointing",
    "is_offloaded_checkpointing",
    "saved_attention_skip_reason",
    "enable_tiled_mlp",
    "disable_tiled_mlp",
    "tiled_mlp_chunk",
    "enable_compute_dtype_lora",
    "disable_compute_dtype_lora",
    "enable_fused_elementwise",
    "disable_fused_elementwise",
    "enable_fused_rope",
    "disable_fused_rope",
    "enable_host_embeddings",
    "disable_host_embeddings",
    "host_embedding_weight",
    "host_embeddings_skip_reason",
    "lookup_on_host",
]
