"""Where the model's layers hand operations to the kernels (`hmoe_jax.kernels`): which shapes the kernels
take, their tiles, device meshes, and gradients. The Pallas kernels (attention and the packed MoE) serve
GPUs; the C++ CPU kernels (the packed MoE, and the product of a bfloat16-stored weight with a few float32
rows: `widened_matmul`) serve a host CPU in the native modes.

`layers.Attention.attend` and `layers.PackedExperts` call `attention` and `packed_moe` when the model's
`RunOptions.kernels` is not "xla" (the mode); each returns None where the kernel does not take the
shapes, and the caller runs the XLA path instead.

Modes: "pallas" runs the kernels (compiled on a GPU, interpreted elsewhere) and fails loudly where one
does not compile; "interpret" interprets them anywhere; "pallas-or-xla", what "auto" picks on a GPU,
first compiles each kernel on its own at the shapes of the call, for the default device, and where that
fails (a GPU, driver or Triton version that rejects it; on a CPU, any compiled kernel) runs the XLA path
for that kernel, with one `KernelFallbackWarning` naming the kernel, the device and the error. The
verdicts are kept per kernel, shapes and device for the life of the process (`compile_verdict`). The
probe compiles and does not run: Triton's rejections (an op without a lowering, tiles past the shared
memory) come at lowering and compile time, a failure at launch would not be caught. In a multi-host job
every host must reach the same verdicts, as hosts with the same GPUs and software do.

On a mesh (`jax.set_mesh`, the mesh of `hmoe_jax.runtime.sharding`), each kernel runs under `jax.shard_map`
on the local shards, split as `sharding.LOGICAL_AXIS_RULES` splits the parameters: attention over
batch (`data`) and heads (`tensor`); the MoE over tokens (`data`), experts (`expert`; each device
runs the token-expert pairs of its experts, the others get weight 0) and the intermediate width
(`tensor`, gate/up rows and down columns; the down bias is added on one shard), partial outputs
summed with `psum`. An axis whose size does not divide the dimension stays unsplit, as for the
parameters. Without a mesh the kernel runs on whole arrays (a Triton custom call that GSPMD cannot
split would otherwise be replicated).

The kernels have no derivative of their own. Given a `reference` (the XLA computation of the same
function), the call is a `jax.custom_vjp`: the kernel runs forward, and the backward pass is the
reference's VJP at the same inputs (recomputed; the residuals are the inputs only). Training through
the model (the hybrid layer's end-to-end training) thus takes the same gradients on either path.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..kernels import PackedExpertWeights, sink_attention
from ..kernels import cpu as cpu_kernel
from ..runtime.options import NATIVE, NATIVE_MODES
from ..runtime.sharding import LOGICAL_AXIS_RULES
from .moe import moe_packed_kernel, moe_packed_native
from .mxfp4 import dequantize_table

_TILE_N = (64, 32, 16)  # output tile widths of the MoE matmul, largest first (Triton: power of two, >= 16)
FALLBACK = "pallas-or-xla"


class KernelFallbackWarning(UserWarning):
    """A Pallas kernel did not compile for this device; the XLA path runs in its place."""


def interpret_flag(mode: str) -> bool | None:
    """A kernel mode -> the kernels' `interpret=` (None: compiled on GPU, interpreted elsewhere)."""
    if mode not in ("pallas", "interpret", FALLBACK):
        raise ValueError(f"not a kernel mode: {mode!r}")
    return {"pallas": None, "interpret": True, FALLBACK: False}[mode]


# (kernel, its static arguments, argument shapes and dtypes, platform, device kind) -> None where the
# kernel compiled, else the error.
_VERDICTS: dict[tuple, str | None] = {}
_WARNED: set[tuple] = set()  # (kernel, platform, device kind): one warning each


def compile_verdict(name: str, fn, args, specs=None, mesh=None) -> str | None:
    """None where `fn(*args)` lowers and compiles on its own for the default device, else the error (one
    `KernelFallbackWarning` per kernel and device). `name` names the kernel and its static arguments. With
    `specs` and `mesh`, `fn` is what each device runs under `shard_map`: it is compiled at the local
    shapes."""
    leaves, tree = jax.tree.flatten(args)
    leaf_specs = jax.tree.leaves(specs, is_leaf=_is_spec) if specs is not None else [None] * len(leaves)
    structs = tree.unflatten([jax.ShapeDtypeStruct(_local_shape(a.shape, spec, mesh), a.dtype)
                              for a, spec in zip(leaves, leaf_specs, strict=True)])
    device = jax.devices()[0]
    key = (name, tuple((s.shape, str(s.dtype)) for s in jax.tree.leaves(structs)), device.platform,
           device.device_kind)
    if key not in _VERDICTS:
        try:
            jax.jit(fn).trace(*structs).lower().compile()
            _VERDICTS[key] = None
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the XLA path still works
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            _VERDICTS[key] = error
            warn = (name.split("(")[0], device.platform, device.device_kind)
            if warn not in _WARNED:
                _WARNED.add(warn)
                warnings.warn(f"the Pallas kernel {name} does not compile on {device.platform} ({device.device_kind}) "
                              f"at shapes {[s.shape for s in jax.tree.leaves(structs)]}: {error}; running the XLA "
                              "path for it (kernels='pallas' makes this an error)", KernelFallbackWarning, stacklevel=2)
    return _VERDICTS[key]


