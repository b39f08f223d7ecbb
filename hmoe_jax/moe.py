"""Mixture-of-experts dispatch: one interface, several backends, identical results.

Every backend computes, for each token n with selected experts e_1..e_k and routing weights w_1..w_k,

    y_n = sum_j w_j * (act(x_n @ gate_up[e_j] + gate_up_bias[e_j]) @ down[e_j] + down_bias[e_j])

for every token (no capacity, no dropped tokens), in the compute dtype with the caller's precision.

- `dense`: every expert on every token, combined with a [N, E] weight matrix that is zero off the
  top-k. E/k times the FLOPs; the simplest program, best for tiny configs and as an oracle.
- `ragged`: token-expert pairs sorted by expert, then `jax.lax.ragged_dot` (grouped matmul). Right for
  GPU/TPU; XLA:CPU lowers it to a masked dense product, so it is slow there.
- `grouped`: the same sort, then a loop over experts. Each expert's rows go through its FFN in ONE row
  tile whose height is the smallest of `GROUPED_ROW_TILES` that holds them (a `switch` over static
  shapes), so each expert's weights are read once and padding wastes little; groups taller than the
  largest tile take several tiles. The weights are read in chunks of rows along the contracted axis
  (about `GROUPED_CHUNK_BYTES` each, accumulated in float32): a contiguous slice of [H, 2I] or [I, H]
  that stays in cache, where slicing a whole expert would copy tens of MB per expert on XLA:CPU. The
  CPU choice at real widths (`bench/results/moe_backends.md`).

`dispatch("auto")` picks per platform: `grouped` on CPU, `ragged` elsewhere (see
`bench/bench_moe_backends.py` for the measurement).
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


# Row-tile heights an expert's group is padded to (the smallest that holds it; taller groups take
# several tiles of the largest). Fine steps where groups usually fall (a few to a few dozen rows: on CPU
# the small-M matmul costs about in proportion to the padded height), coarser above; every height is a
# separate compiled branch, and heights past the number of pairs are dropped at trace time.
GROUPED_ROW_TILES = (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128, 192, 256)
# Bytes of weights per chunk: a contiguous slice that stays in L2 while it is multiplied.
GROUPED_CHUNK_BYTES = 1 << 20


def _chunk_rows(k: int, n: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows of a [k, n] weight matrix per chunk; k (one chunk) when the whole matrix is small."""
    if k * n * itemsize <= 2 * chunk_bytes:
        return k
    return max(8, min(k, chunk_bytes // (n * itemsize)))


def _expert_matmul(rows, w, e, precision, chunk_bytes: int):
    """rows [M, K] @ w[e] ([K, N]) -> float32 [M, N], reading w[e] in contiguous chunks of rows.

    Each chunk is a dynamic slice along the contracted axis (a small copy that stays in cache) and its
    partial product is accumulated in float32; a bf16 run thus rounds once, like a single dot.
    """
    m, k = rows.shape
    n = w.shape[2]
    c = _chunk_rows(k, n, w.dtype.itemsize, chunk_bytes)
    dot = lambda a, b: jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)
    if c == k:
        return dot(rows, w[e])
    full, tail = divmod(k, c)

    def step(j, acc):
        chunk = jax.lax.dynamic_slice(w, (e, j * c, 0), (1, c, n))[0]
        return acc + dot(jax.lax.dynamic_slice_in_dim(rows, j * c, c, axis=1), chunk)

    acc = jax.lax.fori_loop(0, full, step, jnp.zeros((m, n), jnp.float32))
    if tail:
        chunk = jax.lax.dynamic_slice(w, (e, full * c, 0), (1, tail, n))[0]
        acc = acc + dot(rows[:, full * c:], chunk)
    return acc


def moe_grouped(
    x, weights, indices, w: ExpertWeights, act: SwiGLU, precision,
    tiles: tuple[int, ...] = GROUPED_ROW_TILES, chunk_bytes: int = GROUPED_CHUNK_BYTES,
) -> jax.Array:
    num_experts, hidden = w.gate_up.shape[0], x.shape[1]
    s = _sort_by_expert(weights, indices, num_experts)
    pairs = s.token.shape[0]
    # Heights past the first one that holds every pair can never be chosen.
    tiles = tuple(sorted(set(tiles)))
    tiles = tuple(t for t in tiles if t < pairs) + tuple(t for t in tiles if t >= pairs)[:1]
    tallest = tiles[-1]
    # Padded so a tile starting at any pair index stays in bounds (dynamic_slice would clamp it).
    rows = jnp.concatenate([x[s.token], jnp.zeros((tallest, hidden), x.dtype)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(s.group_sizes)[:-1]])
    heights = jnp.asarray(tiles, jnp.int32)

    def ffn(block, e):
        gu = _expert_matmul(block, w.gate_up, e, precision, chunk_bytes).astype(x.dtype) + w.gate_up_bias[e]
        y = _expert_matmul(act(gu), w.down, e, precision, chunk_bytes).astype(x.dtype) + w.down_bias[e]
        return y

    def run_tile(height, e, offset, out):
        # Rows past this expert's group belong to later experts, which overwrite them afterwards
        # (experts run in ascending order, each writing only from its own first row on).
        y = ffn(jax.lax.dynamic_slice_in_dim(rows, offset, height), e)
        return jax.lax.dynamic_update_slice_in_dim(out, y, offset, 0)

    def expert_body(e, out):
        start, size = starts[e], s.group_sizes[e]
        full = size // tallest
        out = jax.lax.fori_loop(0, full, lambda j, o: run_tile(tallest, e, start + j * tallest, o), out)
        rest = size - full * tallest
        offset = start + full * tallest
        branch = jnp.where(rest == 0, 0, 1 + jnp.sum(heights < rest))
        return jax.lax.switch(branch, [lambda o: o] + [lambda o, h=h: run_tile(h, e, offset, o) for h in tiles], out)

    out = jax.lax.fori_loop(0, num_experts, expert_body, jnp.zeros((pairs + tallest, hidden), x.dtype))
    return _combine(x, s, out[:pairs])


BACKENDS: dict[str, Callable] = {"dense": moe_dense, "ragged": moe_ragged, "grouped": moe_grouped}


def auto_backend(platform: str | None = None) -> str:
    """The backend `auto` means on `platform` (default: JAX's default backend). Chosen by measurement
    (`bench/bench_moe_backends.py`): on CPU `grouped` beats `dense` from medium widths on and
    `ragged` everywhere; on GPU/TPU `ragged` is XLA's native grouped matmul."""
    platform = platform or jax.default_backend()
    return "grouped" if platform == "cpu" else "ragged"


def dispatch(backend: str) -> Callable:
    """The backend function by name; `auto` picks by platform (`auto_backend`)."""
    if backend == "auto":
        backend = auto_backend()
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown MoE backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'") from None
