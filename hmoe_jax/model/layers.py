"""The layers of a gpt-oss block, as `docs/gpt-oss.md` writes them: RMSNorm, grouped-query attention
with learned sinks and sliding windows (over the prompt, or over a KV cache), the router, the neural
experts (dense, or MXFP4-packed and decoded inside the product) and the MoE that joins them.

Every parameter is declared once, with its shape, dtype and logical axis names (metadata `axes`);
`hmoe_jax.runtime.sharding` maps those names to mesh axes. Every module that computes holds the model's
`RunOptions` (compute dtype, MoE backend, kernel path): they are part of the graph definition every
jitted program is keyed on.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ..kernels import PackedExpertWeights
from ..runtime.options import RunOptions, matmul_precision
from . import kernel_dispatch, moe
from .config import GptOssConfig
from .mxfp4 import dequantize_mxfp4
from .rope import apply_rope

# Attention logits of masked keys. transformers adds finfo.min; any value that underflows to 0 after
# exp(x - max) gives the same probabilities, and a finite value keeps fully masked rows NaN-free.
MASKED = -1e30


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = 0.02, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


def project(spec: str, x, w, contract: int, options: RunOptions):
    """The einsum `spec` of activations x with a weight w (its first `contract` axes contracted with x's
    last) in the compute dtype. In the native modes a bfloat16-stored weight times a few float32 rows runs
    through the CPU kernel, which reads the weight as stored instead of widening a copy first."""
    y = kernel_dispatch.widened_matmul(x, w, contract, mode=options.kernels)
    if y is not None:
        return y
    return jnp.einsum(spec, x, w.astype(options.compute_dtype), precision=options.precision)


class RunOptionsModule(nnx.Module):
    """A module that computes as the model's `RunOptions` say (`self.options`, set by its constructor)."""

    @property
    def dtype(self):
        return self.options.compute_dtype


class RMSNorm(nnx.Module):
    """`w * x * rsqrt(mean(x^2) + eps)` in float32, cast back to the input dtype.

    The weight is created float32 whatever the model dtype, as transformers keeps norms in fp32 (a
    checkpoint's narrower weight, loaded as stored, is widened exactly in the product).
    """

    def __init__(self, size: int, eps: float, *, rngs: nnx.Rngs):
        self.weight = param(rngs, (size,), ("embed",), jnp.float32, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * h).astype(x.dtype)


# ------------------------------------------------------------------ what a block reads beside the residual


