"""The Pallas kernels compute what the XLA path computes, checked in Pallas interpret mode on CPU.

The interpreter runs the very kernel bodies (tiles, loops, masks, in-kernel MXFP4 decode) that the GPU
compiles, so agreement here pins the algorithm; a separate test lowers both kernels for CUDA (Triton
IR, MLIR-verified) to pin that they compile there. Shapes are small: interpret mode is slow.

The model's wiring is tested the same way: with the kernels forced (`RunOptions.kernels="interpret"`),
whole forwards of a packed-MXFP4 model (left padding, sliding and full layers, jitted, on an 8-device
mesh), generation and gradients equal the XLA path, and so do they through the C++ CPU kernel
(`RunOptions.kernels="native"`, tested on its own in test_cpu_kernel.py); "auto" picks Pallas on a
(mocked) GPU platform and the CPU kernel on CPU; and the wired forward lowers to Triton calls for CUDA.

Tolerances (fp32):
- attention and the whole MoE: max |kernel - XLA| <= 1e-5 * max |XLA| (the online softmax rescales in
  a different order, the matmuls sum in K tiles; observed 2e-7, and up to 2e-6 with a sink of 20 or
  more, where both paths lose ulp(sink) in the argument of exp);
- grouped matmul: elementwise |kernel - ref| <= 1e-6 * (|rows| @ |W|.T), i.e. fp32 summation-order
  rounding only, which can only hold if every decoded weight is bit-exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from comparisons import rel_err
from flax import nnx
from grouped_reference import assert_equals_decode_then_matmul

from hmoe_jax import kernels
from hmoe_jax.kernels.moe import e2m1_bits
from hmoe_jax.model import kernel_dispatch, moe, mxfp4
from hmoe_jax.model.config import GptOssConfig
from hmoe_jax.model.layers import BlockContext, PackedExperts, attention_masks, sink_attention_xla
from hmoe_jax.runtime import options as run_options
from hmoe_jax.runtime.options import RunOptions, matmul_precision

FP32_REL = 1e-5
MATMUL_REL = 1e-6


# ---------------------------------------------------------------------------------------------- attention


@jax.jit
def xla_attention(q, k, v, sinks, allowed):
    """`Attention.attend`'s XLA path itself, jitted (op-by-op dispatch is slow here)."""
    return sink_attention_xla(q, k, v, sinks, allowed, q.dtype)


def allowed_mask(t, s, key_mask, window):
    """The spec's mask over sequence indices: causal, unpadded keys, `q - window < k <= q`."""
    qi, ki = np.arange(t)[:, None], np.arange(s)[None, :]
    allowed = (ki <= qi)[None] & np.asarray(key_mask, bool)[:, None, :]
    if window is not None:
        allowed &= (ki > qi - window)[None]
    return jnp.asarray(allowed)


