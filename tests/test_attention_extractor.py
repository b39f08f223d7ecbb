"""The attention-pooled extractor: its math against float64, the store's token states, training it beside
the mean-pooled probe, and the hybrid layer reading at a prompt's last token what it was trained on.

The end-to-end tests run on a tiny random gpt-oss checkpoint with a tokenizer trained on its CRE
prompts (tests/scenario_inputs.py), on the 8-device CPU mesh of conftest.py.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from comparisons import rel_err
from flax import nnx
from scenario_inputs import write_scenario_checkpoint

from hmoe_jax import formulas, from_pretrained, make_mesh
from hmoe_jax.checkpoint.tokenizer import load_tokenizer
from hmoe_jax.data import features
from hmoe_jax.data.features import StoreError, scenario_prompts
from hmoe_jax.data.prompts import tokenize
from hmoe_jax.hybrid import artifacts
from hmoe_jax.hybrid.attention import (
    KEY_NORM_EPS,
    QUERY,
    attention_probe_apply,
    causal_attention_pool,
    token_mask,
)
from hmoe_jax.hybrid.inference import hybrid_predictions, make_hybrid_from_run
from hmoe_jax.hybrid.layer import HybridConfig, HybridMoE
from hmoe_jax.hybrid.probe import probe_apply, probe_init
from hmoe_jax.model.config import GptOssConfig
from hmoe_jax.model.layers import MoE
from hmoe_jax.runtime.options import RunOptions
from hmoe_jax.training import probes as probe_training
from hmoe_jax.training.precompute import precompute_features
from train.probes_cli import main as probes_main

LAYER = 1
BATCH = 8
N_PROMPTS = 24
RUN_ARGS = ["--experts", "ltv", "--epochs", "3", "--folds", "2", "--seeds", "1", "--checkpoint-every", "3"]
# float32 against float32 computed another way (pool-then-matmul vs matmul-then-pool, padded vs alone).
FP32_REL = 1e-5


def read_array(path):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return np.asarray(ts.open(spec).result().read().result())


# ------------------------------------------------------------------ the math, against float64


def reference_forward(params, states, counts):
    """numpy float64, prompt by prompt, only each prompt's real tokens: RMS-normed keys, scores
    q.k/sqrt(H), softmax, weighted sum of the raw states, then Linear SiLU Linear SiLU Linear."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out = []
    for x, n in zip(np.asarray(states, np.float64), counts):
        real = x[:n]
        keys = real / np.sqrt(np.mean(real ** 2, axis=-1, keepdims=True) + KEY_NORM_EPS)
        scores = keys @ p[QUERY] / np.sqrt(real.shape[-1])
        w = np.exp(scores - scores.max())
        pooled = (w / w.sum()) @ real
        silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
        h = silu(pooled @ p["w1"] + p["b1"])
        h = silu(h @ p["w2"] + p["b2"])
        out.append(h @ p["w3"] + p["b3"])
    return np.stack(out)


def small_problem(seed=0, hidden=6, length=7, counts=(7, 4, 1)):
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v, np.float64) for k, v in probe_init(jax.random.key(seed), hidden, (16, 8)).items()}
    params[QUERY] = 2.0 * rng.standard_normal(hidden)
    states = rng.standard_normal((len(counts), length, hidden))
    counts = np.asarray(counts)
    states[np.arange(length)[None, :] >= counts[:, None]] = 0.0  # stored token states are zero-padded
    return params, states, counts