def attention_masks(attention_mask: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Boolean [B,T,S] masks (full, sliding) over sequence indices, as transformers builds them:
    causal, padded keys removed, and for sliding layers `q - window < k <= q`."""
    t = attention_mask.shape[-1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    causal = (k <= q)[None]
    keys = attention_mask.astype(bool)[:, None, :]
    full = causal & keys
    return full, full & (k > q - window)[None]


@struct.dataclass
class BlockContext:
    """What every decoder block reads beside the residual: the rope tables of the queries' positions
    and the [B,T] mask of real tokens. Over the prompt (forward, prefill) also the (full, sliding)
    [B,T,T] attention masks; in a KV-cache decode step instead `decode_step`, the sequence index of the
    one new token per row (shared: prompts are left-padded)."""

    cos: jax.Array
    sin: jax.Array
    attention_mask: jax.Array
    full: jax.Array | None = None
    sliding: jax.Array | None = None
    decode_step: jax.Array | None = None

    def allowed(self, window: int | None) -> jax.Array:
        return self.sliding if window else self.full

    @property
    def sequence_index(self) -> jax.Array:
        """[B,T] each position's sequence index, -1 for padding: what cache slots record."""
        mask = self.attention_mask
        return jnp.where(mask.astype(bool), jnp.arange(mask.shape[1])[None, :], -1)


class LayerCache(NamedTuple):
    """One layer's KV cache. Full-attention layers keep every position; sliding layers a ring buffer of
    `sliding_window` slots, since no query ever reads further back. Each slot remembers the sequence
    index it holds (-1: empty or padding), and the mask is rebuilt from those indices: exactly the keys
    transformers' masks allow (causal, non-padding, `q - window < k` on sliding layers)."""

    k: jax.Array  # [B, S, KV, D]
    v: jax.Array  # [B, S, KV, D]
    index: jax.Array  # [B, S]

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> LayerCache:
        kv = jnp.zeros((batch, size, kv_heads, head_dim), dtype)
        return cls(kv, kv, jnp.full((batch, size), -1, jnp.int32))

    def prefilled(self, k, v, sequence_index) -> LayerCache:
        """The prompt's keys and values [B,T,KV,D] stored: the last `min(size, T)` positions land in
        slots `index % size`, all distinct."""
        t, size = k.shape[1], self.k.shape[1]
        keep = min(size, t)
        slots = jnp.arange(t - keep, t) % size
        return LayerCache(self.k.at[:, slots].set(k[:, t - keep:]), self.v.at[:, slots].set(v[:, t - keep:]),
                          self.index.at[:, slots].set(sequence_index[:, t - keep:]))

    def appended(self, k, v, step) -> LayerCache:
        """One new key and value per row [B,1,KV,D] at sequence index `step`."""
        slot = step % self.k.shape[1]
        step_index = jnp.full((k.shape[0], 1), step, jnp.int32)
        return LayerCache(jax.lax.dynamic_update_slice_in_dim(self.k, k, slot, axis=1),
                          jax.lax.dynamic_update_slice_in_dim(self.v, v, slot, axis=1),
                          jax.lax.dynamic_update_slice_in_dim(self.index, step_index, slot, axis=1))

    def visible(self, step, window: int | None) -> jax.Array:
        """[B,S] the slots a query at sequence index `step` attends to."""
        allowed = (self.index >= 0) & (self.index <= step)
        return allowed & (self.index > step - window) if window is not None else allowed


# ------------------------------------------------------------------ attention


class Attention(RunOptionsModule):
    """Grouped-query attention with biases, learned sinks and an optional sliding window. Over a prompt
    `attend` runs the Pallas sink attention where the options' kernel path is not "xla" (a GPU by
    default), the XLA path otherwise; KV-cache decode steps take the XLA path."""

    def __init__(self, config: GptOssConfig, layer_idx: int, options: RunOptions, *, rngs: nnx.Rngs):
        c = config
        self.options = options
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.sliding_window = c.sliding_window if c.is_sliding[layer_idx] else None
        self.config = c
        pd = options.storage_dtype
        h, heads, kv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = param(rngs, (h, heads, d), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, (heads, d, h), ("q_heads", "head_dim", "embed"), pd)
        bias_init = "normal" if c.attention_bias else "zeros"
        self.q_bias = param(rngs, (heads, d), ("q_heads", "head_dim"), pd, init=bias_init)
        self.k_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), pd, init=bias_init)
        self.v_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), pd, init=bias_init)
        self.o_bias = param(rngs, (h,), ("embed",), pd, init=bias_init)
        self.sinks = param(rngs, (heads,), ("q_heads",), pd)

    def __call__(self, x, ctx: BlockContext, cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [B,T,H] -> (attention output [B,T,H], cache). Without a cache the queries attend over their
        own positions (the forward); with an empty one too, and the cache comes back holding them (the
        prefill); in a decode step (`ctx.decode_step`) the one new token per row is appended to the
        cache and attends over it."""
        q, k, v = self.project_qkv(x, ctx.cos, ctx.sin)
        if ctx.decode_step is None:
            out = self.attend(q, k, v, ctx.allowed(self.sliding_window), key_mask=ctx.attention_mask)
            if cache is not None:
                cache = cache.prefilled(k, v, ctx.sequence_index)
        else:
            cache = cache.appended(k, v, ctx.decode_step)
            visible = cache.visible(ctx.decode_step, self.sliding_window)
            out = self.attend(q, cache.k, cache.v, visible[:, None, :])
        return self.output(out), cache

    def empty_cache(self, batch: int, total_len: int) -> LayerCache:
        """A cache for sequences of up to `total_len` positions (a sliding layer keeps its window)."""
        size = total_len if self.sliding_window is None else min(self.sliding_window, total_len)
        return LayerCache.empty(batch, size, self.num_kv_heads, self.head_dim, self.dtype)

    def project_qkv(self, x, cos, sin):
        """q [B,T,H,D], k and v [B,T,KV,D], with RoPE applied to q and k."""
        dt = self.dtype
        q = project("bte,ehd->bthd", x, self.q_proj[...], 1, self.options) + self.q_bias[...].astype(dt)
        k = project("bte,ehd->bthd", x, self.k_proj[...], 1, self.options) + self.k_bias[...].astype(dt)
        v = project("bte,ehd->bthd", x, self.v_proj[...], 1, self.options) + self.v_bias[...].astype(dt)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, allowed, key_mask=None):
        """Softmax over keys plus one sink column per head (dropped after normalising).

        q [B,T,H,D]; k, v [B,S,KV,D]; allowed [B,T,S] boolean. Query head h reads KV head h // (H/KV).
        `key_mask` [B,S] says that `allowed` is `attention_masks(key_mask)` for this layer's window
        (queries and keys at the same sequence indices: the forward and the prefill); then the Pallas
        kernel may run instead, rebuilding the mask per tile, where the kernel path is not "xla" and
        the shapes suit it (`kernel_dispatch.attention_supported`).
        """
        mode = self.options.kernels
        if key_mask is not None and mode != "xla":
            window, dtype = self.sliding_window, self.dtype

            def reference(q, k, v, sinks, key_mask):  # the XLA path, for the kernel's gradients
                full, sliding = attention_masks(key_mask, window or 1)
                return sink_attention_xla(q, k, v, sinks, sliding if window else full, dtype)

            out = kernel_dispatch.attention(q, k, v, self.sinks[...], key_mask, window=window,
                                            scale=self.head_dim**-0.5, mode=mode, reference=reference)
            if out is not None:
                return out
        return sink_attention_xla(q, k, v, self.sinks[...], allowed, self.dtype)

    def output(self, attn):
        return project("bthd,hde->bte", attn, self.o_proj[...], 2, self.options) + self.o_bias[...].astype(self.dtype)


def sink_attention_xla(q, k, v, sinks, allowed, dtype):
    """`Attention.attend`'s XLA path: q [B,T,H,D], k/v [B,S,KV,D], sinks [H], allowed [B,T,S]."""
    p = matmul_precision(dtype)
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(b, t, kv_heads, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=p, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(d**-0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, MASKED)
    sinks = sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1, 1)
    # p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k)); subtract the row max (sink included) for stability.
    row_max = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
    e = jnp.exp(scores - row_max)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - row_max))
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v, precision=p)
    return out.reshape(b, t, heads, d)


