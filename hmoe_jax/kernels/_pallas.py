"""What both kernels share: backend choice, precision default, and the Triton shape rules."""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pl_triton

from ..runtime.options import matmul_precision


def resolve_interpret(interpret: bool | None) -> bool:
    # Pallas compiles natively only on GPU here; anywhere else the kernel body is interpreted by XLA.
    return jax.default_backend() != "gpu" if interpret is None else interpret


def default_precision(dtype, precision) -> jax.lax.Precision:
    """`precision`, or the model's rule for `dtype` (`runtime.options.matmul_precision`)."""
    return precision if precision is not None else matmul_precision(dtype)


def triton_params(num_warps: int = 4, num_stages: int = 2) -> pl_triton.CompilerParams:
    # Explicit Triton parameters select the Triton backend: in JAX 0.10 a pallas_call without them goes to
    # Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True), which wants a different kernel style.
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_power_of_two(**sizes: int) -> None:
    """Triton tensors must have power-of-two sizes; checked in interpret mode too, so CPU tests run
    exactly the tiling the GPU will compile."""
    for name, size in sizes.items():
        if size < 1 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two (a Triton tile size)")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
