"""Flash-style attention with gpt-oss's learned sinks, sliding window and grouped-query heads.

Computes what `hmoe_jax.model.layers.Attention.attend` computes, for the masks `attention_masks` builds:

    s_qk = scale * q.k                                  for allowed keys (causal, unpadded, in the window)
    out_q = sum_k exp(s_qk) v_k / (exp(sink_h) + sum_k exp(s_qk))

Each program owns one (query head, query block, batch row) and streams the key blocks its queries can
see through an online softmax: running row max `m`, running sum `row_sum = l = sum exp(s - m)`, and the fp32
accumulator `acc = sum exp(s - m) v`. Without a sink the output would be `acc / l` with log-sum-exp
`lse = m + log l`; the sink is one extra softmax column, so folding it in at the end is

    out = acc / l * sigmoid(lse - sink) = acc / (l + exp(sink - m)),

evaluated after shifting both terms by `max(m, sink)` (as the XLA path subtracts the row max with the
sink included) so a large sink cannot overflow `exp`.

Masked scores are a finite -1e30, as in the XLA path: a query row that sees no key at all keeps
`m = -1e30`, its sink term dominates and the output is exactly 0, NaN-free (padded query rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._pallas import check_power_of_two, default_precision, resolve_interpret, round_up, triton_params

_MASKED = -1e30  # model._MASKED: underflows to 0 after exp(s - max) but keeps fully masked rows finite

_DOT_QK = (((1,), (1,)), ((), ()))  # [bq, D] x [bk, D] -> [bq, bk], k read untransposed


def _attention_kernel(q_ref, k_ref, v_ref, key_mask_ref, sinks_ref, out_ref, *,
                      scale: float, window: int | None, block_k: int, num_k_blocks: int, precision):
    head, q_block = pl.program_id(0), pl.program_id(1)
    block_q = q_ref.shape[0]
    q = q_ref[...]
    q_start = q_block * block_q
    q_pos = q_start + jnp.arange(block_q, dtype=jnp.int32)

    # Only key blocks that can hold an allowed key: causality bounds the range above (the last query of
    # the block), the window below (the first query of the block).
    hi = jnp.minimum((q_start + block_q + block_k - 1) // block_k, num_k_blocks)
    lo = 0 if window is None else jnp.maximum(q_start - window + 1, 0) // block_k

    def visit_key_block(j, carry):
        m, row_sum, acc = carry
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = jax.lax.dot_general(q, k, _DOT_QK, precision=precision, preferred_element_type=jnp.float32)
        s = s * scale  # after the dot, as the XLA path scales fp32 scores
        k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (key_mask_ref[pl.ds(k_start, block_k)] != 0)[None, :]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        s = jnp.where(allowed, s, _MASKED)

        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        row_sum = row_sum * correction + jnp.sum(p, axis=1)
        pv = jax.lax.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
        return m_new, row_sum, acc * correction[:, None] + pv

    carry = (
        jnp.full((block_q,), _MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.zeros(q_ref.shape, jnp.float32),
    )
    m, row_sum, acc = jax.lax.fori_loop(lo, hi, visit_key_block, carry)

    # out * sigmoid(lse - sink), both terms shifted by max(m, sink) so neither exp can overflow.
    sink = sinks_ref[head]
    shift = jnp.maximum(m, sink)
    keys = jnp.exp(m - shift)
    weight = keys / (row_sum * keys + jnp.exp(sink - shift))
    out_ref[...] = (acc * weight[:, None]).astype(out_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("window", "scale", "block_q", "block_k", "precision", "interpret"),
)
def sink_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sinks: jax.Array,
    *,
    window: int | None = None,
    key_mask: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    precision: jax.lax.Precision | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal sink attention: q [B,T,H,D], k and v [B,S,KV,D], sinks [H] -> [B,T,H,D] in q's dtype.

    Query i (sequence index i) sees key j iff `j <= i`, `key_mask[b, j]` (default all keys) and, with a
    `window`, `i - window < j`. Query head h reads KV head `h // (H // KV)`. `scale` defaults to
    `D ** -0.5`; `precision` to HIGHEST for fp32 inputs and DEFAULT otherwise (as the model). Blocks
    are powers of two (Triton tiles), shrunk for short sequences; T and S need not be multiples of them
    (padded here). D must be a power of two (64 for gpt-oss). `interpret=None` runs the compiled
    kernel on GPU and interprets it elsewhere.
    """
    b, t, h, d = q.shape
    _, s, kv, _ = k.shape
    if k.shape != (b, s, kv, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B,S,KV,D] matching q {q.shape}, got {k.shape} and {v.shape}")
    if h % kv:
        raise ValueError(f"query heads {h} must be a multiple of KV heads {kv}")
    if sinks.shape != (h,):
        raise ValueError(f"sinks must be [H]=[{h}], got {sinks.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (it counts the query itself), got {window}")
    # Short sequences (decode, tests) need no 64-row tile; 16 is the smallest tile a Triton dot takes.
    block_q = min(block_q, max(16, pl.next_power_of_2(t)))
    block_k = min(block_k, max(16, pl.next_power_of_2(s)))
    check_power_of_two(block_q=block_q, block_k=block_k, head_dim=d)
    scale = d**-0.5 if scale is None else scale
    precision = default_precision(q.dtype, precision)
    groups = h // kv

    t_pad, s_pad = round_up(t, block_q), round_up(s, block_k)
    if key_mask is None:
        key_mask = jnp.ones((b, s), jnp.int32)
    # int32, not bool: Triton loads i1 through i8 pointers, a plain int needs no special case.
    key_mask = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, s_pad - s)))  # padded keys are masked
    q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))

    kernel = functools.partial(
        _attention_kernel, scale=float(scale), window=window, block_k=block_k,
        num_k_blocks=s_pad // block_k, precision=precision,
    )
    sq = pl.squeezed
    # Heads vary fastest across the launch grid, so the `groups` heads sharing one KV head run side by
    # side and read its key/value blocks from L2 instead of HBM.
    grid = (h, t_pad // block_q, b)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((sq, block_q, sq, d), lambda hd, i, bt: (bt, i, hd, 0)),
            pl.BlockSpec((sq, s_pad, sq, d), lambda hd, i, bt: (bt, 0, hd // groups, 0)),
            pl.BlockSpec((sq, s_pad, sq, d), lambda hd, i, bt: (bt, 0, hd // groups, 0)),
            pl.BlockSpec((sq, s_pad), lambda hd, i, bt: (bt, 0)),
            pl.BlockSpec(),  # sinks: the whole [H] vector, one scalar read per program
        ],
        out_specs=pl.BlockSpec((sq, block_q, sq, d), lambda hd, i, bt: (bt, i, hd, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=resolve_interpret(interpret),
        name="sink_attention",
    )(q, k, v, key_mask, sinks.astype(jnp.float32))
    return out[:, :t]