def _is_spec(x) -> bool:
    return isinstance(x, P) or x is None


def _local_shape(shape, spec, mesh) -> tuple[int, ...]:
    if spec is None or mesh is None:
        return tuple(shape)
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(n // (mesh.shape[axis] if axis else 1) for n, axis in zip(shape, spec))


def with_reference_vjp(kernel_fn, reference_fn):
    """`kernel_fn` forward, `jax.vjp(reference_fn)` backward; both take the same positional arrays."""
    f = jax.custom_vjp(kernel_fn)

    def fwd(*args):
        return kernel_fn(*args), args

    def bwd(args, cotangent):
        return jax.vjp(reference_fn, *args)[1](cotangent)

    f.defvjp(fwd, bwd)
    return f


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def _split(mesh, logical: str, *sizes: int) -> str | None:
    """The mesh axis the logical axis `logical` is split over (`LOGICAL_AXIS_RULES`, as the parameters'
    shardings are, so the kernels follow a change of the table), if the mesh has it (size > 1) and it
    divides every size; else None (unsplit)."""
    axis = LOGICAL_AXIS_RULES.get(logical)
    if mesh is None or axis is None or axis not in mesh.axis_names:
        return None
    n = mesh.shape[axis]
    return axis if n > 1 and all(s % n == 0 for s in sizes) else None


def attention_supported(q_shape, k_shape) -> bool:
    """Self-attention over the same positions (prefill: T == S) with a Triton-sized head dim."""
    d = q_shape[-1]
    return q_shape[1] == k_shape[1] and d >= 16 and d & (d - 1) == 0 and q_shape[2] % k_shape[2] == 0


def attention(q, k, v, sinks, key_mask, *, window: int | None, scale: float, mode: str, reference=None):
    """`kernels.sink_attention` for the model: q [B,T,H,D], k/v [B,T,KV,D], key_mask [B,T]; None
    where unsupported (`attention_supported`) or, in "pallas-or-xla" mode, where it does not compile.
    `reference(q, k, v, sinks, key_mask)`: the XLA path, for gradients."""
    if mode in NATIVE_MODES or not attention_supported(q.shape, k.shape):  # no CPU attention kernel
        return None
    run = functools.partial(sink_attention, window=window, scale=scale, interpret=interpret_flag(mode))

    def call(q, k, v, sinks, key_mask):
        return run(q, k, v, sinks, key_mask=key_mask)

    mesh = _mesh()
    data = _split(mesh, "batch", q.shape[0])
    # Query and KV heads split together (a shard's query heads read its own KV heads): the q_heads rule.
    heads = _split(mesh, "q_heads", q.shape[2], k.shape[2])
    if heads != _split(mesh, "kv_heads", q.shape[2], k.shape[2]):
        heads = None
    act = P(data, None, heads, None)
    specs = (act, act, act, P(heads), P(data, None))
    args = (q, k, v, sinks, key_mask)
    if mode == FALLBACK and compile_verdict(f"sink_attention(window={window})", call, args, specs, mesh):
        return None
    if data is None and heads is None:
        kernel = call
    else:
        kernel = jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=act, check_vma=False)
    if reference is not None:
        kernel = with_reference_vjp(kernel, reference)
    return kernel(*args)


def moe_tile_n(*widths: int) -> int | None:
    """The widest output tile of the MoE matmul dividing every width (None: no tile fits)."""
    return next((t for t in _TILE_N if all(w % t == 0 for w in widths)), None)


def native_verdict(mode: str) -> str | None:
    """None where the CPU kernel (`hmoe_jax.kernels.cpu`) runs here, else why not. In "native" mode a
    reason is an error; in "native-or-xla" mode it is one `KernelFallbackWarning` per process."""
    platform = jax.devices()[0].platform
    ok, why = cpu_kernel.load() if platform == "cpu" else (False, f"the default device is a {platform}, not a CPU")
    if ok:
        return None
    if mode == NATIVE:
        raise cpu_kernel.KernelBuildError(f"kernels='native': the CPU kernel cannot run here: {why}")
    if ("native", platform) not in _WARNED:
        _WARNED.add(("native", platform))
        warnings.warn(f"the CPU kernel expert_ffn_mxfp4_cpu cannot run here: {why}; running the XLA path for it "
                      "(kernels='native' makes this an error)", KernelFallbackWarning, stacklevel=3)
    return why


# Rows up to which the CPU kernel runs a bfloat16-stored weight's product (decode: one row per sequence);
# from a few dozen rows on, XLA's widened copy is paid once for many rows and its own product is faster
# (bench/results/cpu_kernel.md).
WIDENED_MATMUL_MAX_ROWS = 16


