"""`from_pretrained`: a checkpoint directory -> a (possibly sharded) `GptOssForCausalLM`.

The model is first built abstractly (`nnx.eval_shape`: shapes and dtypes, no memory), then each
parameter is read, transformed, checked and placed on its devices one tensor (PyTorch layouts) or one
group of tensors (our converted Flax checkpoints) at a time, so peak host memory is about one tensor
or group beyond the model itself.

Defaults follow the checkpoint (`RunOptions`): MXFP4 experts stay packed, each tensor keeps the dtype
the checkpoint stores it in, and the compute dtype is float32 on a host CPU and the checkpoint's own on
an accelerator. gpt-oss-20b so loads as 12.8 GiB (bf16 weights, MXFP4 experts) where decoding it to
float32 would take ~84 GB.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ..model.config import GptOssConfig, load_config
from ..model.transformer import GptOssForCausalLM
from ..runtime.host import release_freed_heap
from ..runtime.options import AUTO, RunOptions, dtype_name
from ..runtime.sharding import param_sharding
from .flax_format import FlaxCheckpoint, open_flax_checkpoint
from .layout_reading import SafetensorsReader, check_sources, read_params, safetensors_files
from .layouts import TensorRule, hf_rules, original_rules
from .location import CheckpointError, locate_checkpoint, resolve_checkpoint


def path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def abstract_model(config: GptOssConfig, options: RunOptions, head: bool = True) -> GptOssForCausalLM:
    """The model's structure, shapes and dtypes, with no parameter memory."""
    return nnx.eval_shape(lambda: GptOssForCausalLM(config, options, head=head, rngs=nnx.Rngs(0)))


def _flat_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {path_key(p): v for p, v in nnx.to_flat_state(nnx.split(module)[1])}


def _placement(variable: nnx.Variable, mesh: Mesh | None):
    # This process's own first device: jax.devices()[0] belongs to process 0 in a multi-process run.
    return param_sharding(variable, mesh) if mesh is not None else SingleDeviceSharding(jax.local_devices()[0])


def fill_model(abstract: nnx.Module, params: Iterable[tuple[str, np.ndarray | jax.Array]], mesh: Mesh | None = None,
               keep_stored_dtype: bool = False) -> nnx.Module:
    """Merge streamed (target path, array) pairs into the abstract model's state, placing each array
    on `mesh` per its logical axes (or on this process's first device). Arrays already placed stay
    where they are. `keep_stored_dtype`: each array keeps its own dtype (`param_dtype="auto"`);
    otherwise it takes the model's, widened on the device after the transfer of the smaller array."""
    graphdef, state = nnx.split(abstract)
    flat = dict((path_key(p), v) for p, v in nnx.to_flat_state(state))
    filled = set()
    for target, value in params:
        variable = flat[target]
        # device_put, not jnp.asarray: from numpy it makes one device copy where jnp.asarray makes two
        # (3x the tensor's size at peak, measured on CPU).
        placed = jax.device_put(value, _placement(variable, mesh))
        del value
        if placed.dtype != variable.dtype and not keep_stored_dtype:
            placed = placed.astype(variable.dtype)
        variable.set_value(placed)
        filled.add(target)
    missing = sorted(set(flat) - filled)
    if missing:
        raise CheckpointError(f"parameters left unset after loading: {missing[:5]}")
    return nnx.merge(graphdef, state)


def expected_params(abstract: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {target: (tuple(v.shape), np.dtype(v.dtype)) for target, v in _flat_variables(abstract).items()}


def truncated_config(config: GptOssConfig, num_layers: int | None) -> GptOssConfig:
    """`config` with only its first `num_layers` decoder layers (unchanged for None)."""
    if num_layers is None:
        return config
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers}: the checkpoint has layers 0..{config.num_hidden_layers - 1}")
    return dataclasses.replace(config, num_hidden_layers=num_layers, layer_types=config.layer_types[:num_layers])


def _dominant_float_dtype(dtypes_and_bytes: Iterable[tuple[np.dtype, int]]) -> str:
    """The floating-point dtype holding most of a checkpoint's float bytes ("float32" if none)."""
    totals: Counter[str] = Counter()
    for dtype, nbytes in dtypes_and_bytes:
        name = dtype_name(dtype)
        if name in ("float32", "bfloat16", "float16"):
            totals[name] += nbytes
    return totals.most_common(1)[0][0] if totals else "float32"


def from_pretrained(
    path: str | Path,
    options: RunOptions | None = None,
    *,
    mesh: Mesh | None = None,
    num_layers: int | None = None,
    revision: str | None = None,
    progress: Callable[[str, int], None] | None = None,
    **option_overrides,
) -> GptOssForCausalLM:
    """Load a gpt-oss checkpoint as a Flax NNX model: a directory in the HF layout (MXFP4 or bf16 experts),
    OpenAI's `original/` layout, or one converted by `python -m convert` (see `location.locate_checkpoint`
    for how the layout is recognised), or a Hugging Face hub id ("openai/gpt-oss-20b", at `revision`)
    resolved through the hub's cache (`location.resolve_checkpoint`).

    `options` (or any of its fields as keywords: `dtype=`, `param_dtype=`, `experts=`, `moe_backend=`,
    `kernels=`, `execution=`) are the run-time choices; each "auto" follows the checkpoint and the
    platform (`RunOptions.resolved`). With `mesh`, every parameter is placed sharded per
    `runtime.sharding.LOGICAL_AXIS_RULES` (a converted checkpoint is read straight into those shardings).
    `num_layers`: load only the embedding and decoder layers 0..num_layers-1, without the final norm and
    lm_head: features from an early layer, where `hidden_states[L]` (L <= num_layers) is the raw
    residual after block L-1 and there are no logits. The whole checkpoint is still validated.
    """
    requested = (options or RunOptions()).replace(**option_overrides)
    location = locate_checkpoint(resolve_checkpoint(path, revision))
    if location.layout == "probe":
        raise CheckpointError(f"{location.path}: a probe state dict, not a model: convert it and use "
                              "hmoe_jax.hybrid.artifacts.load_probe")
    if location.layout == "flax":
        model = _from_flax(open_flax_checkpoint(location.path), requested, mesh, num_layers)
    else:
        model = _from_safetensors(location, requested, mesh, num_layers, progress)
    release_freed_heap()  # the host copies read from the files are gone: give their pages back
    return model


