"""End-to-end training of the hybrid layer's router rows and projections (`hmoe_jax.training.hybrid`).

A tiny random checkpoint with its own tokenizer and a random (untrained but well-formed) probe run:
what is checked is the training machinery, not the quality of the probes.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hmoe_jax import formulas
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.tokenizer import load_tokenizer
from hmoe_jax.domains import load_domain, read_records
from hmoe_jax.domains.cre import generator as cre_generator
from hmoe_jax.hybrid import artifacts, probe
from hmoe_jax.hybrid.artifacts import PROBES_DIR, PROBES_FILE
from hmoe_jax.hybrid.inference import build_hybrid_model
from hmoe_jax.runtime.options import RunOptions
from hmoe_jax.training import hybrid as ht
from hmoe_jax.training.batches import Examples, encode_scenarios, epoch_batches, make_batch, negatives_batch
from hmoe_jax.training.checkpoints import CHECKPOINT_DIR

CRE = load_domain("cre")


def _records(path):
    return read_records(path)[0]


CONFIG = synthetic.tiny_config(vocab_size=512, hidden_size=64, num_hidden_layers=3)
LAYER = 1
FOLDS = 2
REPO = Path(__file__).resolve().parents[1]
# Small and fast: 8 training scenarios, batches of 4 (2 steps an epoch), one length bucket of 256 tokens.
SETTINGS = ht.Settings(epochs=8, learning_rate=3e-2, batch_size=4, router_weight=1.0, bucket=256, checkpoint_every=2)


def write_random_probe_run(run_dir: Path, hidden: int, layer: int, seed: int = 0) -> Path:
    """A probe run directory as `train probes` writes it, with random probes whose outputs sit near
    sign-log 13 (raw arguments ~ 4e5), so every formula sees positive, plausible arguments."""
    key = jax.random.key(seed)
    tree, names = {}, []
    for expert in ("dscr", "ltv", "cap_rate", "debt_yield"):
        for arg in formulas.get_expert(expert).arg_names:
            key, sub = jax.random.split(key)
            members = [probe.probe_init(k, hidden, probe.PROBE_HIDDEN) for k in jax.random.split(sub, FOLDS)]
            params = {n: np.stack([np.asarray(m[n]) for m in members]) for n in members[0]}
            params["b3"] = params["b3"] + 13.0 + 0.5 * len(names)
            tree.setdefault(expert, {})[arg] = params
            names.append([expert, arg])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((run_dir / PROBES_DIR).resolve(), tree)
    checkpointer.wait_until_finished()
    (run_dir / PROBES_FILE).write_text(json.dumps({
        "identity": {"layer": layer, "pooling": "mean", "model_path": "synthetic"}, "input_dim": hidden,
        "hidden": list(probe.PROBE_HIDDEN), "folds": FOLDS, "loss": "huber", "probes": names, "selected_seed": {}}))
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_training")
    train_json, eval_json = cre_generator.write_dataset(root / "data", n_train=8, n_eval=4)
    scenarios = _records(train_json) + _records(eval_json)
    ckpt = synthetic.write_hf_checkpoint(root / "ckpt", CONFIG, seed=7)
    synthetic.write_tokenizer(ckpt, [s["input_prompt"] for s in scenarios] + [CRE.answer_text(s) for s in scenarios],
                              CONFIG)
    probes = write_random_probe_run(root / "probes", CONFIG["hidden_size"], LAYER)
    return dict(root=root, ckpt=ckpt, probes=probes, train=train_json, eval=eval_json)


def build(setup):
    model, layer = build_hybrid_model(setup["ckpt"], setup["probes"])
    assert layer == LAYER
    return model


def snapshot(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.array(v[...]) for p, v in nnx.to_flat_state(state)}


def run(setup, out, settings=SETTINGS, **kwargs):
    """The library's run, evaluating the held-out answer loss only (the commands' full evaluation,
    with routing, formula scores and generation, is tested in the slow tests)."""
    model = build(setup)
    return model, ht.train_run(out, model, load_tokenizer(setup["ckpt"]), _records(setup["train"]),
                               _records(setup["eval"]), ["What is the capital of Peru?"] * 6, settings,
                               {"test": True}, domain=CRE, n_generate=0, full_evaluation=False, **kwargs)


# ------------------------------------------------------------------ pieces without a model


def test_answer_text_is_the_structured_format_and_parses_back_to_the_ground_truth():
    for s in cre_generator.generate_scenarios(40, 5, 0):
        text = CRE.answer_text(s)
        asked = CRE.asked(s)
        assert len(text.splitlines()) == len(asked) == (1 if s["complexity"] == 1 else 4)
        parsed = CRE.parse_answer(text)
        for m, v in parsed.items():
            assert (v == pytest.approx(s["ground_truth"][m])) if m in asked else math.isnan(v), (m, text)


def test_batches_are_bucketed_deterministic_and_mark_the_answer_tokens():
    ex = Examples([f"s{i}" for i in range(7)], [np.arange(1, 3 + i) for i in range(7)],
                  [np.full(2 + i % 2, 9) for i in range(7)], np.ones((7, 4), np.float32))
    plan = epoch_batches(ex.lengths, 3, 8, seed=1, epoch=0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(7))
    assert [b.tolist() for b in plan] == [b.tolist() for b in epoch_batches(ex.lengths, 3, 8, seed=1, epoch=0)]
    assert len(epoch_batches(ex.lengths, 3, 8, seed=1, epoch=1)) == len(plan)
    for rows in plan:  # one padded length per batch
        assert len({ht.bucket_length(int(n), 8) for n in ex.lengths[rows]}) == 1
    batch = make_batch(ex, np.array([6]), 2, 8, pad_id=0)
    p, a = ex.prompts[6], ex.answers[6]
    assert batch["ids"].shape == (2, 16) and batch["weight"].tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(batch["ids"][0, -len(p) - len(a):], np.concatenate([p, a]))
    assert batch["mask"][0].sum() == len(p) + len(a) and batch["answer"][0].sum() == len(a)
    assert batch["answer"][0, -len(a):].all() and batch["prompt_last"][0] == 16 - len(a) - 1


def test_block_by_block_gradient_equals_the_one_program_gradient(setup):
    """Layerwise execution (a full-size model on a CPU host) computes the objective block by block: the
    head's cotangent pulled back through each later block in a VJP program of its own, the hybrid
    block's VJP giving the trainable gradient. The loss, its terms and every gradient equal the one
    program's, to float32 summation order (1e-5 of each gradient's largest entry), with the
    deterministic experts routed (raised bias) so the answer loss reaches the projections."""
    model, _ = build_hybrid_model(setup["ckpt"], setup["probes"])
    rows = model.layers[LAYER].mlp.det_router
    rows.bias[...] = jnp.full(rows.bias.shape, 3.0, rows.bias.dtype)
    whole = ht.HybridTrainer(model, SETTINGS, total_steps=1)
    with model.using(execution="layerwise"):
        blockwise = ht.HybridTrainer(model, SETTINGS, total_steps=1)
    assert blockwise.objective.layerwise and not whole.objective.layerwise
    tok = load_tokenizer(setup["ckpt"])
    ex = encode_scenarios(CRE, tok, _records(setup["train"]), whole.experts, CONFIG["vocab_size"])
    batch = make_batch(ex, np.arange(4), 4, SETTINGS.bucket, 0)
    negatives = negatives_batch([np.array([5, 6, 7]), np.array([9, 3])], 0, 4, 8, 0, 0)
    params = whole.init_state()["params"]
    (loss, aux), grads = whole.loss_and_grad(params, batch, negatives)
    (loss_b, aux_b), grads_b = blockwise.loss_and_grad(params, batch, negatives)
    assert np.asarray(aux["selected"]).any()
    assert float(loss_b) == pytest.approx(float(loss), rel=1e-6)
    for key in ("answer_loss", "router_loss", "router_pos_bce"):
        assert float(aux_b[key]) == pytest.approx(float(aux[key]), rel=1e-6), key
    np.testing.assert_array_equal(np.asarray(aux_b["selected"]), np.asarray(aux["selected"]))
    ours, ref = snapshot(grads_b), snapshot(grads)
    assert set(ours) == set(ref)
    for name, g in ref.items():
        assert np.abs(g).max() > 0, name
        assert np.abs(ours[name] - g).max() <= 1e-5 * np.abs(g).max(), name
    # A step block by block: the same loss and gradient norm (Adam's first update is about sign(g) * lr,
    # so entries whose gradient is ~0 may move either way: the parameters are not compared).
    state = whole.init_state()
    _, aux_step, finite = whole.step(state, batch, negatives, 0)
    _, aux_step_b, finite_b = blockwise.step(state, batch, negatives, 0)
    assert finite and finite_b
    for key in ("loss", "grad_norm"):
        assert float(aux_step_b[key]) == pytest.approx(float(aux_step[key]), rel=1e-5), key


@pytest.mark.parametrize("bad, match", [
    (dict(epochs=0), "epochs"), (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(batch_size=0), "batch_size"), (dict(router_weight=-1.0), "router_weight"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ht.HybridTrainingError, match=match):
        ht.Settings(**bad)


# ------------------------------------------------------------------ training


def test_gradients_are_nonzero_and_match_finite_differences_in_float64(setup):
    """A float64 model (gpt-oss keeps its norms in float32, so activations are rounded there: 1%
    tolerance): d loss / d (an output scale, a projection weight, a router row bias), each the entry of
    its group with the largest gradient, against central differences. The router bias is raised so
    the deterministic experts are in the top-k (else the answer loss does not see them); the router
    bias step is small, since a routing decision flipping at some token makes the loss jump."""
    with jax.enable_x64(True):
        model, _ = build_hybrid_model(setup["ckpt"], setup["probes"],
                                      options=RunOptions(dtype="float64", param_dtype="float64"))
        rows = model.layers[LAYER].mlp.det_router
        rows.bias[...] = jnp.full(rows.bias.shape, 3.0, rows.bias.dtype)
        trainer = ht.HybridTrainer(model, SETTINGS, total_steps=1)
        tok = load_tokenizer(setup["ckpt"])
        ex = encode_scenarios(CRE, tok, _records(setup["train"]), trainer.experts, CONFIG["vocab_size"])
        batch = make_batch(ex, np.arange(4), 4, SETTINGS.bucket, 0)
        negatives = negatives_batch([np.array([5, 6, 7])], 0, 4, 8, 0, 0)
        params = trainer.init_state()["params"]
        (loss, aux), grads = trainer.loss_and_grad(params, batch, negatives)
        assert loss.dtype == jnp.float64
        assert params["layers"][LAYER]["mlp"]["projection"]["w3"][...].dtype == jnp.float64
        assert np.asarray(aux["selected"]).any()
        flat = snapshot(grads)
        assert all(np.abs(g).max() > 0 for g in flat.values()), {k: np.abs(g).max() for k, g in flat.items()}

        def loss_at(path, index, eps):
            p = jax.tree.map(lambda a: a, params)  # new Variables, same arrays
            node = p
            for k in path[:-1]:
                node = node[k]
            node[path[-1]][...] = node[path[-1]][...].at[index].add(eps)
            return float(trainer.loss_and_grad(p, batch, negatives)[0][0])

        base = ("layers", LAYER, "mlp")
        for path, eps in ((base + ("projection", "output_scale"), 1e-2), (base + ("projection", "w3"), 1e-2),
                          (base + ("det_router", "bias"), 1e-4)):
            g = flat["/".join(map(str, path))]
            index = np.unravel_index(np.argmax(np.abs(g)), g.shape)
            analytic = float(g[index])
            numeric = (loss_at(path, index, eps) - loss_at(path, index, -eps)) / (2 * eps)
            assert abs(analytic - numeric) <= 1e-2 * abs(analytic), (path, analytic, numeric)


def test_training_lowers_the_answer_loss_keeps_everything_else_bit_identical_and_resumes(setup, tmp_path):
    """Eight epochs on 8 scenarios: the training answer loss falls; gpt-oss and the extraction probes
    are bit-identical afterwards, every router row and projection moved; a run stopped after step 5
    (last checkpoint: step 4) and rerun ends with exactly the uninterrupted run's parameters."""
    model, result = run(setup, tmp_path / "a")
    curve = json.loads((tmp_path / "a" / ht.CURVE_FILE).read_text())
    n = len(curve["answer_loss"])
    assert n == result.summary["steps"] == 16
    first, last = np.mean(curve["answer_loss"][:2]), np.mean(curve["answer_loss"][-2:])  # first and last epoch
    assert last < first - 0.5, curve["answer_loss"]
    assert result.summary["after"]["answer_loss"] < result.summary["before"]["answer_loss"]

    fresh = build(setup)
    trained = build(setup)
    artifacts.load_hybrid_params(trained, tmp_path / "a")
    frozen_before, frozen_after = snapshot(nnx.state(fresh, nnx.Not(ht.TRAINABLE))), snapshot(
        nnx.state(trained, nnx.Not(ht.TRAINABLE)))
    assert frozen_before.keys() == frozen_after.keys() and any("extraction" in k for k in frozen_after)
    for k in frozen_before:
        np.testing.assert_array_equal(frozen_before[k], frozen_after[k], err_msg=k)
    # The model the run was given is untouched too.
    for k, v in snapshot(nnx.state(model, nnx.Not(ht.TRAINABLE))).items():
        np.testing.assert_array_equal(v, frozen_before[k], err_msg=k)
    moved_before, moved_after = snapshot(nnx.state(fresh, ht.TRAINABLE)), snapshot(nnx.state(trained, ht.TRAINABLE))
    unmoved = [k for k in moved_before if np.array_equal(moved_before[k], moved_after[k])]
    assert not unmoved, f"trainable params that did not move: {unmoved}"
    for k, v in snapshot(result.params).items():
        np.testing.assert_array_equal(v, moved_after[k])
    for name in (ht.REPORT_FILE, ht.SUMMARY_FILE, ht.CURVE_PLOT, artifacts.PARAMS_FILE):
        assert (tmp_path / "a" / name).is_file()
    assert "answer-token cross-entropy" in (tmp_path / "a" / ht.REPORT_FILE).read_text()

    class Killed(Exception):
        pass

    def kill_after_5(done, total, aux):
        if done == 5:
            raise Killed

    with pytest.raises(Killed):
        run(setup, tmp_path / "b", on_step=kill_after_5)
    assert not (tmp_path / "b" / artifacts.PARAMS_FILE).exists()
    messages = []
    _, resumed = run(setup, tmp_path / "b", log=messages.append)
    assert any("step-4 checkpoint" in m for m in messages)
    for k, v in snapshot(result.params).items():
        np.testing.assert_array_equal(snapshot(resumed.params)[k], v, err_msg=k)
    assert json.loads((tmp_path / "b" / ht.CURVE_FILE).read_text()) == curve


