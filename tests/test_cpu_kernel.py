"""The C++ CPU kernel (`hmoe_jax.kernels.cpu`): its decode is bit for bit the oracle's, its products agree
with decode-then-matmul to float32 summation order, it is built, cached and loaded safely, and where it
cannot run the model falls back to the XLA path with one warning (or fails loudly when asked for by name).
Each check runs on every body the source holds (AVX-512, AVX2, scalar), each built here by its own flags.

Tolerance: elementwise |kernel - ref| <= 1e-6 * (|rows| @ |W|.T), ref in float64 over the exactly decoded
weights: float32 summation-order rounding only, which holds only if every decoded weight is exact. The
model-level tests (forward, 8-device mesh, generation, gradients) are in test_kernels.py, next to the
Pallas kernels'.
"""

from __future__ import annotations

import functools
import platform
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_reference import assert_equals_decode_then_matmul

from hmoe_jax.kernels import cpu
from hmoe_jax.model import kernel_dispatch, mxfp4

MATMUL_REL = 1e-6
# Every body the source holds, built on this host: the model runs "native" (AVX-512 here); an AVX2-only
# CPU would run the "avx2" body and an older x86-64 one the scalar body, so CI runs those too.
X86 = platform.machine() in ("x86_64", "AMD64")
HOST_FLAGS = open("/proc/cpuinfo").read() if X86 else ""
BUILDS = ["native"] + (["scalar"] + (["avx2"] if " avx2" in HOST_FLAGS and " fma" in HOST_FLAGS else [])
                       if X86 else [])


def grouped(rows, sizes, blocks, scales, isa="native"):
    return np.asarray(jax.jit(functools.partial(cpu.grouped_matmul_mxfp4_cpu, isa=isa))(
        jnp.asarray(rows), jnp.asarray(sizes, jnp.int32), jnp.asarray(blocks), jnp.asarray(scales),
        mxfp4.dequantize_table(np.float32)))


def test_the_kernel_builds_here():
    assert cpu.load() == (True, None)
    assert any(cpu.cache_dir().glob("mxfp4_cpu-*.so"))


@pytest.mark.parametrize("isa", BUILDS)
def test_each_build_compiles_the_body_it_names(isa):
    """The target flags pick the source's body: on an AVX-512 host the native build is the AVX-512 one,
    and the avx2 and scalar builds compile the other two bodies (what another CPU would run)."""
    assert cpu.load(isa) == (True, None)
    expected = {"scalar": "scalar", "avx2": "avx2"}.get(isa)
    if isa == "native" and X86:
        expected = "avx512" if " avx512f" in HOST_FLAGS else "avx2" if " avx2" in HOST_FLAGS else "scalar"
    assert expected is None or cpu.body(isa) == expected


@pytest.mark.parametrize("isa", BUILDS)
def test_decode_is_bit_exact_for_every_finite_scale_and_code(isa):
    """One-hot rows read single decoded weights back: for every scale byte 0..252 (253+ overflow to inf,
    and inf x 0 is NaN in any product) and every packed byte (both nibbles, -0 included), the weight the
    kernel multiplies equals `dequantize_mxfp4_np`'s. XLA's CPU runtime flushes subnormal operands to
    zero (scale bytes 0/1 give subnormal weights): the XLA path's own product of the same one-hot rows
    and decoded weights is the reference, so both paths treat them alike."""
    scales = np.repeat(np.arange(253, dtype=np.uint8)[:, None], 16, axis=1)[None]  # [1, 253 rows, 16 groups]
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (1, 253, 16, 16))
    decoded = mxfp4.dequantize_mxfp4_np(blocks, scales)[0]  # [253, 512]
    eye = np.eye(512, dtype=np.float32)
    xla = np.asarray(jax.jit(lambda x, w: jnp.dot(x, w.T, precision="highest"))(eye, decoded))
    subnormal = np.abs(decoded) < np.finfo(np.float32).tiny
    np.testing.assert_array_equal(xla.T, np.where(subnormal, 0, decoded))  # what the XLA path multiplies
    for sizes in ([512], [3, 509]):  # both paths: registers (<= 4 rows) and the decoded tile
        out = grouped(eye, sizes, np.concatenate([blocks] * len(sizes)), np.concatenate([scales] * len(sizes)), isa)
        np.testing.assert_array_equal(out, xla)
        np.testing.assert_array_equal(np.signbit(out), np.signbit(xla))  # -0 too


