"""MXFP4 decode/encode against the spec and the transformers oracle.

Oracle facts pinned here (transformers 5.23 ``convert_moe_packed_tensors``): it takes blocks
``[E, out, G, 16]`` + scales ``[E, out, G]``, returns ``[E, G*32, out]`` = ``[E, in, out]``
(it transposes axes 1 and 2), in ``dtype`` (default bfloat16), and computes an exact
``ldexp`` -- scale 255 gives +-2**127 for +-0.5, +-inf for larger codes, signed zeros for
+-0, never NaN. Our decoders return ``[E, out, in]``; tests transpose before comparing.
"""

import jax
import ml_dtypes
import numpy as np
import pytest

from hmoe_jax.model import mxfp4
from hmoe_jax.model.mxfp4 import FP4_VALUES, dequantize_mxfp4, dequantize_mxfp4_np, quantize_mxfp4_np

DTYPES = [np.float32, ml_dtypes.bfloat16]
_UINT = {2: np.uint16, 4: np.uint32}

_jit_dequantize = jax.jit(dequantize_mxfp4, static_argnums=2)


def bits(x):
    x = np.asarray(x)
    return x.view(_UINT[x.dtype.itemsize])


def assert_bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(bits(a), bits(b))


def random_packed(rng, shape_blocks):
    """Random blocks/scales where every byte value 0..255 and every scale 0..255 occurs."""
    n_groups = int(np.prod(shape_blocks[:-1]))
    assert n_groups >= 256
    blocks = rng.integers(0, 256, size=shape_blocks, dtype=np.uint8)
    blocks.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    scales = rng.integers(0, 256, size=shape_blocks[:-1], dtype=np.uint8)
    scales.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    # Shuffle so the full-coverage entries are not all in expert 0.
    blocks.reshape(-1)[:] = rng.permutation(blocks.reshape(-1))
    perm = rng.permutation(n_groups)
    scales.reshape(-1)[:] = scales.reshape(-1)[perm]
    assert len(np.unique(blocks)) == 256 and len(np.unique(scales)) == 256
    return blocks, scales


def oracle(blocks, scales, dtype):
    """transformers' decoder, returned as numpy in ITS layout [E, in, out]."""
    torch = pytest.importorskip("torch")
    tf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(ml_dtypes.bfloat16): torch.bfloat16}
    out = tf_mxfp4.convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=tdtype[np.dtype(dtype)]
    )
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[out.dtype]
    return out.contiguous().view(int_view).numpy().view(_UINT[np.dtype(dtype).itemsize]).view(dtype)


# ---------------------------------------------------------------- spec pins


def test_fp4_table_is_the_spec_table():
    spec = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]  # fmt: skip
    assert_bits_equal(FP4_VALUES, np.array(spec, np.float32))  # -0.0 included
    tf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    assert_bits_equal(FP4_VALUES, np.array(tf_mxfp4.FP4_VALUES, np.float32))