def qkv(seed, b, t, s, h, kv, d):
    """fp32 q [B,T,H,D], k and v [B,S,KV,D], and N(0, 1) sinks [H]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, s, kv, d))
    v = rng.standard_normal((b, s, kv, d))
    return (*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(rng.standard_normal(h), jnp.float32))


def padding(b, t, left=(), right=()):
    """[B,T] key mask: row i loses `left[i]` leading and `right[i]` trailing positions."""
    mask = np.ones((b, t), bool)
    for row, n in enumerate(left):
        mask[row, :n] = False
    for row, n in enumerate(right):
        mask[row, t - n:] = False
    return mask


ATTENTION_CASES = {
    # name: (B, T, H, KV, D, window, left pad, right pad, block_q, block_k)
    "full_gqa4_left_padded_rows_fully_masked": (2, 37, 8, 2, 16, None, (0, 6), (), 16, 16),
    "sliding_window_inside_one_block_mha": (2, 45, 2, 2, 16, 5, (), (0, 9), 16, 16),
    "sliding_window_spanning_blocks_unequal_tiles": (1, 70, 4, 2, 32, 24, (), (), 16, 32),
    "window_one_sees_only_itself": (1, 20, 4, 1, 16, 1, (3,), (), 16, 16),
    "single_block_default_tiles": (2, 12, 4, 2, 16, 8, (2, 0), (0, 3), 64, 64),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_xla_on_model_masks(case):
    """Square self-attention with the masks the model builds; the key mask is the mask's diagonal (the
    integration recipe for `Attention.attend`)."""
    b, t, h, kv, d, window, left, right, block_q, block_k = ATTENTION_CASES[case]
    q, k, v, sinks = qkv(list(ATTENTION_CASES).index(case), b, t, t, h, kv, d)
    key_mask = padding(b, t, left, right)
    full, sliding = attention_masks(jnp.asarray(key_mask, jnp.int32), window or 8)
    allowed = sliding if window else full
    recovered = jnp.diagonal(allowed, axis1=1, axis2=2)
    np.testing.assert_array_equal(recovered, key_mask)

    ref = xla_attention(q, k, v, sinks, allowed)
    out = kernels.sink_attention(q, k, v, sinks, window=window, key_mask=recovered, block_q=block_q,
                                 block_k=block_k, interpret=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) <= FP32_REL


@pytest.mark.parametrize("magnitude", [0.5, 20.0, 60.0], ids=["small", "large", "huge"])
def test_attention_sinks_small_and_large(magnitude):
    """Sinks of +-magnitude on alternating heads: a large positive sink swallows nearly all the mass
    (outputs ~exp(-60)), a large negative one none of it; each head is exact relative to its own scale."""
    q, k, v, _ = qkv(7, 1, 33, 33, 4, 2, 16)
    sinks = jnp.asarray([1.0, -1.0, 1.0, -1.0], jnp.float32) * magnitude
    ref = xla_attention(q, k, v, sinks, allowed_mask(33, 33, np.ones((1, 33), bool), 8))
    out = kernels.sink_attention(q, k, v, sinks, window=8, block_q=16, block_k=16, interpret=True)
    for head in range(4):
        assert rel_err(out[:, :, head], ref[:, :, head]) <= FP32_REL


def test_attention_more_keys_than_queries_and_a_fully_masked_batch_row():
    """T < S over sequence indices (keys past the last query are causally invisible), a random key mask,
    and a batch row with every key masked: that row's output is exactly 0, not NaN."""
    b, t, s = 3, 24, 40
    q, k, v, sinks = qkv(3, b, t, s, 6, 3, 16)
    key_mask = np.random.default_rng(3).random((b, s)) < 0.7
    key_mask[2] = False
    for window in (None, 6):
        ref = xla_attention(q, k, v, sinks, allowed_mask(t, s, key_mask, window))
        out = kernels.sink_attention(q, k, v, sinks, window=window, key_mask=jnp.asarray(key_mask),
                                     block_q=16, block_k=16, interpret=True)
        assert rel_err(out, ref) <= FP32_REL
        assert np.all(np.asarray(out[2]) == 0)


def test_attention_bf16_within_bf16_rounding():
    """bf16 inputs, bf16 output: the kernel keeps the softmax and accumulation in fp32, so it lands as
    close to the fp32 result as the XLA bf16 path does (both ~5e-3: the bf16 output rounding); bound:
    twice XLA's error, or 1e-2."""
    q, k, v, sinks = qkv(11, 1, 40, 40, 4, 2, 16)
    allowed = allowed_mask(40, 40, np.ones((1, 40), bool), 8)
    exact = xla_attention(q, k, v, sinks, allowed)
    as_bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref = xla_attention(*as_bf16, sinks, allowed)
    out = kernels.sink_attention(*as_bf16, sinks, window=8, block_q=16, block_k=16, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, exact) <= max(2 * rel_err(ref, exact), 1e-2)


def test_attention_rejects_non_triton_tiles():
    q, k, v, sinks = qkv(0, 1, 8, 8, 2, 1, 12)
    with pytest.raises(ValueError, match="power of two"):
        kernels.sink_attention(q, k, v, sinks, interpret=True)


# ------------------------------------------------------------------------------------------ MXFP4 matmul


def test_e2m1_bits_equal_the_decode_table_for_every_scale_and_byte():
    """All 256 scale bytes x all 256 packed bytes (both nibbles), including subnormal (scale 0/1),
    infinite (scale 254/255) and -0 results, bit for bit against `dequantize_mxfp4`, nibble order included."""
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 16, axis=1)  # [256 rows, 16 groups]
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 16, 16))
    expected = np.asarray(mxfp4.dequantize_mxfp4(blocks, scales)).view(np.uint32)  # [256, 512], the jnp decoder
    packed = blocks.astype(np.int32)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(256, 16, 32)
    bits = np.asarray(jax.jit(e2m1_bits)(jnp.asarray(codes), jnp.asarray(scales, jnp.int32)[:, :, None]))
    np.testing.assert_array_equal(bits.view(np.uint32).reshape(256, 512), expected)


