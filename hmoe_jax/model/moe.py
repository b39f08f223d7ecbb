"""Mixture-of-experts dispatch: one interface, several backends, identical results.

Every backend computes, for each token n with selected experts e_1..e_k and routing weights w_1..w_k,

    y_n = sum_j w_j * (act(x_n @ gate_up[e_j] + gate_up_bias[e_j]) @ down[e_j] + down_bias[e_j])

for every token (no capacity limit, no dropped tokens), in the compute dtype with the caller's precision.

The expert matrices come in one of two memory layouts, both accepted by every backend:
- `ExpertWeights`: [E, in, out], as the HF bf16 checkpoint stores them (`x @ W`);
- `ExpertWeightsOutIn`: [E, out, in], as torch's `Linear`, the MXFP4 checkpoint and the model
  (`layers.Experts`; `layers.PackedExperts` decoded) store them. On CPU this is the faster layout at
  full width: XLA's dot library streams an [out, in] matrix as the left operand of `W @ x^T`
  straight from memory, where an [in, out] matrix must be repacked for every product
  (`bench/results/moe_backends.md`).

Backends:
- `dense`: every expert on every token, combined with a [N, E] weight matrix that is zero off the
  top-k. E/k times the FLOPs; the simplest program, best for tiny configs and as an oracle.
- `ragged`: token-expert pairs sorted by expert, then `jax.lax.ragged_dot` (grouped matmul). Right for
  GPU/TPU; XLA:CPU lowers it to a masked dense product, so it is slow there.
- `grouped`: the same sort, then the CPU kernel. [in, out] weights: a loop over experts; each expert's
  rows go through its FFN in one row tile whose height is the smallest of `GROUPED_ROW_TILES` that
  holds them (a `switch` over static shapes), so each expert's weights are read once and padding wastes
  little (taller groups take several tiles). The weights are read in chunks of rows along the
  contracted axis (about `GROUPED_CHUNK_BYTES` each, partial products accumulated in float32): a
  contiguous slice that stays in cache, where slicing a whole expert would copy tens of MB per expert
  on XLA:CPU. [out, in] weights: one batched matmul over all experts at a capacity C (rows padded to
  C per expert; no slicing, so no copy), plus the per-expert loop above (chunked along the output
  rows) for the rows past C. C is picked at run time from `GROUPED_ROW_TILES` (or 0) by a cost model
  fitted on this machine, so a skewed routing costs a few overflow rows, not a huge capacity.

`dispatch("auto")` picks per platform and size, by measurement (`bench/bench_moe_backends.py`):
`ragged` off CPU; on CPU `dense` for tiny experts and `grouped` from medium widths up.

`moe_packed_kernel` is `ragged` with MXFP4 experts and the Pallas grouped matmul (`hmoe_jax.kernels`)
in place of `ragged_dot`: the same pairs, sorted the same way, combined the same way.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..kernels import PackedExpertWeights, expert_ffn_mxfp4
from ..kernels.cpu import expert_ffn_mxfp4_cpu
from ..runtime.options import MOE_BACKENDS


class ExpertWeights(NamedTuple):
    gate_up: jax.Array  # [E, H, 2I], gate/up interleaved on the last axis
    gate_up_bias: jax.Array  # [E, 2I]
    down: jax.Array  # [E, I, H]
    down_bias: jax.Array  # [E, H]


class ExpertWeightsOutIn(NamedTuple):
    """The experts with each matrix stored [out, in] (the transpose of `ExpertWeights`)."""

    gate_up: jax.Array  # [E, 2I, H], gate/up interleaved on axis 1
    gate_up_bias: jax.Array  # [E, 2I]
    down: jax.Array  # [E, H, I]
    down_bias: jax.Array  # [E, H]


class PackedMatrix(NamedTuple):
    """An [E, out, in] matrix kept as MXFP4 (blocks uint8 [E, out, in/32, 16], scales uint8
    [E, out, in/32]) and decoded, bit-exactly, only where the `grouped` backend reads it: one chunk of
    one expert's rows at a time, so the decoded matrix never exists whole."""

    blocks: jax.Array
    scales: jax.Array
    decode: Callable  # (blocks, scales) -> [..., out, in] in the compute dtype (`mxfp4.dequantize_mxfp4`)
    dtype: jnp.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        e, out, groups, per_block = self.blocks.shape
        return e, out, groups * per_block * 2


