"""The reference both grouped MXFP4 matmuls (the Pallas kernel and the C++ CPU kernel) are held to."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hmoe_jax.model import mxfp4


def assert_equals_decode_then_matmul(out, rows, group_sizes, extra: int, blocks, scales, rel: float) -> None:
    """out [M, N] is each group's rows times its expert's exactly decoded weights: elementwise within
    rel * (|rows| @ |W|.T) of the float64 product (float32 summation-order rounding only), and rows past
    the groups are exactly 0."""
    out = np.asarray(out, np.float64)
    w = np.swapaxes(mxfp4.dequantize_mxfp4_np(blocks, scales), -1, -2).astype(np.float64)  # bit-identical to jnp's
    x = np.asarray(jnp.asarray(rows).astype(jnp.float32), np.float64)
    experts = len(group_sizes)
    expert_of_row = np.repeat(np.arange(experts + 1), list(group_sizes) + [extra])
    ref, bound = np.zeros(out.shape), np.zeros(out.shape)
    for e in range(experts):
        sel = expert_of_row == e
        ref[sel], bound[sel] = x[sel] @ w[e], np.abs(x[sel]) @ np.abs(w[e])
    assert np.all(np.abs(out - ref) <= rel * bound)
    assert np.all(out[expert_of_row == experts] == 0)