# ------------------------------------------------------------------ the MoE


class Router(RunOptionsModule):
    """`logits = h @ W + b`; top-k of the raw logits, softmax over those k values only."""

    def __init__(self, config: GptOssConfig, options: RunOptions, *, rngs: nnx.Rngs):
        self.options = options
        pd = options.storage_dtype
        self.weight = param(rngs, (config.hidden_size, config.num_local_experts), ("embed", "experts"), pd)
        self.bias = param(rngs, (config.num_local_experts,), ("experts",), pd)
        self.top_k = config.num_experts_per_tok

    def logits(self, x):
        dt = self.dtype
        return jnp.einsum("nh,he->ne", x, self.weight[...].astype(dt), precision=self.options.precision) + \
            self.bias[...].astype(dt)

    def __call__(self, x):
        """Returns (logits [N,E], weights [N,k], indices [N,k])."""
        logits = self.logits(x)
        top_values, top_indices = jax.lax.top_k(logits, self.top_k)
        return logits, jax.nn.softmax(top_values, axis=-1), top_indices


class Experts(RunOptionsModule):
    """The neural experts, each matrix stored [out, in] (`moe.ExpertWeightsOutIn`): gate_up [E, 2I, H]
    with gate/up INTERLEAVED along axis 1, down [E, H, I].

    That is the MXFP4 checkpoints' order (they decode straight into it) and torch `Linear`'s; HF's plain
    bf16 experts ([E, in, out]) are transposed on loading (`checkpoint.layouts.HF_BF16_EXPERTS`). On CPU
    it is the faster layout (`moe`'s docstring, `bench/results/moe_backends.md`)."""

    def __init__(self, config: GptOssConfig, options: RunOptions, *, rngs: nnx.Rngs):
        c = config
        self.options = options
        e, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
        pd = options.storage_dtype
        self.gate_up_proj = param(rngs, (e, 2 * i, h), ("experts", "mlp", "embed"), pd)
        self.gate_up_proj_bias = param(rngs, (e, 2 * i), ("experts", "mlp"), pd)
        self.down_proj = param(rngs, (e, h, i), ("experts", "embed", "mlp"), pd)
        self.down_proj_bias = param(rngs, (e, h), ("experts", "embed"), pd)
        self.activation = moe.SwiGLU(limit=c.swiglu_limit, alpha=c.swiglu_alpha)

    def weights(self) -> moe.ExpertWeightsOutIn:
        dt = self.dtype
        return moe.ExpertWeightsOutIn(
            self.gate_up_proj[...].astype(dt),
            self.gate_up_proj_bias[...].astype(dt),
            self.down_proj[...].astype(dt),
            self.down_proj_bias[...].astype(dt),
        )

    def __call__(self, x, weights, indices, token_mask=None):
        """x [N,H], routing [N,k] -> [N,H]; `token_mask` [N] (padding 0) is for the packed experts' CPU kernel."""
        return moe.dispatch(self.options.moe_backend)(x, weights, indices, self.weights(), self.activation,
                                                      self.options.precision)