def random_packed(seed, experts, out_features, in_features):
    """Random MXFP4 experts; scale bytes 119..130 (factors 2**-8..2**3) keep every product normal."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (experts, out_features, in_features // 32, 16), dtype=np.uint8)
    scales = rng.integers(119, 131, (experts, out_features, in_features // 32), dtype=np.uint8)
    return jnp.asarray(blocks), jnp.asarray(scales)


MATMUL_CASES = {
    # name: (group sizes, extra rows past the groups, in, out, tile_m, tile_n, rows dtype)
    "uneven_with_empty_groups": ((0, 7, 0, 20, 1, 0), 0, 128, 64, 8, 32, jnp.float32),
    "odd_group_count_one_group_per_step": ((3, 0, 16, 9), 0, 96, 64, 16, 64, jnp.float32),
    "rows_past_the_groups_are_zero": ((5, 0, 11), 4, 64, 32, 8, 16, jnp.float32),
    "all_rows_one_expert": ((0, 0, 40, 0), 0, 128, 32, 16, 32, jnp.float32),
    "bf16_rows": ((6, 0, 13, 2), 0, 128, 64, 16, 32, jnp.bfloat16),
}


@pytest.mark.parametrize("case", list(MATMUL_CASES))
def test_grouped_matmul_equals_decode_then_matmul(case):
    group_sizes, extra, k_in, n_out, tile_m, tile_n, dtype = MATMUL_CASES[case]
    experts, m = len(group_sizes), sum(group_sizes) + extra
    blocks, scales = random_packed(m, experts, n_out, k_in)
    rows = jnp.asarray(np.random.default_rng(m).standard_normal((m, k_in)), dtype)
    sizes = jnp.asarray(group_sizes, jnp.int32)

    out = kernels.grouped_matmul_mxfp4(rows, blocks, scales, sizes, tile_m=tile_m, tile_n=tile_n, interpret=True)
    assert out.shape == (m, n_out) and out.dtype == jnp.float32

    # Reference in float64 on the host: rows (as given, upcast exactly) times the exact decoded weights.
    assert_equals_decode_then_matmul(out, rows, group_sizes, extra, blocks, scales, MATMUL_REL)


def test_grouped_matmul_rejects_width_not_divisible_by_tile():
    blocks, scales = random_packed(0, 2, 48, 64)
    with pytest.raises(ValueError, match="tile_n"):
        kernels.grouped_matmul_mxfp4(jnp.zeros((4, 64)), blocks, scales, jnp.asarray([2, 2]), tile_n=32,
                                     interpret=True)


def moe_config(hidden, intermediate, experts, top_k):
    return GptOssConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=8, layer_types=("full_attention",),
    )


def packed_experts_module(cfg, seed):
    """`model.PackedExperts` with random bytes, scale factors 2**-9..2**-4 and N(0, 0.5^2) biases. Built abstractly
    and filled from numpy: its own random initialisation costs seconds on this machine."""
    options = RunOptions(dtype="float32", param_dtype="float32", experts="packed", moe_backend="ragged",
                         kernels="xla", execution="program")
    module = nnx.eval_shape(lambda: PackedExperts(cfg, options, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, param in nnx.to_flat_state(nnx.state(module)):
        name = path[-1]
        if name.endswith("_blocks"):
            value = rng.integers(0, 256, param.shape, dtype=np.uint8)
        elif name.endswith("_scales"):
            value = rng.integers(118, 124, param.shape, dtype=np.uint8)
        else:
            value = 0.5 * rng.standard_normal(param.shape).astype(np.float32)
        param.set_value(jnp.asarray(value))
    return module


def pallas_adapter(module, x, weights, indices, interpret=True, **tiles):
    """The integration recipe for `PackedExperts.__call__` on GPU: packed params in, biases in compute dtype."""
    dt = module.dtype
    packed = kernels.PackedExpertWeights(
        module.gate_up_proj_blocks[...], module.gate_up_proj_scales[...], module.gate_up_proj_bias[...].astype(dt),
        module.down_proj_blocks[...], module.down_proj_scales[...], module.down_proj_bias[...].astype(dt),
    )
    return moe.moe_packed_kernel(x, weights, indices, packed, module.activation, matmul_precision(dt),
                                 interpret=interpret, **tiles)


@pytest.mark.parametrize("tokens,experts,top_k", [(13, 4, 2), (5, 8, 3)])
def test_moe_pallas_matches_packed_experts_xla_path(tokens, experts, top_k):
    """The whole MoE (gate/up, clamped SwiGLU, down, biases, routing-weighted combine) on packed experts:
    the kernel path equals `PackedExperts` decoding to `ExpertWeightsOutIn` and running `moe_ragged`.
    Few tokens over many experts leaves experts empty and tiles unused."""
    cfg = moe_config(hidden=64, intermediate=96, experts=experts, top_k=top_k)
    module = packed_experts_module(cfg, tokens)
    rng = np.random.default_rng(tokens)
    x = jnp.asarray(rng.standard_normal((tokens, cfg.hidden_size)), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((tokens, experts)), jnp.float32)
    top, indices = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top, axis=-1)

    ref = jax.jit(lambda *args: module(*args))(x, weights, indices)
    dense = jax.jit(lambda *args: moe.moe_dense(*args, module.weights(), module.activation,
                                                jax.lax.Precision.HIGHEST))(x, weights, indices)
    assert rel_err(ref, dense) <= FP32_REL
    out = pallas_adapter(module, x, weights, indices, tile_m=8, tile_n=32)
    assert rel_err(out, ref) <= FP32_REL


# ----------------------------------------------------------------------------------- selection, lowering


def test_auto_picks_pallas_on_a_gpu_the_cpu_kernel_for_a_large_model_on_a_cpu_and_xla_elsewhere():
    assert kernels.available() == (jax.default_backend() == "gpu")
    assert RunOptions().resolved(platform="gpu").kernels == "pallas-or-xla"
    assert RunOptions().resolved(platform="tpu").kernels == "xla"
    assert RunOptions().resolved(platform="cpu").kernels == "auto"  # needs the model's size
    assert RunOptions().resolved(platform="cpu", param_bytes=12 << 30).kernels == "native-or-xla"
    assert RunOptions().resolved(platform="cpu", param_bytes=1 << 20).kernels == "xla"
    for mode in run_options.KERNEL_PATHS:  # an explicit choice is kept on every platform
        assert RunOptions(kernels=mode).resolved(platform="gpu").kernels == mode
        assert RunOptions(kernels=mode).resolved(platform="cpu").kernels == mode
    for bad in ("triton", "gpu"):
        with pytest.raises(ValueError, match="RunOptions.kernels"):
            RunOptions(kernels=bad)


def test_both_kernels_lower_to_verified_triton_ir_for_cuda(monkeypatch):
    """No GPU here, but JAX lowers for CUDA on any host: every primitive in both kernel bodies must have
    a Triton lowering, every tile must be a power of two, and the Triton module must pass MLIR
    verification (this caught a scalar `where` that lowered to an i1 loop bound). gpt-oss-20b shapes."""
    lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)

    def lower_for_cuda(fn, *shapes):
        return jax.jit(fn).trace(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).lower(
            lowering_platforms=("cuda",)).as_text()

    for dtype in (jnp.bfloat16, jnp.float32):
        for window in (None, 128):
            attend = functools.partial(kernels.sink_attention, window=window, interpret=False)
            text = lower_for_cuda(lambda q, k, v, s, m: attend(q, k, v, s, key_mask=m),
                                  ((1, 200, 64, 64), dtype), ((1, 200, 8, 64), dtype), ((1, 200, 8, 64), dtype),
                                  ((64,), jnp.float32), ((1, 200), jnp.bool_))
            assert "xla.gpu.triton" in text
        matmul = functools.partial(kernels.grouped_matmul_mxfp4, interpret=False)
        text = lower_for_cuda(matmul, ((512, 2880), dtype), ((32, 5760, 90, 16), jnp.uint8),
                              ((32, 5760, 90), jnp.uint8), ((32,), jnp.int32))
        assert "xla.gpu.triton" in text
    assert verified == [True] * 6


# ------------------------------------------------------------------------------------ compiled, GPU only

on_gpu = pytest.mark.skipif(not kernels.available(), reason="compiled Pallas kernels need a GPU")


@on_gpu
@pytest.mark.parametrize("window", [None, 128])
def test_compiled_attention_matches_xla_on_gpu(window):
    """The Triton-compiled kernel at gpt-oss head shapes, fp32 (IEEE dots on both sides)."""
    b, t = 2, 300
    q, k, v, sinks = qkv(5, b, t, t, 64, 8, 64)
    key_mask = padding(b, t, left=(0, 17))
    ref = xla_attention(q, k, v, sinks, allowed_mask(t, t, key_mask, window))
    out = kernels.sink_attention(q, k, v, sinks, window=window, key_mask=jnp.asarray(key_mask), interpret=False)
    assert rel_err(out, ref) <= FP32_REL


@on_gpu
def test_compiled_moe_matches_packed_experts_on_gpu():
    cfg = moe_config(hidden=256, intermediate=192, experts=8, top_k=4)
    module = packed_experts_module(cfg, 0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((100, cfg.hidden_size)), jnp.float32)
    top, indices = jax.lax.top_k(jnp.asarray(rng.standard_normal((100, 8)), jnp.float32), 4)
    weights = jax.nn.softmax(top, axis=-1)
    ref = jax.jit(lambda *args: module(*args))(x, weights, indices)
    out = pallas_adapter(module, x, weights, indices, interpret=False)
    assert rel_err(out, ref) <= FP32_REL


# ------------------------------------------------------------------------ wired into the model (interpret)

MODEL_CONFIG = dict(
    # Window 4 over 11 tokens: the sliding layer really slides; head_dim 16 and sizes divisible by 32 suit both
    # kernels. Layer 0 sliding, layer 1 full.
    num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, vocab_size=96,
)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    from hmoe_jax.checkpoint import synthetic

    return synthetic.write_hf_checkpoint(tmp_path_factory.mktemp("kernels_mxfp4"),
                                         synthetic.tiny_config(**MODEL_CONFIG), seed=21, experts="mxfp4")


@pytest.fixture(scope="module")
def packed_model(mxfp4_checkpoint):
    import hmoe_jax

    model = hmoe_jax.from_pretrained(mxfp4_checkpoint)  # MXFP4 experts stay packed by default
    assert isinstance(model.layers[0].mlp.experts, PackedExperts)
    assert [layer.self_attn.sliding_window for layer in model.layers] == [4, None]
    return model


def left_padded(seed, b, t, vocab, lengths):
    ids = np.random.default_rng(seed).integers(3, vocab, (b, t))
    mask = np.zeros((b, t), np.int32)
    for row, n in enumerate(lengths):
        mask[row, t - n:] = 1
    return np.where(mask == 1, ids, 0), mask


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def assert_forward_equal(out, ref, where):
    """Logits and every hidden state on the real tokens, fp32, within FP32_REL."""
    assert rel_err(np.asarray(out.logits)[where], np.asarray(ref.logits)[where]) <= FP32_REL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        err = rel_err(np.asarray(a)[where], np.asarray(b)[where])
        assert err <= FP32_REL, f"hidden_states[{i}]: {err:.3g}"


# Each kernel path of the model: the Pallas kernels (interpret mode) and the C++ CPU kernel.
MODES = ("interpret", "native")


@pytest.mark.parametrize("mode", MODES)
def test_model_forward_through_the_kernels_equals_xla(packed_model, monkeypatch, mode):
    """A packed-MXFP4 model from an MXFP4 checkpoint, jitted (`model(...)`), a left-padded batch: the
    forward through the kernels (both Pallas kernels in interpret mode; the CPU kernel for the MoE)
    equals the XLA path, sliding and full layers alike. The kernel choice is part of the compiled
    program's key: the second call traces the kernels anew."""
    ids, mask = left_padded(0, 3, 11, MODEL_CONFIG["vocab_size"], [11, 7, 2])
    attention_calls = count_calls(monkeypatch, kernel_dispatch, "attention")
    moe_calls = count_calls(monkeypatch, kernel_dispatch, "packed_moe")
    native_calls = count_calls(monkeypatch, kernel_dispatch, "moe_packed_native")
    with packed_model.using(kernels="xla"):
        ref = packed_model(ids, mask, output_hidden_states=True)
    assert attention_calls == moe_calls == []
    with packed_model.using(kernels=mode):
        out = packed_model(ids, mask, output_hidden_states=True)
    assert len(moe_calls) == len(attention_calls) == 2  # (the native mode has no attention kernel: XLA runs it)
    assert len(native_calls) == (2 if mode == "native" else 0)
    assert_forward_equal(out, ref, mask == 1)
    # Padded positions see no key: exactly zero attention on both paths, so no NaN anywhere.
    assert np.isfinite(np.asarray(out.logits)).all()