class LazilyDecodedExpertWeights(NamedTuple):
    """`ExpertWeightsOutIn` with both matrices kept MXFP4 (`PackedMatrix`) and decoded lazily, a chunk
    at a time where they are read: only the `grouped` backend's per-expert loop reads it (the layout of
    `PackedExperts` at small batches on CPU, where the whole decode would be the layer's largest
    temporary: 3.2 GB in float32 at 20b width)."""

    gate_up: PackedMatrix
    gate_up_bias: jax.Array
    down: PackedMatrix
    down_bias: jax.Array


AnyExpertWeights = ExpertWeights | ExpertWeightsOutIn | LazilyDecodedExpertWeights


def _out_in(w) -> bool:
    return isinstance(w, (ExpertWeightsOutIn, LazilyDecodedExpertWeights))


def _expert_rows(w, e, start, size: int):
    """Rows [start, start + size) of expert e's matrix ([size, cols]), decoding them if packed."""
    if isinstance(w, PackedMatrix):
        groups, per_block = w.blocks.shape[2:]
        blocks = jax.lax.dynamic_slice(w.blocks, (e, start, 0, 0), (1, size, groups, per_block))[0]
        scales = jax.lax.dynamic_slice(w.scales, (e, start, 0), (1, size, groups))[0]
        return w.decode(blocks, scales)
    return jax.lax.dynamic_slice(w, (e, start, 0), (1, size, w.shape[2]))[0]


def _num_experts(w) -> int:
    return w.gate_up.shape[0]


class SwiGLU(NamedTuple):
    """gpt-oss's clamped SwiGLU on an interleaved gate/up vector."""

    limit: float = 7.0
    alpha: float = 1.702

    def __call__(self, gate_up: jax.Array) -> jax.Array:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


def moe_dense(x, weights, indices, w: AnyExpertWeights, act: SwiGLU, precision) -> jax.Array:
    n, e = x.shape[0], _num_experts(w)
    combined = jnp.zeros((n, e), x.dtype).at[jnp.arange(n)[:, None], indices].add(weights.astype(x.dtype))
    specs = ("nh,efh->enf", "enf,ehf->enh") if _out_in(w) else ("nh,ehf->enf", "enf,efh->enh")
    gu = jnp.einsum(specs[0], x, w.gate_up, precision=precision) + w.gate_up_bias[:, None, :]
    y = jnp.einsum(specs[1], act(gu), w.down, precision=precision) + w.down_bias[:, None, :]
    return jnp.einsum("ne,enh->nh", combined, y, precision=precision)


class SortedPairs(NamedTuple):
    token: jax.Array  # [N*k] token of each pair, pairs ordered by expert
    expert: jax.Array  # [N*k] expert of each pair, ascending
    weight: jax.Array  # [N*k] routing weight of each pair
    group_sizes: jax.Array  # [E] pairs per expert


def sort_by_expert(weights, indices, num_experts: int) -> SortedPairs:
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return SortedPairs(
        token=order // k,
        expert=flat[order],
        weight=weights.reshape(-1)[order],
        group_sizes=jnp.bincount(flat, length=num_experts).astype(jnp.int32),
    )


