"""Checkpoint layouts as declarative key tables, read tensor by tensor.

A layout is a list of `TensorRule`s: which checkpoint keys (sources) make which model parameter
(target, a `/`-joined NNX path), through which small named transform. `{i}` stands for the layer
index. A new checkpoint layout is a new table, not new code paths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .config import GptOssConfig
from .mxfp4 import dequantize_mxfp4_np

Transform = Callable[[Sequence[np.ndarray], GptOssConfig], np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint that does not hold the model its config describes; the message names file and key."""


# ---------------------------------------------------------------- named transforms (numpy, pure)

def identity(t, c):
    return t[0]


def transpose(t, c):
    return np.ascontiguousarray(t[0].T)


def in_to_heads(t, c):
    """Linear weight [heads*D, H] (torch layout) -> [H, heads, D]."""
    w = t[0]
    return np.ascontiguousarray(w.T).reshape(w.shape[1], -1, c.head_dim)


def bias_to_heads(t, c):
    return t[0].reshape(-1, c.head_dim)


def heads_to_out(t, c):
    """Output projection [H, heads*D] -> [heads, D, H]."""
    w = t[0]
    return np.ascontiguousarray(w.T).reshape(-1, c.head_dim, w.shape[0])


def mxfp4_experts(t, c):
    """MXFP4 blocks [E, out, in/32, 16] + scales [E, out, in/32] -> float32 [E, in, out]."""
    blocks, scales = t
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    return np.ascontiguousarray(np.swapaxes(dequantize_mxfp4_np(blocks, scales, np.float32), -1, -2))


@dataclasses.dataclass(frozen=True)
class TensorRule:
    target: str
    sources: tuple[str, ...]
    transform: Transform = identity

    def for_layer(self, i: int) -> "TensorRule":
        return TensorRule(self.target.format(i=i), tuple(s.format(i=i) for s in self.sources), self.transform)


HF_GLOBAL = [
    TensorRule("embed_tokens", ("model.embed_tokens.weight",)),
    TensorRule("norm/weight", ("model.norm.weight",)),
    TensorRule("lm_head", ("lm_head.weight",), transpose),
]

_L = "model.layers.{i}."
HF_LAYER = [
    TensorRule("layers/{i}/input_layernorm/weight", (_L + "input_layernorm.weight",)),
    TensorRule("layers/{i}/post_attention_layernorm/weight", (_L + "post_attention_layernorm.weight",)),
    TensorRule("layers/{i}/self_attn/q_proj", (_L + "self_attn.q_proj.weight",), in_to_heads),
    TensorRule("layers/{i}/self_attn/k_proj", (_L + "self_attn.k_proj.weight",), in_to_heads),
    TensorRule("layers/{i}/self_attn/v_proj", (_L + "self_attn.v_proj.weight",), in_to_heads),
    TensorRule("layers/{i}/self_attn/o_proj", (_L + "self_attn.o_proj.weight",), heads_to_out),
    TensorRule("layers/{i}/self_attn/q_bias", (_L + "self_attn.q_proj.bias",), bias_to_heads),
    TensorRule("layers/{i}/self_attn/k_bias", (_L + "self_attn.k_proj.bias",), bias_to_heads),
    TensorRule("layers/{i}/self_attn/v_bias", (_L + "self_attn.v_proj.bias",), bias_to_heads),
    TensorRule("layers/{i}/self_attn/o_bias", (_L + "self_attn.o_proj.bias",)),
    TensorRule("layers/{i}/self_attn/sinks", (_L + "self_attn.sinks",)),
    TensorRule("layers/{i}/mlp/router/weight", (_L + "mlp.router.weight",), transpose),
    TensorRule("layers/{i}/mlp/router/bias", (_L + "mlp.router.bias",)),
    TensorRule("layers/{i}/mlp/experts/gate_up_proj_bias", (_L + "mlp.experts.gate_up_proj_bias",)),
    TensorRule("layers/{i}/mlp/experts/down_proj_bias", (_L + "mlp.experts.down_proj_bias",)),
]
HF_BF16_EXPERTS = [
    # Already [E, in, out] in the checkpoint, gate/up still interleaved: no transform.
    TensorRule("layers/{i}/mlp/experts/gate_up_proj", (_L + "mlp.experts.gate_up_proj",)),
    TensorRule("layers/{i}/mlp/experts/down_proj", (_L + "mlp.experts.down_proj",)),
]
HF_MXFP4_EXPERTS = [
    TensorRule("layers/{i}/mlp/experts/gate_up_proj",
               (_L + "mlp.experts.gate_up_proj_blocks", _L + "mlp.experts.gate_up_proj_scales"), mxfp4_experts),
    TensorRule("layers/{i}/mlp/experts/down_proj",
               (_L + "mlp.experts.down_proj_blocks", _L + "mlp.experts.down_proj_scales"), mxfp4_experts),
]


