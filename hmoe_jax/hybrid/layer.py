"""The Hybrid MoE layer: exact deterministic experts in gpt-oss's routing pool, inside the jitted forward.

At each configured layer the neural `MoE` is replaced by `HybridMoE`, which keeps the frozen gpt-oss
router and experts (the very same modules, so checkpoint paths `mlp.router.*` and `mlp.experts.*` do
not move) and adds, for D deterministic experts:

    extended router   logits = [x @ W_r + b_r  |  x @ W_det + b_det]           [N, E + D]
                      top-k over all E + D; weights = softmax over the k values (gpt-oss), or the
                      reference's sigmoid-then-normalise-by-sum ("sigmoid_sum")
    extraction        features = the block's input residual (= hidden_states[L] of layer L, what the
                      paper's probes read): the token's own vector ("token") or the mean over the real
                      tokens up to it ("causal_mean", which at a prompt's last token is the prompt
                      mean-pool the probes were trained on), or, per argument, its learned query's
                      attention pooling over the real tokens up to it ("attention", `hybrid.attention`,
                      at the last token the pooling the extractor was trained with); one probe MLP per
                      argument (or an
                      ensemble, e.g. the reference's 5 fold probes, combined by the median of the
                      decoded outputs), in float32; outputs are sign-log values, decoded with
                      `probe.decode`
    computation       the registered exact formula (`formulas.evaluate`)
    projection        Linear(1,128) SiLU Linear(128,512) SiLU Linear(512,H) of `probe.encode(result)`,
                      times a learned per-expert `output_scale`

    y = sum over neural slots w_j expert_j(x)  +  sum over deterministic slots w_j output_scale_d proj_d

Every token is routed and every deterministic expert is computed for every token (static shapes, no
data-dependent control flow); a token's deterministic slot gets the out-of-range neural index E with
weight 0, which every dispatch backend skips, so it costs no neural compute, and the slot's weight
gates that expert's projection. With no deterministic expert selected the layer computes exactly
what `MoE` computes, bit for bit.

Public API
----------
``HybridConfig``                 frozen; ``HybridConfig.from_dict``, ``load_hybrid_config(path)``
                                 (JSON, e.g. ``configs/hybrid_default.json``), ``to_dict``.
``make_hybrid(model, config, rngs=, probes=)``
                                 swaps a ``HybridMoE`` into ``model.layers[i].mlp`` for each configured
                                 layer, after validating everything; returns the model. On a mesh, call
                                 ``shard_model(model, mesh)`` afterwards to place the new parameters.
``HybridMoE``                    the layer; ``load_probes(expert, {arg: probe params})`` fills an
                                 expert's extraction from probes trained with ``hybrid.probe``
                                 (validated by ``stack_probes``).
``HybridParam``                  the variable type of every new (trainable) parameter, with subtypes
                                 ``RouterRowParam``, ``ExtractionParam``, ``ProjectionParam``: use them
                                 as NNX filters, e.g. ``nnx.Optimizer(model, tx, wrt=HybridParam)``, or
                                 ``nnx.Any(RouterRowParam, ProjectionParam)`` to keep trained probes
                                 frozen. The gpt-oss parameters are plain ``nnx.Param``.

Per hybrid layer, ``model(ids, output_layer_info=True).layer_info[L]`` holds (B, T leading):
``router_logits`` [E+D], ``expert_indices`` and ``expert_weights`` [k] (router slots: 0..E-1 neural,
E+d the d-th configured deterministic expert, ``HybridMoE.router_slot(name)``; for gpt-oss-20b with the
default experts the slots are the registry ids 32..35), and, keyed by expert name, ``arguments``
[n_args] (raw units), ``results`` (the exact formula value) and ``selected`` (bool).

Each argument's probe speaks its target's training space (`HybridConfig.argument_scalings`: sign-log
unless the domain scales it otherwise, `domains.scaling`), decoded back to raw units before the formula.

Numerical guards (no inf or NaN from a deterministic expert reaches the residual stream): probe
outputs are clipped to |v| <= SIGN_LOG_LIMIT before decoding (for sign-log, |argument| <= 2.35e17 units,
far beyond any real value and finite in float32), and a formula result is clipped to the same limit after encoding;
where a formula overflows (a non-finite result of finite arguments) it is saturated at the limit and
re-evaluated on harmless arguments for the gradient, so that lane has gradient 0, not inf * 0 = NaN.
`results` in the layer info keep the formula's own value (inf or NaN there).

The probes run as at inference (no dropout): they are trained on cached features by the probe trainer
(`hybrid.probe`), which applies the paper's dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import formulas
from ..domains import SIGN_LOG, Scaling
from ..formulas import DeterministicExpert
from ..model.layers import MoE
from . import attention, probe

NORMALIZATIONS = ("softmax", "sigmoid_sum")
EXTRACTION_INPUTS = ("token", "causal_mean", "attention")

# Clip for sign-log values (probe outputs and encoded formula results). decode(40) = 2.35e17 lies far
# beyond any real estate figure (<= ~1e9), so a trained probe is never clipped, while every decoded
# argument and its derivative exp(40) stay finite in float32.
SIGN_LOG_LIMIT = 40.0

_PRECISION = jax.lax.Precision.HIGHEST


class HybridParam(nnx.Param):
    """A parameter the hybrid layer adds; the gpt-oss parameters it wraps stay plain `nnx.Param`."""


class RouterRowParam(HybridParam):
    """The new router rows (one per deterministic expert) and their biases."""


class ExtractionParam(HybridParam):
    """The argument-extraction probes."""


class ProjectionParam(HybridParam):
    """The result-projection MLPs and their output scales."""


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Where and how deterministic experts join the routing pool (defaults: the paper's setup).

    layers: indices of the blocks whose MoE becomes hybrid (block L reads hidden_states[L]).
    experts: registered expert names (`formulas`), in router-slot order E, E+1, ...
    normalization: "softmax" over the top-k logits (gpt-oss) or "sigmoid_sum" (the reference).
    extraction_input: "causal_mean" (mean of the block input over real tokens up to each token),
        "token" (the token's own block input) or "attention" (each argument's query pools the block
        input over the real tokens up to each token; its probes carry a `query`, `hybrid.attention`).
    router_init_std, router_bias_init: new router rows ~ N(0, std^2), bias constant (-inf disables
        the deterministic experts).
    output_scale_init: initial per-expert scale of the projection.
    probe_hidden, projection_hidden: hidden widths of the extraction probes and projection MLPs.
    ensemble_size: probes per argument (e.g. the reference's 5 fold probes); their decoded outputs
        are combined by the median, as the reference's inference does.
    argument_scalings: each argument's probe target space (`domains.Scaling`), one per argument in
        `det_args` order (expert by expert, arguments in registry order); empty: sign-log for all.
    """

    layers: tuple[int, ...] = (12,)
    experts: tuple[str, ...] = dataclasses.field(default_factory=formulas.default_expert_names)
    normalization: str = "softmax"
    extraction_input: str = "causal_mean"
    router_init_std: float = 0.01
    router_bias_init: float = -2.0
    output_scale_init: float = 0.01
    probe_hidden: tuple[int, int] = probe.PROBE_HIDDEN
    projection_hidden: tuple[int, int] = (128, 512)
    ensemble_size: int = 1
    argument_scalings: tuple[Scaling, ...] = ()

    def __post_init__(self):
        for name in ("layers", "experts", "probe_hidden", "projection_hidden", "argument_scalings"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"HybridConfig.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.layers:
            raise ValueError("HybridConfig.layers is empty: name at least one layer to make hybrid")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.layers):
            raise TypeError(f"HybridConfig.layers must be integers, got {self.layers!r}")
        repeated = sorted({i for i in self.layers if self.layers.count(i) > 1})
        if repeated:
            raise ValueError(f"HybridConfig.layers lists layer(s) {repeated} more than once")
        if not self.experts:
            raise ValueError("HybridConfig.experts is empty: a hybrid layer needs at least one deterministic expert")
        specs = formulas.resolve_experts(self.experts)  # unknown names, repeated names or ids: ValueError now
        scalings = tuple(Scaling.from_dict(x) if isinstance(x, Mapping) else x for x in self.argument_scalings)
        if any(not isinstance(x, Scaling) for x in scalings):
            raise TypeError(f"HybridConfig.argument_scalings must be Scaling objects, got {self.argument_scalings!r}")
        n_args = sum(e.num_args for e in specs)
        if scalings and len(scalings) != n_args:
            raise ValueError(f"HybridConfig.argument_scalings has {len(scalings)} entries; the experts "
                             f"{self.experts} take {n_args} arguments")
        object.__setattr__(self, "argument_scalings", scalings)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose from {NORMALIZATIONS}")
        if self.extraction_input not in EXTRACTION_INPUTS:
            raise ValueError(f"unknown extraction_input {self.extraction_input!r}; choose from {EXTRACTION_INPUTS}")
        for name in ("probe_hidden", "projection_hidden"):
            sizes = getattr(self, name)
            if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"HybridConfig.{name} must be two positive widths, got {sizes!r}")
        if isinstance(self.ensemble_size, bool) or not isinstance(self.ensemble_size, int) or self.ensemble_size < 1:
            raise ValueError(f"HybridConfig.ensemble_size must be a positive integer, got {self.ensemble_size!r}")
        if not (math.isfinite(self.router_init_std) and self.router_init_std >= 0):
            raise ValueError(f"HybridConfig.router_init_std must be finite and >= 0, got {self.router_init_std}")
        if math.isnan(self.router_bias_init) or self.router_bias_init == math.inf:
            raise ValueError(f"HybridConfig.router_bias_init must be a number or -inf, got {self.router_bias_init}")
        if not math.isfinite(self.output_scale_init):
            raise ValueError(f"HybridConfig.output_scale_init must be finite, got {self.output_scale_init}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HybridConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown hybrid config key(s) {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists; `from_dict(to_dict())` gives the config back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["argument_scalings"] = [x.to_dict() for x in self.argument_scalings]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def scalings(self) -> tuple[Scaling, ...]:
        """One scaling per argument (`argument_scalings`, or sign-log for every argument)."""
        if self.argument_scalings:
            return self.argument_scalings
        return (SIGN_LOG,) * sum(e.num_args for e in formulas.resolve_experts(self.experts))


def load_hybrid_config(path: str | Path) -> HybridConfig:
    """A `HybridConfig` from a JSON file; errors name the file."""
    path = Path(path)
    try:
        return HybridConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from None


# ------------------------------------------------------------------ routing


def topk_weights(top_values: jax.Array, normalization: str) -> jax.Array:
    """Routing weights of the k selected logits: gpt-oss's softmax over those k values, or the
    reference's sigmoid of each, normalised by their sum."""
    if normalization == "softmax":
        return jax.nn.softmax(top_values, axis=-1)
    if normalization == "sigmoid_sum":
        gates = jax.nn.sigmoid(top_values)
        return gates / jnp.sum(gates, axis=-1, keepdims=True)
    raise ValueError(f"unknown normalization {normalization!r}; choose from {NORMALIZATIONS}")


class DeterministicRouterRows(nnx.Module):
    """The router rows added for the deterministic experts: `x @ W + b`, W [H, D], b [D]."""

    def __init__(self, hidden_size: int, num_experts: int, *, std: float, bias: float, dtype, rngs: nnx.Rngs):
        weight, bias = _router_rows_init(rngs.params(), hidden_size, num_experts, std, bias, dtype)
        self.weight = RouterRowParam(weight, axes=("embed", "det_experts"))
        self.bias = RouterRowParam(bias, axes=("det_experts",))

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        return jnp.dot(x.astype(w.dtype), w, precision=_PRECISION) + self.bias[...]


# ------------------------------------------------------------------ extraction, formulas, projection


# Initialisers are compiled whole: run eagerly, each small op would be a compilation of its own.


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _router_rows_init(key, hidden_size: int, num_experts: int, std: float, bias: float, dtype):
    weight = std * jax.random.normal(key, (hidden_size, num_experts), jnp.float32)
    return weight.astype(dtype), jnp.full((num_experts,), bias, dtype)


def _stacked_mlp_init(key, count: int, input_dim: int, hidden: tuple[int, int], output_dim: int, dtype):
    """`count` independent `probe.probe_init` MLPs, stacked on a leading axis."""
    return jax.vmap(lambda k: probe.probe_init(k, input_dim, hidden, output_dim, dtype))(jax.random.split(key, count))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _extraction_init(key, num_args: int, ensemble: int, hidden_size: int, probe_hidden: tuple[int, int], dtype):
    """probe_init for every (argument, member), laid out as `ArgumentExtraction` stores it."""
    p = _stacked_mlp_init(key, num_args * ensemble, hidden_size, probe_hidden, 1, dtype)
    lead = (num_args, ensemble)
    w1 = jnp.moveaxis(p["w1"].reshape(*lead, hidden_size, probe_hidden[0]), 2, 0)
    return {"w1": w1, **{name: p[name].reshape(*lead, *p[name].shape[1:]) for name in ("b1", "w2", "b2", "w3", "b3")}}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _projection_init(key, num_experts: int, hidden_size: int, projection_hidden: tuple[int, int], output_scale: float,
                     dtype):
    # The projection is a probe-shaped MLP run backwards: 1 input, H outputs.
    p = _stacked_mlp_init(key, num_experts, 1, projection_hidden, hidden_size, dtype)
    return {**p, "output_scale": jnp.full((num_experts,), output_scale, dtype)}


def causal_mean(x: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Mean of x [B,T,H] over the real tokens (token_mask [B,T]) at or before each position; zero
    before the first real token. Padding never enters, so a prompt's features do not depend on it."""
    mask = token_mask.astype(x.dtype)[..., None]
    sums = jnp.cumsum(x * mask, axis=1)
    counts = jnp.cumsum(mask, axis=1)
    return sums / jnp.maximum(counts, 1.0)


class ArgumentExtraction(nnx.Module):
    """Every probe of every argument of every deterministic expert, run as one program.

    Arguments are stacked along `det_args` (expert by expert, each in its registry argument order) and
    ensemble members along `probe_ensemble`. The first weight is stored [H, args, members, hidden] so
    that all first layers are ONE [N, H] x [H, args*members*hidden] matmul, with no transpose of the
    largest weight.
    """

    def __init__(self, hidden_size: int, num_args: int, ensemble: int, probe_hidden: tuple[int, int], *, dtype,
                 rngs: nnx.Rngs, attention_queries: bool = False):
        p = _extraction_init(rngs.params(), num_args, ensemble, hidden_size, tuple(probe_hidden), dtype)
        axes = ("det_args", "probe_ensemble")
        if attention_queries:
            # Stored [H, args, members] like w1: all scores are one [N, H] x [H, args*members] matmul.
            self.query = ExtractionParam(jnp.zeros((hidden_size, num_args, ensemble), dtype), axes=("embed", *axes))
        self.w1 = ExtractionParam(p["w1"], axes=("embed", *axes, "probe_hidden"))
        self.b1 = ExtractionParam(p["b1"], axes=(*axes, "probe_hidden"))
        self.w2 = ExtractionParam(p["w2"], axes=(*axes, "probe_hidden", "probe_hidden"))
        self.b2 = ExtractionParam(p["b2"], axes=(*axes, "probe_hidden"))
        self.w3 = ExtractionParam(p["w3"], axes=(*axes, "probe_hidden", None))
        self.b3 = ExtractionParam(p["b3"], axes=(*axes, None))

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [N, H] -> sign-log probe outputs [N, args, members]."""
        h, a, m, k1 = self.w1.shape
        flat = lambda p: p[...].reshape(a * m, *p.shape[2:])  # noqa: E731
        params = {"w1": self.w1[...].reshape(h, a * m, k1), "b1": flat(self.b1), "w2": flat(self.w2),
                  "b2": flat(self.b2), "w3": flat(self.w3), "b3": flat(self.b3)}
        in_axes = ({"w1": 1, "b1": 0, "w2": 0, "b2": 0, "w3": 0, "b3": 0}, None)
        out = jax.vmap(probe.probe_apply, in_axes=in_axes, out_axes=1)(params, features.astype(self.w1.dtype))
        return out.reshape(features.shape[0], a, m)

    def attend(self, x: jax.Array, token_mask: jax.Array) -> jax.Array:
        """Attention extraction: block input x [B, T, H], token_mask [B, T] -> sign-log probe outputs
        [B*T, args, members], each (argument, member) pooling the real tokens up to each position
        with its own query. The pooling runs after the probes' first matmul (a weighted average
        commutes with it): [B, T, args*members, p1] is what the mean path holds too, never a pooled
        [H] vector per (token, argument, member)."""
        b, t, _ = x.shape
        h, a, m, k1 = self.w1.shape
        x = x.astype(self.w1.dtype)
        scores = attention.attention_scores(self.query[...].reshape(h, a * m), x)  # [B, T, a*m]
        first = jnp.dot(x.reshape(b * t, h), self.w1[...].reshape(h, a * m * k1), precision=_PRECISION)
        pooled = attention.causal_attention_pool(scores, first.reshape(b, t, a * m, k1), token_mask)
        flat = lambda p: p[...].reshape(a * m, *p.shape[2:])  # noqa: E731
        params = {"b1": flat(self.b1), "w2": flat(self.w2), "b2": flat(self.b2), "w3": flat(self.w3),
                  "b3": flat(self.b3)}
        out = jax.vmap(probe.probe_head, in_axes=(0, 1), out_axes=1)(params, pooled.reshape(b * t, a * m, k1))
        return out.reshape(b * t, a, m)


def decode_arguments(encoded: jax.Array, scalings: Sequence[Scaling]) -> jax.Array:
    """Probe outputs [N, args, members], argument a in `scalings[a]`'s space -> raw arguments [N, args]:
    clip, decode, median over members."""
    clipped = jnp.clip(encoded, -SIGN_LOG_LIMIT, SIGN_LOG_LIMIT)
    if all(x == SIGN_LOG for x in scalings):  # the reference's case, one op for all
        values = probe.decode(clipped)
    else:
        values = jnp.stack([x.decode(clipped[:, a]) for a, x in enumerate(scalings)], axis=1)
    return values[..., 0] if values.shape[-1] == 1 else jnp.median(values, axis=-1)


def exact_formula(expert: DeterministicExpert, args: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(result, encoded): the formula's exact value [N], and its sign-log encoding clipped to
    +-SIGN_LOG_LIMIT, finite with a finite gradient even where the formula overflows."""
    result = formulas.evaluate(expert, args)
    # The arguments are finite (clipped, decoded probe outputs), so a non-finite result is an overflow
    # of the dtype: +-inf, or NaN where the ratio kernels' error terms overflow too (inf - inf).
    # Saturate it, at +limit when the sign is lost.
    overflow = ~jnp.isfinite(jax.lax.stop_gradient(result))
    # Reverse mode through an overflowed lane multiplies a zero cotangent by an infinite partial
    # derivative (NaN); evaluating those lanes on harmless arguments gives them a zero gradient instead.
    safe = formulas.evaluate(expert, jnp.where(overflow[..., None], jnp.ones_like(args), args))
    encoded = jnp.clip(probe.encode(safe), -SIGN_LOG_LIMIT, SIGN_LOG_LIMIT)
    encoded = jnp.where(overflow, jnp.where(result < 0, -SIGN_LOG_LIMIT, SIGN_LOG_LIMIT), encoded)
    return result, encoded


class ResultProjection(nnx.Module):
    """Per deterministic expert: Linear(1, p1) SiLU Linear(p1, p2) SiLU Linear(p2, H), times a learned
    output scale (the reference module; PyTorch's default Linear init)."""

    def __init__(self, hidden_size: int, num_experts: int, projection_hidden: tuple[int, int], *, output_scale: float,
                 dtype, rngs: nnx.Rngs):
        p = _projection_init(rngs.params(), num_experts, hidden_size, tuple(projection_hidden), output_scale, dtype)
        self.w1 = ProjectionParam(p["w1"], axes=("det_experts", None, "probe_hidden"))
        self.b1 = ProjectionParam(p["b1"], axes=("det_experts", "probe_hidden"))
        self.w2 = ProjectionParam(p["w2"], axes=("det_experts", "probe_hidden", "probe_hidden"))
        self.b2 = ProjectionParam(p["b2"], axes=("det_experts", "probe_hidden"))
        self.w3 = ProjectionParam(p["w3"], axes=("det_experts", "probe_hidden", "embed"))
        self.b3 = ProjectionParam(p["b3"], axes=("det_experts", "embed"))
        self.output_scale = ProjectionParam(p["output_scale"], axes=("det_experts",))

    def __call__(self, encoded: jax.Array, gate: jax.Array) -> jax.Array:
        """encoded results [N, D] and routing weights [N, D] -> sum_d gate_d scale_d proj_d [N, H]."""
        h = jax.nn.silu(encoded[..., None] * self.w1[...][:, 0, :] + self.b1[...])
        h = jax.nn.silu(jnp.einsum("ndi,dij->ndj", h, self.w2[...], precision=_PRECISION) + self.b2[...])
        # The last layer is linear: gating its input instead of its [N, D, H] output is one
        # [N, D*p2] x [D*p2, H] matmul that never materialises a per-expert projection.
        scaled_gate = gate * self.output_scale[...]
        return (jnp.einsum("ndj,djh->nh", h * scaled_gate[..., None], self.w3[...], precision=_PRECISION)
                + jnp.dot(scaled_gate, self.b3[...], precision=_PRECISION))


# ------------------------------------------------------------------ the layer


class HybridMoE(nnx.Module):
    """gpt-oss's MoE with deterministic experts in its routing pool; a drop-in for `DecoderLayer.mlp`.

    `moe`'s router and experts are reused as they are (frozen `nnx.Param`s); the new parameters are
    `HybridParam`s, float32 (float64 for a float64 model) whatever the model dtype.
    """

    def __init__(self, moe: MoE, config: HybridConfig, *, rngs: nnx.Rngs):
        self.router = moe.router
        self.experts = moe.experts
        self.config = config
        self.det_experts = formulas.resolve_experts(config.experts)
        self.num_neural = moe.router.weight.shape[1]
        self.top_k = moe.router.top_k
        hidden = moe.router.weight.shape[0]
        dtype = jnp.promote_types(moe.router.dtype, jnp.float32)
        offsets = [0]
        for e in self.det_experts:
            offsets.append(offsets[-1] + e.num_args)
        self.arg_offsets = tuple(offsets)
        d = len(self.det_experts)
        self.det_router = DeterministicRouterRows(hidden, d, std=config.router_init_std, bias=config.router_bias_init,
                                                  dtype=dtype, rngs=rngs)
        self.extraction = ArgumentExtraction(hidden, offsets[-1], config.ensemble_size, config.probe_hidden,
                                             dtype=dtype, rngs=rngs,
                                             attention_queries=config.extraction_input == "attention")
        self.projection = ResultProjection(hidden, d, config.projection_hidden, output_scale=config.output_scale_init,
                                           dtype=dtype, rngs=rngs)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.det_experts)

    def router_slot(self, name: str) -> int:
        """The router slot (index into `router_logits`, value in `expert_indices`) of a deterministic expert."""
        return self.num_neural + self.expert_names.index(name)

    def extended_router(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, H] -> (logits [N, E+D], weights [N, k], indices [N, k]) over neural and deterministic slots."""
        neural = self.router.logits(x)
        logits = jnp.concatenate([neural, self.det_router(x).astype(neural.dtype)], axis=-1)
        top_values, indices = jax.lax.top_k(logits, self.top_k)
        return logits, topk_weights(top_values, self.config.normalization), indices

    def extraction_features(self, block_input: jax.Array, token_mask: jax.Array) -> jax.Array:
        """The probes' [B, T, H] input for "causal_mean" and "token" ("attention" pools per argument:
        `probe_outputs`)."""
        x = block_input.astype(self.extraction.w1.dtype)
        return causal_mean(x, token_mask) if self.config.extraction_input == "causal_mean" else x

    def probe_outputs(self, block_input: jax.Array, token_mask: jax.Array) -> jax.Array:
        """block_input [B, T, H], token_mask [B, T] -> sign-log probe outputs [B*T, args, members]."""
        if self.config.extraction_input == "attention":
            return self.extraction.attend(block_input, token_mask)
        b, t, h = block_input.shape
        return self.extraction(self.extraction_features(block_input, token_mask).reshape(b * t, h))

    def compute_experts(self, features: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Pooled features [N, H] -> (arguments [N, args] raw, results [N, D], encoded results [N, D]).
        Not for "attention" extraction, whose probes pool the tokens themselves (`probe_outputs`)."""
        if self.config.extraction_input == "attention":
            raise ValueError("attention extraction reads the block input's tokens, not pooled features: "
                             "use probe_outputs(block_input, token_mask) and experts_from_outputs")
        return self.experts_from_outputs(self.extraction(features))

    def experts_from_outputs(self, outputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Probe outputs [N, args, members] -> (arguments [N, args] raw, results [N, D], encoded [N, D])."""
        arguments = decode_arguments(outputs, self.config.scalings)
        results, encoded = [], []
        for e, start, stop in zip(self.det_experts, self.arg_offsets[:-1], self.arg_offsets[1:]):
            r, c = exact_formula(e, arguments[:, start:stop])
            results.append(r)
            encoded.append(c)
        return arguments, jnp.stack(results, axis=-1), jnp.stack(encoded, axis=-1)

    def __call__(self, x, block_input=None, token_mask=None):
        """x [B,T,H] (post-attention-normed), block_input [B,T,H] (the block's input residual),
        token_mask [B,T] -> (y [B,T,H], info dict)."""
        if block_input is None:
            raise ValueError("HybridMoE reads the block's input residual: pass block_input=")
        b, t, h = x.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), jnp.int32)
        n, e, d = b * t, self.num_neural, len(self.det_experts)
        flat = x.reshape(n, h)

        logits, weights, indices = self.extended_router(flat)
        is_neural = indices < e
        # A deterministic slot becomes neural index E (out of range) with weight 0: every dispatch
        # backend skips it, so it costs no expert compute and adds exactly nothing.
        neural = self.experts(flat, jnp.where(is_neural, weights, 0), jnp.where(is_neural, indices, e),
                              token_mask=token_mask.reshape(n))

        arguments, results, encoded = self.experts_from_outputs(self.probe_outputs(block_input, token_mask))
        slots = jax.nn.one_hot(indices - e, d, dtype=encoded.dtype)  # [N, k, D]; neural slots are all-zero rows
        gate = jnp.einsum("nk,nkd->nd", weights.astype(encoded.dtype), slots)
        y = neural + self.projection(encoded, gate).astype(neural.dtype)

        selected = jnp.any(slots > 0, axis=1)
        bt = lambda a: a.reshape(b, t, *a.shape[1:])  # noqa: E731
        spans = zip(self.expert_names, self.arg_offsets[:-1], self.arg_offsets[1:])
        info = {
            "router_logits": bt(logits),
            "expert_indices": bt(indices),
            "expert_weights": bt(weights),
            "arguments": {name: bt(arguments[:, start:stop]) for name, start, stop in spans},
            "results": {name: bt(results[:, i]) for i, name in enumerate(self.expert_names)},
            "selected": {name: bt(selected[:, i]) for i, name in enumerate(self.expert_names)},
        }
        return y.reshape(b, t, h), info

    def load_probes(self, expert: str, probes: Mapping[str, Mapping[str, Any]]) -> None:
        """Set `expert`'s extraction from trained probes (see `stack_probes`); ValueError on any mismatch."""
        hidden = self.extraction.w1.shape[0]
        stacked = stack_probes(self.config, hidden, expert, probes, self.extraction.w1.dtype)
        start = self.arg_offsets[self.expert_names.index(expert)]
        current = {name: getattr(self.extraction, name)[...] for name in stacked}
        for name, value in _write_probes(current, stacked, start).items():
            getattr(self.extraction, name)[...] = value


@functools.partial(jax.jit, static_argnums=2)
def _write_probes(current: dict[str, jax.Array], stacked: dict[str, jax.Array], start: int) -> dict[str, jax.Array]:
    """`ArgumentExtraction`'s parameters with argument columns start.. replaced by `stacked` [args, ...]."""
    out = {}
    for name, value in stacked.items():
        if name in ("w1", attention.QUERY):  # stored [H, args, members, (p1)]
            out[name] = jax.lax.dynamic_update_slice_in_dim(current[name], jnp.moveaxis(value, 2, 0), start, axis=1)
        else:
            out[name] = jax.lax.dynamic_update_slice_in_dim(current[name], value, start, axis=0)
    return out


def stack_probes(config: HybridConfig, hidden_size: int, expert: str, probes: Mapping[str, Mapping[str, Any]],
                 dtype=jnp.float32) -> dict[str, jax.Array]:
    """Validate trained probes for one configured expert and stack them [args, members, ...].

    probes: {argument name: probe params} in `hybrid.probe`'s layout ({w1 [H, p1], b1, w2, b2, w3,
    b3}, plus `query` [H] for "attention" extraction, `hybrid.attention`), each with a leading ensemble
    axis of `config.ensemble_size` (optional when that is 1). An expert that is not
    configured, argument names that are not the registry's (a different argument count included),
    probes of the other extractor, or shapes that do not fit the hidden size, probe widths or ensemble
    size: ValueError naming them.
    """
    if expert not in config.experts:
        raise ValueError(f"probes given for {expert!r}, which is not a configured expert {config.experts}")
    spec = formulas.get_expert(expert)
    if not isinstance(probes, Mapping):
        raise TypeError(f"probes for {expert!r} must map argument names {spec.arg_names} to probe params")
    if set(probes) != set(spec.arg_names):
        raise ValueError(
            f"expert {expert!r} takes {spec.num_args} argument(s) {spec.arg_names}; probes were given for "
            f"{len(probes)}: {tuple(probes)}"
        )
    m, (k1, k2) = config.ensemble_size, config.probe_hidden
    shapes = {"w1": (hidden_size, k1), "b1": (k1,), "w2": (k1, k2), "b2": (k2,), "w3": (k2, 1), "b3": (1,)}
    attending = config.extraction_input == "attention"
    if attending:
        shapes[attention.QUERY] = (hidden_size,)
    stacked = {name: [] for name in shapes}
    for arg in spec.arg_names:
        params = probes[arg]
        if attending != (attention.QUERY in params):
            raise ValueError(
                f"probe {expert}/{arg}: " + ("has no attention query (a mean-pooled probe), but the config's "
                                             "extraction_input is 'attention'" if attending else
                                             "carries an attention query (an attention extractor), but the "
                                             f"config's extraction_input is {config.extraction_input!r}, "
                                             "not 'attention'"))
        if set(params) != set(shapes):
            raise ValueError(f"probe {expert}/{arg}: expected parameters {sorted(shapes)}, got {sorted(params)}")
        for name, shape in shapes.items():
            got = tuple(jnp.shape(params[name]))
            if got != (m, *shape) and not (m == 1 and got == shape):
                expected = f"{(m, *shape)}" + (f" or {shape}" if m == 1 else "")
                raise ValueError(
                    f"probe {expert}/{arg}: {name} has shape {got}, expected {expected} "
                    f"(hidden size {hidden_size}, probe widths {(k1, k2)}, ensemble {m})"
                )
            stacked[name].append(jnp.asarray(params[name], dtype).reshape(m, *shape))
    return {name: jnp.stack(values) for name, values in stacked.items()}


def make_hybrid(model, config: HybridConfig | None = None, *, rngs: nnx.Rngs | None = None,
                probes: Mapping[int, Mapping[str, Mapping[str, Any]]] | None = None):
    """Make the configured layers of a `GptOssForCausalLM` hybrid, in place; returns the model.

    probes: optional {layer: {expert: {argument: probe params}}} (see `HybridMoE.load_probes`).
    Everything is validated before the model is touched: unknown experts, layers out of range or
    already hybrid, probes for a layer or expert not configured, and argument or shape mismatches
    raise ValueError here, never inside the jitted forward. On a mesh, call `shard_model` afterwards
    to place the new parameters.
    """
    config = config if config is not None else HybridConfig()
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    n_layers = model.config.num_hidden_layers
    for i in config.layers:
        if not 0 <= i < n_layers:
            raise ValueError(f"hybrid layer {i} is out of range: the model has layers 0..{n_layers - 1}")
        mlp = model.layers[i].mlp
        if isinstance(mlp, HybridMoE):
            raise ValueError(f"layer {i} is already hybrid")
        if not isinstance(mlp, MoE):
            raise ValueError(f"layer {i}'s mlp is a {type(mlp).__name__}, not the gpt-oss MoE")
    formulas.check_router_ids(config.experts, model.config.num_local_experts)
    probes = dict(probes or {})
    extra = sorted(set(probes) - set(config.layers))
    if extra:
        raise ValueError(f"probes given for layer(s) {extra}, which are not hybrid layers {list(config.layers)}")
    for layer_probes in probes.values():
        for expert, expert_probes in layer_probes.items():
            stack_probes(config, model.config.hidden_size, expert, expert_probes)

    hybrids = {}
    for i in config.layers:
        hybrid = HybridMoE(model.layers[i].mlp, config, rngs=rngs)
        for expert, expert_probes in probes.get(i, {}).items():
            hybrid.load_probes(expert, expert_probes)
        hybrids[i] = hybrid
    for i, hybrid in hybrids.items():
        model.layers[i].mlp = hybrid
    return model