def combine(x, s: SortedPairs, y):
    """Scale each pair's expert output by its routing weight and sum the pairs back per token."""
    y = y * s.weight[:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[s.token].add(y)


def _ragged_matmul(rows, w, group_sizes, out_in: bool, precision):
    if not out_in:
        return jax.lax.ragged_dot(rows, w, group_sizes, precision=precision)
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(rows, w, group_sizes, dims, precision=precision)


def moe_ragged(x, weights, indices, w: AnyExpertWeights, act: SwiGLU, precision) -> jax.Array:
    s = sort_by_expert(weights, indices, _num_experts(w))
    rows = x[s.token]
    gu = _ragged_matmul(rows, w.gate_up, s.group_sizes, _out_in(w), precision) + w.gate_up_bias[s.expert]
    y = _ragged_matmul(act(gu), w.down, s.group_sizes, _out_in(w), precision) + w.down_bias[s.expert]
    return combine(x, s, y)


# ---------------------------------------------------------------- grouped (the CPU kernel)

# Row-tile heights an expert's group is padded to (the smallest that holds it; taller groups take
# several tiles of the largest), and the capacities the out-in batched matmul may pick. Fine steps where
# groups usually fall (a few to a few dozen rows: on CPU a small-M matmul costs about in proportion to
# its padded height), coarser above; every height is a separate compiled branch, and heights past the
# number of token-expert pairs are dropped at trace time.
GROUPED_ROW_TILES = (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 192, 224, 256)
# Bytes of weights per chunk: a contiguous slice that stays in L2 while it is multiplied.
GROUPED_CHUNK_BYTES = 1 << 21
# The out-in capacity cost model, in units of "one row through one expert's FFN": streaming every
# expert's weights through the batched matmul costs about CAPACITY_READ rows per expert, and an
# expert that overflows the capacity costs about OVERFLOW_EXPERT rows more (its weights go through the
# chunked per-expert loop: copied into cache, then multiplied, not overlapped). Fitted on the
# full-width layer (bench/bench_moe_backends.py); only the ranking of capacities depends on them.
CAPACITY_READ = 8.5
OVERFLOW_EXPERT = 64.0


def _chunk_rows(rows: int, cols: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows of a [rows, cols] matrix per chunk; all of them when the matrix is small."""
    if rows * cols * itemsize <= 2 * chunk_bytes:
        return rows
    return max(8, min(rows, chunk_bytes // (cols * itemsize)))


def _dot_f32(a, b, contract, precision):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _expert_matmul(rows, w, e, out_in: bool, precision, chunk_bytes: int):
    """rows [M, K] times expert e's matrix (w[e]: [K, N], or [N, K] when out_in) -> float32 [M, N].

    w[e] is read in contiguous chunks of rows (a small copy each, which stays in cache): along the
    contracted axis for [K, N] (partial products accumulated in float32, so a bf16 run still rounds
    once, like a single dot), along the output axis for [N, K].
    """
    m = rows.shape[0]
    r, cols = w.shape[1], w.shape[2]
    c = _chunk_rows(r, cols, jnp.dtype(w.dtype).itemsize, chunk_bytes)
    full, tail = divmod(r, c)
    chunk = lambda start, size: _expert_rows(w, e, start, size)  # noqa: E731
    if out_in:  # w[e] is [N, K]: chunk j gives output columns j*c .. j*c + c
        def columns(wc):
            return _dot_f32(rows, wc, ((1,), (1,)), precision)

        if c == r:
            return columns(chunk(0, r))
        out = jax.lax.fori_loop(
            0, full, lambda j, o: jax.lax.dynamic_update_slice_in_dim(o, columns(chunk(j * c, c)), j * c, 1),
            jnp.zeros((m, r), jnp.float32))
        return out.at[:, full * c:].set(columns(chunk(full * c, tail))) if tail else out

    def partial_sum(xc, wc):
        return _dot_f32(xc, wc, ((1,), (0,)), precision)

    if c == r:
        return partial_sum(rows, w[e])
    acc = jax.lax.fori_loop(
        0, full, lambda j, a: a + partial_sum(jax.lax.dynamic_slice_in_dim(rows, j * c, c, 1), chunk(j * c, c)),
        jnp.zeros((m, cols), jnp.float32))
    return acc + partial_sum(rows[:, full * c:], chunk(full * c, tail)) if tail else acc


def _per_expert(rows, starts, counts, w, act, precision, tiles, chunk_bytes, dtype):
    """Rows [starts[e], starts[e] + counts[e]) of `rows` (sorted by expert, padded by tiles[-1]) through
    expert e's FFN, for every expert; other rows of the result are zero or garbage."""
    out_in = _out_in(w)
    tallest = tiles[-1]
    heights = jnp.asarray(tiles, jnp.int32)

    def ffn(block, e):
        gu = _expert_matmul(block, w.gate_up, e, out_in, precision, chunk_bytes).astype(dtype) + w.gate_up_bias[e]
        return _expert_matmul(act(gu), w.down, e, out_in, precision, chunk_bytes).astype(dtype) + w.down_bias[e]

    def tile(height, e, offset):
        y = ffn(jax.lax.dynamic_slice_in_dim(rows, offset, height), e)
        return y if height == tallest else jnp.concatenate([y, jnp.zeros((tallest - height, y.shape[1]), dtype)])

    # Rows written past an expert's group belong to later experts (or to the padding), which overwrite
    # them afterwards: experts run in ascending order, each writing only from its own first row on.
    # The switch returns the tile rather than updating `out` inside its branches, which would copy `out`.
    def expert_body(e, out):
        start, size = starts[e], counts[e]
        full = size // tallest
        out = jax.lax.fori_loop(
            0, full, lambda j, o: jax.lax.dynamic_update_slice_in_dim(o, tile(tallest, e, start + j * tallest),
                                                                       start + j * tallest, 0), out)
        rest, offset = size - full * tallest, start + full * tallest
        branch = jnp.where(rest == 0, 0, 1 + jnp.sum(heights < rest))
        y = jax.lax.switch(branch, [lambda: jnp.zeros((tallest, rows.shape[1]), dtype)]
                           + [lambda h=h: tile(h, e, offset) for h in tiles])
        return jax.lax.dynamic_update_slice_in_dim(out, y, offset, 0)

    return jax.lax.fori_loop(0, _num_experts(w), expert_body, jnp.zeros(rows.shape, dtype))


def _capacity_cost(group_sizes, capacities):
    """Estimated cost (rows, see CAPACITY_READ) of each capacity: batched part + overflow loop."""
    num_experts = group_sizes.shape[0]
    caps = jnp.asarray(capacities, jnp.float32)[:, None]
    g = group_sizes.astype(jnp.float32)[None, :]
    batched = jnp.where(caps[:, 0] > 0, num_experts * (caps[:, 0] + CAPACITY_READ), 0.0)
    overflow = jnp.sum(jnp.maximum(g - caps, 0) + OVERFLOW_EXPERT * (g > caps), axis=1)
    return batched + overflow


def _batched_out_in(xs, s: SortedPairs, rank, capacity: int, w: ExpertWeightsOutIn, act, precision):
    """Rows of rank < capacity through their experts, as one batched matmul over all experts ([out, in]
    weights as the left operand: no slicing, no copy); the other rows of the result are zero."""
    num_experts, hidden = _num_experts(w), xs.shape[1]
    inside = rank < capacity
    dest = jnp.where(inside, s.expert * capacity + rank, num_experts * capacity)  # the last row: dropped
    xb = jnp.zeros((num_experts * capacity + 1, hidden), xs.dtype).at[dest].set(xs)[:-1]
    xb = xb.reshape(num_experts, capacity, hidden)
    gu = jnp.einsum("efh,ech->efc", w.gate_up, xb, precision=precision) + w.gate_up_bias[:, :, None]
    a = act(jnp.swapaxes(gu, 1, 2))  # [E, C, I]
    y = jnp.einsum("ehi,eci->ehc", w.down, a, precision=precision) + w.down_bias[:, :, None]
    y = jnp.swapaxes(y, 1, 2).reshape(num_experts * capacity, hidden)
    return jnp.where(inside[:, None], y[jnp.minimum(dest, num_experts * capacity - 1)], 0)


def moe_grouped(
    x, weights, indices, w: AnyExpertWeights, act: SwiGLU, precision,
    tiles: tuple[int, ...] = GROUPED_ROW_TILES, chunk_bytes: int = GROUPED_CHUNK_BYTES,
) -> jax.Array:
    s = sort_by_expert(weights, indices, _num_experts(w))
    pairs, hidden = s.token.shape[0], x.shape[1]
    tiles = tuple(sorted(set(tiles)))
    tiles = tuple(t for t in tiles if t < pairs) + tuple(t for t in tiles if t >= pairs)[:1]
    xs = x[s.token]
    # Padded so a tile starting at any pair index stays in bounds (dynamic_slice would clamp it).
    rows = jnp.concatenate([xs, jnp.zeros((tiles[-1], hidden), x.dtype)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(s.group_sizes)[:-1]])
    if not _out_in(w) or isinstance(w, LazilyDecodedExpertWeights):  # packed: no batched part, it reads all
        out = _per_expert(rows, starts, s.group_sizes, w, act, precision, tiles, chunk_bytes, x.dtype)
        return combine(x, s, out[:pairs])
    rank = jnp.arange(pairs, dtype=jnp.int32) - starts[s.expert]  # position of each pair in its group
    capacities = (0,) + tiles
    choice = jnp.argmin(_capacity_cost(s.group_sizes, capacities))
    batched = jax.lax.switch(
        choice,
        [lambda: jnp.zeros_like(xs)] + [lambda c=c: _batched_out_in(xs, s, rank, c, w, act, precision) for c in tiles])
    capacity = jnp.asarray(capacities, jnp.int32)[choice]
    overflow = _per_expert(rows, starts + capacity, jnp.maximum(s.group_sizes - capacity, 0), w, act, precision,
                           tiles, chunk_bytes, x.dtype)
    return combine(x, s, jnp.where((rank < capacity)[:, None], batched, overflow[:pairs]))


def moe_packed_kernel(x, weights, indices, w: PackedExpertWeights, act: SwiGLU, precision, *, tile_m: int = 64,
                      tile_n: int = 64, interpret: bool | None = None) -> jax.Array:
    """`moe_ragged` over MXFP4-packed experts, each expert's FFN run by the Pallas kernel, which decodes
    the weight tiles it multiplies (`kernels.expert_ffn_mxfp4`): no decoded expert ever exists whole."""
    s = sort_by_expert(weights, indices, w.gate_up_blocks.shape[0])
    y = expert_ffn_mxfp4(x[s.token], s.group_sizes, w, act, precision, tile_m=tile_m, tile_n=tile_n,
                         interpret=interpret)
    return combine(x, s, y)


def moe_packed_native(x, weights, indices, w: PackedExpertWeights, act: SwiGLU, *, table) -> jax.Array:
    """`moe_ragged` over MXFP4-packed experts, each expert's FFN run by the C++ CPU kernel
    (`kernels.cpu.expert_ffn_mxfp4_cpu`), which decodes through `table` (`mxfp4.dequantize_table`) in
    registers: only the routed experts are read, and no decoded expert exists in memory."""
    s = sort_by_expert(weights, indices, w.gate_up_blocks.shape[0])
    return combine(x, s, expert_ffn_mxfp4_cpu(x[s.token], s.group_sizes, s.expert, w, act, table))


BACKENDS: dict[str, Callable] = {"dense": moe_dense, "ragged": moe_ragged, "grouped": moe_grouped}
assert tuple(BACKENDS) == MOE_BACKENDS  # RunOptions.moe_backend names exactly these

# On CPU, `dense` (E/k times the FLOPs, but no sort, loop or gather) wins while every expert on every
# token stays below about this many FLOPs (bench/results/moe_backends.md: tiny configs); `grouped` above.
DENSE_MAX_FLOPS = 1e8


def auto_backend(x, w: AnyExpertWeights, platform: str | None = None) -> str:
    """The backend `auto` runs for tokens x [N, H] and experts w on `platform` (default: JAX's default
    backend), chosen by measurement (`bench/bench_moe_backends.py`)."""
    if (platform or jax.default_backend()) != "cpu":
        return "ragged"
    e, a, b = w.gate_up.shape
    dense_flops = 2 * x.shape[0] * e * a * b * 3 // 2  # gate_up and down, every expert
    return "dense" if dense_flops <= DENSE_MAX_FLOPS else "grouped"


def moe_auto(x, weights, indices, w: AnyExpertWeights, act: SwiGLU, precision) -> jax.Array:
    return BACKENDS[auto_backend(x, w)](x, weights, indices, w, act, precision)


def dispatch(backend: str) -> Callable:
    """The backend function by name; `auto` picks per platform and size (`auto_backend`)."""
    if backend == "auto":
        return moe_auto
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown MoE backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'") from None
