"""The hybrid MoE layer: extended router, exact deterministic experts, and their place in the forward.

Checkpoints are random tiny gpt-oss models written by `transformers`; the PyTorch reference of the
hybrid layer is built here on `transformers`' own `GptOssMLP` (its router and experts). Errors are
relative: max |ours - ref| / max |ref| over the tensor.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from comparisons import rel_err
from flax import nnx

import hmoe_jax
from hmoe_jax import formulas
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.hybrid import probe
from hmoe_jax.hybrid.layer import (
    SIGN_LOG_LIMIT,
    ExtractionParam,
    HybridConfig,
    HybridMoE,
    HybridParam,
    ProjectionParam,
    RouterRowParam,
    causal_mean,
    exact_formula,
    load_hybrid_config,
    make_hybrid,
)
from hmoe_jax.model import moe
from hmoe_jax.model.config import GptOssConfig
from hmoe_jax.model.layers import MoE
from hmoe_jax.runtime.options import RunOptions

# fp32 against fp32 (the model's own parity bound, tests/test_model.py).
FP32_REL = 1e-5
HYBRID_LAYER = 1
CONFIG = synthetic.tiny_config()  # 2 layers, hidden 64, 4 experts top-2
REPO = Path(__file__).resolve().parents[1]
# The registry's formulas as the layer runs them: compiled (formulas pins eager == jit bit for bit).
evaluate = jax.jit(formulas.evaluate, static_argnums=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return synthetic.write_hf_checkpoint(tmp_path_factory.mktemp("hybrid_ckpt"), CONFIG, seed=21)


def padded_batch(rng, batch=3, length=12, lengths=(12, 9, 5)):
    """Token ids and a left-padded attention mask (row b has lengths[b] real tokens)."""
    ids = rng.integers(3, CONFIG["vocab_size"], (batch, length))
    mask = np.zeros((batch, length), np.int32)
    for b, n in enumerate(lengths):
        mask[b, length - n:] = 1
    return np.where(mask == 1, ids, 0), mask


def routed_hybrid(model, config: HybridConfig, seed: int = 0):
    """make_hybrid, then new router rows strong enough that about half the slots pick a deterministic
    expert (the paper's init, bias -2, would rarely route to them in a random tiny model), and probe
    output biases that make most arguments positive, so the formulas are mostly inside their domain
    (an untrained probe's sign is a coin flip, and a denominator <= 0 gives the constant 0)."""
    make_hybrid(model, config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for i in config.layers:
        layer = model.layers[i].mlp
        rows = layer.det_router
        rows.weight[...] = jnp.asarray(0.1 * rng.standard_normal(rows.weight.shape), rows.weight.dtype)
        rows.bias[...] = jnp.asarray(rng.uniform(0.0, 1.0, rows.bias.shape), rows.bias.dtype)
        b3 = layer.extraction.b3
        b3[...] = jnp.asarray(rng.uniform(1.0, 3.0, b3.shape), b3.dtype)
    return model


# ------------------------------------------------------------------ configuration and bad input


def test_default_config_is_the_papers_setup_and_the_json_file_matches_it():
    c = HybridConfig()
    assert c.layers == (12,)
    assert c.experts == ("dscr", "ltv", "cap_rate", "debt_yield") == formulas.default_expert_names()
    assert (c.normalization, c.router_init_std, c.router_bias_init, c.output_scale_init) == (
        "softmax", 0.01, -2.0, 0.01)
    assert c.probe_hidden == probe.PROBE_HIDDEN and c.projection_hidden == (128, 512)
    assert load_hybrid_config(REPO / "configs" / "hybrid_default.json") == c
    assert HybridConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"experts": ["dscr", "irr"]}, ValueError, r"unknown deterministic expert.*'irr'"),
        ({"experts": ["dscr", "ltv", "dscr"]}, ValueError, r"more than once.*'dscr'"),
        ({"experts": []}, ValueError, "at least one deterministic expert"),
        ({"experts": "dscr"}, TypeError, "must be a list"),
        ({"layers": [1, 1]}, ValueError, r"layer\(s\) \[1\] more than once"),
        ({"normalization": "sigmoid"}, ValueError, "unknown normalization 'sigmoid'"),
        ({"extraction_input": "mean"}, ValueError, "unknown extraction_input 'mean'"),
        ({"ensemble_size": 0}, ValueError, "ensemble_size"),
        ({"router_bias_init": math.inf}, ValueError, "router_bias_init"),
        ({"probe_width": 3}, ValueError, r"unknown hybrid config key\(s\) \['probe_width'\]"),
    ],
)
def test_bad_configs_are_named_at_construction(overrides, error, match):
    with pytest.raises(error, match=match):
        HybridConfig.from_dict({**HybridConfig().to_dict(), **overrides})


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "hybrid.json"
    path.write_text(json.dumps({"experts": ["dscr", "noi_yield"]}))
    with pytest.raises(ValueError, match=r"hybrid.json.*'noi_yield'"):
        load_hybrid_config(path)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_probes(key, count, hidden, ensemble):
    keys = jax.random.split(key, (count,) if ensemble is None else (count, ensemble))
    init = lambda k: probe.probe_init(k, hidden)  # noqa: E731
    return jax.vmap(init if ensemble is None else jax.vmap(init))(keys)