def test_the_kernel_path_is_the_models_own_option(mxfp4_checkpoint, monkeypatch):
    """`from_pretrained(kernels=...)` fixes the path for that model; "auto" traces the kernels on a
    (mocked) GPU platform, not on CPU; `set_options` switches a loaded model. Checked on the traced
    program (no execution)."""
    import hmoe_jax

    ids, mask = left_padded(1, 2, 8, MODEL_CONFIG["vocab_size"], [8, 5])

    def pallas_calls(model):
        graphdef, state = nnx.split(model)
        forward = lambda s: nnx.merge(graphdef, s).forward(jnp.asarray(ids), jnp.asarray(mask)).logits  # noqa: E731
        return str(jax.make_jaxpr(forward)(state)).count("pallas_call")

    xla_model = hmoe_jax.from_pretrained(mxfp4_checkpoint, experts="packed", kernels="xla")
    forced = hmoe_jax.from_pretrained(mxfp4_checkpoint, experts="packed", kernels="interpret")
    auto_on_cpu = hmoe_jax.from_pretrained(mxfp4_checkpoint, experts="packed")
    assert pallas_calls(xla_model) == 0 and pallas_calls(forced) > 0
    assert pallas_calls(auto_on_cpu) == 0 and auto_on_cpu.options.kernels == "xla"  # a small model
    monkeypatch.setattr(run_options, "default_platform", lambda: "gpu")
    auto_on_gpu = hmoe_jax.from_pretrained(mxfp4_checkpoint, experts="packed")
    assert auto_on_gpu.options.kernels == "pallas-or-xla"
    # As where the kernels compile (here: interpreted, which compiles on a CPU).
    monkeypatch.setattr(kernel_dispatch, "interpret_flag", lambda mode: True)
    assert pallas_calls(auto_on_gpu) > 0
    assert pallas_calls(xla_model) == 0
    auto_on_gpu.set_options(kernels="xla")
    assert pallas_calls(auto_on_gpu) == 0
    with pytest.raises(ValueError, match="RunOptions.kernels"):
        hmoe_jax.from_pretrained(mxfp4_checkpoint, kernels="cuda")


