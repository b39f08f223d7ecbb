"""Mixture-of-experts dispatch: one interface, several backends, identical results.

Every backend computes, for each token n with selected experts e_1..e_k and routing weights w_1..w_k,

    y_n = sum_j w_j * (act(x_n @ gate_up[e_j] + gate_up_bias[e_j]) @ down[e_j] + down_bias[e_j])

- `dense`: every expert on every token, combined with a [N, E] weight matrix that is zero off the
  top-k. E/k times the FLOPs; the simplest program, best for tiny configs and as an oracle.
- `ragged`: token-expert pairs sorted by expert, then `jax.lax.ragged_dot` (grouped matmul). Right for
  GPU/TPU; XLA:CPU lowers it to a masked dense product, so it is slow there.
- `grouped`: the same sort, then a loop over experts that multiplies each expert's contiguous rows
  in fixed-size row tiles (`while_loop` with a data-dependent trip count; no capacity, no dropped
  tokens). Reads each expert's weights once per tile; the CPU choice at real widths.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
    gate_up: jax.Array  # [E, H, 2I], gate/up interleaved on the last axis
    gate_up_bias: jax.Array  # [E, 2I]
    down: jax.Array  # [E, I, H]
    down_bias: jax.Array  # [E, H]


class SwiGLU(NamedTuple):
    """gpt-oss's clamped SwiGLU on an interleaved gate/up vector."""

    limit: float = 7.0
    alpha: float = 1.702

    def __call__(self, gate_up: jax.Array) -> jax.Array:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


def moe_dense(x, weights, indices, w: ExpertWeights, act: SwiGLU, precision) -> jax.Array:
    n, e = x.shape[0], w.gate_up.shape[0]
    combine = jnp.zeros((n, e), x.dtype).at[jnp.arange(n)[:, None], indices].add(weights.astype(x.dtype))
    gu = jnp.einsum("nh,ehf->enf", x, w.gate_up, precision=precision) + w.gate_up_bias[:, None, :]
    y = jnp.einsum("enf,efh->enh", act(gu), w.down, precision=precision) + w.down_bias[:, None, :]
    return jnp.einsum("ne,enh->nh", combine, y, precision=precision)


class _Sorted(NamedTuple):
    token: jax.Array  # [N*k] token of each pair, pairs ordered by expert
    expert: jax.Array  # [N*k] expert of each pair, ascending
    weight: jax.Array  # [N*k] routing weight of each pair
    group_sizes: jax.Array  # [E] pairs per expert


def _sort_by_expert(weights, indices, num_experts: int) -> _Sorted:
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return _Sorted(
        token=order // k,
        expert=flat[order],
        weight=weights.reshape(-1)[order],
        group_sizes=jnp.bincount(flat, length=num_experts).astype(jnp.int32),
    )


def _combine(x, s: _Sorted, y):
    """Scale each pair's expert output by its routing weight and sum the pairs back per token."""
    y = y * s.weight[:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[s.token].add(y)


def moe_ragged(x, weights, indices, w: ExpertWeights, act: SwiGLU, precision) -> jax.Array:
    s = _sort_by_expert(weights, indices, w.gate_up.shape[0])
    rows = x[s.token]
    gu = jax.lax.ragged_dot(rows, w.gate_up, s.group_sizes, precision=precision) + w.gate_up_bias[s.expert]
    y = jax.lax.ragged_dot(act(gu), w.down, s.group_sizes, precision=precision) + w.down_bias[s.expert]
    return _combine(x, s, y)


GROUPED_TILE_ROWS = 16


def moe_grouped(x, weights, indices, w: ExpertWeights, act: SwiGLU, precision, tile: int = GROUPED_TILE_ROWS) -> jax.Array:
    num_experts, hidden = w.gate_up.shape[0], x.shape[1]
    s = _sort_by_expert(weights, indices, num_experts)
    pairs = s.token.shape[0]
    # Pad the sorted rows so a tile starting at any pair index stays in bounds.
    rows = jnp.concatenate([x[s.token], jnp.zeros((tile, hidden), x.dtype)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(s.group_sizes)[:-1]])
    out = jnp.zeros((pairs + tile, hidden), x.dtype)

    def expert_body(e, out):
        start, size = starts[e], s.group_sizes[e]
        gate_up, gate_up_bias, down, down_bias = w.gate_up[e], w.gate_up_bias[e], w.down[e], w.down_bias[e]

        def tile_body(j, out):
            offset = start + j * tile
            block = jax.lax.dynamic_slice_in_dim(rows, offset, tile)
            gu = jnp.dot(block, gate_up, precision=precision) + gate_up_bias
            y = jnp.dot(act(gu), down, precision=precision) + down_bias
            # Rows past this expert's group belong to the next expert: keep what is there.
            valid = (jnp.arange(tile) < size - j * tile)[:, None]
            current = jax.lax.dynamic_slice_in_dim(out, offset, tile)
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid, y, current), offset, 0)

        return jax.lax.fori_loop(0, (size + tile - 1) // tile, tile_body, out)

    out = jax.lax.fori_loop(0, num_experts, expert_body, out)
    return _combine(x, s, out[:pairs])


BACKENDS: dict[str, Callable] = {"dense": moe_dense, "ragged": moe_ragged, "grouped": moe_grouped}


def dispatch(backend: str) -> Callable:
    """The backend function by name; `auto` picks by platform (see README's dispatch benchmark)."""
    if backend == "auto":
        backend = "grouped" if jax.default_backend() == "cpu" else "ragged"
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown MoE backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'") from None