def probe_set(hidden, args, seed=0, ensemble=None):
    """{argument: probe params} as `hmoe_jax.probe` trains them (optionally an ensemble)."""
    stacked = _init_probes(jax.random.key(seed), len(args), hidden, ensemble)
    return {a: jax.tree.map(lambda p: p[i], stacked) for i, a in enumerate(args)}


def test_construction_errors_are_raised_before_the_model_changes(checkpoint):
    model = hmoe_jax.from_pretrained(checkpoint)
    hidden = CONFIG["hidden_size"]
    before = jax.tree.map(np.asarray, nnx.state(model))
    cases = [
        (HybridConfig(layers=(2,)), None, r"hybrid layer 2 is out of range: the model has layers 0\.\.1"),
        (HybridConfig(layers=(-1,)), None, "out of range"),
        (HybridConfig(layers=(1,)), {0: {}}, r"probes given for layer\(s\) \[0\]"),
        (HybridConfig(layers=(1,), experts=("ltv",)), {1: {"dscr": probe_set(hidden, ("noi", "ads"))}},
         "not a configured expert"),
        # An argument-count mismatch between the registry (dscr: noi, ads) and the probes.
        (HybridConfig(layers=(1,)), {1: {"dscr": probe_set(hidden, ("noi",))}},
         r"'dscr' takes 2 argument\(s\) \('noi', 'ads'\); probes were given for 1"),
        (HybridConfig(layers=(1,)), {1: {"dscr": probe_set(hidden, ("noi", "ads", "loan"))}}, "given for 3"),
        # Probes trained on another model's hidden size.
        (HybridConfig(layers=(1,)), {1: {"ltv": probe_set(2 * hidden, ("loan", "value"))}},
         r"ltv/loan: w1 has shape \(128, 512\), expected \(1, 64, 512\) or \(64, 512\)"),
        # A 3-member ensemble given to a single-probe configuration.
        (HybridConfig(layers=(1,)), {1: {"ltv": probe_set(hidden, ("loan", "value"), ensemble=3)}}, "ensemble 1"),
    ]
    for config, probes, match in cases:
        with pytest.raises(ValueError, match=match):
            make_hybrid(model, config, probes=probes)
        assert not any(isinstance(layer.mlp, HybridMoE) for layer in model.layers)
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)

    make_hybrid(model, HybridConfig(layers=(1,)))
    with pytest.raises(ValueError, match="layer 1 is already hybrid"):
        make_hybrid(model, HybridConfig(layers=(0, 1)))
    assert not isinstance(model.layers[0].mlp, HybridMoE)


# ------------------------------------------------------------------ the dispatch contract the layer relies on


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("backend", sorted(moe.BACKENDS))
def test_dispatch_backends_drop_out_of_range_slots_bit_exactly(backend, layout):
    """A deterministic slot reaches the neural dispatch as expert index E with weight 0: each backend
    must add exactly nothing for it (bit for bit what a zero-weight valid slot adds) and stay close to
    the dense sum over the remaining slots."""
    rng = np.random.default_rng(30)
    n, h, i, e, k = 40, 16, 8, 4, 3
    w = moe.ExpertWeights(*(jnp.asarray(rng.standard_normal(s), jnp.float32) * 0.3
                            for s in ((e, h, 2 * i), (e, 2 * i), (e, i, h), (e, h))))
    if layout == "out_in":  # the model's layout (`model.Experts`)
        w = moe.ExpertWeightsOutIn(jnp.swapaxes(w.gate_up, 1, 2), w.gate_up_bias, jnp.swapaxes(w.down, 1, 2),
                                   w.down_bias)
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    indices = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    weights = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    deterministic = rng.uniform(size=(n, k)) < 0.4
    deterministic[0] = True  # a token with no neural slot at all
    weights[deterministic] = 0.0
    act, p = moe.SwiGLU(), jax.lax.Precision.HIGHEST
    fn = jax.jit(lambda wt, idx: moe.dispatch(backend)(x, wt, idx, w, act, p))
    out_of_range = fn(jnp.asarray(weights), jnp.asarray(np.where(deterministic, e, indices)))
    zero_weight = fn(jnp.asarray(weights), jnp.asarray(indices))
    np.testing.assert_array_equal(np.asarray(out_of_range), np.asarray(zero_weight))
    np.testing.assert_array_equal(np.asarray(out_of_range[0]), 0.0)
    dense = moe.moe_dense(x, jnp.asarray(weights), jnp.asarray(indices), w, act, p)
    assert rel_err(out_of_range, dense) < 1e-6