@pytest.mark.parametrize("mode", MODES)
def test_model_forward_through_the_kernels_on_an_8_device_mesh(mxfp4_checkpoint, packed_model, mode):
    """Sharded (data 2 x expert 2 x tensor 2) and under `jax.set_mesh`, the kernels run per shard
    (`shard_map`: batch and heads for attention; tokens, experts and the intermediate width for the
    MoE, partial sums reduced) and equal the single-device XLA forward."""
    import hmoe_jax

    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    mesh = hmoe_jax.make_mesh(data=2, expert=2, tensor=2)
    sharded = hmoe_jax.from_pretrained(mxfp4_checkpoint, experts="packed", mesh=mesh, kernels=mode)
    experts = sharded.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks[...].sharding.spec[:2] == ("expert", "tensor")
    ids, mask = left_padded(2, 4, 9, MODEL_CONFIG["vocab_size"], [9, 3, 6, 9])
    batch = hmoe_jax.runtime.sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        out = sharded(jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch),
                      output_hidden_states=True)
    assert len(out.logits.sharding.device_set) == 8
    with packed_model.using(kernels="xla"):
        ref = packed_model(ids, mask, output_hidden_states=True)
    assert_forward_equal(out, ref, mask == 1)


def test_the_kernels_shard_as_the_logical_axis_table_says(mxfp4_checkpoint, packed_model, monkeypatch):
    """`LOGICAL_AXIS_RULES` is the one place a sharding strategy changes: with the expert intermediate
    ("mlp") no longer split over `tensor`, the packed weights and the MoE kernel's per-shard specs
    both leave it whole, and the forward still equals the single-device XLA one."""
    from jax.sharding import PartitionSpec

    import hmoe_jax

    monkeypatch.setitem(hmoe_jax.runtime.sharding.LOGICAL_AXIS_RULES, "mlp", None)
    specs = []
    real_shard_map = jax.shard_map

    def recording_shard_map(f, **kwargs):
        specs.append(kwargs["in_specs"])
        return real_shard_map(f, **kwargs)

    monkeypatch.setattr(jax, "shard_map", recording_shard_map)
    jax.clear_caches()  # the specs are read when the forward is traced: trace it anew under this table
    mesh = hmoe_jax.make_mesh(data=2, expert=2, tensor=2)
    sharded = hmoe_jax.from_pretrained(mxfp4_checkpoint, experts="packed", mesh=mesh, kernels="native")
    assert sharded.layers[0].mlp.experts.gate_up_proj_blocks[...].sharding.spec[:2] == ("expert", None)
    ids, mask = left_padded(2, 4, 9, MODEL_CONFIG["vocab_size"], [9, 3, 6, 9])
    batch = hmoe_jax.runtime.sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        out = sharded(jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch),
                      output_hidden_states=True)
    moe_specs = [s for s in specs if len(s) == 4]  # (rows, weights, indices, experts' weights)
    assert moe_specs and all(s[3].gate_up_blocks == PartitionSpec("expert", None, None, None) for s in moe_specs)
    with packed_model.using(kernels="xla"):
        ref = packed_model(ids, mask, output_hidden_states=True)
    assert_forward_equal(out, ref, mask == 1)


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_the_kernels_equals_xla(packed_model, mode):
    """Prefill through the kernels, decode steps through the MoE kernel (attention over the cache stays
    XLA): the same greedy tokens after left-padded prompts, the window wrapping."""
    from hmoe_jax.model.generate import generate

    ids, mask = left_padded(3, 2, 6, MODEL_CONFIG["vocab_size"], [6, 3])
    with packed_model.using(kernels="xla"):
        ref = np.asarray(generate(packed_model, ids, mask, max_new_tokens=5))
    with packed_model.using(kernels=mode):
        out = np.asarray(generate(packed_model, ids, mask, max_new_tokens=5))
    np.testing.assert_array_equal(out, ref)


