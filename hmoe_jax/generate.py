"""Jitted autoregressive generation with a KV cache that respects sliding-window layers.

One compiled program per (batch, prompt length, max_new_tokens): a prefill over the (left-padded)
prompt, then `lax.scan` over decode steps. Full-attention layers cache every position; sliding layers
keep a ring buffer of `sliding_window` slots, since no query ever reads further back. Each slot
remembers the sequence index it holds (-1: empty or padding), and the mask is rebuilt from those
indices, exactly the keys transformers' masks allow: causal, non-padding, and `q - window < k` on
sliding layers. Positions follow the attention mask (`cumsum - 1`), as `transformers.generate` does.

The prefill's attention takes the Pallas kernel where `hmoe_jax.kernels` selects it (a GPU by default);
the decode steps attend over the cache slots with the XLA path (one query per row: a masked
matrix-vector product, not what a flash kernel is for). Packed MXFP4 experts use the MoE kernel in both.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import kernels
from .model import BlockContext, EmbeddingAndHead, GptOssForCausalLM, call_jitted, default_position_ids, unembed
from .rope import rope_tables


class LayerCache(NamedTuple):
    k: jax.Array  # [B, S, KV, D]
    v: jax.Array  # [B, S, KV, D]
    index: jax.Array  # [B, S] sequence index held by each slot, -1 when empty or padding


def _cache_size(layer, total_len: int) -> int:
    window = layer.self_attn.sliding_window
    return total_len if window is None else min(window, total_len)


def _prefill(model: GptOssForCausalLM, ids, mask, total_len: int):
    """Run the prompt, returning the last position's logits, the caches and the next positions."""
    positions = default_position_ids(mask)
    x, context = model.embed(ids, mask, positions)
    seq_index = _sequence_index(mask)
    caches = []
    for layer in model.layers:
        x, cache = _prefill_block(layer, x, context, seq_index, total_len)
        caches.append(cache)
    return _lm_head(model, x[:, -1:])[:, 0], tuple(caches), positions[:, -1] + 1


def _sequence_index(mask):
    """[B,T] the sequence index of each prompt position, -1 for padding: what cache slots record."""
    return jnp.where(mask.astype(bool), jnp.arange(mask.shape[1])[None, :], -1)


def _prefill_block(layer, x, context: BlockContext, seq_index, total_len: int):
    """Block `layer` over the whole prompt: (new residual, its filled KV cache)."""
    b, t = x.shape[:2]
    mask = context.attention_mask
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q, k, v = attn.project_qkv(h, context.cos, context.sin)
    allowed = context.sliding if attn.sliding_window else context.full
    x_mid = x + attn.output(attn.attend(q, k, v, allowed, key_mask=mask))
    y, _ = layer.mlp(layer.post_attention_layernorm(x_mid), block_input=x, token_mask=mask)
    x = x_mid + y
    size = _cache_size(layer, total_len)
    keep = min(size, t)  # the last `keep` prompt positions land in slots (index % size), all distinct
    slots = jnp.arange(t - keep, t) % size
    cache = LayerCache(
        jnp.zeros((b, size) + k.shape[2:], k.dtype).at[:, slots].set(k[:, t - keep:]),
        jnp.zeros((b, size) + v.shape[2:], v.dtype).at[:, slots].set(v[:, t - keep:]),
        jnp.full((b, size), -1, jnp.int32).at[:, slots].set(seq_index[:, t - keep:]),
    )
    return x, cache


def _lm_head(model, x):
    x = model.norm(x)
    return unembed(x, model.lm_head[...], model.dtype)


def _decode_step(model: GptOssForCausalLM, token, position, step_index, caches):
    """One token per row at sequence index `step_index` (shared: prompts are left-padded)."""
    x, cos, sin = _decode_inputs(model, token, position)
    new_caches = []
    for layer, cache in zip(model.layers, caches):
        x, cache = _decode_block(layer, x, cos, sin, step_index, cache)
        new_caches.append(cache)
    return _lm_head(model, x)[:, 0], tuple(new_caches)


def _decode_inputs(model, token, position):
    """The new tokens' embeddings [B,1,H] and rope tables."""
    cos, sin = rope_tables(position[:, None], model.config, model.dtype)
    x = jnp.take(model.embed_tokens[...], token[:, None], axis=0).astype(model.dtype)
    return x, cos, sin


def _decode_block(layer, x, cos, sin, step_index, cache: LayerCache):
    """Block `layer` on one new token per row, reading and updating its KV cache."""
    b = x.shape[0]
    attn = layer.self_attn
    q, k, v = attn.project_qkv(layer.input_layernorm(x), cos, sin)
    size = cache.k.shape[1]
    slot = step_index % size
    cache = LayerCache(
        jax.lax.dynamic_update_slice_in_dim(cache.k, k, slot, axis=1),
        jax.lax.dynamic_update_slice_in_dim(cache.v, v, slot, axis=1),
        jax.lax.dynamic_update_slice_in_dim(cache.index, jnp.full((b, 1), step_index, jnp.int32), slot, axis=1),
    )
    allowed = (cache.index >= 0) & (cache.index <= step_index)
    if attn.sliding_window is not None:
        allowed &= cache.index > step_index - attn.sliding_window
    x_mid = x + attn.output(attn.attend(q, cache.k, cache.v, allowed[:, None, :]))
    y, _ = layer.mlp(layer.post_attention_layernorm(x_mid), block_input=x, token_mask=jnp.ones((b, 1), jnp.int32))
    return x_mid + y, cache


