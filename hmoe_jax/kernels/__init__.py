"""Pallas kernels for the GPU path: flash-style sink attention and the MXFP4 grouped expert matmul.

Both compute exactly what the model's XLA path computes (`hmoe_jax.model.layers.Attention.attend`, the
`hmoe_jax.model.moe` backends over `hmoe_jax.model.mxfp4.dequantize_mxfp4`), are tested against it in
Pallas interpret mode on CPU, and are written for the Pallas Triton backend (2-D dots, power-of-two
tiles, no gathers inside the kernel). They know nothing of the model: `hmoe_jax.model.kernel_dispatch`
decides which shapes reach them, with which tiles, on which device mesh, and gives them gradients. Which
path a model takes is its `RunOptions.kernels` ("pallas" on a GPU by default).
"""

from __future__ import annotations

import jax

from .attention import sink_attention
from .moe import PackedExpertWeights, expert_ffn_mxfp4, grouped_matmul_mxfp4

__all__ = ["PackedExpertWeights", "available", "expert_ffn_mxfp4", "grouped_matmul_mxfp4", "sink_attention"]


def available() -> bool:
    """True where the kernels compile natively: JAX's default backend is a GPU (CUDA or ROCm)."""
    return jax.default_backend() == "gpu"
