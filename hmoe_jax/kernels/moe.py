"""Grouped expert matmul over MXFP4-packed weights, decoded inside the kernel.

The experts stay as the checkpoint stores them (uint8 blocks [E, out, in/32, 16] and scales
[E, out, in/32], a quarter of bf16's bytes); each program decodes the weight tile it multiplies, so
the decoded experts never exist in HBM.

Rows arrive sorted by expert (`hmoe_jax.model.moe.sort_by_expert`) with per-expert group sizes. A row
tile must belong to one expert, so each expert's rows are first laid out at a multiple of `tile_m` (the
vLLM / megablox "aligned blocks" idea): at most `M // tile_m + E` tiles, a static bound, with a tile->expert
table the kernel reads. Tiles past the used ones run no K steps and write zeros.

The decode is bit-exact with `hmoe_jax.model.mxfp4.dequantize_mxfp4`, but arithmetic instead of a table lookup,
because a Triton kernel has no gather: the fp32 bit pattern of `E2M1(code) * 2**(scale - 127)` is
assembled from the code's exponent/mantissa bits and the scale byte (see `e2m1_bits`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._pallas import check_power_of_two, default_precision, resolve_interpret, triton_params

_GROUP = 32  # elements per MXFP4 scale
_F32_INF_BITS = 0x7F800000
_DOT_ROWS_BY_OUT_IN = (((1,), (1,)), ((), ()))  # [tm, K] x [tn, K] -> [tm, tn]: weights stay [out, in]


class PackedExpertWeights(NamedTuple):
    """The experts in the checkpoint's MXFP4 layout (`hmoe_jax.model.layers.PackedExperts`); biases in compute dtype."""

    gate_up_blocks: jax.Array  # [E, 2I, H/32, 16] uint8, gate/up interleaved along 2I
    gate_up_scales: jax.Array  # [E, 2I, H/32] uint8
    gate_up_bias: jax.Array  # [E, 2I]
    down_blocks: jax.Array  # [E, H, I/32, 16] uint8
    down_scales: jax.Array  # [E, H, I/32] uint8
    down_bias: jax.Array  # [E, H]


def e2m1_bits(code: jax.Array, scale: jax.Array) -> jax.Array:
    """int32 fp32 bit patterns of `E2M1(code) * 2**(scale - 127)`, code 0..15, scale 0..255 (int32).

    Identical to `mxfp4.dequantize_mxfp4`'s exact-ldexp table for all 16 x 256 pairs, including
    subnormal results (scale 0/1), +-inf overflow (scale >= 253) and -0 (code 8). Pure integer ops, so
    no float rounding or flush-to-zero can touch a value.
    """
    exponent, mantissa = (code >> 1) & 3, code & 1
    # A nonzero E2M1 magnitude is 2**(e-1) * (1 + m/2) for e > 0, and 2**-1 for code 1 (subnormal).
    is_normal = exponent > 0
    biased = scale + jnp.where(is_normal, exponent - 1, -1)  # fp32 biased exponent of the product, >= -1
    mantissa = jnp.where(is_normal, mantissa, 0)
    normal = (biased << 23) | (mantissa << 22)
    # biased in {-1, 0}: an fp32 subnormal with significand (2 + m) * 2**(21 + biased). The shift stays in
    # 20..21 for every input, since an out-of-range shift is undefined in Triton (LLVM shl).
    subnormal = (2 + mantissa) << (21 + jnp.minimum(biased, 0))
    bits = jnp.where(biased >= 255, _F32_INF_BITS, jnp.where(biased >= 1, normal, subnormal))
    bits = jnp.where((code & 7) == 0, 0, bits)
    return bits | ((code >> 3) << 31)  # sign bit; code 8 gives -0 like the table


