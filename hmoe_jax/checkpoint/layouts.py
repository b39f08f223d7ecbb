"""Checkpoint layouts as declarative key tables (read tensor by tensor by `layout_reading`).

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
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from ..model.config import GptOssConfig
from ..model.mxfp4 import dequantize_mxfp4_np, quantize_mxfp4_np
from .location import CheckpointError

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