# ------------------------------------------------------------------ bit-exact with nothing selected


@pytest.mark.parametrize("backend", sorted(moe.BACKENDS))
def test_hybrid_model_with_no_deterministic_expert_selected_equals_the_base_model_bit_for_bit(checkpoint, backend):
    model = hmoe_jax.from_pretrained(checkpoint, moe_backend=backend)
    ids, mask = padded_batch(np.random.default_rng(31))
    pos = hmoe_jax.default_position_ids(jnp.asarray(mask))
    base = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    make_hybrid(model, HybridConfig(layers=(0, 1), router_bias_init=-math.inf), rngs=nnx.Rngs(1))
    hybrid = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, output_layer_info=True)
    np.testing.assert_array_equal(np.asarray(hybrid.logits), np.asarray(base.logits))
    for a, b in zip(hybrid.hidden_states, base.hidden_states):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for info in hybrid.layer_info:
        assert int(np.asarray(info["expert_indices"]).max()) < CONFIG["num_local_experts"]
        assert not any(np.asarray(s).any() for s in info["selected"].values())


# ------------------------------------------------------------------ parity with a PyTorch hybrid layer


class TorchHybridMLP(torch.nn.Module):
    """The hybrid layer in PyTorch: transformers' `GptOssMLP` router and experts, plus extraction
    probes, formulas and projections as plain torch modules, loaded with the JAX layer's weights.

    Drop-in for `GptOssDecoderLayer.mlp` (returns (y, router scores)); the block input residual and the
    token mask it reads are set on it before the call (`block_input`, `token_mask`)."""

    def __init__(self, mlp, layer: HybridMoE):
        super().__init__()
        t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
        self.mlp = mlp
        self.config = layer.config
        self.names = layer.expert_names
        self.num_args = [e.num_args for e in layer.det_experts]
        self.num_neural = layer.num_neural
        self.top_k = layer.top_k
        self.det_router = torch.nn.Linear(mlp.router.hidden_dim, len(self.names))
        with torch.no_grad():
            self.det_router.weight.copy_(t(layer.det_router.weight[...]).T)
            self.det_router.bias.copy_(t(layer.det_router.bias[...]))
        ex = layer.extraction
        hidden, n_args, members, k1 = ex.w1.shape
        k2 = ex.w2.shape[-1]
        self.probes = torch.nn.ModuleList()
        for a in range(n_args):
            for m in range(members):
                seq = torch.nn.Sequential(torch.nn.Linear(hidden, k1), torch.nn.SiLU(), torch.nn.Linear(k1, k2),
                                          torch.nn.SiLU(), torch.nn.Linear(k2, 1))
                with torch.no_grad():
                    for lin, (w, b) in zip(seq[::2], ((ex.w1[...][:, a, m], ex.b1[...][a, m]),
                                                      (ex.w2[...][a, m], ex.b2[...][a, m]),
                                                      (ex.w3[...][a, m], ex.b3[...][a, m]))):
                        lin.weight.copy_(t(w).T)
                        lin.bias.copy_(t(b))
                self.probes.append(seq)
        self.members = members
        pr = layer.projection
        self.projections = torch.nn.ModuleList()
        for d in range(len(self.names)):
            seq = torch.nn.Sequential(torch.nn.Linear(1, pr.w1.shape[-1]), torch.nn.SiLU(),
                                      torch.nn.Linear(pr.w2.shape[1], pr.w2.shape[2]), torch.nn.SiLU(),
                                      torch.nn.Linear(pr.w3.shape[1], pr.w3.shape[2]))
            with torch.no_grad():
                for lin, (w, b) in zip(seq[::2], ((pr.w1[...][d], pr.b1[...][d]), (pr.w2[...][d], pr.b2[...][d]),
                                                  (pr.w3[...][d], pr.b3[...][d]))):
                    lin.weight.copy_(t(w).T)
                    lin.bias.copy_(t(b))
            self.projections.append(seq)
        self.output_scale = torch.nn.Parameter(t(pr.output_scale[...]))
        self.block_input = self.token_mask = None
        self.last = {}

    def formula(self, name, args):
        """The formulas in float64, rounded once to float32; a denominator <= 0 gives 0."""
        a = [c.double() for c in args.unbind(-1)]
        numerator, denominator, scale = {"dscr": (a[0], a[1], 1.0), "ltv": (a[0], a[1], 100.0),
                                         "cap_rate": (a[0], a[1], 100.0), "debt_yield": (a[0], a[1], 100.0)}[name]
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator > 0, numerator * scale / safe, torch.zeros_like(numerator)).float()

    def forward(self, x):
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        neural_logits, _, _ = self.mlp.router(flat)  # transformers' own router rows
        logits = torch.cat([neural_logits, self.det_router(flat)], dim=-1)
        top_values, indices = torch.topk(logits, self.top_k, dim=-1)
        if self.config.normalization == "softmax":
            weights = torch.softmax(top_values, dim=-1)
        else:
            gates = torch.sigmoid(top_values)
            weights = gates / gates.sum(-1, keepdim=True)
        is_det = indices >= self.num_neural
        # transformers' experts take no out-of-range index: a valid one with weight 0 adds nothing.
        neural = self.mlp.experts(flat, torch.where(is_det, 0, indices), torch.where(is_det, 0.0, weights))

        features = self.block_input.float()
        if self.config.extraction_input == "causal_mean":
            m = self.token_mask.float()[..., None]
            features = torch.cumsum(features * m, dim=1) / torch.cumsum(m, dim=1).clamp(min=1.0)
        features = features.reshape(-1, h)
        values = torch.stack([p(features)[:, 0] for p in self.probes], dim=-1)
        values = values.reshape(-1, sum(self.num_args), self.members)
        values = values.clamp(-SIGN_LOG_LIMIT, SIGN_LOG_LIMIT)
        values = torch.sign(values) * torch.expm1(values.abs())
        arguments = values[..., 0] if self.members == 1 else torch.quantile(values, 0.5, dim=-1)

        out = neural
        offset, results = 0, {}
        for d, (name, n) in enumerate(zip(self.names, self.num_args)):
            result = self.formula(name, arguments[:, offset:offset + n])
            offset += n
            encoded = (torch.sign(result) * torch.log1p(result.abs())).clamp(-SIGN_LOG_LIMIT, SIGN_LOG_LIMIT)
            gate = (weights * (indices == self.num_neural + d)).sum(-1)
            out = out + (gate * self.output_scale[d])[:, None] * self.projections[d](encoded[:, None])
            results[name] = result
        self.last = dict(logits=logits, indices=indices, weights=weights, arguments=arguments, results=results)
        return out.reshape(b, t, h), weights


