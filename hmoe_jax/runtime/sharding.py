"""The one place that builds a device mesh and maps logical axis names to mesh axes.

Parameters name their axes logically (`embed`, `q_heads`, `experts`, ...); `LOGICAL_AXIS_RULES` says
which mesh axis, if any, each logical axis is split over. Changing a sharding strategy is changing
this table and nothing else. Mesh axes: `data` (batch), `expert` (MoE experts), `tensor` (heads,
expert intermediate, vocabulary).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")

LOGICAL_AXIS_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "experts": "expert",
    "mlp": "tensor",
    # Hybrid-layer parameters are small: replicate them.
    "probe_hidden": None,
    "det_experts": None,
    "det_args": None,
    "probe_ensemble": None,
    # Probe training: ensemble members are independent models, spread over the data axis like a
    # batch; each member's minibatch may further be split over the tensor axis.
    "ensemble": "data",
    "ensemble_batch": "tensor",
}


def make_mesh(data: int = -1, expert: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, expert, tensor) mesh; `data=-1` takes all devices left over.

    Over several processes (`runtime.distributed`), the mesh spans every process's devices: the
    `data` axis crosses hosts, `expert` and `tensor` stay within one (expert x tensor must divide each
    host's device count), so only the batch's (or the probe ensemble's) split goes over the slower
    network. Each host's block is laid out by `mesh_utils.create_hybrid_device_mesh`."""
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % (expert * tensor):
            raise ValueError(f"{len(devices)} devices cannot be split into expert={expert} x tensor={tensor}")
        data = len(devices) // (expert * tensor)
    if data * expert * tensor != len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x tensor={tensor} needs {data * expert * tensor} "
                         f"devices, have {len(devices)}")
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    if len(per_process) == 1:
        return Mesh(np.asarray(devices).reshape(data, expert, tensor), MESH_AXES)
    hosts, counts = len(per_process), set(per_process.values())
    if len(counts) != 1 or next(iter(counts)) % (expert * tensor) or data % hosts:
        raise ValueError(f"over {hosts} processes with {sorted(per_process.values())} devices each, expert={expert} x "
                         f"tensor={tensor} must divide each process's devices (they stay within a host; only the data "
                         "axis crosses hosts)")
    from jax.experimental import mesh_utils

    try:
        grid = mesh_utils.create_hybrid_device_mesh((data // hosts, expert, tensor), (hosts, 1, 1), devices,
                                                    process_is_granule=True)
    except (ValueError, NotImplementedError, AssertionError):
        # A host's block the topology-aware layout cannot build: process-major order, as on CPU.
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        grid = np.asarray(ordered).reshape(data, expert, tensor)
    return Mesh(grid, MESH_AXES)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str, str | None] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Logical axes -> PartitionSpec. An axis whose size the mesh axis does not divide stays replicated
    (e.g. 2 KV heads on a tensor axis of 4), so any config runs on any mesh."""
    spec = []
    used = set()
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in LOGICAL_AXIS_RULES")
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def param_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    axes = variable.get_metadata().get("axes")
    shape = variable.shape if hasattr(variable, "shape") else variable[...].shape
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh):
    """A NamedSharding for every variable of an NNX state (same tree structure)."""
    return jax.tree.map(lambda v: param_sharding(v, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(value, sharding: NamedSharding):
    """`value` with `sharding`, also when `sharding` spans several processes. Arrays already spread
    over processes are resharded by a jitted identity (`device_put` cannot move shards between hosts
    on every backend, CPU included); a value this process holds whole (host or local device, the
    same on every process) gives each process's devices their shards."""
    if not isinstance(value, jax.Array) or sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if not value.is_fully_addressable:
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        return jax.jit(lambda x: x, out_shardings=sharding)(value)
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(value), NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec)))
        impl = jax.random.key_impl(value)
        return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` on `mesh` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    if jax.process_count() == 1:
        nnx.update(model, jax.device_put(state, shardings))
        return model
    leaves, treedef = jax.tree.flatten(state)
    targets = jax.tree.leaves(shardings)
    if len(targets) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(targets)} shardings in the model's state")
    nnx.update(model, jax.tree.unflatten(treedef, [place(x, s) for x, s in zip(leaves, targets)]))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))