def _grouped_kernel(tile_expert_ref, rows_ref, blocks_ref, scales_ref, out_ref, *,
                    groups_per_step: int, num_steps: int, precision):
    tile, col_tile = pl.program_id(0), pl.program_id(1)
    tile_m, tile_n = out_ref.shape
    tile_k = groups_per_step * _GROUP
    expert = tile_expert_ref[tile]
    row0, col0 = tile * tile_m, col_tile * tile_n

    def k_step(step, acc):
        g0 = step * groups_per_step
        x = rows_ref[pl.ds(row0, tile_m), pl.ds(g0 * _GROUP, tile_k)]
        packed = blocks_ref[expert, pl.ds(col0, tile_n), pl.ds(g0, groups_per_step), :].astype(jnp.int32)
        scale = scales_ref[expert, pl.ds(col0, tile_n), pl.ds(g0, groups_per_step)].astype(jnp.int32)
        # Byte b holds element 2b in its LOW nibble and 2b+1 in its HIGH nibble: interleave (low first).
        codes = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(tile_n, groups_per_step, _GROUP)
        w = jax.lax.bitcast_convert_type(e2m1_bits(codes, scale[:, :, None]), jnp.float32)
        w = w.reshape(tile_n, tile_k).astype(x.dtype)  # exact: the values fit bf16 as well
        return acc + jax.lax.dot_general(x, w, _DOT_ROWS_BY_OUT_IN, precision=precision,
                                         preferred_element_type=jnp.float32)

    # Unused tiles (expert -1) run no K step and store zeros. Integer arithmetic rather than a scalar
    # `jnp.where`, which the Triton lowering turns into an i1 loop bound.
    steps = jnp.minimum(expert + 1, 1) * num_steps
    out_ref[...] = jax.lax.fori_loop(0, steps, k_step, jnp.zeros((tile_m, tile_n), jnp.float32))


def _groups_per_step(num_groups: int, max_groups: int) -> int:
    # The K step must divide the input width (no masked tail loads) and be a power of two (Triton):
    # gpt-oss's 2880 = 90 groups gives 2 groups = 64 elements per step.
    g = 1
    while g * 2 <= max_groups and num_groups % (g * 2) == 0:
        g *= 2
    return g