@pytest.fixture(scope="module")
def torch_reference(checkpoint):
    return synthetic.load_torch_reference(checkpoint)


@pytest.mark.parametrize("normalization, extraction_input, ensemble", [
    ("softmax", "causal_mean", 1),
    ("sigmoid_sum", "token", 3),
])
def test_hybrid_layer_matches_a_pytorch_hybrid_layer_on_transformers_gpt_oss_mlp(
        checkpoint, torch_reference, normalization, extraction_input, ensemble):
    model = hmoe_jax.from_pretrained(checkpoint)
    config = HybridConfig(layers=(HYBRID_LAYER,), normalization=normalization, extraction_input=extraction_input,
                          ensemble_size=ensemble)
    layer = routed_hybrid(model, config, seed=32).layers[HYBRID_LAYER].mlp
    reference = TorchHybridMLP(torch_reference.model.layers[HYBRID_LAYER].mlp, layer)

    rng = np.random.default_rng(33)
    b, t, h = 3, 10, CONFIG["hidden_size"]
    x = rng.standard_normal((b, t, h)).astype(np.float32)
    block_input = (4 * rng.standard_normal((b, t, h))).astype(np.float32)
    mask = np.ones((b, t), np.int32)
    mask[1, :4] = 0  # left padding: the causal mean must skip it
    y, info = nnx.jit(lambda m, *a: m(a[0], block_input=a[1], token_mask=a[2]))(layer, x, block_input, mask)
    reference.block_input, reference.token_mask = torch.from_numpy(block_input), torch.from_numpy(mask)
    with torch.no_grad():
        ref_y, _ = reference(torch.from_numpy(x))
    ref = reference.last

    indices = np.asarray(info["expert_indices"]).reshape(-1, layer.top_k)
    np.testing.assert_array_equal(indices, ref["indices"].numpy())
    det_share = float(np.mean(indices >= layer.num_neural))
    assert 0.2 < det_share < 0.8, f"fixture must route a fair share of slots to deterministic experts: {det_share}"
    assert rel_err(info["router_logits"].reshape(b * t, -1), ref["logits"].numpy()) < 1e-6
    assert rel_err(info["expert_weights"].reshape(b * t, -1), ref["weights"].numpy()) < 1e-6
    arguments = np.concatenate([np.asarray(info["arguments"][n]).reshape(b * t, -1) for n in layer.expert_names], -1)
    assert rel_err(arguments, ref["arguments"].numpy()) < FP32_REL
    for name in layer.expert_names:
        ours, theirs = np.asarray(info["results"][name]).reshape(-1), ref["results"][name].numpy()
        assert np.count_nonzero(theirs) > b * t // 4, "fixture must give positive denominators"
        assert rel_err(ours, theirs) < FP32_REL, name
    assert rel_err(y, ref_y.numpy()) < FP32_REL