def test_attention_extractor_forward_and_gradient_match_float64():
    """Forward and gradient (query, MLP, token states) of the float32 extractor against float64: the
    jax float64 forward equals an independent numpy reference, its gradient equals central differences
    of that reference, and float32 stays within fp32 error of both."""
    params, states, counts = small_problem()
    cotangent = np.random.default_rng(1).standard_normal((len(counts), 1))

    def loss(p, x, dtype):
        mask = token_mask(jnp.asarray(counts), x.shape[1])
        return jnp.sum(attention_probe_apply(p, x, mask) * jnp.asarray(cotangent, dtype))

    ref = reference_forward(params, states, counts)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(states, jnp.float64)
        out64 = np.asarray(attention_probe_apply(p64, x64, token_mask(jnp.asarray(counts), states.shape[1])))
        grads64 = jax.grad(loss, argnums=(0, 1))(p64, x64, jnp.float64)
        grads64 = jax.tree.map(np.asarray, grads64)
    assert rel_err(out64, ref) < 1e-12

    def numeric(f, a, index, eps=1e-6):
        up, down = a.copy(), a.copy()
        up[index] += eps
        down[index] -= eps
        return (f(up) - f(down)) / (2 * eps)

    scalar = lambda p, x: float(np.sum(reference_forward(p, x, counts) * cotangent))  # noqa: E731
    rng = np.random.default_rng(2)
    for name in (QUERY, "w1", "b1", "w3"):
        for _ in range(3):
            index = tuple(rng.integers(0, s) for s in params[name].shape)
            fd = numeric(lambda v: scalar({**params, name: v}, states), params[name], index)
            assert abs(grads64[0][name][index] - fd) <= 1e-6 * max(1.0, abs(fd)), (name, index)
    for index in ((0, 2, 3), (1, 3, 0), (2, 0, 5)):  # real tokens of each prompt
        fd = numeric(lambda v: scalar(params, v), states, index)
        assert abs(grads64[1][index] - fd) <= 1e-6 * max(1.0, abs(fd)), index
    np.testing.assert_array_equal(grads64[1][1, 4:], 0.0)  # padding gets no gradient

    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x32 = jnp.asarray(states, jnp.float32)
    out32 = attention_probe_apply(p32, x32, token_mask(jnp.asarray(counts), states.shape[1]))
    assert rel_err(out32, ref) < FP32_REL
    grads32 = jax.grad(loss, argnums=(0, 1))(p32, x32, jnp.float32)
    for name in params:
        assert rel_err(grads32[0][name], grads64[0][name]) < 1e-4, name
    assert rel_err(grads32[1], grads64[1]) < 1e-4


def test_a_zero_query_is_the_mean_pooled_probe():
    """Training starts from q = 0, where the weights are uniform: the mean extractor's probe on the
    prompt's mean (what mean.zarr holds)."""
    params, states, counts = small_problem(seed=3)
    params[QUERY] = np.zeros_like(params[QUERY])
    means = np.stack([x[:n].mean(0) for x, n in zip(states, counts)])
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    ours = attention_probe_apply(p32, jnp.asarray(states, jnp.float32), token_mask(jnp.asarray(counts), 7))
    assert rel_err(ours, probe_apply(p32, jnp.asarray(means, jnp.float32))) < FP32_REL


def test_causal_attention_pool_is_a_softmax_over_the_real_tokens_up_to_each_position():
    """The online-softmax scan against a dense float64 softmax per position, with scores far beyond
    exp's float32 range (no underflow to 0/0) and left padding (zero before the first real token)."""
    rng = np.random.default_rng(4)
    b, t, p, k = 2, 9, 3, 4
    scores = 150.0 * rng.standard_normal((b, t, p))
    values = rng.standard_normal((b, t, p, k))
    mask = np.zeros((b, t), bool)
    mask[0, :] = True
    mask[1, 3:] = True
    ours = np.asarray(causal_attention_pool(jnp.asarray(scores, jnp.float32), jnp.asarray(values, jnp.float32),
                                            jnp.asarray(mask)))
    ref = np.zeros((b, t, p, k))
    for i in range(b):
        for j in range(t):
            real = np.flatnonzero(mask[i, :j + 1])
            if real.size:
                s = scores[i, real]  # [s, p]
                w = np.exp(s - s.max(0))
                ref[i, j] = np.einsum("sp,spk->pk", w / w.sum(0), values[i, real])
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours[1, :3], 0.0)
    assert rel_err(ours, ref) < FP32_REL


def attention_probes(hidden, args, members, seed):
    """Random probes with random (non-zero) queries, {argument: params [members, ...]}."""
    out = {}
    for a, arg in enumerate(args):
        keys = jax.random.split(jax.random.key(seed + a), members)
        params = jax.vmap(lambda key: probe_init(key, hidden))(keys)
        params[QUERY] = 3.0 * jax.random.normal(jax.random.key(100 + seed + a), (members, hidden))
        out[arg] = params
    return out