def widened_matmul(x, w, contract: int, *, mode: str):
    """x [..., K1..Kc] @ w [K1..Kc, ...] contracting the last `contract` axes of x with the first of w, for a
    bfloat16-stored `w` in a float32 run, by the CPU kernel (each weight read once as stored, widened in
    registers): the native modes, a few rows, no mesh. None where not taken (the caller's einsum runs).
    Gradients: the XLA product's VJP."""
    if (mode not in NATIVE_MODES or w.dtype != jnp.bfloat16 or x.dtype != jnp.float32 or _mesh() is not None):
        return None
    lead, k = x.shape[:x.ndim - contract], math.prod(x.shape[x.ndim - contract:])
    if math.prod(lead) > WIDENED_MATMUL_MAX_ROWS or native_verdict(mode):
        return None

    def kernel(x, w):
        return cpu_kernel.matmul_bf16_cpu(x.reshape(-1, k), w.reshape(k, -1)).reshape(*lead, *w.shape[contract:])

    def reference(x, w):
        return jnp.tensordot(x, w.astype(jnp.float32), axes=contract, precision=jax.lax.Precision.HIGHEST)

    return with_reference_vjp(kernel, reference)(x, w)


def packed_moe(x, weights, indices, w: PackedExpertWeights, act, precision, *, mode: str, reference=None,
               token_mask=None):
    """The packed-expert kernel of `mode` for the model: x [N, H], routing [N, k] -> [N, H]. The Pallas
    modes run `moe.moe_packed_kernel` (None where no output tile fits the widths or, in "pallas-or-xla"
    mode, where it does not compile); the native modes `moe.moe_packed_native` (None in "native-or-xla"
    mode where it cannot run). Pairs routed to an index >= E (the hybrid layer's deterministic slots,
    weight 0) contribute nothing, as in every `moe` backend. `reference(x, weights, indices, w)`: the XLA
    path, for gradients. `token_mask` [N] (0: padding): the native modes route padding positions out of
    range too, so a left-padded batch costs only its real tokens' products; a padding position's MoE output
    is then 0. Nothing reads it: attention gives padding no key, and features, logits and parity read real
    tokens only."""
    num_experts, gate_up_rows = w.gate_up_blocks.shape[:2]
    if mode in NATIVE_MODES and token_mask is not None:
        real = token_mask.reshape(-1, 1).astype(bool)
        weights, indices = jnp.where(real, weights, 0), jnp.where(real, indices, num_experts)
    hidden, down_groups = w.down_blocks.shape[1:3]
    mesh = _mesh()
    data = _split(mesh, "batch", x.shape[0])
    experts = _split(mesh, "experts", num_experts)
    mlp = _split(mesh, "mlp", down_groups)  # I/32 groups per shard, so 2I/shards stays a multiple of 64
    if mode in NATIVE_MODES:
        if native_verdict(mode):
            return None
        run = functools.partial(moe_packed_native, act=act, table=dequantize_table(jnp.float32))
    else:
        tile_n = moe_tile_n(gate_up_rows // (mesh.shape[mlp] if mlp else 1), hidden)
        if tile_n is None:
            return None
        run = functools.partial(moe_packed_kernel, act=act, precision=precision, tile_n=tile_n,
                                interpret=interpret_flag(mode))
        if mode == FALLBACK and compile_verdict(f"expert_ffn_mxfp4(tile_n={tile_n})", run, (x, weights, indices, w),
                                                _moe_specs(data, experts, mlp), mesh):
            return None
    if data is None and experts is None and mlp is None:
        kernel = run
    else:
        kernel = functools.partial(_sharded_moe, run=run, mesh=mesh, data=data, experts=experts, mlp=mlp)
    if reference is not None:
        kernel = with_reference_vjp(kernel, reference)
    return kernel(x, weights, indices, w)


def _sharded_moe(x, weights, indices, w, *, run, mesh, data, experts, mlp):
    """`run` per shard under `shard_map`: each device's experts and intermediate slice, partials summed."""

    def local(x, weights, indices, w):
        if experts is not None:
            local_experts = w.gate_up_blocks.shape[0]
            indices = indices - jax.lax.axis_index(experts) * local_experts
            mine = (indices >= 0) & (indices < local_experts)
            indices = jnp.where(mine, indices, local_experts)  # out of range: skipped, weight 0
            weights = jnp.where(mine, weights, 0)
        if mlp is not None:
            w = w._replace(down_bias=jnp.where(jax.lax.axis_index(mlp) == 0, w.down_bias, 0))
        y = run(x, weights, indices, w)
        partial_axes = tuple(a for a in (experts, mlp) if a is not None)
        return jax.lax.psum(y, partial_axes) if partial_axes else y

    specs = _moe_specs(data, experts, mlp)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(x, weights, indices, w)


def _moe_specs(data, experts, mlp) -> tuple:
    """How `_sharded_moe` splits (x, weights, indices, packed experts)."""
    rows = P(data, None)
    return rows, rows, rows, PackedExpertWeights(
        gate_up_blocks=P(experts, mlp, None, None), gate_up_scales=P(experts, mlp, None), gate_up_bias=P(experts, mlp),
        down_blocks=P(experts, None, mlp, None), down_scales=P(experts, None, mlp), down_bias=P(experts, None),
    )