@pytest.mark.parametrize("decode", ["np", "jnp"])
def test_nibble_order_and_scale_by_hand(decode):
    # Byte 0x21: LOW nibble (code 1 = +0.5) is the first element, HIGH (code 2 = +1.0) second.
    # Byte 0x8F: low code 15 = -6, high code 8 = -0. Group 1 uses scale 129 (x4).
    blocks = np.zeros((1, 1, 2, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x21
    blocks[0, 0, 0, 15] = 0x8F
    blocks[0, 0, 1, 1] = 0x7A  # low code 10 = -1, high code 7 = +6
    scales = np.array([[[127, 129]]], np.uint8)
    expected = np.zeros((1, 1, 64), np.float32)
    expected[0, 0, [0, 1, 30, 31]] = [0.5, 1.0, -6.0, -0.0]
    expected[0, 0, [34, 35]] = [-4.0, 24.0]
    fn = dequantize_mxfp4_np if decode == "np" else _jit_dequantize
    assert_bits_equal(fn(blocks, scales, np.float32), expected)


def test_extreme_scales_by_hand():
    blocks = np.array([0x21, 0x87] + [0] * 14, np.uint8).reshape(1, 1, 1, 16)
    lo = dequantize_mxfp4_np(blocks, np.array([[[0]]], np.uint8))[0, 0, :4]
    hi = dequantize_mxfp4_np(blocks, np.array([[[255]]], np.uint8))[0, 0, :4]
    assert_bits_equal(lo, np.array([2.0**-128, 2.0**-127, 6 * 2.0**-127, -0.0], np.float32))
    # Exact ldexp: 0.5 * 2**128 is finite, larger codes overflow, zeros stay signed zeros.
    assert_bits_equal(hi, np.array([2.0**127, np.inf, np.inf, -0.0], np.float32))


# ---------------------------------------------------------------- oracle agreement

SHAPES = [(2, 16, 8, 16), (3, 40, 3, 16), (1, 300, 1, 16)]  # [E, out, G, 16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_decoders_bit_identical_to_oracle(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    blocks, scales = random_packed(rng, shape)
    ref = oracle(blocks, scales, dtype)
    e, out, g, _ = shape
    assert ref.shape == (e, g * 32, out) and ref.dtype == np.dtype(dtype)  # oracle: [E, in, out]

    ours_np = dequantize_mxfp4_np(blocks, scales, dtype)
    ours_jnp = np.asarray(_jit_dequantize(blocks, scales, dtype))
    assert ours_np.shape == (e, out, g * 32)  # ours: checkpoint order [E, out, in]
    assert_bits_equal(ours_np.swapaxes(-1, -2), ref)
    assert_bits_equal(ours_jnp, ours_np)
    # All scales 0..255 were exercised, including subnormal and inf outputs; no NaN anywhere.
    as_f32 = ours_np.astype(np.float32)
    assert np.isinf(as_f32).any() and (np.abs(as_f32[as_f32 != 0]) < 2.0**-126).any()
    assert not np.isnan(as_f32).any()


def test_np_chunking_and_prefix_shapes(monkeypatch):
    rng = np.random.default_rng(7)
    blocks, scales = random_packed(rng, (3, 50, 4, 16))
    full = dequantize_mxfp4_np(blocks, scales)
    monkeypatch.setattr(mxfp4, "_NP_CHUNK_ELEMS", 7 * 4 * 32)  # 7 rows/chunk, ragged tail
    assert_bits_equal(dequantize_mxfp4_np(blocks, scales), full)
    # No expert axis, and an extra leading axis: decoding is per row, layout-agnostic.
    assert_bits_equal(dequantize_mxfp4_np(blocks[1], scales[1]), full[1])
    assert_bits_equal(dequantize_mxfp4_np(blocks[None], scales[None]), full[None])
    assert_bits_equal(np.asarray(dequantize_mxfp4(blocks[1], scales[1])), full[1])


def test_shape_and_dtype_validation():
    blocks = np.zeros((2, 3, 16), np.uint8)
    with pytest.raises(ValueError):
        dequantize_mxfp4_np(blocks, np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError):
        dequantize_mxfp4(np.zeros((2, 3, 8), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError):
        dequantize_mxfp4_np(blocks, np.zeros((2, 3), np.uint8), np.float16)
    with pytest.raises(ValueError):
        quantize_mxfp4_np(np.zeros((4, 48)))


# ---------------------------------------------------------------- packer


def test_packer_round_trips_representable_weights_exactly():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(4, 24, 6, 16), dtype=np.uint8)
    scales = rng.integers(90, 165, size=(4, 24, 6), dtype=np.uint8)
    blocks[0, 0, 0] = 0x88  # an all -0 group
    blocks[0, 0, 1] = 0x11  # a group whose max is 0.5: chosen scale differs, values must not
    w = dequantize_mxfp4_np(blocks, scales)
    b2, s2 = quantize_mxfp4_np(w)
    assert b2.dtype == s2.dtype == np.uint8
    assert b2.shape == blocks.shape and s2.shape == scales.shape
    assert_bits_equal(dequantize_mxfp4_np(b2, s2), w)
    # bf16 input (what a bf16 checkpoint holds) round-trips too.
    w16 = dequantize_mxfp4_np(blocks, scales, ml_dtypes.bfloat16)
    assert_bits_equal(dequantize_mxfp4_np(*quantize_mxfp4_np(w16), ml_dtypes.bfloat16), w16)


def test_packer_ties_to_even_by_hand():
    # Scale fixed by the 6.0 (X = 1); midpoints round to the even-mantissa neighbour.
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 0.2, 5.5] + [0.0] * 20
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 0.0, 6.0] + [0.0] * 20
    b, s = quantize_mxfp4_np(np.array([row]))
    assert s.tolist() == [[127]]
    assert_bits_equal(dequantize_mxfp4_np(b, s)[0], np.array(want, np.float32))


def test_packer_is_nearest_on_gaussian_weights_and_oracle_agrees():
    rng = np.random.default_rng(2)
    magnitude = 2.0 ** rng.integers(-12, 6, size=(3, 20, 1))  # rows of very different scale
    w = (rng.standard_normal((3, 20, 128)) * magnitude).astype(np.float32)
    blocks, scales = quantize_mxfp4_np(w)
    deq = dequantize_mxfp4_np(blocks, scales)

    # The packed bytes mean the same thing to the oracle.
    assert_bits_equal(oracle(blocks, scales, np.float32), deq.swapaxes(-1, -2))

    w64 = w.astype(np.float64).reshape(3, 20, 4, 32)
    x = 2.0 ** (scales.astype(np.float64) - 127)  # [3, 20, 4]
    amax = np.abs(w64).max(-1)
    # Smallest power-of-two scale with the group max inside +-6X: never clips.
    assert ((amax / x > 3) & (amax / x <= 6)).all()
    err = np.abs(deq.reshape(w64.shape) - w64)
    grid = FP4_VALUES.astype(np.float64)[None, None, None, None, :] * x[..., None, None]
    nearest = np.abs(w64[..., None] - grid).min(-1)
    np.testing.assert_array_equal(err, nearest)  # each element took its nearest code
    # E2M1 has one mantissa bit: <= 20% relative above X, <= X/4 absolute below.
    assert (err <= np.maximum(0.2 * np.abs(w64), 0.25 * x[..., None])).all()
    assert np.linalg.norm(err) / np.linalg.norm(w64) < 0.15