def test_bf16_stored_weights_through_the_cpu_kernel_equal_xla(mxfp4_checkpoint, monkeypatch):
    """bfloat16-stored weights, float32 compute (the 20b's CPU default): in the native mode a few rows
    (here a 2 x 5 batch; decode) take the attention projections and the lm_head through the CPU kernel,
    which widens each weight as XLA's einsum does. The same logits to float32 rounding, the same greedy
    tokens."""
    import hmoe_jax
    from hmoe_jax.model.generate import generate

    model = hmoe_jax.from_pretrained(mxfp4_checkpoint, param_dtype="bfloat16", dtype="float32")
    assert model.layers[0].self_attn.q_proj[...].dtype == jnp.bfloat16
    ids, mask = left_padded(5, 2, 5, MODEL_CONFIG["vocab_size"], [5, 3])
    with model.using(kernels="xla"):
        ref = model(ids, mask, output_hidden_states=True)
        ref_tokens = np.asarray(generate(model, ids, mask, max_new_tokens=4))
    calls = count_calls(monkeypatch, kernel_dispatch.cpu_kernel, "matmul_bf16_cpu")
    with model.using(kernels="native"):
        out = model(ids, mask, output_hidden_states=True)
        assert len(calls) == 2 * 4 + 1  # q, k, v, o in each of 2 layers, and the lm_head
        tokens = np.asarray(generate(model, ids, mask, max_new_tokens=4))
    assert_forward_equal(out, ref, mask == 1)
    np.testing.assert_array_equal(tokens, ref_tokens)


