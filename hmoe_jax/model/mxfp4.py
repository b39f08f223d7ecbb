"""MXFP4 (OCP microscaling, E2M1 elements + one E8M0 scale per 32 elements) decode and encode.

Checkpoint layout (gpt-oss-20b, HF ``*_blocks`` / ``*_scales`` and OpenAI ``original/``):

* ``blocks``: uint8 ``[..., out, G, 16]`` -- 16 bytes pack the 32 elements of one group.
  Byte ``b`` of group ``g`` holds element ``32*g + 2*b`` in its LOW nibble and element
  ``32*g + 2*b + 1`` in its HIGH nibble (low nibble first; reading high-first is a known bug
  of another port).
* ``scales``: uint8 ``[..., out, G]`` -- biased exponent, factor ``2 ** (scale - 127)``.

The decoders here return ``[..., out, G*32]``, i.e. the checkpoint's ``[E, out, in]`` order,
NOT transposed: the layout ``layers.Experts`` stores and every MoE backend takes. Callers that
want ``[E, in, out]`` (the layout of the oracle
``transformers.integrations.mxfp4.convert_moe_packed_tensors`` and of bf16 re-uploads) must
``swapaxes(-1, -2)`` themselves.

Numerics mirror the oracle bit for bit: it computes ``torch.ldexp(table[code], scale - 127)``
in the output dtype, which is an exact ldexp (no intermediate ``2**128``). Hence, for every
code and every scale byte 0..255:

* every finite result is exact in both float32 and bfloat16 (at most 2 significant bits;
  scale 0/1 yield subnormals down to ``2**-128``, representable in both);
* scale 255 (E8M0 NaN in the OCP spec) is NOT treated as NaN: ``+-0.5 * 2**128 = +-2**127``
  is finite, codes with ``|v| >= 1`` give ``+-inf`` and ``+-0`` stays a signed zero. No
  NaN is ever produced.

Because every result is exact, decoding is a pure table lookup indexed by ``(scale, code)``;
that keeps the jnp version independent of flush-to-zero settings of the backend (XLA:CPU
flushes subnormals in arithmetic, a gather only moves bits).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "FP4_VALUES",
    "dequantize_mxfp4_np",
    "dequantize_mxfp4",
    "quantize_mxfp4_np",
]

# E2M1 value of each 4-bit code: bit 3 is the sign, so codes 8..15 mirror 0..7 (8 is -0).
FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)  # fmt: skip

_SCALE_BIAS = 127
_GROUP = 32  # elements per scale
_GROUP_BYTES = _GROUP // 2

# Numpy decode works on this many output elements at a time, so decoding a whole
# gpt-oss expert tensor ([32, 5760, 90, 16] -> 530 M values) needs only the output
# plus ~20 MB of index temporaries.
_NP_CHUNK_ELEMS = 1 << 22

_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


def _canonical_dtype(dtype) -> np.dtype:
    # Both share float32's exponent range, which is what makes every decoded value exact.
    dt = np.dtype(dtype)
    if dt not in _SUPPORTED_DTYPES:
        raise TypeError(f"MXFP4 decode supports float32 and bfloat16, got {dt}")
    return dt


@functools.lru_cache(maxsize=None)
def _value_table(dtype: np.dtype) -> np.ndarray:
    """[256 scales, 16 codes] table of decoded values, computed exactly like the oracle.

    float32 ldexp is exact here (products have 2 significant bits and stay >= 2**-128), so
    the cast to a narrower float with the same exponent range (bfloat16) is exact too.
    """
    exps = np.arange(256, dtype=np.int32)[:, None] - _SCALE_BIAS
    with np.errstate(over="ignore"):  # scale 255 overflows to inf, as in the oracle
        table = np.ldexp(FP4_VALUES[None, :], exps)
    table = table.astype(dtype)
    table.setflags(write=False)
    return table


def dequantize_table(dtype=np.float32) -> np.ndarray:
    """[256 scales, 16 codes], read-only: the decoded value of every (scale byte, code) pair, exactly as
    the oracle and `dequantize_mxfp4` decode it. The CPU kernel (`hmoe_jax.kernels.cpu`) decodes through
    it, so its weights are bit for bit this module's."""
    return _value_table(_canonical_dtype(dtype))