def test_hybrid_layer_attention_at_each_position_is_the_extractor_on_the_tokens_so_far():
    """The layer pools inside the model, after the probes' first matmul, causally; the training path
    pools the stored (left-aligned) token states, then runs the MLP. At every real position t of a
    left-padded batch the layer's outputs equal each member's extractor on the prompt's tokens up to
    t; at the last token, on the whole prompt. Mean probes are refused for an attention layer and
    attention probes for a mean one."""
    from hmoe_jax.checkpoint import synthetic

    options = RunOptions(dtype="float32", param_dtype="float32").resolved()
    moe = MoE(GptOssConfig.from_dict(synthetic.tiny_config()), options, rngs=nnx.Rngs(0))
    hidden, members = 64, 2
    config = HybridConfig(layers=(LAYER,), experts=("ltv",), ensemble_size=members, extraction_input="attention")
    layer = HybridMoE(moe, config, rngs=nnx.Rngs(0))
    args = formulas.get_expert("ltv").arg_names
    probes = attention_probes(hidden, args, members, seed=5)
    layer.load_probes("ltv", probes)

    rng = np.random.default_rng(6)
    lengths, length = (10, 6, 1), 10
    x = rng.standard_normal((len(lengths), length, hidden)).astype(np.float32)
    mask = np.arange(length)[None, :] >= (length - np.asarray(lengths))[:, None]
    x[~mask] = 7.0  # padding must not matter
    outputs = np.asarray(layer.probe_outputs(jnp.asarray(x), jnp.asarray(mask)))
    outputs = outputs.reshape(len(lengths), length, len(args), members)
    for row, n in enumerate(lengths):
        for t in (length - 1, length - 1 - (n - 1) // 2):  # the last token, and one midway
            tokens = x[row, length - n:t + 1]
            for a, arg in enumerate(args):
                for m in range(members):
                    member = jax.tree.map(lambda v: v[m], probes[arg])
                    ref = attention_probe_apply(member, jnp.asarray(tokens), jnp.ones(len(tokens), bool))
                    assert rel_err(outputs[row, t, a, m], ref) < FP32_REL, (row, t, arg, m)

    mean_probes = {arg: {k: v for k, v in p.items() if k != QUERY} for arg, p in probes.items()}
    with pytest.raises(ValueError, match="has no attention query"):
        layer.load_probes("ltv", mean_probes)
    mean_layer = HybridMoE(moe, HybridConfig(layers=(LAYER,), experts=("ltv",), ensemble_size=members),
                           rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="carries an attention query"):
        mean_layer.load_probes("ltv", probes)
    with pytest.raises(ValueError, match="probe_outputs"):
        layer.compute_experts(jnp.zeros((2, hidden)))


def test_training_starts_both_extractors_at_the_same_function():
    """Same seed, same MLP, zero query: at step 0 the attention extractor's scores on token states are
    the mean extractor's on their means, member for member."""
    rng = np.random.default_rng(7)
    counts = rng.integers(1, 9, 40)
    states = rng.standard_normal((40, 8, 16)).astype(np.float32)
    states[np.arange(8)[None, :] >= counts[:, None]] = 0.0
    means = np.stack([s[:n].mean(0) for s, n in zip(states, counts)])
    task = probe_training.Task(("ltv", "loan"), np.arange(40), means[:, 0] * 2 + 1)
    protocol = probe_training.Protocol(folds=2, seeds=2, epochs=1)
    ensemble = probe_training.build_ensemble([task], protocol, member_multiple=8)
    mesh = make_mesh()
    mean = probe_training.EnsembleTrainer(means, ensemble, protocol, mesh)
    attend = probe_training.EnsembleTrainer(probe_training.TokenStates(states, counts), ensemble, protocol, mesh)
    p_mean, p_attend = mean.init_state()["params"], attend.init_state()["params"]
    for name in p_mean:
        np.testing.assert_array_equal(np.asarray(p_mean[name]), np.asarray(p_attend[name]))
    np.testing.assert_array_equal(np.asarray(p_attend[QUERY]), 0.0)
    for part, scores in mean.scores(p_mean).items():
        np.testing.assert_allclose(attend.scores(p_attend)[part], scores, atol=1e-5)


# ------------------------------------------------------------------ store, training and the hybrid model


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = write_scenario_checkpoint(tmp_path_factory.mktemp("attention"), n_train=N_PROMPTS)
    store = precompute_features(root / "ckpt", scenario_prompts(root / "data" / "train.json"), [LAYER],
                                root / "store", mesh=make_mesh(), batch_size=BATCH, token_states=True)
    return root, store


def test_precompute_stores_each_tokens_hidden_state_and_resumes_to_the_same_bytes(scenario, tmp_path):
    """tokens.zarr holds, left-aligned, hidden_states[layer] of a forward of each prompt alone
    (output_hidden_states=True), zero past its tokens, and its mean is mean.zarr; a run whose done
    flags were lost for some rows redoes exactly those and ends with the same bytes."""
    root, store = scenario
    assert store.has_token_states and store.metadata["poolings"] == ["mean", "last", "tokens"]
    states, counts = store.token_states(LAYER)
    assert states.shape == (N_PROMPTS, max(counts), 64)
    model = from_pretrained(root / "ckpt")
    tokens = tokenize(load_tokenizer(root / "ckpt"), scenario_prompts(root / "data" / "train.json").prompts,
                      model.config.vocab_size)
    shortest, longest = int(np.argmin(counts)), int(np.argmax(counts))
    for row in (shortest, longest):
        ids = tokens[row][None]
        hidden = np.asarray(model(ids, output_hidden_states=True).hidden_states[LAYER][0])
        n = counts[row]
        assert n == ids.shape[1]
        assert rel_err(states[row, :n], hidden) < FP32_REL
        np.testing.assert_array_equal(states[row, n:], 0.0)
    pooled = np.stack([s[:n].mean(0) for s, n in zip(states, counts)])
    assert rel_err(pooled, store.features(LAYER, "mean")) < FP32_REL

    resumed = tmp_path / "store"
    shutil.copytree(store.path, resumed)
    meta = json.loads((resumed / features.METADATA_FILE).read_text())
    (resumed / features.METADATA_FILE).write_text(json.dumps({**meta, "complete": False}))
    partial = features.FeatureStore.open(resumed)
    lost = np.arange(5, 14)  # across two batches
    partial._array(features.DONE_ARRAY)[lost].write(np.zeros(len(lost), np.uint8)).result()
    partial._array("tokens.zarr")[lost].write(np.zeros((len(lost), 1, *states.shape[1:]), np.float32)).result()
    precompute_features(root / "ckpt", scenario_prompts(root / "data" / "train.json"), [LAYER], resumed,
                        mesh=make_mesh(), batch_size=BATCH, token_states=True)
    for name in ("mean.zarr", "last.zarr", "tokens.zarr", features.DONE_ARRAY):
        np.testing.assert_array_equal(read_array(resumed / name), read_array(store.path / name))
    # Token states or not are different jobs: refused, the store untouched.
    with pytest.raises(StoreError, match="poolings"):
        precompute_features(root / "ckpt", scenario_prompts(root / "data" / "train.json"), [LAYER], resumed,
                            mesh=make_mesh(), batch_size=BATCH)


@pytest.fixture(scope="module")
def compared(scenario):
    root, store = scenario
    out = root / "compare"
    assert probes_main(["--store", str(store.path), "--out", str(out), "--extractor", "both", *RUN_ARGS]) == 0
    return store, out


def test_both_extractors_train_on_the_same_folds_and_report_one_table(compared):
    store, out = compared
    mean, attend = (json.loads((out / e / probe_training.RESULTS_FILE).read_text()) for e in ("mean", "attention"))
    assert mean["members"] == attend["members"]
    for task in ("ltv/loan", "ltv/value", "ltv/output"):
        assert mean["tasks"][task]["scenarios"] == attend["tasks"][task]["scenarios"]
        assert f"| {task} |" in (out / probe_training.COMPARISON_FILE).read_text()
    assert mean["extractor"] == {"kind": "mean"} and attend["extractor"]["kind"] == "attention"
    record = json.loads((out / "attention" / artifacts.PROBES_FILE).read_text())
    assert record["extractor"]["kind"] == "attention" and record["identity"]["pooling"] == "tokens"
    assert artifacts.probe_run_extractor(out / "mean") == "mean"
    # The saved probes (query included) reproduce the attention run's reported test scores.
    probes = artifacts.load_probes(out / "attention")
    states, counts = store.token_states(LAYER)
    protocol = probe_training.Protocol(folds=2, seeds=1, epochs=3)
    for task in probe_training.probe_tasks(store, formulas_domain(), ("ltv",)):
        params = probes[task.key]
        assert params[QUERY].shape == (2, 64)
        for k, split in enumerate(probe_training.split_task(task, protocol)):
            rows = task.rows[split["test"]]
            fold = jax.tree.map(lambda p: p[k], params)
            pred = np.asarray(attention_probe_apply(fold, states[rows], token_mask(counts[rows], states.shape[1])))
            r2 = probe_training.r2_score(task.targets[split["test"]], pred[:, 0])
            assert r2 == pytest.approx(attend["tasks"][task.name]["honest"]["per_fold"][k], abs=1e-5)


def formulas_domain():
    from hmoe_jax.domains import load_domain

    return load_domain("cre")


def test_hybrid_model_from_an_attention_run_reads_at_the_last_token_what_the_probes_were_trained_on(scenario,
                                                                                                 compared):
    """make_hybrid_from_run picks the attention extraction from probes.json; the model's own forward,
    left-padded in batches, extracts at each prompt's last token the median over fold probes of the
    extractor applied to the store's token states: with the trained queries, and with large random
    ones put into both the model and the probes (so the attention is sharp, not near-uniform)."""
    root, store = scenario
    _, out = compared
    run = out / "attention"
    model = make_hybrid_from_run(from_pretrained(root / "ckpt"), run)
    layer = model.layers[LAYER].mlp
    assert layer.config.extraction_input == "attention" and layer.config.ensemble_size == 2
    prompts = scenario_prompts(root / "data" / "train.json").prompts
    states, counts = store.token_states(LAYER)
    probes = artifacts.extraction_probes(run)["ltv"]
    scalings = artifacts.probe_run_scalings(run)
    args = formulas.get_expert("ltv").arg_names

    def expected(probe_set):
        out = []
        for arg in args:
            raw = jax.vmap(attention_probe_apply, (0, None, None))(
                probe_set[arg], states, token_mask(counts, states.shape[1]))[..., 0]
            out.append(np.median(np.asarray(scalings[("ltv", arg)].decode(raw)), axis=0))
        return np.stack(out, -1)

    tokenizer = load_tokenizer(root / "ckpt")
    ours = hybrid_predictions(model, LAYER, tokenizer, prompts, batch_size=BATCH)["arguments"]["ltv"]
    assert rel_err(ours, expected(probes)) < 1e-4

    sharp = {arg: {**p, QUERY: 4.0 * jax.random.normal(jax.random.key(i), p[QUERY].shape)}
             for i, (arg, p) in enumerate(probes.items())}
    layer.load_probes("ltv", sharp)
    ours = hybrid_predictions(model, LAYER, tokenizer, prompts, batch_size=BATCH)["arguments"]["ltv"]
    assert rel_err(ours, expected(sharp)) < 1e-4


def test_attention_on_a_store_without_token_states_is_refused_naming_the_flag(scenario, tmp_path, capsys):
    root, _ = scenario
    pooled_only = features.create_store(tmp_path / "pooled", features.store_metadata(
        scenario_prompts(root / "data" / "train.json"), root / "ckpt", [LAYER], 64, [3] * N_PROMPTS,
        dtype="float32", batch_size=BATCH, bucket=32))
    zeros = np.zeros((N_PROMPTS, 1, 64), np.float32)
    pooled_only.write_batch(np.arange(N_PROMPTS), zeros, zeros)
    pooled_only.mark_complete()
    for extractor in ("attention", "both"):
        out = tmp_path / extractor
        assert probes_main(["--store", str(pooled_only.path), "--out", str(out), "--extractor", extractor,
                            *RUN_ARGS]) == 2
        err = capsys.readouterr().err
        assert "no per-token hidden states" in err and "--token-states" in err, err
        assert not out.exists()
