"""`from_pretrained`: a checkpoint directory -> a (possibly sharded) `GptOssForCausalLM`.

The model is first built abstractly (`nnx.eval_shape`: shapes and dtypes, no memory), then each
parameter is read, transformed, checked and placed on its devices one tensor (PyTorch layouts) or one
group of tensors (our converted Flax checkpoints) at a time, so peak host memory is about one tensor
or group beyond the model itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from .checkpoint import (
    CheckpointError,
    SafetensorsReader,
    hf_rules,
    locate_checkpoint,
    original_rules,
    read_params,
    safetensors_files,
)
from .config import GptOssConfig, load_config
from .flax_checkpoint import open_flax_checkpoint
from .model import GptOssForCausalLM
from .sharding import param_sharding


def path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def abstract_model(
    config: GptOssConfig, dtype=jnp.float32, moe_backend: str = "auto", packed_experts: bool = False, param_dtype=None,
    kernels: str = "auto",
) -> nnx.Module:
    return nnx.eval_shape(
        lambda: GptOssForCausalLM(
            config, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend, packed_experts=packed_experts,
            kernels=kernels, rngs=nnx.Rngs(0),
        )
    )


def fill_model(
    abstract: nnx.Module,
    params: Iterable[tuple[str, np.ndarray | jax.Array]],
    mesh: Mesh | None = None,
) -> nnx.Module:
    """Merge streamed (target path, array) pairs into the abstract model's state, placing each array
    on `mesh` per its logical axes (or on the default device). Arrays already placed stay where they are."""
    graphdef, state = nnx.split(abstract)
    flat = dict((path_key(p), v) for p, v in nnx.to_flat_state(state))
    filled = set()
    default = SingleDeviceSharding(jax.devices()[0])
    for target, value in params:
        variable = flat[target]
        # device_put, not jnp.asarray: from numpy it makes one device copy where jnp.asarray makes two
        # (3x the tensor's size at peak, measured on CPU). A lossless narrower source (bfloat16 experts
        # into a float32 model) is widened on the device, after the transfer of the smaller array.
        placed = jax.device_put(value, param_sharding(variable, mesh) if mesh is not None else default)
        del value
        if placed.dtype != variable.dtype:
            placed = placed.astype(variable.dtype)
        variable.set_value(placed)
        filled.add(target)
    missing = sorted(set(flat) - filled)
    if missing:
        raise CheckpointError(f"parameters left unset after loading: {missing[:5]}")
    return nnx.merge(graphdef, state)


def expected_params(abstract: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    _, state = nnx.split(abstract)
    return {path_key(p): (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(state)}


def placed_params(abstract: nnx.Module, mesh: Mesh | None) -> dict[str, jax.ShapeDtypeStruct]:
    """Every parameter's shape, dtype and final sharding (the mesh's, or the default device)."""
    _, state = nnx.split(abstract)
    default = SingleDeviceSharding(jax.devices()[0])
    return {
        path_key(p): jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sharding(v, mesh) if mesh is not None else default)
        for p, v in nnx.to_flat_state(state)
    }


def from_pretrained(
    path: str | Path,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    moe_backend: str = "auto",
    keep_mxfp4: bool | None = None,
    progress: Callable[[str, int], None] | None = None,
    kernels: str = "auto",
) -> GptOssForCausalLM:
    """Load a gpt-oss checkpoint directory as a Flax NNX model: HF layout (MXFP4 or bf16 experts),
    OpenAI `original/` layout, or a checkpoint converted by `python -m convert` (see
    `hmoe_jax.checkpoint.locate_checkpoint` for how the layout is recognised).

    `dtype` is both the parameter and the compute dtype (float32 or bfloat16; norms stay float32).
    With `mesh`, every parameter is placed sharded per `hmoe_jax.sharding.LOGICAL_AXIS_RULES`
    (a converted checkpoint is read straight into those shardings).
    `keep_mxfp4`: keep MXFP4 experts packed and decode them inside the forward (`PackedExperts`).
    None means: as a converted checkpoint stores them, decoded for PyTorch layouts.
    `kernels`: the model's kernel choice (`GptOssForCausalLM`, `hmoe_jax.kernels`): `"auto"` runs the
    Pallas kernels on a GPU and XLA elsewhere.
    """
    location = locate_checkpoint(path)
    if location.layout == "probe":
        raise CheckpointError(f"{location.path}: a probe state dict, not a model: convert it and use load_probe")
    if location.layout == "flax":
        return _from_flax(location.path, dtype, mesh, moe_backend, keep_mxfp4, kernels)
    config = load_config(location.path)
    reader = SafetensorsReader(safetensors_files(location.path))
    packed = bool(keep_mxfp4)
    if location.layout == "original":
        rules = original_rules(config, packed)
    else:
        rules = hf_rules(config, set(reader.keys()), packed)
    abstract = abstract_model(config, dtype, moe_backend, packed, kernels=kernels)
    params = read_params(reader, rules, config, expected_params(abstract), progress)
    return fill_model(abstract, params, mesh)


def _from_flax(path: Path, dtype, mesh: Mesh | None, moe_backend: str, keep_mxfp4: bool | None,
               kernels: str = "auto") -> GptOssForCausalLM:
    checkpoint = open_flax_checkpoint(path)
    if checkpoint.kind != "gpt_oss":
        raise CheckpointError(f"{path}: a converted {checkpoint.kind} checkpoint, not a model: use load_probe")
    if keep_mxfp4 is not None and keep_mxfp4 != checkpoint.packed_experts:
        stored = "packed MXFP4" if checkpoint.packed_experts else "dense"
        raise CheckpointError(
            f"{path}: stores {stored} experts but keep_mxfp4={keep_mxfp4}; re-convert "
            f"{'without' if checkpoint.packed_experts else 'with'} --keep-mxfp4, or leave keep_mxfp4 unset"
        )
    abstract = abstract_model(checkpoint.config, dtype, moe_backend, checkpoint.packed_experts, kernels=kernels)
    checkpoint.check_params(expected_params(abstract))
    return fill_model(abstract, checkpoint.read(placed_params(abstract, mesh)), mesh)


def load_probe(path: str | Path) -> dict[str, jax.Array]:
    """A probe converted by `python -m convert probe.pt DST`: {w1, b1, w2, b2, w3, b3} ([in, out] layout)."""
    location = locate_checkpoint(path)
    if location.layout != "flax":
        raise CheckpointError(f"{location.path}: not a converted checkpoint (convert the probe .pt first)")
    checkpoint = open_flax_checkpoint(location.path)
    if checkpoint.kind != "probe":
        raise CheckpointError(f"{location.path}: a converted {checkpoint.kind} checkpoint, not a probe")
    default = SingleDeviceSharding(jax.devices()[0])
    abstract = {t: jax.ShapeDtypeStruct(s, d, sharding=default) for t, (s, d) in checkpoint.shapes.items()}
    return dict(checkpoint.read(abstract))
