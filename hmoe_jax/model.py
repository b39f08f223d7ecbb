"""gpt-oss as a Flax NNX model, computing exactly what `transformers`' `GptOssForCausalLM` computes.

The forward reads top-down like `spec/gpt-oss.md`:

    x = embed[ids]
    for each block: x = x + attention(rmsnorm(x)); x = x + moe(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

Every parameter is declared once, with its shape, dtype and logical axis names (metadata `axes`);
`hmoe_jax.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from . import kernels as kernels_module
from . import moe
from .config import GptOssConfig
from .mxfp4 import dequantize_mxfp4
from .kernels import ops as kernel_ops
from .rope import apply_rope, rope_tables

# Attention logits of masked keys. transformers adds finfo.min; any value that underflows to 0 after
# exp(x - max) gives the same probabilities, and a finite value keeps fully masked rows NaN-free.
_MASKED = -1e30


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = 0.02, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


def _precision(dtype) -> jax.lax.Precision:
    # fp32 runs are parity checks: no TF32/bf16 passes on GPU/TPU. bf16 runs take the fast default.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class RMSNorm(nnx.Module):
    """`w * x * rsqrt(mean(x^2) + eps)` in float32, cast back to the input dtype.

    The weight stays float32 whatever the model dtype, as transformers keeps norms in fp32.
    """

    def __init__(self, size: int, eps: float, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (size,), ("embed",), jnp.float32, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * h).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with biases, learned sinks and an optional sliding window.

    `kernels`: which path `attend` runs (`hmoe_jax.kernels.select`): on prefill the Pallas sink
    attention where selected (a GPU by default), the XLA path otherwise.
    """

    def __init__(self, config: GptOssConfig, layer_idx: int, *, dtype, param_dtype, kernels: str = "auto",
                 rngs: nnx.Rngs):
        c = config
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.sliding_window = c.sliding_window if c.is_sliding[layer_idx] else None
        self.config = c
        self.dtype = dtype
        pd = param_dtype
        self.q_proj = _param(rngs, (c.hidden_size, c.num_attention_heads, c.head_dim), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (c.hidden_size, c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (c.hidden_size, c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (c.num_attention_heads, c.head_dim, c.hidden_size), ("q_heads", "head_dim", "embed"), pd)
        bias_init = "normal" if c.attention_bias else "zeros"
        self.q_bias = _param(rngs, (c.num_attention_heads, c.head_dim), ("q_heads", "head_dim"), pd, init=bias_init)
        self.k_bias = _param(rngs, (c.num_key_value_heads, c.head_dim), ("kv_heads", "head_dim"), pd, init=bias_init)
        self.v_bias = _param(rngs, (c.num_key_value_heads, c.head_dim), ("kv_heads", "head_dim"), pd, init=bias_init)
        self.o_bias = _param(rngs, (c.hidden_size,), ("embed",), pd, init=bias_init)
        self.sinks = _param(rngs, (c.num_attention_heads,), ("q_heads",), pd)

    def project_qkv(self, x, cos, sin):
        """q [B,T,H,D], k and v [B,T,KV,D], with RoPE applied to q and k."""
        p, dt = _precision(self.dtype), self.dtype
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...].astype(dt), precision=p) + self.q_bias[...].astype(dt)
        k = jnp.einsum("bte,ehd->bthd", x, self.k_proj[...].astype(dt), precision=p) + self.k_bias[...].astype(dt)
        v = jnp.einsum("bte,ehd->bthd", x, self.v_proj[...].astype(dt), precision=p) + self.v_bias[...].astype(dt)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, allowed, key_mask=None):
        """Softmax over keys plus one sink column per head (dropped after normalising).

        q [B,T,H,D]; k, v [B,S,KV,D]; allowed [B,T,S] boolean. Query head h reads KV head h // (H/KV).
        `key_mask` [B,S] says that `allowed` is `attention_masks(key_mask)` for this layer's window
        (queries and keys at the same sequence indices, the forward and prefill): then the Pallas
        kernel may run instead, rebuilding the mask per tile, where `kernels.select` picks it and the
        shapes suit it (`kernels.ops.attention_supported`). Without it (KV-cache decode), XLA.
        """
        if key_mask is not None:
            mode = kernels_module.select(self.kernels)
            if mode != "xla":
                window, dtype = self.sliding_window, self.dtype

                def reference(q, k, v, sinks, key_mask):  # the XLA path, for the kernel's gradients
                    full, sliding = attention_masks(key_mask, window or 1)
                    return _sink_attention_xla(q, k, v, sinks, sliding if window else full, dtype)

                out = kernel_ops.attention(q, k, v, self.sinks[...], key_mask, window=window,
                                           scale=self.head_dim**-0.5, mode=mode, reference=reference)
                if out is not None:
                    return out
        return _sink_attention_xla(q, k, v, self.sinks[...], allowed, self.dtype)

    def output(self, attn):
        p, dt = _precision(self.dtype), self.dtype
        return jnp.einsum("bthd,hde->bte", attn, self.o_proj[...].astype(dt), precision=p) + self.o_bias[...].astype(dt)

    def __call__(self, x, cos, sin, allowed, key_mask=None):
        q, k, v = self.project_qkv(x, cos, sin)
        return self.output(self.attend(q, k, v, allowed, key_mask))