# Scale byte of a freshly initialised packed expert: 2**(120 - 127) maps the E2M1 magnitudes (<= 6) to
# <= 0.047, about the spread of the dense experts' N(0, 0.02^2) initialisation.
_PACKED_INIT_SCALE = 120


class PackedExperts(RunOptionsModule):
    """The neural experts kept as MXFP4, exactly as the checkpoint stores them, decoded inside the forward.

    Blocks are uint8 [E, out, in/32, 16] and scales uint8 [E, out, in/32]: 4.25 bits per value, about a
    quarter of bf16's memory. The decode is bit-exact in the compute dtype, so the forward computes
    exactly what `Experts` holding the decoded weights computes. Where the kernel path is not "xla" (a
    GPU by default) the grouped MXFP4 Pallas matmul runs instead, decoding each weight tile inside the
    kernel; elsewhere the MoE backend runs on the decoded experts.
    """

    def __init__(self, config: GptOssConfig, options: RunOptions, *, rngs: nnx.Rngs):
        c = config
        self.options = options
        e, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
        for size in (h, i):
            if size % 32:
                raise ValueError(f"MXFP4 experts need hidden and intermediate sizes divisible by 32, got {size}")

        def blocks(shape, axes):
            return nnx.Param(jax.random.randint(rngs.params(), shape, 0, 256, jnp.int32).astype(jnp.uint8), axes=axes)

        def scales(shape, axes):
            return nnx.Param(jnp.full(shape, _PACKED_INIT_SCALE, jnp.uint8), axes=axes)

        pd = options.storage_dtype
        # The group axis (in/32) is the input axis in units of 32: it carries the input's logical name.
        self.gate_up_proj_blocks = blocks((e, 2 * i, h // 32, 16), ("experts", "mlp", "embed", None))
        self.gate_up_proj_scales = scales((e, 2 * i, h // 32), ("experts", "mlp", "embed"))
        self.gate_up_proj_bias = param(rngs, (e, 2 * i), ("experts", "mlp"), pd)
        self.down_proj_blocks = blocks((e, h, i // 32, 16), ("experts", "embed", "mlp", None))
        self.down_proj_scales = scales((e, h, i // 32), ("experts", "embed", "mlp"))
        self.down_proj_bias = param(rngs, (e, h), ("experts", "embed"), pd)
        self.activation = moe.SwiGLU(limit=c.swiglu_limit, alpha=c.swiglu_alpha)

    def weights(self) -> moe.ExpertWeightsOutIn:
        return _decoded_experts(self.packed_weights(), self.dtype)

    def packed_weights(self) -> PackedExpertWeights:
        """The experts as the kernel reads them: blocks and scales as stored, biases in the compute dtype."""
        dt = self.dtype
        return PackedExpertWeights(
            self.gate_up_proj_blocks[...], self.gate_up_proj_scales[...], self.gate_up_proj_bias[...].astype(dt),
            self.down_proj_blocks[...], self.down_proj_scales[...], self.down_proj_bias[...].astype(dt),
        )

    def __call__(self, x, weights, indices, token_mask=None):
        """x [N,H], routing [N,k] -> [N,H]. With `token_mask` [N] the CPU kernel skips padding positions
        (`kernel_dispatch.packed_moe`); every other path computes them as transformers does."""
        o = self.options
        if o.kernels != "xla":
            backend, act, precision, dtype = o.moe_backend, self.activation, o.precision, self.dtype

            def reference(x, weights, indices, packed):  # the XLA path, for the kernel's gradients
                return moe.dispatch(backend)(x, weights, indices, _decoded_experts(packed, dtype), act, precision)

            y = kernel_dispatch.packed_moe(x, weights, indices, self.packed_weights(), act, precision, mode=o.kernels,
                                           reference=reference, token_mask=token_mask)
            if y is not None:
                return y
        # The decode depends on the parameters alone, so XLA may schedule every layer's decode up front and
        # hold them all (12 layers x 3.2 GB at 20b width, measured: a 43 GB allocation). Tying the packed
        # weights to this layer's input keeps one layer's decoded experts alive at a time.
        packed, x = jax.lax.optimization_barrier((self.packed_weights(), x))
        lazy = _lazily_decoded_experts(packed, self.dtype)
        backend = o.moe_backend if o.moe_backend != "auto" else moe.auto_backend(x, lazy)
        num_experts = packed.gate_up_blocks.shape[0]
        if backend == "grouped" and x.shape[0] * indices.shape[1] <= num_experts * moe.GROUPED_ROW_TILES[-1]:
            # Few rows per expert (a prompt or two): each expert's chunk is decoded where the loop reads
            # it, once, and the decoded layer never exists whole. Larger batches decode once per layer
            # and take the batched path instead (chunks would be decoded once per row tile).
            return moe.moe_grouped(x, weights, indices, lazy, self.activation, o.precision)
        return moe.dispatch(backend)(x, weights, indices, _decoded_experts(packed, self.dtype), self.activation,
                                     o.precision)


def _lazily_decoded_experts(packed: PackedExpertWeights, dtype) -> moe.LazilyDecodedExpertWeights:
    decode = functools.partial(dequantize_mxfp4, dtype=dtype)
    return moe.LazilyDecodedExpertWeights(
        moe.PackedMatrix(packed.gate_up_blocks, packed.gate_up_scales, decode, jnp.dtype(dtype)), packed.gate_up_bias,
        moe.PackedMatrix(packed.down_blocks, packed.down_scales, decode, jnp.dtype(dtype)), packed.down_bias)


def _decoded_experts(packed: PackedExpertWeights, dtype) -> moe.ExpertWeightsOutIn:
    """MXFP4 experts decoded (bit-exact) into the compute dtype, [E, out, in] as the checkpoint stores
    them and as `Experts` holds them: every backend takes that layout, it is the faster one on CPU, and
    no transposed copy of the decoded weights (3.2 GB a layer at 20b width in float32) is ever made."""
    gate_up = dequantize_mxfp4(packed.gate_up_blocks, packed.gate_up_scales, dtype)
    down = dequantize_mxfp4(packed.down_blocks, packed.down_scales, dtype)
    return moe.ExpertWeightsOutIn(gate_up, packed.gate_up_bias, down, packed.down_bias)


class MoE(nnx.Module):
    """gpt-oss's sparse MoE: the router picks k experts per token, their outputs are mixed by weight."""

    def __init__(self, config: GptOssConfig, options: RunOptions, *, rngs: nnx.Rngs):
        self.router = Router(config, options, rngs=rngs)
        experts = PackedExperts if options.experts == "packed" else Experts
        self.experts = experts(config, options, rngs=rngs)

    def __call__(self, x, block_input=None, token_mask=None):
        """x [B,T,H] -> (y [B,T,H], routing dict). The block's input residual and the [B,T] token
        mask are context a hybrid layer reads; the neural MoE ignores them."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        logits, weights, indices = self.router(flat)
        y = self.experts(flat, weights, indices, token_mask=None if token_mask is None else token_mask.reshape(b * t))
        info = {"router_logits": logits.reshape(b, t, -1), "expert_indices": indices.reshape(b, t, -1)}
        return y.reshape(b, t, h), info