def test_hybrid_model_matches_transformers_with_the_pytorch_hybrid_layer_swapped_in(checkpoint, torch_reference):
    """The whole forward: the hybrid layer inside the jitted JAX model against transformers'
    `GptOssForCausalLM` whose MLP at that layer is the PyTorch hybrid layer, on a padded batch."""
    model = routed_hybrid(hmoe_jax.from_pretrained(checkpoint), HybridConfig(layers=(HYBRID_LAYER,)), seed=34)
    layer = model.layers[HYBRID_LAYER].mlp
    decoder = torch_reference.model.layers[HYBRID_LAYER]
    original = decoder.mlp
    hybrid = TorchHybridMLP(original, layer)
    ids, mask = padded_batch(np.random.default_rng(35))
    pos = hmoe_jax.default_position_ids(jnp.asarray(mask))

    def capture_block_input(module, args, kwargs):
        hybrid.block_input = args[0] if args else kwargs["hidden_states"]

    hook = decoder.register_forward_pre_hook(capture_block_input, with_kwargs=True)
    decoder.mlp, hybrid.token_mask = hybrid, torch.from_numpy(mask)
    try:
        with torch.no_grad():
            ref = torch_reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                  position_ids=torch.from_numpy(np.array(pos)), output_hidden_states=True)
    finally:
        decoder.mlp = original
        hook.remove()
    ours = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, output_layer_info=True)
    real = mask.astype(bool)
    assert np.asarray(ours.layer_info[HYBRID_LAYER]["expert_indices"])[real].max() >= CONFIG["num_local_experts"]
    assert rel_err(np.asarray(ours.logits)[real], ref.logits.numpy()[real]) < FP32_REL
    for i, (a, r) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert rel_err(np.asarray(a)[real], r.numpy()[real]) < FP32_REL, f"hidden_states[{i}]"


# ------------------------------------------------------------------ what the layer reports


def test_layer_info_reports_probe_arguments_and_exact_formula_results(checkpoint):
    """At a prompt's last token, causal-mean extraction reads exactly the prompt's mean-pooled
    hidden_states[L], the features the paper's probes are trained on: the reported arguments are
    those probes' decoded outputs, the results are the registered formulas of those arguments (bit
    for bit), and left padding changes neither."""
    hidden = CONFIG["hidden_size"]
    probes = {name: probe_set(hidden, formulas.get_expert(name).arg_names, seed=s)
              for s, name in enumerate(formulas.default_expert_names())}
    model = hmoe_jax.from_pretrained(checkpoint)
    # A probe trainer's output keeps its fold axis even for one fold: accepted as an ensemble of 1.
    given = dict(probes, ltv={a: jax.tree.map(lambda p: p[None], v) for a, v in probes["ltv"].items()})
    make_hybrid(model, HybridConfig(layers=(HYBRID_LAYER,)), probes={HYBRID_LAYER: given})
    layer = model.layers[HYBRID_LAYER].mlp
    ids, mask = padded_batch(np.random.default_rng(36))
    pos = hmoe_jax.default_position_ids(jnp.asarray(mask))
    out = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, output_layer_info=True)
    info = out.layer_info[HYBRID_LAYER]
    residual = np.asarray(out.hidden_states[HYBRID_LAYER])
    for row in range(ids.shape[0]):
        pooled = residual[row][mask[row] == 1].mean(0)
        for name, expert_probes in probes.items():
            expected = [probe.decode(probe.probe_apply(expert_probes[a], jnp.asarray(pooled)))[0]
                        for a in formulas.get_expert(name).arg_names]
            got = np.asarray(info["arguments"][name])[row, -1]
            np.testing.assert_allclose(got, np.asarray(expected), rtol=2e-5, atol=1e-6)
    for name in layer.expert_names:
        args = jnp.asarray(info["arguments"][name])
        np.testing.assert_array_equal(np.asarray(info["results"][name]), np.asarray(evaluate(name, args)))
        slot = layer.router_slot(name)
        np.testing.assert_array_equal(np.asarray(info["selected"][name]),
                                      (np.asarray(info["expert_indices"]) == slot).any(-1))

    # The shortest prompt alone, unpadded: same arguments at its last token.
    n = int(mask[-1].sum())
    alone = model(ids[-1:, -n:], output_layer_info=True).layer_info[HYBRID_LAYER]
    for name in layer.expert_names:
        np.testing.assert_allclose(np.asarray(alone["arguments"][name])[0, -1],
                                   np.asarray(info["arguments"][name])[-1, -1], rtol=1e-5, atol=1e-6)