def _sink_attention_xla(q, k, v, sinks, allowed, dtype):
    """`Attention.attend`'s XLA path: q [B,T,H,D], k/v [B,S,KV,D], sinks [H], allowed [B,T,S]."""
    p, dt = _precision(dtype), dtype
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(b, t, kv_heads, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=p, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(d**-0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASKED)
    sinks = sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1, 1)
    # p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k)); subtract the row max (sink included) for stability.
    row_max = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
    e = jnp.exp(scores - row_max)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - row_max))
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dt), v, precision=p)
    return out.reshape(b, t, heads, d)


class Router(nnx.Module):
    """`logits = h @ W + b`; top-k of the raw logits, softmax over those k values only."""

    def __init__(self, config: GptOssConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (config.hidden_size, config.num_local_experts), ("embed", "experts"), param_dtype)
        self.bias = _param(rngs, (config.num_local_experts,), ("experts",), param_dtype)
        self.top_k = config.num_experts_per_tok
        self.dtype = dtype

    def logits(self, x):
        dt = self.dtype
        return jnp.einsum("nh,he->ne", x, self.weight[...].astype(dt), precision=_precision(dt)) + self.bias[...].astype(dt)

    def __call__(self, x):
        """Returns (logits [N,E], weights [N,k], indices [N,k])."""
        logits = self.logits(x)
        top_values, top_indices = jax.lax.top_k(logits, self.top_k)
        return logits, jax.nn.softmax(top_values, axis=-1), top_indices