@pytest.mark.parametrize("mode", MODES)
def test_packed_experts_skip_out_of_range_slots_like_xla(mode):
    """The hybrid layer hands the experts index E (a deterministic slot) with weight 0: the kernel path
    skips it as the XLA backends do."""
    cfg = moe_config(hidden=64, intermediate=64, experts=4, top_k=3)
    module = packed_experts_module(cfg, 3)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((9, 64)), jnp.float32)
    top, indices = jax.lax.top_k(jnp.asarray(rng.standard_normal((9, 4)), jnp.float32), 3)
    weights = jax.nn.softmax(top, axis=-1)
    deterministic = jnp.asarray(rng.random((9, 3)) < 0.3)
    weights, indices = jnp.where(deterministic, 0.0, weights), jnp.where(deterministic, 4, indices)
    ref = jax.jit(lambda *args: module(*args))(x, weights, indices)
    module.options = module.options.replace(kernels=mode)
    out = jax.jit(lambda *args: module(*args))(x, weights, indices)
    assert rel_err(out, ref) <= FP32_REL


def test_the_cpu_kernel_skips_padding_positions():
    """A left-padded batch through the CPU kernel: the real positions' expert output equals the XLA path's,
    and the padding positions' is exactly 0, their products skipped (the XLA path computes them)."""
    cfg = moe_config(hidden=64, intermediate=64, experts=4, top_k=2)
    module = packed_experts_module(cfg, 5)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((10, 64)), jnp.float32)
    top, indices = jax.lax.top_k(jnp.asarray(rng.standard_normal((10, 4)), jnp.float32), 2)
    weights = jax.nn.softmax(top, axis=-1)
    token_mask = jnp.asarray([0, 0, 1, 1, 1, 0, 1, 1, 1, 1], jnp.int32)
    ref = np.asarray(jax.jit(lambda *args: module(*args))(x, weights, indices, token_mask))
    module.options = module.options.replace(kernels="native")
    out = np.asarray(jax.jit(lambda *args: module(*args))(x, weights, indices, token_mask))
    real = np.asarray(token_mask, bool)
    assert rel_err(out[real], ref[real]) <= FP32_REL
    assert np.all(out[~real] == 0) and np.all(np.abs(ref[~real]).max(axis=-1) > 0)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_through_the_kernels_equal_xla(packed_model, mode):
    """The kernels run forward, the XLA path's VJP backward (`kernel_dispatch.with_reference_vjp`): gradients
    of a loss through one sliding-window block (attention, router, packed MoE) with respect to its input
    and every float parameter (projections, sinks, biases, router) equal the XLA path's."""
    from hmoe_jax.model.rope import rope_tables
    from hmoe_jax.model.transformer import default_position_ids

    layer = packed_model.layers[0]
    assert layer.self_attn.sliding_window == 4
    b, t, h = 2, 9, MODEL_CONFIG["hidden_size"]
    _, mask = left_padded(4, b, t, MODEL_CONFIG["vocab_size"], [9, 5])
    mask = jnp.asarray(mask)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32) * mask[..., None]
    cos, sin = rope_tables(default_position_ids(mask), packed_model.config, jnp.float32)
    full, sliding = attention_masks(mask, 4)
    ctx = BlockContext(cos, sin, mask, full, sliding)
    is_float = lambda path, v: isinstance(v, nnx.Param) and jnp.issubdtype(v.dtype, jnp.floating)  # noqa: E731

    @functools.partial(jax.jit, static_argnums=0)
    def grads(graphdef, floats, rest, x):
        def loss(floats, x):
            y, _, _ = nnx.merge(graphdef, floats, rest)(x, ctx)
            return jnp.sum(y * probe)
        return jax.grad(loss, argnums=(0, 1))(floats, x)

    with packed_model.using(kernels="xla"):
        ref = grads(*nnx.split(layer, is_float, ...), x)
    with packed_model.using(kernels=mode):
        out = grads(*nnx.split(layer, is_float, ...), x)
    ref_leaves, out_leaves = jax.tree.leaves(ref), jax.tree.leaves(out)
    assert len(ref_leaves) == len(out_leaves) > 10
    for a, r in zip(out_leaves, ref_leaves):
        assert np.abs(np.asarray(r)).max() > 0
        assert rel_err(a, r) <= FP32_REL