@functools.lru_cache(maxsize=None)
def _pair_table(dtype: np.dtype) -> np.ndarray:
    """[256 * 256, 2] table: row ``scale * 256 + byte`` = (low-nibble value, high-nibble value).

    One gather per byte writes both elements contiguously, straight into the output.
    """
    values = _value_table(dtype)
    byte = np.arange(256)
    pairs = np.stack([values[:, byte & 0x0F], values[:, byte >> 4]], axis=-1)
    pairs = np.ascontiguousarray(pairs.reshape(256 * 256, 2))
    pairs.setflags(write=False)
    return pairs


def _check_shapes(blocks_shape, scales_shape) -> None:
    if len(blocks_shape) < 2 or blocks_shape[-1] != _GROUP_BYTES:
        raise ValueError(f"blocks must be [..., G, {_GROUP_BYTES}], got {tuple(blocks_shape)}")
    if tuple(blocks_shape[:-1]) != tuple(scales_shape):
        raise ValueError(
            f"scales shape {tuple(scales_shape)} != blocks shape without last axis "
            f"{tuple(blocks_shape[:-1])}"
        )


def dequantize_mxfp4_np(blocks, scales, dtype=np.float32) -> np.ndarray:
    """Decode MXFP4 on the host: uint8 ``[..., out, G, 16]`` + ``[..., out, G]`` -> ``[..., out, G*32]``.

    Output is in the checkpoint's ``[..., out, in]`` order (transpose to ``[E, in, out]`` for
    the matmul layout) and bit-identical to the oracle after that transpose, for ``dtype``
    float32 or ``ml_dtypes.bfloat16``. Works in chunks of rows so a converter streaming one
    tensor at a time only ever holds the output plus a few MB of temporaries; ``blocks`` may
    be a memory map.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check_shapes(blocks.shape, scales.shape)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise TypeError(f"blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    dtype = _canonical_dtype(dtype)

    *lead, n_groups, _ = blocks.shape
    rows = math.prod(lead)
    out = np.empty((*lead, n_groups * _GROUP), dtype=dtype)
    if out.size == 0:
        return out

    pairs = _pair_table(dtype)
    blocks_r = blocks.reshape(rows, n_groups, _GROUP_BYTES)
    scales_r = scales.reshape(rows, n_groups)
    out_r = out.reshape(rows, n_groups, _GROUP_BYTES, 2)  # a view: element 2b+j <-> [b, j]

    step = max(1, _NP_CHUNK_ELEMS // (n_groups * _GROUP))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        idx = blocks_r[r0:r1].astype(np.intp)
        idx |= scales_r[r0:r1, :, None].astype(np.intp) << 8
        np.take(pairs, idx, axis=0, out=out_r[r0:r1])
    return out


def dequantize_mxfp4(blocks, scales, dtype=jnp.float32) -> jax.Array:
    """jnp twin of :func:`dequantize_mxfp4_np`, bit-identical to it; jit/vmap friendly.

    Meant for decoding packed experts on the fly inside the jitted forward. The float32 bit pattern
    of every value is built with integer operations (no table gather: XLA:CPU runs a gather one
    element at a time, this vectorises: 1.7x faster, measured) and no float op, so no backend
    flush-to-zero touches a value: an FP4 code is sign s, exponent e (2 bits), mantissa m (1 bit),
    magnitude 0.5*m for e = 0 and 2^(e-1) * (1 + m/2) otherwise; the scale adds scale - 127 to the
    exponent, giving a float32 subnormal (the mantissa shifted right) below exponent 1 and inf past
    254, exactly as `ldexp` in the oracle. bfloat16 is the upper half of those bits (exact: the
    values have at most 2 significant bits). Returns ``[..., out, G*32]`` (not transposed).
    """
    _check_shapes(jnp.shape(blocks), jnp.shape(scales))
    dtype = _canonical_dtype(dtype)
    # (The operation order below is the fast one: the same arithmetic on int32 nibbles taken from
    # int32 bytes compiles to code twice as slow on XLA:CPU, measured.)
    blocks = jnp.asarray(blocks).astype(jnp.uint8)
    wide = blocks.astype(jnp.uint32)
    scale = jnp.asarray(scales).astype(jnp.uint8).astype(jnp.int32)[..., None, None]
    codes = jnp.stack([wide & 0x0F, wide >> 4], axis=-1).astype(jnp.int32)  # [..., G, 16, 2]: low nibble first
    sign = (codes >> 3) << 31
    e, m = (codes >> 1) & 3, codes & 1
    exponent = jnp.where(e == 0, 126, e + 126) + scale - _SCALE_BIAS  # biased float32 exponent
    mantissa = jnp.where(e == 0, 0, m << 22)
    normal = (exponent << 23) | mantissa
    subnormal = (0x800000 | mantissa) >> jnp.clip(1 - exponent, 0, 31)
    bits = jnp.where(exponent >= 255, 0x7F800000, jnp.where(exponent >= 1, normal, subnormal))
    bits = (jnp.where((codes & 7) == 0, 0, bits) | sign).astype(jnp.uint32)
    if dtype == np.dtype(jnp.bfloat16):
        values = jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    else:
        values = jax.lax.bitcast_convert_type(bits, jnp.float32)
    *lead, n_groups, _ = blocks.shape
    return values.reshape(*lead, n_groups * _GROUP)


# Magnitudes of codes 0..7 and the midpoints between neighbours, for round-to-nearest.
_FP4_MAGNITUDES = FP4_VALUES[:8].astype(np.float64)
_FP4_MIDPOINTS = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2
_FP4_MAX = 6.0


def quantize_mxfp4_np(weights) -> tuple[np.ndarray, np.ndarray]:
    """Pack float ``[..., out, in]`` (``in % 32 == 0``) into MXFP4 ``(blocks, scales)``.

    A fixture packer (the real quantizer needs triton kernels). Per 32-group the scale is
    the smallest power of two ``X`` with ``max|w| / X <= 6``, so the group maximum always
    fits without clipping. (The OCP spec's ``floor(log2 max) - 2`` can be one step smaller
    and clip values in (6X, 8X) to 6X; ours trades that for one bit of headroom.)
    Elements round to the nearest E2M1 value, ties to even mantissa, sign kept (``-0`` ->
    code 8). Weights already of the form ``code * 2**(s-127)`` with a shared ``s`` per group
    round-trip exactly (the chosen scale byte may differ, the decoded values do not).
    Scale bytes are clamped to 0..254, i.e. 255 (inf/NaN territory) is never emitted.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 2 or w.shape[-1] % _GROUP:
        raise ValueError(f"weights must be [..., out, in] with in % {_GROUP} == 0, got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    *lead, n_in = w.shape
    g = w.reshape(*lead, n_in // _GROUP, _GROUP)

    # ceil(log2(amax / 6)) from frexp: m * 2**e with m in [0.5, 1); exact powers of two have
    # m == 0.5. amax / 6 is exact whenever amax is 6 * 2**k, the only boundary that matters.
    amax = np.abs(g).max(axis=-1)
    mant, exp = np.frexp(amax / _FP4_MAX)
    shared = exp - (mant == 0.5)
    scale_byte = np.where(amax > 0, shared + _SCALE_BIAS, _SCALE_BIAS)
    scale_byte = np.clip(scale_byte, 0, 254)

    q = np.abs(np.ldexp(g, (_SCALE_BIAS - scale_byte)[..., None]))  # exact: power-of-two scale
    q = np.minimum(q, _FP4_MAX)
    lo = np.searchsorted(_FP4_MIDPOINTS, q, side="left")
    hi = np.searchsorted(_FP4_MIDPOINTS, q, side="right")
    # lo != hi only on an exact midpoint; the even code there is the even-mantissa one.
    code = np.where(lo % 2 == 0, lo, hi).astype(np.uint8)
    code |= np.signbit(g).astype(np.uint8) << 3

    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.astype(np.uint8), scale_byte.astype(np.uint8)