class Experts(nnx.Module):
    """The neural experts, each matrix stored [out, in] (`moe.ExpertWeightsOutIn`): gate_up [E, 2I, H]
    with gate/up INTERLEAVED along axis 1, down [E, H, I].

    That is the MXFP4 checkpoints' order (they decode straight into it) and torch `Linear`'s; HF's plain
    bf16 experts ([E, in, out]) are transposed on loading (`checkpoint.HF_BF16_EXPERTS`). On CPU it is
    the faster layout (`moe`'s docstring, `bench/results/moe_backends.md`)."""

    def __init__(self, config: GptOssConfig, *, dtype, param_dtype, backend: str, kernels: str = "auto",
                 rngs: nnx.Rngs):
        # `kernels` is accepted for a uniform constructor; the MoE kernel takes MXFP4 experts only.
        c = config
        e, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
        self.gate_up_proj = _param(rngs, (e, 2 * i, h), ("experts", "mlp", "embed"), param_dtype)
        self.gate_up_proj_bias = _param(rngs, (e, 2 * i), ("experts", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (e, h, i), ("experts", "embed", "mlp"), param_dtype)
        self.down_proj_bias = _param(rngs, (e, h), ("experts", "embed"), param_dtype)
        self.activation = moe.SwiGLU(limit=c.swiglu_limit, alpha=c.swiglu_alpha)
        self.backend = backend
        self.dtype = dtype

    def weights(self) -> moe.ExpertWeightsOutIn:
        dt = self.dtype
        return moe.ExpertWeightsOutIn(
            self.gate_up_proj[...].astype(dt),
            self.gate_up_proj_bias[...].astype(dt),
            self.down_proj[...].astype(dt),
            self.down_proj_bias[...].astype(dt),
        )

    def __call__(self, x, weights, indices):
        return moe.dispatch(self.backend)(x, weights, indices, self.weights(), self.activation, _precision(self.dtype))


# Scale byte of a freshly initialised packed expert: 2**(120 - 127) maps the E2M1 magnitudes (<= 6) to
# <= 0.047, about the spread of the dense experts' N(0, 0.02^2) initialisation.
_PACKED_INIT_SCALE = 120


class PackedExperts(nnx.Module):
    """The neural experts kept as MXFP4, exactly as the checkpoint stores them, decoded inside the forward.

    Blocks are uint8 [E, out, in/32, 16] and scales uint8 [E, out, in/32]: 4.25 bits per value, about a
    quarter of bf16's memory. The decode is a bit-exact table lookup in the compute dtype, so the forward computes exactly
    what `Experts` holding the decoded weights computes.

    `kernels`: where `hmoe_jax.kernels.select` picks the kernels (a GPU by default), the grouped MXFP4
    Pallas matmul runs instead, decoding each weight tile inside the kernel (no decoded copy in HBM);
    elsewhere the `backend` runs on the decoded experts.
    """

    def __init__(self, config: GptOssConfig, *, dtype, param_dtype, backend: str, kernels: str = "auto",
                 rngs: nnx.Rngs):
        c = config
        self.kernels = kernels
        e, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
        for size in (h, i):
            if size % 32:
                raise ValueError(f"MXFP4 experts need hidden and intermediate sizes divisible by 32, got {size}")

        def blocks(shape, axes):
            return nnx.Param(jax.random.randint(rngs.params(), shape, 0, 256, jnp.int32).astype(jnp.uint8), axes=axes)

        def scales(shape, axes):
            return nnx.Param(jnp.full(shape, _PACKED_INIT_SCALE, jnp.uint8), axes=axes)

        # The group axis (in/32) is the input axis in units of 32: it carries the input's logical name.
        self.gate_up_proj_blocks = blocks((e, 2 * i, h // 32, 16), ("experts", "mlp", "embed", None))
        self.gate_up_proj_scales = scales((e, 2 * i, h // 32), ("experts", "mlp", "embed"))
        self.gate_up_proj_bias = _param(rngs, (e, 2 * i), ("experts", "mlp"), param_dtype)
        self.down_proj_blocks = blocks((e, h, i // 32, 16), ("experts", "embed", "mlp", None))
        self.down_proj_scales = scales((e, h, i // 32), ("experts", "embed", "mlp"))
        self.down_proj_bias = _param(rngs, (e, h), ("experts", "embed"), param_dtype)
        self.activation = moe.SwiGLU(limit=c.swiglu_limit, alpha=c.swiglu_alpha)
        self.backend = backend
        self.dtype = dtype

    def weights(self) -> moe.ExpertWeightsOutIn:
        return _decoded_experts(self.packed_weights(), self.dtype)

    def packed_weights(self) -> kernels_module.PackedExpertWeights:
        """The experts as the kernel reads them: blocks and scales as stored, biases in the compute dtype."""
        dt = self.dtype
        return kernels_module.PackedExpertWeights(
            self.gate_up_proj_blocks[...], self.gate_up_proj_scales[...], self.gate_up_proj_bias[...].astype(dt),
            self.down_proj_blocks[...], self.down_proj_scales[...], self.down_proj_bias[...].astype(dt),
        )

    def __call__(self, x, weights, indices):
        mode = kernels_module.select(self.kernels)
        if mode != "xla":
            backend, act, precision, dtype = self.backend, self.activation, _precision(self.dtype), self.dtype

            def reference(x, weights, indices, packed):  # the XLA path, for the kernel's gradients
                return moe.dispatch(backend)(x, weights, indices, _decoded_experts(packed, dtype), act, precision)

            y = kernel_ops.packed_moe(x, weights, indices, self.packed_weights(), act, precision, mode=mode,
                                      reference=reference)
            if y is not None:
                return y
        # The decode depends on the parameters alone, so XLA may schedule every layer's decode up front and
        # hold them all (12 layers x 3.2 GB at 20b width, measured: a 43 GB allocation). Tying the packed
        # weights to this layer's input keeps one layer's decoded experts alive at a time.
        packed, x = jax.lax.optimization_barrier((self.packed_weights(), x))
        lazy = _lazily_decoded_experts(packed, self.dtype)
        backend = self.backend if self.backend != "auto" else moe.auto_backend(x, lazy)
        num_experts = packed.gate_up_blocks.shape[0]
        if backend == "grouped" and x.shape[0] * indices.shape[1] <= num_experts * moe.GROUPED_ROW_TILES[-1]:
            # Few rows per expert (a prompt or two): each expert's chunk is decoded where the loop reads
            # it, once, and the decoded layer never exists whole. Larger batches decode once per layer
            # and take the batched path instead (chunks would be decoded once per row tile).
            return moe.moe_grouped(x, weights, indices, lazy, self.activation, _precision(self.dtype))
        return moe.dispatch(backend)(x, weights, indices, _decoded_experts(packed, self.dtype), self.activation,
                                     _precision(self.dtype))


def _lazily_decoded_experts(packed: kernels_module.PackedExpertWeights, dtype) -> moe.PackedExpertWeightsOutIn:
    decode = functools.partial(dequantize_mxfp4, dtype=dtype)
    return moe.PackedExpertWeightsOutIn(
        moe.PackedMatrix(packed.gate_up_blocks, packed.gate_up_scales, decode, jnp.dtype(dtype)), packed.gate_up_bias,
        moe.PackedMatrix(packed.down_blocks, packed.down_scales, decode, jnp.dtype(dtype)), packed.down_bias)


def _decoded_experts(packed: kernels_module.PackedExpertWeights, dtype) -> moe.ExpertWeightsOutIn:
    """MXFP4 experts decoded (bit-exact) into the compute dtype, [E, out, in] as the checkpoint stores
    them and as `Experts` holds them: every backend takes that layout, it is the faster one on CPU, and
    no transposed copy of the decoded weights (3.2 GB a layer at 20b width in float32) is ever made."""
    gate_up = dequantize_mxfp4(packed.gate_up_blocks, packed.gate_up_scales, dtype)
    down = dequantize_mxfp4(packed.down_blocks, packed.down_scales, dtype)
    return moe.ExpertWeightsOutIn(gate_up, packed.gate_up_bias, down, packed.down_bias)


class MoE(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, param_dtype, backend: str, packed_experts: bool = False,
                 kernels: str = "auto", rngs: nnx.Rngs):
        self.router = Router(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        experts = PackedExperts if packed_experts else Experts
        self.experts = experts(config, dtype=dtype, param_dtype=param_dtype, backend=backend, kernels=kernels,
                               rngs=rngs)

    def __call__(self, x, block_input=None, token_mask=None):
        """x [B,T,H] -> (y [B,T,H], routing dict). The block's input residual and the [B,T] token
        mask are context a hybrid layer reads; the neural MoE ignores them."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        logits, weights, indices = self.router(flat)
        y = self.experts(flat, weights, indices)
        return y.reshape(b, t, h), {"router_logits": logits.reshape(b, t, -1), "expert_indices": indices.reshape(b, t, -1)}


class DecoderLayer(nnx.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, *, dtype, param_dtype, moe_backend: str,
                 packed_experts: bool = False, kernels: str = "auto", rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
        self.self_attn = Attention(config, layer_idx, dtype=dtype, param_dtype=param_dtype, kernels=kernels, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)
        # Any module mapping (normed [B,T,H], block_input=, token_mask=) -> ([B,T,H], info dict): the
        # hybrid layer swaps itself in here.
        self.mlp = MoE(config, dtype=dtype, param_dtype=param_dtype, backend=moe_backend, packed_experts=packed_experts,
                       kernels=kernels, rngs=rngs)

    def __call__(self, x, cos, sin, allowed, token_mask, key_mask=None):
        """`key_mask`: the [B,T] padding mask `allowed` was built from (`Attention.attend`)."""
        block_input = x
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, key_mask)
        y, info = self.mlp(self.post_attention_layernorm(x), block_input=block_input, token_mask=token_mask)
        return x + y, info


@struct.dataclass
class CausalLMOutput:
    """`logits` [B,T,V] (None when the forward stopped early); `hidden_states` as in transformers:
    entry 0 the embeddings, entry i the output of block i-1, and the last (after all L blocks) after the
    final norm. `layer_info` holds per-layer routing details (router logits, expert indices, and for a
    hybrid layer its extracted arguments and formula results) when requested."""

    logits: jax.Array | None
    hidden_states: tuple[jax.Array, ...] | None = None
    layer_info: tuple[dict[str, Any], ...] | None = None


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


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that make a left-padded prompt see the positions it has alone (what `generate`
    passes); transformers' plain forward uses `arange(T)` when no `position_ids` are given."""
    return jnp.clip(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0, None)


# Vocabulary entries per lm_head chunk when the head is stored narrower than the compute dtype.
UNEMBED_CHUNK = 16384


def unembed(x: jax.Array, lm_head: jax.Array, dtype) -> jax.Array:
    """Logits x [..., H] @ lm_head [H, V] in `dtype`. A head stored narrower (bf16 weights, fp32 compute)
    is widened one vocabulary chunk at a time: widening the 20b's whole head at once is a 2.3 GB
    temporary. Each logit is the same dot over H either way."""
    precision = _precision(dtype)
    vocab = lm_head.shape[1]
    if lm_head.dtype == dtype or vocab <= 2 * UNEMBED_CHUNK:
        return jnp.einsum("...e,ev->...v", x, lm_head.astype(dtype), precision=precision)
    parts = [jnp.einsum("...e,ev->...v", x, lm_head[:, start:start + UNEMBED_CHUNK].astype(dtype), precision=precision)
             for start in range(0, vocab, UNEMBED_CHUNK)]
    return jnp.concatenate(parts, axis=-1)


class GptOssForCausalLM(nnx.Module):
    """gpt-oss. `forward` is the traceable computation; calling the model runs it under `jax.jit`."""

    def __init__(
        self,
        config: GptOssConfig,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        moe_backend: str = "auto",
        packed_experts: bool = False,
        kernels: str = "auto",
        head: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        """`packed_experts`: keep the experts as MXFP4 blocks/scales (`PackedExperts`) instead of dense.
        `kernels`: `"auto"` (Pallas kernels on a GPU, XLA elsewhere, overridable by `kernels.use` and
        `HMOE_KERNELS`), or `"xla"`, `"pallas"`, `"interpret"` for this model whatever the context
        (`hmoe_jax.kernels`).
        `head=False`: no final norm and no lm_head: the first layers of a deeper model, for features
        (`from_pretrained(num_layers=...)`); every hidden state is then a raw residual and there are
        no logits."""
        kernels_module.check_mode(kernels)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = param_dtype or dtype
        c = config
        self.config = c
        self.dtype = dtype
        self.embed_tokens = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List(
            [
                DecoderLayer(c, i, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                             packed_experts=packed_experts, kernels=kernels, rngs=rngs)
                for i in range(c.num_hidden_layers)
            ]
        )
        self.has_head = head
        if head:
            self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, rngs=rngs)
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), param_dtype)

    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_layer_info: bool = False,
        stop_after_layer: int | None = None,
    ) -> CausalLMOutput:
        """`stop_after_layer=L` runs blocks 0..L-1 only: no later block, no final norm, no lm_head
        (precompute needs only `hidden_states[L]`, which is then the last entry)."""
        n_layers = self.layer_count(stop_after_layer)
        x, context = self.embed(input_ids, attention_mask, position_ids)
        hidden, infos = [x], []
        for i in range(n_layers):
            x, info = self.block(i, x, context)
            hidden.append(x)
            infos.append(info)
        return self._output(n_layers, hidden, infos, output_hidden_states, output_layer_info, stop_after_layer,
                            self.head if n_layers == self.config.num_hidden_layers and self.has_head else None)

    def layer_count(self, stop_after_layer: int | None) -> int:
        """How many blocks a forward with `stop_after_layer` runs (all for None)."""
        c = self.config
        n_layers = c.num_hidden_layers if stop_after_layer is None else stop_after_layer
        if not 0 <= n_layers <= c.num_hidden_layers:
            raise ValueError(f"stop_after_layer={stop_after_layer} is outside [0, {c.num_hidden_layers}]")
        return n_layers

    def embed(self, input_ids, attention_mask=None, position_ids=None) -> tuple[jax.Array, BlockContext]:
        """The embeddings [B,T,H] in the compute dtype, and what every block reads beside them."""
        c = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        full, sliding = attention_masks(attention_mask, c.sliding_window)
        cos, sin = rope_tables(position_ids, c, self.dtype)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        return x, BlockContext(cos, sin, full, sliding, attention_mask)

    def block(self, i: int, x, context: BlockContext):
        """Decoder block `i` on the residual `x`: (new residual, routing info)."""
        layer = self.layers[i]
        return _run_block(layer, x, context)

    def head(self, x) -> tuple[jax.Array, jax.Array]:
        """(final-normed hidden state, logits)."""
        x = self.final_norm(x)
        return x, self.logits(x)

    def final_norm(self, x) -> jax.Array:
        return self.norm(x)

    def logits(self, normed) -> jax.Array:
        return unembed(normed, self.lm_head[...], self.dtype)

    @staticmethod
    def _output(n_layers, hidden, infos, output_hidden_states, output_layer_info, stop_after_layer, head):
        logits = None
        if head is not None:
            hidden[-1], logits = head(hidden[-1])
        return CausalLMOutput(
            logits=logits,
            hidden_states=tuple(hidden) if output_hidden_states or stop_after_layer is not None else None,
            layer_info=tuple(infos) if output_layer_info else None,
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        output_hidden_states: bool = False,
        output_layer_info: bool = False,
        stop_after_layer: int | None = None,
        layerwise: bool = False,
    ) -> CausalLMOutput:
        """`forward` under `jax.jit`. `layerwise=True` compiles the embedding, each distinct kind of
        block (sliding or full attention, plain or hybrid MoE) and the head as programs of their own
        and runs the blocks from Python, one after another: the same numbers (tests), but compiling a
        few block-sized programs instead of one with every layer unrolled. For a full-size model on a
        host with little memory to spare: the 20b's unrolled program takes ~2.5 GiB to compile, or to
        load from the compile cache, while its 12.8 GiB of parameters are already resident."""
        input_ids, attention_mask, position_ids = _arrays(input_ids, attention_mask, position_ids)
        kernel_mode = kernels_module.select()
        if layerwise:
            return self._layerwise(input_ids, attention_mask, position_ids, output_hidden_states, output_layer_info,
                                   stop_after_layer, kernel_mode)
        graphdef, state = nnx.split(self)
        return _jitted_forward(
            graphdef, state, input_ids, attention_mask, position_ids,
            output_hidden_states, output_layer_info, stop_after_layer,
            kernel_mode=kernel_mode,
        )

    def _layerwise(self, input_ids, attention_mask, position_ids, output_hidden_states, output_layer_info,
                   stop_after_layer, kernel_mode) -> CausalLMOutput:
        n_layers = self.layer_count(stop_after_layer)
        hidden, infos = [], []
        for _, x, info in self.layerwise_blocks(input_ids, attention_mask, position_ids, n_layers,
                                                kernel_mode=kernel_mode):
            hidden.append(x)
            if info is not None:
                infos.append(info)
        head = None
        if n_layers == self.config.num_hidden_layers and self.has_head:
            # hidden[-1] is already final-normed (layerwise_blocks): only the logits are left.
            head = lambda h: (h, call_jitted(GptOssForCausalLM.logits, (), *nnx.split(EmbeddingAndHead(self)),  # noqa: E731
                                             h, kernel_mode=kernel_mode))
        return self._output(n_layers, hidden, infos, output_hidden_states, output_layer_info, stop_after_layer, head)

    def layerwise_blocks(self, input_ids, attention_mask=None, position_ids=None, n_layers: int | None = None, *,
                         kernel_mode=None):
        """Yield (i, hidden_states[i], info of block i-1) for i = 0..n_layers (all blocks for None):
        the embedding (info None), then each block's residual, each part a jitted program of its own
        (`layerwise=True`). As in `forward`, the state after the last block is final-normed when the
        model has a head and every block ran. A caller that keeps only the states it needs holds one
        residual at a time."""
        n_layers = self.layer_count(n_layers)
        kernel_mode = kernel_mode if kernel_mode is not None else kernels_module.select()
        input_ids, attention_mask, position_ids = _arrays(input_ids, attention_mask, position_ids)
        # Each part is jitted with only the parameters it reads; blocks of one kind share a graphdef,
        # hence one compiled program.
        outer = nnx.split(EmbeddingAndHead(self))
        x, context = call_jitted(GptOssForCausalLM.embed, (), *outer, input_ids, attention_mask, position_ids,
                                 kernel_mode=kernel_mode)
        yield 0, x, None
        for i in range(n_layers):
            x, info = call_jitted(_run_block, (), *nnx.split(self.layers[i]), x, context, kernel_mode=kernel_mode)
            if i + 1 == self.config.num_hidden_layers and self.has_head:
                x = call_jitted(GptOssForCausalLM.final_norm, (), *outer, x, kernel_mode=kernel_mode)
            yield i + 1, x, info


def _arrays(*values):
    """Each value as a jax array; None stays None."""
    return tuple(None if v is None else jnp.asarray(v) for v in values)


@struct.dataclass
class BlockContext:
    """What every decoder block reads beside the residual: rope tables, the (full, sliding) attention
    masks and the [B,T] padding mask."""

    cos: jax.Array
    sin: jax.Array
    full: jax.Array
    sliding: jax.Array
    attention_mask: jax.Array


def _run_block(layer: DecoderLayer, x, context: BlockContext):
    allowed = context.sliding if layer.self_attn.sliding_window else context.full
    return layer(x, context.cos, context.sin, allowed, context.attention_mask, key_mask=context.attention_mask)


class EmbeddingAndHead(nnx.Module):
    """A model's embedding and head without its blocks (sharing its variables): what the layerwise
    paths jit around the blocks, so those programs take none of the blocks' parameters."""

    def __init__(self, model: GptOssForCausalLM):
        self.config = model.config
        self.dtype = model.dtype
        self.embed_tokens = model.embed_tokens
        if model.has_head:
            self.norm = model.norm
            self.lm_head = model.lm_head

    embed = GptOssForCausalLM.embed
    final_norm = GptOssForCausalLM.final_norm
    logits = GptOssForCausalLM.logits


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("kernel_mode",))
def call_jitted(fn, static, graphdef, state, *args, kernel_mode=None):
    """`fn(module, *args, *static)` on the module `nnx.merge(graphdef, state)`, jitted: `fn` and the
    tuple `static` are compile-time, so modules of one structure (blocks of one kind) share a program."""
    module = nnx.merge(graphdef, state)
    with kernels_module.use(kernel_mode):
        return fn(module, *args, *static)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7), static_argnames=("kernel_mode",))
def _jitted_forward(graphdef, state, input_ids, attention_mask, position_ids, output_hidden_states, output_layer_info,
                    stop_after_layer, kernel_mode=None):
    # `kernel_mode`: what `kernels="auto"` resolves to at the call (context, environment, backend); a
    # static argument, so a different choice compiles anew instead of reusing the other path.
    model = nnx.merge(graphdef, state)
    with kernels_module.use(kernel_mode):
        return model.forward(
            input_ids, attention_mask, position_ids,
            output_hidden_states=output_hidden_states,
            output_layer_info=output_layer_info,
            stop_after_layer=stop_after_layer,
        )
