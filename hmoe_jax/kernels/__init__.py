"""Pallas kernels for the GPU path: sink attention and the MXFP4 grouped expert matmul.

Both kernels compute exactly what the XLA path computes (`model.Attention.attend`, the `moe` backends
over `mxfp4.dequantize_mxfp4`), are tested against it in Pallas interpret mode on CPU, and are written
for the Pallas Triton backend (2-D dots, power-of-two tiles, no gathers inside the kernel).

`use_pallas()` is the switch the model reads: the kernels run where they compile (a GPU backend) and
the XLA path runs everywhere else. Set `HMOE_PALLAS=0` to force the XLA path on a GPU (A/B runs,
debugging), `HMOE_PALLAS=1` to force the kernels (on CPU they then run in interpret mode: slow, for
tests only).
"""

from __future__ import annotations

import os

import jax

from .attention import sink_attention
from .moe import PackedExpertWeights, grouped_matmul_mxfp4, moe_pallas_mxfp4

__all__ = [
    "PackedExpertWeights",
    "available",
    "grouped_matmul_mxfp4",
    "moe_pallas_mxfp4",
    "sink_attention",
    "use_pallas",
]


def available() -> bool:
    """True where the kernels compile natively: JAX's default backend is a GPU (CUDA or ROCm)."""
    return jax.default_backend() == "gpu"


def use_pallas() -> bool:
    """Whether the model should route attention and packed experts through the kernels.

    Defaults to `available()`; the `HMOE_PALLAS` environment variable (0/1) overrides it. Read at trace
    time, so it is fixed per compiled function.
    """
    forced = os.environ.get("HMOE_PALLAS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return available()
