"""The one place that builds a device mesh and maps logical axis names to mesh axes.

Parameters name their axes logically (`embed`, `q_heads`, `experts`, ...); `LOGICAL_AXIS_RULES` says
which mesh axis, if any, each logical axis is split over. Changing a sharding strategy is changing
this table and nothing else. Mesh axes: `data` (batch), `expert` (MoE experts), `tensor` (heads,
expert intermediate, vocabulary).
"""

from __future__ import annotations

import math
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
    """A (data, expert, tensor) mesh; `data=-1` takes all devices left over."""
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % (expert * tensor):
            raise ValueError(f"{len(devices)} devices cannot be split into expert={expert} x tensor={tensor}")
        data = len(devices) // (expert * tensor)
    if data * expert * tensor != len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x tensor={tensor} needs {data * expert * tensor} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, expert, tensor), MESH_AXES)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_AXIS_RULES) -> PartitionSpec:
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


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` on `mesh` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else math.prod(mesh.shape.values())
