"""Checkpoint layouts as declarative key tables, read tensor by tensor.

A layout is a list of `TensorRule`s: which checkpoint keys (sources) make which model parameter
(target, a `/`-joined NNX path), through which small named transform. `{i}` stands for the layer
index. A new checkpoint layout is a new table, not new code paths. Transforms that have an inverse
(`transform.inverse(value, config) -> sources`) let the same table write the layout back (export).

Layouts read here:
- Hugging Face (`model*.safetensors`), experts as MXFP4 `*_blocks`/`*_scales` or plain bf16;
- OpenAI `original/` (`block.N.attn.qkv`, `mlp1_weight.blocks`, `norm.scale`, ...), MXFP4 experts.
Both store MXFP4 experts as [E, out, in/32, 16] with gate/up interleaved along `out`: our dense
experts are [E, out, in] with the same interleave (`model.layers.Experts`), so they decode straight into it,
with neither a transpose nor a de-interleave. HF's plain (bf16) experts are [E, in, out] and are
transposed, one expert at a time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from ..model.config import GptOssConfig
from ..model.mxfp4 import dequantize_mxfp4_np, quantize_mxfp4_np
from .location import CheckpointError
from .safetensors_file import SafetensorsFormatError, read_header, read_tensor

Transform = Callable[[Sequence[np.ndarray], GptOssConfig], np.ndarray]

# ---------------------------------------------------------------- named transforms (numpy, pure)

def inverse_of(forward: Transform):
    """Register the decorated function as `forward.inverse`: target value -> tuple of source tensors."""

    def register(inverse):
        forward.inverse = inverse
        return inverse

    return register


def identity(t, c):
    return t[0]


@inverse_of(identity)
def _identity_back(x, c):
    return (x,)


def transpose(t, c):
    return np.ascontiguousarray(t[0].T)


@inverse_of(transpose)
def _transpose_back(x, c):
    return (np.ascontiguousarray(x.T),)


def in_to_heads(t, c):
    """Linear weight [heads*D, H] (torch layout) -> [H, heads, D]."""
    w = t[0]
    return np.ascontiguousarray(w.T).reshape(w.shape[1], -1, c.head_dim)


@inverse_of(in_to_heads)
def heads_to_in(w, c):
    return (np.ascontiguousarray(w.reshape(w.shape[0], -1).T),)


def bias_to_heads(t, c):
    return t[0].reshape(-1, c.head_dim)


@inverse_of(bias_to_heads)
def heads_to_bias(b, c):
    return (b.reshape(-1),)


def heads_to_out(t, c):
    """Output projection [H, heads*D] -> [heads, D, H]."""
    w = t[0]
    return np.ascontiguousarray(w.T).reshape(-1, c.head_dim, w.shape[0])


@inverse_of(heads_to_out)
def out_to_heads(w, c):
    return (np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T),)


def swap_expert_axes(t, c):
    """Experts [E, a, b] -> [E, b, a] (HF's plain [E, in, out] <-> our [E, out, in]; its own inverse).

    Written into one preallocated output (the source plus one output, no second full-size temporary),
    a strip of 128 source rows at a time, moved as unsigned integers of the same width: 3-4x faster
    than numpy's whole-matrix transposed copy of bfloat16 (1.6 GB a layer of plain 20b experts)."""
    w = t[0]
    if w.ndim != 3:
        raise ValueError(f"expert weights must be [E, in, out] or [E, out, in], got {w.shape}")
    out = np.empty((w.shape[0], w.shape[2], w.shape[1]), w.dtype)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(w.dtype.itemsize)
    src, dst = (w.view(bits), out.view(bits)) if bits is not None and w.flags.c_contiguous else (w, out)
    for e in range(w.shape[0]):
        for i in range(0, w.shape[1], _TRANSPOSE_STRIP):
            dst[e, :, i:i + _TRANSPOSE_STRIP] = src[e, i:i + _TRANSPOSE_STRIP].T
    return out


_TRANSPOSE_STRIP = 128


@inverse_of(swap_expert_axes)
def _swap_expert_axes_back(w, c):
    return (swap_expert_axes((w,), c),)


def mxfp4_experts(t, c):
    """MXFP4 blocks [E, out, in/32, 16] + scales [E, out, in/32] -> bfloat16 [E, out, in], our layout.

    bfloat16 holds every MXFP4 value exactly, at half of float32's memory. The decoder fills one
    preallocated output a few MB of rows at a time: no transpose, no second full-size copy."""
    blocks, scales = t
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim != 4:
        raise ValueError(f"MXFP4 expert blocks must be [E, out, in/32, 16], got {blocks.shape}")
    return dequantize_mxfp4_np(blocks, scales, ml_dtypes.bfloat16)


@inverse_of(mxfp4_experts)
def experts_to_mxfp4(w, c):
    """Float [E, out, in] -> (blocks, scales). Exact for values that came from MXFP4; otherwise rounds
    each to the nearest E2M1 value of its 32-group. One expert at a time into preallocated outputs: the
    packer works in float64."""
    if w.ndim != 3 or w.shape[2] % 32:
        raise ValueError(f"expert weights must be [E, out, in] with in % 32 == 0, got {w.shape}")
    n_experts, n_out, n_in = w.shape
    blocks = np.empty((n_experts, n_out, n_in // 32, 16), np.uint8)
    scales = np.empty((n_experts, n_out, n_in // 32), np.uint8)
    for e in range(n_experts):
        blocks[e], scales[e] = quantize_mxfp4_np(np.asarray(w[e], np.float32))
    return blocks, scales


def from_qkv(part: str, transform: Transform) -> Transform:
    """Take the q, k or v rows of a fused qkv weight/bias [(heads + 2 kv_heads) * D, ...] (rows q|k|v,
    as OpenAI's `original/` stores them), then apply `transform`."""

    def rows(t, c):
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        qkv = t[0]
        if qkv.shape[0] != q + 2 * kv:
            raise ValueError(f"fused qkv has {qkv.shape[0]} rows, the config implies {q} + 2 * {kv}")
        start, stop = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[part]
        return transform([qkv[start:stop]], c)

    rows.__name__ = f"{part}_of_qkv_{transform.__name__}"
    return rows


@dataclasses.dataclass(frozen=True)
class TensorRule:
    target: str
    sources: tuple[str, ...]
    transform: Transform = identity
    # Sources are MXFP4 bytes (uint8), not floating-point tensors.
    packed: bool = False

    def for_layer(self, i: int) -> "TensorRule":
        return dataclasses.replace(self, target=self.target.format(i=i),
                                   sources=tuple(s.format(i=i) for s in self.sources))


def expand_rules(global_rules, layer_rules, num_layers: int) -> list[TensorRule]:
    return list(global_rules) + [r.for_layer(i) for i in range(num_layers) for r in layer_rules]


# ---------------------------------------------------------------- Hugging Face layout

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
    # [E, in, out] in the checkpoint (gate/up interleaved on the last axis) -> our [E, out, in].
    TensorRule("layers/{i}/mlp/experts/gate_up_proj", (_L + "mlp.experts.gate_up_proj",), swap_expert_axes),
    TensorRule("layers/{i}/mlp/experts/down_proj", (_L + "mlp.experts.down_proj",), swap_expert_axes),
]
HF_MXFP4_EXPERTS = [
    TensorRule("layers/{i}/mlp/experts/gate_up_proj",
               (_L + "mlp.experts.gate_up_proj_blocks", _L + "mlp.experts.gate_up_proj_scales"), mxfp4_experts,
               packed=True),
    TensorRule("layers/{i}/mlp/experts/down_proj",
               (_L + "mlp.experts.down_proj_blocks", _L + "mlp.experts.down_proj_scales"), mxfp4_experts, packed=True),
]
# `--keep-mxfp4`: the bytes go into `PackedExperts` unchanged.
HF_PACKED_EXPERTS = [
    TensorRule(f"layers/{{i}}/mlp/experts/{name}_{part}", (_L + f"mlp.experts.{name}_{part}",), packed=True)
    for name in ("gate_up_proj", "down_proj") for part in ("blocks", "scales")
]


# An MXFP4 HF checkpoint's `quantization_config.modules_to_not_convert`: what stays bf16.
MXFP4_MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def hf_tensor_shapes(config: GptOssConfig, experts: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF gpt-oss checkpoint with its shape, in checkpoint order (global tensors,
    then layer by layer); `experts` is "mxfp4" (`*_blocks`/`*_scales`) or "bf16" (plain)."""
    c = config
    e, h, i, v = c.num_local_experts, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(c.num_hidden_layers):
        p = _L.format(i=layer)
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q), p + "self_attn.o_proj.bias": (h,),
            p + "self_attn.sinks": (c.num_attention_heads,),
            p + "mlp.router.weight": (e, h), p + "mlp.router.bias": (e,),
        })
        if experts == "mxfp4":
            shapes.update({
                p + "mlp.experts.gate_up_proj_blocks": (e, 2 * i, h // 32, 16),
                p + "mlp.experts.gate_up_proj_scales": (e, 2 * i, h // 32),
                p + "mlp.experts.down_proj_blocks": (e, h, i // 32, 16),
                p + "mlp.experts.down_proj_scales": (e, h, i // 32),
            })
        elif experts == "bf16":
            shapes.update({p + "mlp.experts.gate_up_proj": (e, h, 2 * i), p + "mlp.experts.down_proj": (e, i, h)})
        else:
            raise ValueError(f"experts must be 'mxfp4' or 'bf16', got {experts!r}")
        shapes.update({p + "mlp.experts.gate_up_proj_bias": (e, 2 * i), p + "mlp.experts.down_proj_bias": (e, h)})
    return shapes


def hf_rules(config: GptOssConfig, keys: set[str], packed_experts: bool = False) -> list[TensorRule]:
    """HF layout rules, with MXFP4 or bf16 experts detected from the keys present. `packed_experts`
    keeps MXFP4 experts packed (an error for a checkpoint whose experts are not MXFP4)."""
    mxfp4 = any(k.endswith("gate_up_proj_blocks") for k in keys)
    if packed_experts and not mxfp4:
        raise CheckpointError(
            "keeping the experts packed needs MXFP4 experts (*_blocks/*_scales), but this checkpoint stores "
            "plain gate_up_proj/down_proj: load or convert it without keep_mxfp4"
        )
    experts = HF_PACKED_EXPERTS if packed_experts else HF_MXFP4_EXPERTS if mxfp4 else HF_BF16_EXPERTS
    globals_ = HF_GLOBAL if not (config.tie_word_embeddings and "lm_head.weight" not in keys) else [
        r if r.target != "lm_head" else TensorRule("lm_head", ("model.embed_tokens.weight",), transpose)
        for r in HF_GLOBAL
    ]
    return expand_rules(globals_, HF_LAYER + experts, config.num_hidden_layers)


# ---------------------------------------------------------------- OpenAI original/ layout

ORIGINAL_GLOBAL = [
    TensorRule("embed_tokens", ("embedding.weight",)),
    TensorRule("norm/weight", ("norm.scale",)),
    TensorRule("lm_head", ("unembedding.weight",), transpose),
]

_B = "block.{i}."
ORIGINAL_LAYER = [
    TensorRule("layers/{i}/input_layernorm/weight", (_B + "attn.norm.scale",)),
    TensorRule("layers/{i}/post_attention_layernorm/weight", (_B + "mlp.norm.scale",)),
    TensorRule("layers/{i}/self_attn/q_proj", (_B + "attn.qkv.weight",), from_qkv("q", in_to_heads)),
    TensorRule("layers/{i}/self_attn/k_proj", (_B + "attn.qkv.weight",), from_qkv("k", in_to_heads)),
    TensorRule("layers/{i}/self_attn/v_proj", (_B + "attn.qkv.weight",), from_qkv("v", in_to_heads)),
    TensorRule("layers/{i}/self_attn/q_bias", (_B + "attn.qkv.bias",), from_qkv("q", bias_to_heads)),
    TensorRule("layers/{i}/self_attn/k_bias", (_B + "attn.qkv.bias",), from_qkv("k", bias_to_heads)),
    TensorRule("layers/{i}/self_attn/v_bias", (_B + "attn.qkv.bias",), from_qkv("v", bias_to_heads)),
    TensorRule("layers/{i}/self_attn/o_proj", (_B + "attn.out.weight",), heads_to_out),
    TensorRule("layers/{i}/self_attn/o_bias", (_B + "attn.out.bias",)),
    TensorRule("layers/{i}/self_attn/sinks", (_B + "attn.sinks",)),
    TensorRule("layers/{i}/mlp/router/weight", (_B + "mlp.gate.weight",), transpose),
    TensorRule("layers/{i}/mlp/router/bias", (_B + "mlp.gate.bias",)),
    TensorRule("layers/{i}/mlp/experts/gate_up_proj_bias", (_B + "mlp.mlp1_bias",)),
    TensorRule("layers/{i}/mlp/experts/down_proj_bias", (_B + "mlp.mlp2_bias",)),
]
# mlp1 is gate_up ([E, 2I, H/32, 16], gate/up interleaved like HF), mlp2 is down ([E, H, I/32, 16]):
# [E, out, in] like HF's MXFP4 experts, so the same decode.
ORIGINAL_MXFP4_EXPERTS = [
    TensorRule("layers/{i}/mlp/experts/gate_up_proj",
               (_B + "mlp.mlp1_weight.blocks", _B + "mlp.mlp1_weight.scales"), mxfp4_experts, packed=True),
    TensorRule("layers/{i}/mlp/experts/down_proj",
               (_B + "mlp.mlp2_weight.blocks", _B + "mlp.mlp2_weight.scales"), mxfp4_experts, packed=True),
]
ORIGINAL_PACKED_EXPERTS = [
    TensorRule(f"layers/{{i}}/mlp/experts/{name}_{part}", (_B + f"mlp.{mlp}_weight.{part}",), packed=True)
    for name, mlp in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")) for part in ("blocks", "scales")
]


def original_rules(config: GptOssConfig, packed_experts: bool = False) -> list[TensorRule]:
    experts = ORIGINAL_PACKED_EXPERTS if packed_experts else ORIGINAL_MXFP4_EXPERTS
    return expand_rules(ORIGINAL_GLOBAL, ORIGINAL_LAYER + experts, config.num_hidden_layers)


# ---------------------------------------------------------------- reading safetensors

class SafetensorsReader:
    """Lazy access to the tensors of one or more `.safetensors` files, by key, one tensor at a time."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self._where: dict[str, Path] = {}
        self._info = {}
        self._data_start: dict[Path, int] = {}
        for f in self.files:
            try:
                tensors, _, data_start = read_header(f)
            except SafetensorsFormatError as e:
                raise CheckpointError(str(e)) from None
            self._data_start[f] = data_start
            for key, info in tensors.items():
                if key in self._where:
                    raise CheckpointError(f"{f}: tensor {key!r} also appears in {self._where[key]}")
                self._where[key] = f
                self._info[key] = info

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        info = self._info[key]
        return info.shape, info.dtype

    def nbytes(self, key: str) -> int:
        info = self._info[key]
        return info.end - info.begin

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor's first axis, reading only their bytes (a vocabulary chunk
        of a 200k x 2880 embedding, say, without the other 2 GB)."""
        f = self._where.get(key)
        if f is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint ({', '.join(map(str, self.files))})")
        info = self._info[key]
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"{f}: rows {start}:{stop} outside tensor {key!r} of shape {info.shape}")
        row_bytes = (info.end - info.begin) // max(info.shape[0], 1)
        sliced = info._replace(shape=(stop - start, *info.shape[1:]), begin=info.begin + start * row_bytes,
                               end=info.begin + stop * row_bytes)
        try:
            return read_tensor(f, sliced, self._data_start[f])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: tensor {key!r} rows {start}:{stop} could not be read ({e})") from None

    def get(self, key: str) -> np.ndarray:
        f = self._where.get(key)
        if f is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint ({', '.join(map(str, self.files))})")
        try:
            return read_tensor(f, self._info[key], self._data_start[f])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: tensor {key!r} could not be read ({e})") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files: from `model.safetensors.index.json` when present, else all
    `*.safetensors` (HF names them `model*.safetensors`, OpenAI's `original/` has `model.safetensors`)."""
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
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files (config.json without weights)")
    return files


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def check_sources(reader: SafetensorsReader, rules: Sequence[TensorRule]) -> None:
    """Before reading any data: every key the rules need is present, every key present is used, and
    each has the right kind of dtype (uint8 MXFP4 bytes or floating point)."""
    used = {s for r in rules for s in r.sources}
    keys = set(reader.keys())
    missing = [s for r in rules for s in r.sources if s not in keys]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing from the checkpoint ({', '.join(map(str, reader.files))})"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(keys - used)
    if unexpected:
        raise CheckpointError(
            f"{reader.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for rule in rules:
        for key in rule.sources:
            _, dtype = reader.shape_dtype(key)
            ok = dtype == np.uint8 if rule.packed else _is_float(dtype)
            if not ok:
                want = "uint8 (MXFP4 bytes)" if rule.packed else "a floating-point dtype"
                raise CheckpointError(f"{reader.file_of(key)}: tensor {key!r} has dtype {dtype}, expected {want}")


def _lossless_widening(src: np.dtype, dst: np.dtype) -> bool:
    src, dst = np.dtype(src), np.dtype(dst)
    floating = lambda d: d.kind == "f" or d == np.dtype(ml_dtypes.bfloat16)  # noqa: E731
    return floating(src) and floating(dst) and dst.itemsize > src.itemsize


def read_params(
    reader: SafetensorsReader,
    rules: Sequence[TensorRule],
    config: GptOssConfig,
    expected: dict[str, tuple[tuple[int, ...], np.dtype]],
    progress: Callable[[str, int], None] | None = None,
    check: bool = True,
    widen_later: bool = False,
    keep_stored: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (target, array) for every rule, checking the result's shape against `expected` (target ->
    (shape, dtype)); `check_sources` runs first, before any tensor is read (`check=False`: the caller
    ran it on a superset of `rules`, e.g. when loading only the first layers).
    `widen_later`: a float tensor narrower than its target dtype (bfloat16 for a float32 model) is
    yielded as it is, for a consumer that widens it after placing it (`loading.fill_model`, on the
    device): the host never holds a float32 copy of it. `keep_stored`: every tensor is yielded in the
    dtype its transform gives (the checkpoint's; bfloat16 for decoded MXFP4 experts), uncast."""
    if check:
        check_sources(reader, rules)
    produced = {r.target for r in rules}
    missing_targets = sorted(set(expected) - produced)
    if missing_targets:
        raise CheckpointError(f"no checkpoint tensor provides parameter {missing_targets[0]!r}")
    for rule in rules:
        if rule.target not in expected:
            raise CheckpointError(f"rule target {rule.target!r} is not a parameter of the model")
        sources = [reader.get(k) for k in rule.sources]
        try:
            value = rule.transform(sources, config)
        except CheckpointError as e:
            raise CheckpointError(f"{reader.file_of(rule.sources[0])}: tensor {rule.sources[0]!r}: {e}") from None
        except ValueError as e:  # reshape failures: the stored shape cannot be this parameter
            shapes = {k: a.shape for k, a in zip(rule.sources, sources)}
            raise CheckpointError(
                f"{reader.file_of(rule.sources[0])}: tensor(s) {shapes} cannot form parameter {rule.target!r}: "
                f"the config implies shape {expected[rule.target][0]} ({e})"
            ) from None
        # The sources go before the cast: a transform that made a new array (a transpose) then holds
        # only that array and the cast's output at once, as an identity rule does.
        shapes = {k: a.shape for k, a in zip(rule.sources, sources)}
        nbytes = sum(a.nbytes for a in sources)
        del sources
        want_shape, want_dtype = expected[rule.target]
        if tuple(value.shape) != tuple(want_shape):
            raise CheckpointError(
                f"{reader.file_of(rule.sources[0])}: tensor(s) {shapes} give shape {tuple(value.shape)} for "
                f"parameter {rule.target!r}, but the config implies {tuple(want_shape)}"
            )
        if progress is not None:
            progress(rule.target, nbytes)
        if not (keep_stored or widen_later and _lossless_widening(value.dtype, want_dtype)):
            value = value.astype(want_dtype, copy=False)
        yield rule.target, value
        del value  # before the next tensor is read: the consumer has placed this one
