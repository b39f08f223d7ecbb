"""`from_pretrained`: a checkpoint directory -> a (possibly sharded) `GptOssForCausalLM`.

The model is first built abstractly (`nnx.eval_shape`: shapes and dtypes, no memory), then each
parameter is read, transformed, checked and placed on its devices one tensor at a time, so peak host
memory is about one tensor beyond the model itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .checkpoint import CheckpointError, SafetensorsReader, TensorRule, hf_rules, read_params, safetensors_files
from .config import GptOssConfig, load_config
from .model import GptOssForCausalLM
from .sharding import param_sharding


def path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def abstract_model(config: GptOssConfig, dtype=jnp.float32, moe_backend: str = "auto") -> nnx.Module:
    return nnx.eval_shape(lambda: GptOssForCausalLM(config, dtype=dtype, moe_backend=moe_backend, rngs=nnx.Rngs(0)))


def fill_model(
    abstract: nnx.Module,
    params: Iterable[tuple[str, np.ndarray]],
    mesh: Mesh | None = None,
) -> nnx.Module:
    """Merge streamed (target path, array) pairs into the abstract model's state, placing each array
    on `mesh` per its logical axes (or on the default device)."""
    graphdef, state = nnx.split(abstract)
    flat = dict((path_key(p), v) for p, v in nnx.to_flat_state(state))
    filled = set()
    for target, value in params:
        variable = flat[target]
        if mesh is not None:
            variable.set_value(jax.device_put(value, param_sharding(variable, mesh)))
        else:
            variable.set_value(jnp.asarray(value))
        filled.add(target)
    missing = sorted(set(flat) - filled)
    if missing:
        raise CheckpointError(f"parameters left unset after loading: {missing[:5]}")
    return nnx.merge(graphdef, state)


def expected_params(abstract: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    _, state = nnx.split(abstract)
    return {path_key(p): (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(state)}


def from_pretrained(
    path: str | Path,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    moe_backend: str = "auto",
    progress: Callable[[str, int], None] | None = None,
) -> GptOssForCausalLM:
    """Load a gpt-oss checkpoint directory (HF layout, MXFP4 or bf16 experts) as a Flax NNX model.

    `dtype` is both the parameter and the compute dtype (float32 or bfloat16; norms stay float32).
    With `mesh`, every parameter is placed sharded per `hmoe_jax.sharding.LOGICAL_AXIS_RULES`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory")
    config = load_config(path)
    reader = SafetensorsReader(safetensors_files(path))
    rules: list[TensorRule] = hf_rules(reader, config)
    abstract = abstract_model(config, dtype, moe_backend)
    params = read_params(reader, rules, config, expected_params(abstract), progress)
    return fill_model(abstract, params, mesh)