def expand_rules(global_rules, layer_rules, num_layers: int) -> list[TensorRule]:
    return list(global_rules) + [r.for_layer(i) for i in range(num_layers) for r in layer_rules]


# ---------------------------------------------------------------- reading safetensors

class SafetensorsReader:
    """Lazy access to the tensors of one or more `.safetensors` files, by key, one tensor at a time."""

    def __init__(self, files: Sequence[Path]):
        from safetensors import safe_open

        self.files = list(files)
        self._where: dict[str, Path] = {}
        self._handles = {}
        for f in self.files:
            try:
                handle = safe_open(str(f), framework="flax")
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = handle
            for key in handle.keys():
                if key in self._where:
                    raise CheckpointError(f"{f}: tensor {key!r} also appears in {self._where[key]}")
                self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        s = self._handles[self._where[key]].get_slice(key)
        return tuple(s.get_shape()), s.get_dtype()

    def get(self, key: str) -> np.ndarray:
        f = self._where.get(key)
        if f is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint ({', '.join(map(str, self.files))})")
        try:
            return np.asarray(self._handles[f].get_tensor(key))
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {key!r} could not be read ({e})") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files: from `model.safetensors.index.json` when present, else all
    `model*.safetensors`."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {[str(m) for m in missing]}")
        return files
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no model*.safetensors files (not an HF checkpoint directory)")
    return files


def hf_rules(reader: SafetensorsReader, config: GptOssConfig) -> list[TensorRule]:
    """HF layout rules, with MXFP4 or bf16 experts detected from the keys present."""
    keys = set(reader.keys())
    mxfp4 = any(k.endswith("gate_up_proj_blocks") for k in keys)
    experts = HF_MXFP4_EXPERTS if mxfp4 else HF_BF16_EXPERTS
    globals_ = HF_GLOBAL if not (config.tie_word_embeddings and "lm_head.weight" not in keys) else [
        r if r.target != "lm_head" else TensorRule("lm_head", ("model.embed_tokens.weight",), transpose) for r in HF_GLOBAL
    ]
    return expand_rules(globals_, HF_LAYER + experts, config.num_hidden_layers)


def read_params(
    reader: SafetensorsReader,
    rules: Sequence[TensorRule],
    config: GptOssConfig,
    expected: dict[str, tuple[tuple[int, ...], np.dtype]],
    progress: Callable[[str, int], None] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (target, array) for every rule, checking the result's shape against `expected` (target ->
    (shape, dtype)) and that the checkpoint holds no tensor the rules do not use."""
    used = {s for r in rules for s in r.sources}
    unexpected = sorted(set(reader.keys()) - used)
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} in {reader.file_of(unexpected[0])}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    produced = {r.target for r in rules}
    missing_targets = sorted(set(expected) - produced)
    if missing_targets:
        raise CheckpointError(f"no checkpoint tensor provides parameter {missing_targets[0]!r}")
    for rule in rules:
        if rule.target not in expected:
            raise CheckpointError(f"rule target {rule.target!r} is not a parameter of the model")
        sources = [reader.get(k) for k in rule.sources]
        for key, arr in zip(rule.sources, sources):
            if arr.dtype.kind not in "fV" and arr.dtype != np.uint8 and str(arr.dtype) != "bfloat16":
                raise CheckpointError(f"{reader.file_of(key)}: tensor {key!r} has unsupported dtype {arr.dtype}")
        try:
            value = rule.transform(sources, config)
        except CheckpointError as e:
            raise CheckpointError(f"{reader.file_of(rule.sources[0])}: tensor {rule.sources[0]!r}: {e}") from None
        except ValueError as e:  # reshape failures: the stored shape cannot be this parameter
            shapes = {k: a.shape for k, a in zip(rule.sources, sources)}
            raise CheckpointError(
                f"{reader.file_of(rule.sources[0])}: tensor(s) {shapes} cannot form parameter {rule.target!r} "
                f"of shape {expected[rule.target][0]} ({e})"
            ) from None
        want_shape, want_dtype = expected[rule.target]
        if tuple(value.shape) != tuple(want_shape):
            shapes = {k: a.shape for k, a in zip(rule.sources, sources)}
            raise CheckpointError(
                f"{reader.file_of(rule.sources[0])}: tensor(s) {shapes} give shape {tuple(value.shape)} for "
                f"parameter {rule.target!r}, but the config implies {tuple(want_shape)}"
            )
        if progress is not None:
            progress(rule.target, sum(a.nbytes for a in sources))
        yield rule.target, value.astype(want_dtype)