def _choose(logits, key, temperature: float, top_k: int | None):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _next_token(logits, key, done, temperature: float, top_k: int | None, eos_token_id, pad_token_id):
    """One generation step's token: a fresh key split, the choice, padding after EOS."""
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_token_id, _choose(logits, sub, temperature, top_k))
    if eos_token_id is not None:
        done = done | (token == eos_token_id)
    return token, done, key


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8), static_argnames=("kernel_mode",))
def _generate(graphdef, state, ids, mask, max_new_tokens, temperature, top_k, eos_token_id, pad_token_id, key,
              kernel_mode=None):
    model = nnx.merge(graphdef, state)
    t = ids.shape[1]
    with kernels.use(kernel_mode):  # static: each kernel choice compiles its own program
        return _generate_traced(model, ids, mask, t, max_new_tokens, temperature, top_k, eos_token_id,
                                pad_token_id, key)


def _generate_traced(model, ids, mask, t, max_new_tokens, temperature, top_k, eos_token_id, pad_token_id, key):
    logits, caches, position = _prefill(model, ids, mask, t + max_new_tokens)
    done = jnp.zeros(ids.shape[0], bool)

    def step(carry, i):
        logits, caches, position, done, key = carry
        token, done, key = _next_token(logits, key, done, temperature, top_k, eos_token_id, pad_token_id)
        logits, caches = _decode_step(model, token, position, t + i, caches)
        return (logits, caches, position + 1, done, key), token

    _, tokens = jax.lax.scan(step, (logits, caches, position, done, key), jnp.arange(max_new_tokens))
    return tokens.T


def generate(
    model: GptOssForCausalLM,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
    layerwise: bool = False,
) -> jax.Array:
    """New tokens [B, max_new_tokens] after left-padded prompts. `temperature=0` is greedy; after a
    row emits `eos_token_id` it emits `pad_token_id`. A hybrid model generates too, with
    token-level extraction (causal-mean extraction needs the whole prefix and is a prefill feature).
    `layerwise=True`: the prefill and the decode step run block by block from Python, each kind of
    block a small jitted program (as `GptOssForCausalLM(..., layerwise=True)`), and the token loop is
    a Python loop: the same tokens, without compiling two programs that unroll every layer (the
    memory a full-size model on a small host does not have)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if bool(jnp.any(mask[:, -1] == 0)):
        raise ValueError("generate needs left-padded prompts: every row's last position must be a real token")
    args = (max_new_tokens, float(temperature), top_k, eos_token_id, pad_token_id, jax.random.key(seed))
    if layerwise:
        return _generate_layerwise(model, ids, mask, *args, kernel_mode=kernels.select())
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, ids, mask, *args, kernel_mode=kernels.select())


# ------------------------------------------------------------------ layerwise generation

_jitted_next_token = jax.jit(_next_token, static_argnums=(3, 4, 5, 6))


def _embed_prompt(model, ids, mask, positions):
    return model.embed(ids, mask, positions)


def _last_logits(model, x):
    return _lm_head(model, x[:, -1:])[:, 0]


def _generate_layerwise(model, ids, mask, max_new_tokens, temperature, top_k, eos_token_id, pad_token_id, key,
                        kernel_mode=None):
    t = ids.shape[1]
    total = t + max_new_tokens
    outer = nnx.split(EmbeddingAndHead(model))  # the embedding and head programs read only their parameters
    blocks = [nnx.split(layer) for layer in model.layers]
    run = functools.partial(call_jitted, kernel_mode=kernel_mode)
    positions = default_position_ids(mask)
    x, context = run(_embed_prompt, (), *outer, ids, mask, positions)
    seq_index = _sequence_index(mask)
    caches = []
    for block in blocks:
        x, cache = run(_prefill_block, (total,), *block, x, context, seq_index)
        caches.append(cache)
    logits = run(_last_logits, (), *outer, x)
    position = positions[:, -1] + 1
    done = jnp.zeros(ids.shape[0], bool)
    tokens = []
    for i in range(max_new_tokens):
        token, done, key = _jitted_next_token(logits, key, done, temperature, top_k, eos_token_id, pad_token_id)
        tokens.append(token)
        if i == max_new_tokens - 1:
            break  # the last token's own logits are never used
        x, cos, sin = run(_decode_inputs, (), *outer, token, position)
        step_index = jnp.asarray(t + i, jnp.int32)
        for j, block in enumerate(blocks):
            x, caches[j] = run(_decode_block, (), *block, x, cos, sin, step_index, caches[j])
        logits = run(_last_logits, (), *outer, x)
        position = position + 1
    return jnp.stack(tokens, axis=1) if tokens else jnp.zeros((ids.shape[0], 0), jnp.int32)