def test_probe_ensembles_combine_by_the_median_of_decoded_outputs(checkpoint):
    """The reference's inference: median over the fold probes after the inverse transform; here with
    experts of 2 and 3 arguments side by side, so each reads its own columns."""
    model = hmoe_jax.from_pretrained(checkpoint)
    hidden = CONFIG["hidden_size"]
    experts = ("ltv", "annual_debt_service")
    probes = {name: probe_set(hidden, formulas.get_expert(name).arg_names, seed=3 + i, ensemble=5)
              for i, name in enumerate(experts)}
    make_hybrid(model, HybridConfig(layers=(0,), experts=experts, extraction_input="token", ensemble_size=5),
                probes={0: probes})
    layer = model.layers[0].mlp
    features = jax.random.normal(jax.random.key(0), (6, hidden)) * 3
    arguments, results, _ = nnx.jit(lambda m, f: m.compute_experts(f))(layer, features)
    column = 0
    for d, name in enumerate(experts):
        arg_names = formulas.get_expert(name).arg_names
        for arg in arg_names:
            members = jax.vmap(probe.probe_apply, in_axes=(0, None))(probes[name][arg], features)[..., 0]
            np.testing.assert_allclose(np.asarray(arguments[:, column]),
                                       np.median(np.asarray(probe.decode(members)), 0),
                                       rtol=1e-5, atol=1e-7)
            column += 1
        own = arguments[:, column - len(arg_names):column]
        np.testing.assert_array_equal(np.asarray(results[:, d]), np.asarray(evaluate(name, own)))


def test_causal_mean_skips_padding_and_starts_at_zero():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    mask = jnp.asarray([[0, 1, 0, 1]])
    out = np.asarray(causal_mean(x, mask))
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_array_equal(out[0, 1], [3, 4, 5])
    np.testing.assert_array_equal(out[0, 2], [3, 4, 5])
    np.testing.assert_array_equal(out[0, 3], [6, 7, 8])


def test_overflowing_formulas_and_huge_probe_outputs_stay_finite_with_finite_gradients():
    """No inf or NaN from a deterministic expert reaches the residual stream or the gradient: a result
    that overflows float32 is encoded at the clip limit with gradient 0; probe outputs are clipped
    before decoding."""
    formula = jax.jit(exact_formula, static_argnums=0)
    dscr = formulas.get_expert("dscr")
    args = jnp.asarray([[1e30, 1e-20], [-1e30, 1e-20], [5.0, 2.0], [3.0, -1.0]], jnp.float32)
    result, encoded = formula(dscr, args)
    assert not np.isfinite(np.asarray(result[:2])).any()  # 1e50 does not fit in float32
    assert float(result[2]) == 2.5 and float(result[3]) == 0.0
    expected = [SIGN_LOG_LIMIT, SIGN_LOG_LIMIT, float(probe.encode(jnp.float32(2.5))), 0.0]
    np.testing.assert_array_equal(np.asarray(encoded), np.asarray(expected, np.float32))
    grad = jax.jit(jax.grad(lambda a: exact_formula(dscr, a)[1].sum()))(args)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad[:2]), 0.0)
    assert float(grad[2, 0]) > 0  # d encode(noi / ads) / d noi

    projection = formulas.get_expert("noi_projection")
    result, encoded = formula(projection, jnp.asarray([[1e10, 10.0, 100.0], [-1e10, 10.0, 100.0]], jnp.float32))
    np.testing.assert_array_equal(np.asarray(result), [np.inf, -np.inf])
    np.testing.assert_array_equal(np.asarray(encoded), [SIGN_LOG_LIMIT, -SIGN_LOG_LIMIT])

    from hmoe_jax.domains import linear, sign_log
    from hmoe_jax.hybrid.layer import decode_arguments

    huge = jnp.asarray([[[1e3], [-1e3], [2.0]]], jnp.float32)
    raw = decode_arguments(huge, [sign_log()] * 3)
    assert np.isfinite(np.asarray(raw)).all()
    assert float(raw[0, 0]) == pytest.approx(math.expm1(SIGN_LOG_LIMIT), rel=1e-6)
    # Each argument decodes in its own probe's space, clipped there too.
    raw = decode_arguments(huge, [sign_log(unit=1e-6), linear(5.0, 2.0), sign_log()])
    np.testing.assert_allclose(np.asarray(raw[0]), [math.expm1(SIGN_LOG_LIMIT) * 1e-6,
                                                    -SIGN_LOG_LIMIT * 2.0 + 5.0, math.expm1(2.0)], rtol=1e-6)