def test_non_finite_loss_stops_naming_the_step_and_writes_nothing_more(setup, tmp_path):
    settings = dataclasses.replace(SETTINGS, learning_rate=1e30, clip_norm=1e30)
    with pytest.raises(ht.HybridTrainingError, match=r"non-finite loss or gradient at step \d+ of 16"):
        run(setup, tmp_path / "nan", settings)
    assert not (tmp_path / "nan" / artifacts.PARAMS_FILE).exists() and not (tmp_path / "nan" / ht.SUMMARY_FILE).exists()


# ------------------------------------------------------------------ the commands


@pytest.mark.slow
def test_cli_trains_evaluates_before_and_after_and_eval_hybrid_loads_the_trained_params(setup, tmp_path, capsys,
                                                                                       monkeypatch):
    from eval import hybrid_cli
    from train import hybrid_cli as train_cli

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    argv = ["--model", os.path.relpath(setup["ckpt"]), "--probes", os.path.relpath(setup["probes"]), "--data",
            os.path.relpath(setup["train"]), "--out", "run", "--epochs", "8", "--lr", "3e-2", "--batch-size", "4",
            "--bucket", "256", "--checkpoint-every", "2", "--n-generate", "2"]
    assert train_cli.main(argv) == 0
    report = capsys.readouterr().out
    assert "answer-token cross-entropy" in report and "generated answer" in report and "routed to dscr" in report
    summary = json.loads((out / ht.SUMMARY_FILE).read_text())
    assert summary["steps"] == 16 and summary["after"]["generated"]["n"] == 2
    assert summary["after"]["answer_loss"] < summary["before"]["answer_loss"]
    assert summary["formula_predictions_unchanged"] is True
    # The router term learns: its training BCE falls over the 16 steps. (The held-out routed share is a
    # thresholded count over a few prompts, which 16 steps of batch 4 may or may not tip: it must not fall.)
    router_bce = json.loads((out / ht.CURVE_FILE).read_text())["router_loss"]
    assert np.mean(router_bce[-4:]) < np.mean(router_bce[:4])
    assert summary["after"]["routing"]["dscr"]["asked"] >= summary["before"]["routing"]["dscr"]["asked"]
    assert train_cli.main(argv[:-2] + ["--lr", "1e-3"]) == 2  # another run into the same --out
    assert "holds another hybrid training run" in capsys.readouterr().err

    results = tmp_path / "results"
    assert hybrid_cli.main(["--model", str(setup["ckpt"]), "--probes", str(setup["probes"]), "--data",
                            str(setup["eval"]), "--train", str(setup["train"]), "--out", str(results),
                            "--hybrid-params", str(out)]) == 0
    assert json.loads((results / "summary.json").read_text())["hybrid_params"] == str(out)
    assert "trained end to end" in (results / "report.md").read_text()