def planned_options(path: str | Path, options: RunOptions | None = None) -> RunOptions:
    """The options `from_pretrained(path, options)` runs with (all but `execution`, which depends on how
    many layers are loaded), from the checkpoint's headers alone: nothing is loaded."""
    location = locate_checkpoint(path)
    options = options or RunOptions()
    if location.layout == "flax":
        return _flax_options(open_flax_checkpoint(location.path), options)
    if location.layout == "probe":
        raise CheckpointError(f"{location.path}: a probe state dict, not a model")
    return _safetensors_options(SafetensorsReader(safetensors_files(location.path)), options)[0]


def planned_model(path: str | Path, options: RunOptions | None = None) -> GptOssForCausalLM:
    """The model `from_pretrained(path, options)` builds, abstract (shapes and dtypes, no values), from the
    checkpoint's headers alone: what it will hold in memory, before anything is read."""
    location = locate_checkpoint(path)
    options = planned_options(location.path, options)
    if location.layout == "flax":
        checkpoint = open_flax_checkpoint(location.path)
        return abstract_model(checkpoint.config, _storage(options, dtype_name(checkpoint.param_dtype)))
    reader = SafetensorsReader(safetensors_files(location.path))
    return abstract_model(load_config(location.path), _storage(options, _safetensors_options(reader, options)[1]))


def _safetensors_options(reader: SafetensorsReader, requested: RunOptions) -> tuple[RunOptions, str]:
    """(resolved options, the checkpoint's dominant floating-point dtype)."""
    mxfp4 = any(k.endswith(("_blocks", ".blocks")) for k in reader.keys())
    stored = _dominant_float_dtype(reader.shape_dtype(k)[1:] + (reader.nbytes(k),) for k in reader.keys())
    return requested.resolved(stored_dtype=stored, mxfp4_source=mxfp4), stored


def _from_safetensors(location, requested: RunOptions, mesh, num_layers, progress) -> GptOssForCausalLM:
    config = load_config(location.path)
    reader = SafetensorsReader(safetensors_files(location.path))
    options, stored = _safetensors_options(reader, requested)
    packed = options.experts == "packed"
    if location.layout == "original":
        rules = original_rules(config, packed)
    else:
        rules = hf_rules(config, set(reader.keys()), packed)
    check_sources(reader, rules)
    abstract = abstract_model(truncated_config(config, num_layers), _storage(options, stored), head=num_layers is None)
    expected = expected_params(abstract)
    rules: list[TensorRule] = [r for r in rules if r.target in expected]
    keep = requested.param_dtype == AUTO
    params = read_params(reader, rules, config, expected, progress, check=False, widen_later=True, keep_stored=keep)
    return fill_model(abstract, params, mesh, keep_stored_dtype=keep)


def _storage(options: RunOptions, stored: str) -> RunOptions:
    """`param_dtype="auto"` builds the abstract model in the checkpoint's dtype, so its sizes (and the
    execution chosen from them) are those of the loaded model."""
    return options.replace(param_dtype=stored if stored in ("float32", "bfloat16") else "float32") \
        if options.param_dtype == AUTO else options


def _flax_options(checkpoint: FlaxCheckpoint, requested: RunOptions) -> RunOptions:
    path = checkpoint.path
    if checkpoint.kind != "gpt_oss":
        raise CheckpointError(f"{path}: a converted {checkpoint.kind} checkpoint, not a model: use "
                              "hmoe_jax.hybrid.artifacts.load_probe")
    stored_experts = "packed" if checkpoint.packed_experts else "dense"
    if requested.experts not in (AUTO, stored_experts):
        raise CheckpointError(
            f"{path}: stores {'packed MXFP4' if checkpoint.packed_experts else 'dense'} experts but experts="
            f"{requested.experts!r} was asked; re-convert {'without' if checkpoint.packed_experts else 'with'} "
            "--keep-mxfp4, or leave experts 'auto'"
        )
    return requested.replace(experts=stored_experts).resolved(stored_dtype=dtype_name(checkpoint.param_dtype),
                                                              mxfp4_source=checkpoint.packed_experts)


def _from_flax(checkpoint: FlaxCheckpoint, requested: RunOptions, mesh, num_layers) -> GptOssForCausalLM:
    options = _storage(_flax_options(checkpoint, requested), dtype_name(checkpoint.param_dtype))
    full = abstract_model(checkpoint.config, options)
    checkpoint.check_params(expected_params(full))
    abstract = full if num_layers is None else abstract_model(truncated_config(checkpoint.config, num_layers),
                                                              options, head=False)
    keep = requested.param_dtype == AUTO
    placements = {}
    for target, variable in _flat_variables(abstract).items():
        dtype = checkpoint.shapes[target][1] if keep else variable.dtype
        placements[target] = jax.ShapeDtypeStruct(variable.shape, dtype, sharding=_placement(variable, mesh))
    return fill_model(abstract, checkpoint.read(placements), mesh, keep_stored_dtype=keep)
