"""Autoregressive generation with a KV cache that respects sliding-window layers.

A prefill runs the (left-padded) prompt through every block, each filling its `LayerCache`; then each
decode step runs the one new token per row through the same blocks (`DecoderLayer`), reading and
extending the caches. Positions follow the attention mask (`cumsum - 1`), as `transformers.generate`
does.

Executed as the model's options say (`transformer.run`): as one compiled program per (batch, prompt
length, max_new_tokens), the decode steps a `lax.scan`; or layerwise, the prefill and each decode step
running block by block and the token loop in Python, with no program that unrolls every layer. Both
draw the same tokens.

The prefill's attention takes the Pallas kernel where the model's kernel path says so (a GPU by
default); decode steps attend over the cache slots on the XLA path (one query per row: a masked
matrix-vector product, not what a flash kernel is for). Packed MXFP4 experts use the MoE kernel in both.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .layers import LayerCache
from .transformer import EmbeddingAndHead, GptOssForCausalLM, default_position_ids, run


def _last_logits(embedding_and_head: EmbeddingAndHead, x):
    """Logits [B, V] of the last position."""
    return embedding_and_head.logits(embedding_and_head.final_norm(x[:, -1:]))[:, 0]


def _prefill(model: GptOssForCausalLM, ids, mask, total_len: int):
    """Run the prompt through every block, filling a fresh cache per layer: (last position's logits,
    caches, each row's next position)."""
    positions = default_position_ids(mask)
    embedding_and_head = model.embedding_and_head
    x, ctx = model.part(EmbeddingAndHead.embed, embedding_and_head, ids, mask, positions)
    empty = [layer.self_attn.empty_cache(ids.shape[0], total_len) for layer in model.layers]
    caches = []
    for x, _, cache in model.blocks(x, ctx, caches=empty):
        caches.append(cache)
    return model.part(_last_logits, embedding_and_head, x), caches, positions[:, -1] + 1


def _decode_step(model: GptOssForCausalLM, token, position, step, caches: list[LayerCache]):
    """One token per row at sequence index `step`: (its logits [B, V], the extended caches)."""
    embedding_and_head = model.embedding_and_head
    x, ctx = model.part(EmbeddingAndHead.embed, embedding_and_head, token[:, None], None, position[:, None])
    ctx = ctx.replace(full=None, sliding=None, decode_step=step)
    new_caches = []
    for x, _, cache in model.blocks(x, ctx, caches=caches):
        new_caches.append(cache)
    return model.part(_last_logits, embedding_and_head, x), new_caches


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
    if eos_token_id:  # a tuple of end-of-sequence ids
        done = done | jnp.isin(token, jnp.asarray(eos_token_id, token.dtype))
    return token, done, key


_jitted_next_token = jax.jit(_next_token, static_argnums=(3, 4, 5, 6))


def _generate(model: GptOssForCausalLM, ids, mask, key, max_new_tokens, temperature, top_k, eos_token_id,
              pad_token_id):
    t = ids.shape[1]
    logits, caches, position = _prefill(model, ids, mask, t + max_new_tokens)
    sampling = (temperature, top_k, eos_token_id, pad_token_id)

    def step(carry, i):
        logits, caches, position, done, key = carry
        token, done, key = _jitted_next_token(logits, key, done, *sampling)
        logits, caches = _decode_step(model, token, position, t + i, caches)
        return (logits, caches, position + 1, done, key), token

    carry = (logits, caches, position, jnp.zeros(ids.shape[0], bool), key)
    if not model.runs_per_part(ids):
        _, tokens = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
        return tokens.T
    tokens = []
    for i in range(max_new_tokens):
        if i == max_new_tokens - 1:  # the last token's own logits are never used: no decode step for it
            tokens.append(_jitted_next_token(carry[0], carry[4], carry[3], *sampling)[0])
            break
        carry, token = step(carry, jnp.asarray(i, jnp.int32))
        tokens.append(token)
    return jnp.stack(tokens, axis=1) if tokens else jnp.zeros((ids.shape[0], 0), jnp.int32)


def generate(
    model: GptOssForCausalLM,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
) -> jax.Array:
    """New tokens [B, max_new_tokens] after left-padded prompts. `temperature=0` is greedy; after a
    row emits `eos_token_id` (or any of several) it emits `pad_token_id`. A hybrid model generates too, with
    token-level extraction (causal-mean extraction needs the whole prefix and is a prefill feature)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if bool(jnp.any(mask[:, -1] == 0)):
        raise ValueError("generate needs left-padded prompts: every row's last position must be a real token")
    eos = () if eos_token_id is None else tuple(int(i) for i in np.atleast_1d(eos_token_id))
    return run(model, _generate, ids, mask, jax.random.key(seed),
               static=(max_new_tokens, float(temperature), top_k, eos, pad_token_id))