def test_the_wired_model_lowers_to_triton_for_cuda(monkeypatch):
    """The model with the kernels selected (as on a GPU: compiled, not interpreted) lowers for CUDA on
    this host: each layer's attention and both MoE matmuls are Triton calls inside the forward."""
    pytest.importorskip("jax._src.pallas.triton.lowering")
    import hmoe_jax
    cfg = GptOssConfig(**{k: v for k, v in MODEL_CONFIG.items() if k != "num_hidden_layers"}, num_hidden_layers=2,
                       layer_types=("sliding_attention", "full_attention"))
    options = RunOptions(experts="packed", kernels="pallas", execution="program")
    model = nnx.eval_shape(lambda: hmoe_jax.GptOssForCausalLM(cfg, options, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    monkeypatch.setattr(kernel_dispatch, "interpret_flag", lambda mode: False)
    ids = jax.ShapeDtypeStruct((2, 40), jnp.int32)
    forward = lambda s, ids, mask: nnx.merge(graphdef, s).forward(ids, mask).logits  # noqa: E731
    text = jax.jit(forward).trace(state, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
    # Sliding and full attention are two kernels; the MoE function (two grouped matmuls) is shared by both layers.
    assert text.count("__gpu$xla.gpu.triton") >= 4
    assert "sink_attention" in text and "grouped_matmul_mxfp4" in text