@pytest.mark.parametrize("case, match", [
    ("missing probes", "no trained probes"),
    ("empty data", "no records"),
    ("missing data", "no such data file"),
    ("bad lr", "learning_rate"),
])
def test_cli_refuses_bad_input_before_writing(setup, tmp_path, capsys, monkeypatch, case, match):
    from train import hybrid_cli as train_cli

    monkeypatch.chdir(tmp_path)  # every path relative to the working directory

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    args = {"--model": setup["ckpt"], "--probes": setup["probes"], "--data": setup["train"], "--eval": setup["eval"],
            "--out": tmp_path / "out"}
    extra = []
    if case == "missing probes":
        args["--probes"] = tmp_path / "nothing"
    elif case == "empty data":
        args["--data"] = empty
    elif case == "missing data":
        args["--data"] = tmp_path / "absent.json"
    else:
        extra = ["--lr", "-1"]
    argv = [x if x.startswith("--") else os.path.relpath(x, tmp_path) for kv in args.items() for x in map(str, kv)]
    assert train_cli.main(argv + extra) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hybrid_params_of_another_layer_are_refused(setup, tmp_path):
    model = build(setup)
    meta = tmp_path / artifacts.PARAMS_FILE
    meta.write_text(json.dumps({"layer": 0, "experts": [], "params": {}}))
    with pytest.raises(artifacts.ArtifactError, match="trained for layer 0"):
        artifacts.load_hybrid_params(model, tmp_path)
    with pytest.raises(artifacts.ArtifactError, match="did training finish"):
        artifacts.load_hybrid_params(model, tmp_path / "none")


