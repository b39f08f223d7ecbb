"""`from_pretrained`: a checkpoint directory -> a (possibly sharded) `GptOssForCausalLM`.

The model is first built abstractly (`nnx.eval_shape`: shapes and dtypes, no memory), then each
parameter is read, transformed, checked and placed on its devices one tensor (PyTorch layouts) or one
group of tensors (our converted Flax checkpoints) at a time, so peak host memory is about one tensor
or group beyond the model itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from . import heap
from .checkpoint import (
    CheckpointError,
    SafetensorsReader,
    check_sources,
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
    kernels: str = "auto", head: bool = True,
) -> nnx.Module:
    return nnx.eval_shape(
        lambda: GptOssForCausalLM(
            config, dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend, packed_experts=packed_experts,
            kernels=kernels, head=head, rngs=nnx.Rngs(0),
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
    param_dtype=None,
    num_layers: int | None = None,
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
    `param_dtype`: how parameters are stored (a dtype or its name), when it should differ from the
    compute `dtype`. gpt-oss ships its non-expert weights in bfloat16, so `dtype=float32,
    param_dtype=bfloat16` computes exactly what float32 storage computes, in half the memory.
    `num_layers`: load only the embedding and decoder layers 0..num_layers-1, without the final norm
    and lm_head (`GptOssForCausalLM(head=False)`): features from an early layer, where
    `hidden_states[L]` (L <= num_layers) is the raw residual after block L-1 and there are no logits.
    A 20b's first 12 layers, packed, fit where all 24 and the lm_head would not. The whole checkpoint is
    still validated.
    """
    param_dtype = None if param_dtype is None else jnp.dtype(param_dtype)
    location = locate_checkpoint(path)
    if location.layout == "probe":
        raise CheckpointError(f"{location.path}: a probe state dict, not a model: convert it and use load_probe")
    if location.layout == "flax":
        return _from_flax(location.path, dtype, mesh, moe_backend, keep_mxfp4, kernels, param_dtype, num_layers)
    config = load_config(location.path)
    reader = SafetensorsReader(safetensors_files(location.path))
    packed = bool(keep_mxfp4)
    if location.layout == "original":
        rules = original_rules(config, packed)
    else:
        rules = hf_rules(config, set(reader.keys()), packed)
    check_sources(reader, rules)
    abstract = abstract_model(truncated_config(config, num_layers), dtype, moe_backend, packed,
                              param_dtype=param_dtype, kernels=kernels, head=num_layers is None)
    expected = expected_params(abstract)
    rules = [r for r in rules if r.target in expected]
    params = read_params(reader, rules, config, expected, progress, check=False, widen_later=True)
    model = fill_model(abstract, params, mesh)
    del params
    heap.release_freed_heap()  # the host copies read from the files are gone: give their pages back
    return model


def add_memory_arguments(parser) -> None:
    """The command-line options that fit a full-size model on a small host: `--keep-mxfp4`,
    `--param-dtype` (see `from_pretrained`; `memory_options` turns them into its arguments) and
    `--layerwise` (`GptOssForCausalLM(..., layerwise=True)`)."""
    parser.add_argument("--keep-mxfp4", action="store_true",
                        help="keep MXFP4 experts packed, decoded inside the forward (bit-exact; ~4x less memory)")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                        help="weight storage dtype when it should differ from the compute dtype; bfloat16 is "
                             "lossless for gpt-oss's bf16 weights")
    parser.add_argument("--layerwise", action="store_true",
                        help="run the blocks as separately jitted programs instead of one that unrolls every "
                             "layer: the same results, compiled in seconds and in less memory on a deep model "
                             "(the 20b on a CPU host)")


def memory_options(args) -> dict:
    """`from_pretrained`'s `keep_mxfp4` and `param_dtype` from `add_memory_arguments`' options."""
    return {"keep_mxfp4": True if args.keep_mxfp4 else None, "param_dtype": args.param_dtype}


def truncated_config(config: GptOssConfig, num_layers: int | None) -> GptOssConfig:
    """`config` with only its first `num_layers` decoder layers (unchanged for None)."""
    if num_layers is None:
        return config
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers}: the checkpoint has layers 0..{config.num_hidden_layers - 1}")
    return dataclasses.replace(config, num_hidden_layers=num_layers, layer_types=config.layer_types[:num_layers])


def _from_flax(path: Path, dtype, mesh: Mesh | None, moe_backend: str, keep_mxfp4: bool | None,
               kernels: str = "auto", param_dtype=None, num_layers: int | None = None) -> GptOssForCausalLM:
    checkpoint = open_flax_checkpoint(path)
    if checkpoint.kind != "gpt_oss":
        raise CheckpointError(f"{path}: a converted {checkpoint.kind} checkpoint, not a model: use load_probe")
    if keep_mxfp4 is not None and keep_mxfp4 != checkpoint.packed_experts:
        stored = "packed MXFP4" if checkpoint.packed_experts else "dense"
        raise CheckpointError(
            f"{path}: stores {stored} experts but keep_mxfp4={keep_mxfp4}; re-convert "
            f"{'without' if checkpoint.packed_experts else 'with'} --keep-mxfp4, or leave keep_mxfp4 unset"
        )
    full = abstract_model(checkpoint.config, dtype, moe_backend, checkpoint.packed_experts, param_dtype=param_dtype,
                          kernels=kernels)
    checkpoint.check_params(expected_params(full))
    abstract = full if num_layers is None else abstract_model(
        truncated_config(checkpoint.config, num_layers), dtype, moe_backend, checkpoint.packed_experts,
        param_dtype=param_dtype, kernels=kernels, head=False)
    model = fill_model(abstract, checkpoint.read(placed_params(abstract, mesh)), mesh)
    heap.release_freed_heap()
    return model


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