def _grouped_matmul_tiles(rows, tile_expert, blocks, scales, *, tile_m, tile_n, max_groups_per_step,
                          precision, interpret):
    """rows [tiles * tile_m, in] (each tile one expert's, `tile_expert[i] = -1` for unused tiles) ->
    rows @ decode(blocks[e], scales[e]).T per tile, fp32 [tiles * tile_m, out]."""
    num_experts, out_features, num_groups, _ = blocks.shape
    padded_rows, in_features = rows.shape
    if in_features != num_groups * _GROUP or scales.shape != blocks.shape[:-1] or blocks.shape[-1] != 16:
        raise ValueError(f"rows [M, {num_groups * _GROUP}], blocks [E, out, in/32, 16] and scales "
                         f"[E, out, in/32] expected, got {rows.shape}, {blocks.shape}, {scales.shape}")
    if out_features % tile_n:
        raise ValueError(f"output width {out_features} must be a multiple of tile_n={tile_n}")
    groups_per_step = _groups_per_step(num_groups, max_groups_per_step)
    check_power_of_two(tile_m=tile_m, tile_n=tile_n, groups_per_step=groups_per_step)
    kernel = functools.partial(_grouped_kernel, groups_per_step=groups_per_step,
                               num_steps=num_groups // groups_per_step, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(padded_rows // tile_m, out_features // tile_n),
        # Whole-array refs: the kernel picks the expert's slices itself (Triton Pallas has no scalar
        # prefetch, so a BlockSpec index map cannot depend on the tile->expert table).
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec()],
        out_specs=pl.BlockSpec((tile_m, tile_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((padded_rows, out_features), jnp.float32),
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="grouped_matmul_mxfp4",
    )(tile_expert, rows, blocks, scales)


class _TileLayout(NamedTuple):
    dest: jax.Array  # [M] padded row of each sorted row; out of bounds for rows past the groups
    tile_expert: jax.Array  # [tiles] expert of each row tile, -1 for unused tiles
    padded_rows: int  # tiles * tile_m (static)


def _tile_layout(group_sizes: jax.Array, num_rows: int, tile_m: int) -> _TileLayout:
    num_experts = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    # sum_e ceil(g_e / tile_m) <= M // tile_m + E: a static tile count for any routing.
    num_tiles = max(1, num_rows // tile_m + num_experts)
    tiles = (group_sizes + tile_m - 1) // tile_m
    tile_end = jnp.cumsum(tiles)
    group_end = jnp.cumsum(group_sizes)
    row = jnp.arange(num_rows, dtype=jnp.int32)
    row_group = jnp.searchsorted(group_end, row, side="right").astype(jnp.int32)
    g = jnp.minimum(row_group, num_experts - 1)
    dest = (tile_end - tiles)[g] * tile_m + row - (group_end - group_sizes)[g]
    dest = jnp.where(row_group < num_experts, dest, num_tiles * tile_m)
    tile_expert = jnp.searchsorted(tile_end, jnp.arange(num_tiles, dtype=jnp.int32), side="right")
    tile_expert = jnp.where(tile_expert < num_experts, tile_expert, -1).astype(jnp.int32)
    return _TileLayout(dest, tile_expert, num_tiles * tile_m)


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "max_groups_per_step", "precision", "interpret"))
def grouped_matmul_mxfp4(
    rows: jax.Array,
    blocks: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    *,
    tile_m: int = 64,
    tile_n: int = 64,
    max_groups_per_step: int = 4,
    precision: jax.lax.Precision | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`ragged_dot` with MXFP4 right-hand sides: rows [M, in] sorted by expert, group_sizes [E] ->
    fp32 [M, out], row r of group e multiplied by `dequantize_mxfp4(blocks[e], scales[e]).T`.

    Rows past `sum(group_sizes)` give zeros. Decoded weights are cast to the rows' dtype (exact for fp32
    and bf16); accumulation is fp32. `precision` defaults to HIGHEST for fp32 rows, else DEFAULT.
    """
    layout = _tile_layout(group_sizes, rows.shape[0], tile_m)
    padded = jnp.zeros((layout.padded_rows, rows.shape[1]), rows.dtype).at[layout.dest].set(rows, mode="drop")
    out = _grouped_matmul_tiles(
        padded, layout.tile_expert, blocks, scales, tile_m=tile_m, tile_n=tile_n,
        max_groups_per_step=max_groups_per_step, precision=default_precision(rows.dtype, precision),
        interpret=resolve_interpret(interpret),
    )
    return out.at[layout.dest].get(mode="fill", fill_value=0)


@functools.partial(jax.jit, static_argnames=("act", "precision", "tile_m", "tile_n", "interpret"))
def expert_ffn_mxfp4(rows, group_sizes, w: PackedExpertWeights, act, precision=None, *,
                     tile_m: int = 64, tile_n: int = 64, interpret: bool | None = None) -> jax.Array:
    """Each expert's FFN on its rows: rows [M, H] sorted by expert (`group_sizes` [E] rows each) ->
    `down(act(gate_up(row)))` [M, H] in the rows' dtype, both projections reading MXFP4 tiles.

    What `hmoe_jax.model.moe.moe_ragged` computes per token-expert pair with the experts decoded from `w` (`act`:
    the model's SwiGLU); rows past `sum(group_sizes)` give zeros. The rows are laid out in expert
    tiles once and both projections run on that layout.
    """
    precision = default_precision(rows.dtype, precision)
    interpret = resolve_interpret(interpret)
    tiles = dict(tile_m=tile_m, tile_n=tile_n, max_groups_per_step=4, precision=precision, interpret=interpret)
    layout = _tile_layout(group_sizes, rows.shape[0], tile_m)
    padded = jnp.zeros((layout.padded_rows, rows.shape[1]), rows.dtype).at[layout.dest].set(rows, mode="drop")
    # Expert of every padded row, for the biases; unused tiles borrow expert 0 (their rows are dropped).
    row_expert = jnp.repeat(jnp.maximum(layout.tile_expert, 0), tile_m, total_repeat_length=layout.padded_rows)

    gate_up = _grouped_matmul_tiles(padded, layout.tile_expert, w.gate_up_blocks, w.gate_up_scales, **tiles)
    gate_up = gate_up.astype(rows.dtype) + w.gate_up_bias[row_expert].astype(rows.dtype)
    y = _grouped_matmul_tiles(act(gate_up), layout.tile_expert, w.down_blocks, w.down_scales, **tiles)
    y = y.astype(rows.dtype) + w.down_bias[row_expert].astype(rows.dtype)
    return y.at[layout.dest].get(mode="fill", fill_value=0)