@pytest.mark.slow
def test_a_killed_training_process_resumes_to_the_uninterrupted_params(setup, tmp_path):
    """SIGKILL a `python -m train hybrid` subprocess after its first checkpoint; the rerun resumes and
    its parameters equal an uninterrupted run's bit for bit."""
    import signal
    import time

    def argv(out):
        return [sys.executable, "-m", "train", "hybrid", "--model", str(setup["ckpt"]), "--probes",
                str(setup["probes"]), "--data", str(setup["train"]), "--out", str(out), "--epochs", "4",
                "--lr", "1e-2", "--batch-size", "4", "--bucket", "256", "--checkpoint-every", "1", "--n-generate", "0"]

    assert subprocess.run(argv(tmp_path / "a"), cwd=REPO, capture_output=True).returncode == 0
    proc = subprocess.Popen(argv(tmp_path / "b"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "b" / CHECKPOINT_DIR
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints.is_dir()
                                          and any(p.name.isdigit() for p in checkpoints.iterdir())):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / artifacts.PARAMS_FILE).exists(), "killed too late to test anything"
    done = subprocess.run(argv(tmp_path / "b"), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    a, b = build(setup), build(setup)
    artifacts.load_hybrid_params(a, tmp_path / "a")
    artifacts.load_hybrid_params(b, tmp_path / "b")
    sa, sb = snapshot(nnx.state(a, ht.TRAINABLE)), snapshot(nnx.state(b, ht.TRAINABLE))
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
