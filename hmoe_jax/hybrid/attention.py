"""The attention-pooled extractor: a probe that chooses which of the prompt's tokens it reads.

The mean-pooled probe reads the average of a layer's token states, so a figure stated once in a long
prompt is diluted by every other token. The attention extractor gives each argument a learned query q
[H] and pools the real tokens s of the prompt with weights

    score_s = rms(h_s) . q / sqrt(H)          rms(h) = h / sqrt(mean(h^2) + eps), no parameters
    w_s     = softmax over the real tokens s of score_s
    pooled  = sum_s w_s h_s                   then the probe MLP (`probe.probe_apply`) on `pooled`

Design choices, and why:
- No key projection. With one query per argument a linear key map K only ever enters as the vector
  K q, so `k(h) . q` is `h . (K q)`: a key map would add H x d parameters and nothing to what the
  scores can express. q lives directly in the hidden space.
- No value projection: the pooled vector stays a point of the residual stream, so the probe MLP is the
  mean-pooled probe's (same widths, same init, same `probe_apply`).
- The keys are RMS-normed (values are not): scores compare directions, so a few tokens of huge norm
  (attention sinks, the first token) do not win the softmax by norm alone, and |score| <= |q|.
- q starts at zero, where the weights are uniform and the extractor IS the mean-pooled probe (with the
  same seed, the same MLP): training can only move away from mean pooling where that helps.

Parameters are the probe's dict plus `QUERY` [H] ({w1, b1, w2, b2, w3, b3, query}); leading axes are an
ensemble, as for `probe`. `attention_probe_apply` is the training path (one prompt's token states,
padded, and a mask). Inside the model (`hybrid.layer`, extraction_input "attention") every token t pools
the real tokens s <= t (`causal_attention_pool`), so at a prompt's last token it reads what the probe
was trained on; there the pooling runs after the probe's first (linear) layer, which it commutes with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import probe

QUERY = "query"
KEY_NORM_EPS = 1e-6
# A finite "minus infinity" for masked scores: exp(_MASKED - real) is exactly 0, and two masked
# entries combine without the inf - inf = NaN of a true -inf.
_MASKED = -1e30

_PRECISION = jax.lax.Precision.HIGHEST


def query_init(input_dim: int, dtype=jnp.float32) -> jax.Array:
    """Zeros: uniform weights, i.e. mean pooling, at the start of training."""
    return jnp.zeros((input_dim,), dtype)


def attention_scores(query: jax.Array, states: jax.Array) -> jax.Array:
    """states [..., T, H] and query [H] -> scores [..., T] (RMS-normed keys, 1/sqrt(H) scaling)."""
    keys = states * jax.lax.rsqrt(jnp.mean(jnp.square(states), axis=-1, keepdims=True) + KEY_NORM_EPS)
    return jnp.dot(keys, query, precision=_PRECISION) / jnp.sqrt(jnp.asarray(states.shape[-1], states.dtype))


def attention_weights(query: jax.Array, states: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the real tokens (mask [..., T]) of the scores; exactly 0 on padding."""
    scores = jnp.where(mask, attention_scores(query, states), _MASKED)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.where(mask, weights, 0.0)


def attention_pool(query: jax.Array, states: jax.Array, mask: jax.Array) -> jax.Array:
    """states [..., T, H], mask [..., T] -> pooled [..., H] = sum_s w_s h_s over the real tokens."""
    weights = attention_weights(query, states, mask)
    return jnp.einsum("...t,...th->...h", weights, states, precision=_PRECISION)


def token_mask(counts: jax.Array, length: int) -> jax.Array:
    """Counts [...] of real tokens, stored left-aligned (`data.features` token states) -> mask [..., length]."""
    return jnp.arange(length) < counts[..., None]


def attention_probe_apply(params: dict[str, jax.Array], states: jax.Array, mask: jax.Array,
                          dropout_key: jax.Array | None = None, dropout: tuple[float, float] = probe.PROBE_DROPOUT
                          ) -> jax.Array:
    """Token states [..., T, H] of prompts and their mask [..., T] -> probe outputs [..., 1]."""
    return probe.probe_apply(params, attention_pool(params[QUERY], states, mask), dropout_key, dropout)


def causal_attention_pool(scores: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """At every position t, the softmax-weighted sum over real positions s <= t.

    scores [B, T, P] (one score per token and pooling head p), values [B, T, P, K], mask [B, T] ->
    [B, T, P, K]; zero before the first real token. The weights of position t are a softmax over the
    scores s <= t, which do not depend on t, so the pooled values are a running (online) softmax: an
    associative scan of (running max m, sum of exp(score - m), weighted sum), O(T log T) and never a
    [T, T] matrix. Each position is renormalised at its own running max, so nothing underflows however
    sharp the weights.
    """
    real = mask.astype(bool)[..., None]
    m = jnp.where(real, scores, _MASKED)
    weight = real.astype(values.dtype) * jnp.ones_like(scores)
    acc = values * weight[..., None]

    def combine(left, right):
        m1, l1, a1 = left
        m2, l2, a2 = right
        m = jnp.maximum(m1, m2)
        c1, c2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
        return m, l1 * c1 + l2 * c2, a1 * c1[..., None] + a2 * c2[..., None]

    _, total, acc = jax.lax.associative_scan(combine, (m, weight, acc), axis=1)
    # total >= 1 from the first real token on (the running max contributes exp(0)).
    return jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