CASES = {
    # name: (group sizes, rows past the groups, in, out, rows dtype)
    "decode_one_row_per_expert": ((1, 0, 1, 1), 0, 128, 48, np.float32),
    "few_rows_each_path": ((2, 3, 4, 5, 9), 0, 96, 34, np.float32),  # <= 4 rows: registers; more: the tile
    "uneven_with_empty_groups": ((0, 7, 0, 20, 1, 0), 0, 128, 64, np.float32),
    "rows_past_the_groups_are_zero": ((5, 0, 11), 4, 64, 33, np.float32),
    "all_rows_one_expert": ((0, 0, 40, 0), 0, 256, 17, np.float32),
    "long_rows_over_several_chunks": ((6, 2, 9), 0, 1056, 24, np.float32),  # k past the tile's 256-long chunks
    "no_rows_at_all": ((0, 0), 3, 64, 16, np.float32),
    "bf16_rows": ((6, 0, 13, 2), 0, 128, 64, jnp.bfloat16),
}


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_matmul_equals_decode_then_matmul(case, isa):
    group_sizes, extra, k_in, n_out, dtype = CASES[case]
    experts, m = len(group_sizes), sum(group_sizes) + extra
    rng = np.random.default_rng(m + n_out)
    blocks = rng.integers(0, 256, (experts, n_out, k_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(119, 131, (experts, n_out, k_in // 32), dtype=np.uint8)
    rows = jnp.asarray(rng.standard_normal((m, k_in)), dtype)

    out = grouped(rows, group_sizes, blocks, scales, isa)
    assert out.shape == (m, n_out) and out.dtype == np.float32
    assert_equals_decode_then_matmul(out, rows, group_sizes, extra, blocks, scales, MATMUL_REL)


BF16_CASES = {
    # name: (rows, in, out): decode GEMV, a block boundary with a ragged tail, rows past one pass of 4
    "one_row": (1, 64, 40),
    "ragged_columns_across_blocks": (3, 96, 2 * 1024 + 13),
    "more_rows_than_one_pass": (9, 40, 130),
    "no_rows": (0, 32, 16),
}


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_matmul_equals_the_widened_float64_product(case, isa):
    m, k, n = BF16_CASES[case]
    rng = np.random.default_rng(m * 7 + n)
    rows = rng.standard_normal((m, k)).astype(np.float32)
    weights = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    out = np.asarray(jax.jit(functools.partial(cpu.matmul_bf16_cpu, isa=isa))(rows, weights))
    assert out.shape == (m, n) and out.dtype == np.float32
    w = np.asarray(weights.astype(jnp.float32), np.float64)
    ref, bound = rows.astype(np.float64) @ w, np.abs(rows.astype(np.float64)) @ np.abs(w)
    assert np.all(np.abs(out - ref) <= MATMUL_REL * bound)


def test_widened_matmul_takes_few_rows_only_and_its_gradients_are_xlas():
    """The model's projections in the native modes: a few float32 rows times bfloat16 weights go through
    the kernel (same values as the XLA einsum to float32 rounding, same gradients); more rows, float32
    weights or the "xla" mode are declined (None), so the caller's einsum runs."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((8, 4, 24)), jnp.bfloat16)  # [H, D, E]: two contracted axes
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 4)), jnp.float32)  # [B, T, H, D]: 6 rows

    def xla(x, w):
        return jnp.einsum("bthd,hde->bte", x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

    def native(x, w):
        return kernel_dispatch.widened_matmul(x, w, 2, mode="native")

    np.testing.assert_allclose(jax.jit(native)(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
    weighting = jnp.asarray(rng.standard_normal((2, 3, 24)), jnp.float32)
    grads = jax.grad(lambda x, w: jnp.sum(native(x, w) * weighting), argnums=(0, 1))(x, w)
    ref_grads = jax.grad(lambda x, w: jnp.sum(xla(x, w) * weighting), argnums=(0, 1))(x, w)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-5, atol=1e-5)

    many = jnp.zeros((1, kernel_dispatch.WIDENED_MATMUL_MAX_ROWS + 1, 8, 4), jnp.float32)
    assert kernel_dispatch.widened_matmul(many, w, 2, mode="native") is None
    assert kernel_dispatch.widened_matmul(x, w.astype(jnp.float32), 2, mode="native") is None
    assert kernel_dispatch.widened_matmul(x, w, 2, mode="xla") is None


def test_bad_shapes_and_group_sizes_are_named_errors():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 8, 2, 16), dtype=np.uint8)
    scales = np.full((2, 8, 2), 127, np.uint8)
    with pytest.raises(Exception, match="do not match blocks"):
        grouped(np.zeros((4, 96), np.float32), [2, 2], blocks, scales)  # K = 96, blocks hold 64
    with pytest.raises(Exception, match="exceed the rows"):
        grouped(np.zeros((4, 64), np.float32), [3, 3], blocks, scales)


def test_a_failed_build_names_the_compiler_and_its_error(tmp_path, monkeypatch):
    """A compiler that fails (here: a stand-in that prints and exits 1) gives `KernelBuildError` with its
    message, and leaves nothing in the cache a later load could take for a built kernel."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx 1.0'; echo 'error: no such intrinsic' >&2; exit 1\n")
    fake.chmod(0o755)
    with pytest.raises(cpu.KernelBuildError, match="no such intrinsic"):
        cpu._build(str(fake))
    assert not list((tmp_path / "hmoe-jax" / "kernels").rglob("*.so"))


def test_the_build_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch):
    """The second build of the same source is the cached library (no compile); it lives in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu._build(cpu._compiler())
    assert first.parent == tmp_path / "hmoe-jax" / "kernels"
    mtime = first.stat().st_mtime_ns
    assert cpu._build(cpu._compiler()) == first and first.stat().st_mtime_ns == mtime


def test_where_the_kernel_cannot_run_the_model_warns_once_and_runs_xla(monkeypatch):
    """"native-or-xla" (the CPU default for a large model) with a kernel that cannot be built: one
    `KernelFallbackWarning` naming why, the XLA path's result; "native" (asked for by name) raises instead."""
    from tests.test_kernels import moe_config, packed_experts_module  # the same random module recipe

    module = packed_experts_module(moe_config(hidden=64, intermediate=64, experts=4, top_k=2), 5)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 64)), jnp.float32)
    top, indices = jax.lax.top_k(jnp.asarray(rng.standard_normal((6, 4)), jnp.float32), 2)
    weights = jax.nn.softmax(top, axis=-1)
    ref = np.asarray(jax.jit(lambda *a: module(*a))(x, weights, indices))

    monkeypatch.setattr(cpu, "load", lambda: (False, "no C++ compiler found (test)"))
    monkeypatch.setattr(kernel_dispatch, "_WARNED", set())
    module.options = module.options.replace(kernels="native-or-xla")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = np.asarray(jax.jit(lambda *a: module(*a))(x, weights, indices))
        jax.jit(lambda *a: module(*a) * 2)(x, weights, indices)  # traced again: no second warning
    fallbacks = [w for w in caught if issubclass(w.category, kernel_dispatch.KernelFallbackWarning)]
    assert len(fallbacks) == 1 and "no C++ compiler found (test)" in str(fallbacks[0].message)
    np.testing.assert_array_equal(out, ref)
    module.options = module.options.replace(kernels="native")
    with pytest.raises(cpu.KernelBuildError, match="kernels='native'.*no C\\+\\+ compiler"):
        jax.jit(lambda *a: module(*a))(x, weights, indices)