# ------------------------------------------------------------------ training: what moves and what does not


def test_gradients_reach_router_rows_extraction_and_projection_and_match_finite_differences():
    """float64 (jax.enable_x64): a loss on the layer output, differentiated w.r.t. every new
    parameter group through the exact formula, against central differences along a random direction.
    The routing does not change within +-eps, so the loss is smooth there."""
    with jax.enable_x64(True):
        cfg = GptOssConfig.from_dict(CONFIG)
        neural = MoE(cfg, RunOptions(dtype="float64", param_dtype="float64", moe_backend="dense").resolved(),
                     rngs=nnx.Rngs(40))
        layer = HybridMoE(neural, HybridConfig(layers=(0,), router_bias_init=0.5), rngs=nnx.Rngs(41))
        rng = np.random.default_rng(42)
        b, t, h = 2, 6, cfg.hidden_size
        x = jnp.asarray(rng.standard_normal((b, t, h)))
        block_input = jnp.asarray(4 * rng.standard_normal((b, t, h)))
        mask = jnp.ones((b, t), jnp.int32)
        target = jnp.asarray(rng.standard_normal((b, t, h)))
        graphdef, trainable, frozen = nnx.split(layer, HybridParam, ...)
        assert trainable["extraction"]["w1"][...].dtype == jnp.float64
        params = nnx.to_pure_dict(trainable)

        def loss(params):
            state = nnx.clone(trainable)
            nnx.replace_by_pure_dict(state, params)
            y, info = nnx.merge(graphdef, state, frozen)(x, block_input=block_input, token_mask=mask)
            return jnp.sum(y * target), (info["expert_indices"], info["results"])

        # One compiled program for the gradient and every shifted evaluation (its gradient unused).
        loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, (indices, results)), grads = loss_and_grad(params)
        assert 0 < np.mean(np.asarray(indices) >= cfg.num_local_experts) < 1
        assert all(np.count_nonzero(np.asarray(r)) for r in results.values())

        eps = 1e-6
        groups = {"router rows": ("det_router",), "extraction": ("extraction",),
                  "projection": ("projection", ("w1", "b1", "w2", "b2", "w3", "b3")),
                  "output scale": ("projection", ("output_scale",))}
        for group, (module, *names) in groups.items():
            def direction_of(path, v):
                keys = [k.key for k in path]
                keep = keys[0] == module and (not names or keys[1] in names[0])
                return jnp.asarray(rng.standard_normal(v.shape)) if keep else jnp.zeros_like(v)

            direction = jax.tree_util.tree_map_with_path(direction_of, params)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            shifted = []
            for sign in (1.0, -1.0):
                shifted_params = jax.tree.map(lambda v, d: v + sign * eps * d, params, direction)
                (value, (shifted_indices, _)), _ = loss_and_grad(shifted_params)
                np.testing.assert_array_equal(np.asarray(shifted_indices), np.asarray(indices))
                shifted.append(float(value))
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert abs(analytic) > 1e-6, f"{group}: zero gradient"
            assert abs(analytic - numeric) <= 1e-6 * abs(analytic), f"{group}: {analytic} vs {numeric}"


def test_an_optimizer_on_hybrid_params_leaves_gpt_oss_frozen(checkpoint):
    model = hmoe_jax.from_pretrained(checkpoint)
    routed_hybrid(model, HybridConfig(layers=(1,)), seed=43)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, HybridParam))}
    assert paths and all(p.startswith("layers/1/mlp/") for p in paths)
    assert not any("/router/" in p or "/experts/" in p for p in paths)
    kinds = {type(v) for _, v in nnx.to_flat_state(nnx.state(model, HybridParam))}
    assert kinds == {RouterRowParam, ExtractionParam, ProjectionParam}

    before = jax.tree.map(np.asarray, nnx.state(model))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=HybridParam)
    ids = np.random.default_rng(44).integers(0, CONFIG["vocab_size"], (2, 8))

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return jnp.mean(model.forward(jnp.asarray(ids)).logits ** 2)

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, HybridParam))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    after = jax.tree.map(np.asarray, nnx.state(model))
    changed = set()
    for (path, old), (_, new) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        if not np.array_equal(old[...], new[...]):
            changed.add("/".join(map(str, path)))
    assert changed and changed <= paths
    assert {p.split("/")[3] for p in changed} == {"det_router", "extraction", "projection"}


# ------------------------------------------------------------------ sharding


def test_hybrid_forward_on_an_8_device_mesh_equals_single_device(checkpoint):
    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    mesh = hmoe_jax.make_mesh(data=2, expert=2, tensor=2)
    config = HybridConfig(layers=(HYBRID_LAYER,))
    single = routed_hybrid(hmoe_jax.from_pretrained(checkpoint), config, seed=45)
    sharded = routed_hybrid(hmoe_jax.from_pretrained(checkpoint, mesh=mesh), config, seed=45)
    hmoe_jax.shard_model(sharded, mesh)
    assert sharded.layers[1].mlp.experts.gate_up_proj[...].sharding.spec[0] == "expert"
    assert len(sharded.layers[1].mlp.extraction.w1[...].sharding.device_set) == 8
    ids, mask = padded_batch(np.random.default_rng(46), batch=4, lengths=(12, 10, 7, 12))
    pos = hmoe_jax.default_position_ids(jnp.asarray(mask))
    ids_sharded = jax.device_put(jnp.asarray(ids), hmoe_jax.runtime.sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        out = sharded(ids_sharded, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                      output_layer_info=True)
    ref = single(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, output_layer_info=True)
    assert len(out.logits.sharding.device_set) == 8
    assert rel_err(out.logits, ref.logits) < 1e-6
    for a, r in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(a, r) < 1e-6
    a, r = out.layer_info[HYBRID_LAYER], ref.layer_info[HYBRID_LAYER]
    np.testing.assert_array_equal(np.asarray(a["expert_indices"]), np.asarray(r["expert_indices"]))
    assert np.asarray(r["expert_indices"]).max() >= CONFIG["num_local_experts"]
    for name in a["results"]:
        np.testing.assert_allclose(np.asarray(a["results"][name]), np.asarray(r["results"][name]), rtol=1e-5)


def test_layerwise_hybrid_forward_equals_the_fused_one_on_one_device_and_on_a_mesh(checkpoint):
    """Layerwise execution (blocks jitted one by one, as the 20b runs on a CPU host) computes what the
    one-program forward computes, the hybrid layer's routing, arguments and results included."""
    mesh = hmoe_jax.make_mesh(data=2, expert=2, tensor=2)
    config = HybridConfig(layers=(HYBRID_LAYER,))
    ids, mask = padded_batch(np.random.default_rng(47), batch=4, lengths=(12, 10, 7, 12))
    pos = hmoe_jax.default_position_ids(jnp.asarray(mask))
    kwargs = dict(attention_mask=mask, position_ids=pos, output_hidden_states=True, output_layer_info=True)
    single = routed_hybrid(hmoe_jax.from_pretrained(checkpoint), config, seed=48)
    fused = single(ids, **kwargs)
    sharded = routed_hybrid(hmoe_jax.from_pretrained(checkpoint, mesh=mesh), config, seed=48)
    hmoe_jax.shard_model(sharded, mesh)
    ids_sharded = jax.device_put(jnp.asarray(ids), hmoe_jax.runtime.sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh), sharded.using(execution="layerwise"):
        on_mesh = sharded(ids_sharded, **kwargs)
    assert len(on_mesh.logits.sharding.device_set) == 8
    with single.using(execution="layerwise"):
        one_device = single(ids, **kwargs)
    for out in (one_device, on_mesh):
        assert rel_err(out.logits, fused.logits) < 1e-6
        for a, r in zip(out.hidden_states, fused.hidden_states, strict=True):
            assert rel_err(a, r) < 1e-6
        a, r = out.layer_info[HYBRID_LAYER], fused.layer_info[HYBRID_LAYER]
        np.testing.assert_array_equal(np.asarray(a["expert_indices"]), np.asarray(r["expert_indices"]))
        assert np.asarray(r["expert_indices"]).max() >= CONFIG["num_local_experts"]
        for name in r["results"]:
            np.testing.assert_array_equal(np.asarray(a["selected"][name]), np.asarray(r["selected"][name]))
            np.testing.assert_allclose(np.asarray(a["results"][name]), np.asarray(r["results"][name]), rtol=1e-5)
