"""Probe training: the protocol, the one-program ensemble, parity with PyTorch, resuming, refusals.

Feature stores here are synthetic (scenarios from the data set generator, features a noisy linear
mix of their sign-log amounts), so the tests exercise training, not a model. Runs use 8 CPU devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from comparisons import rel_err

from hmoe_jax import formulas, make_mesh
from hmoe_jax.data import features as precompute
from hmoe_jax.domains import domain_origin, load_domain
from hmoe_jax.domains.cre import generator as cre_generator
from hmoe_jax.hybrid import artifacts
from hmoe_jax.hybrid.probe import decode, encode, probe_apply
from hmoe_jax.training import probes as probe_training
from hmoe_jax.training.probes import Protocol, Task, build_ensemble, split_task
from train.probes_cli import main as probes_main
from train.router_cli import main as router_main

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 64  # the tiny gpt-oss config's hidden size, so trained probes fit its hybrid layer
LAYER = 1
RUN_ARGS = ["--experts", "ltv", "--epochs", "8", "--folds", "2", "--seeds", "2", "--checkpoint-every", "1"]
# float32 training of the same member two ways (different programs, batching, device counts).
SAME_MEMBER_REL = 1e-5
CRE = load_domain("cre")


def write_store(path, n, *, kind="scenarios", seed=0, fingerprint="0123456789abcdef", shift=0.0, nan_row=None):
    """A complete feature store of `n` generated scenarios (or negatives) with informative features."""
    scenarios = cre_generator.generate_scenarios(n, seed, 0)
    truth = np.asarray([[s["financials"]["noi"], s["financials"]["loan_amount"], s["financials"]["purchase_price"],
                         s["ground_truth"]["annual_debt_service"], s["ground_truth"]["dscr"], s["ground_truth"]["ltv"],
                         s["ground_truth"]["cap_rate"], s["ground_truth"]["debt_yield"]] for s in scenarios])
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((truth.shape[1], HIDDEN)) / np.sqrt(truth.shape[1])
    features = (np.asarray(encode(truth)) @ mix + 0.01 * rng.standard_normal((n, HIDDEN)) + shift).astype(np.float32)
    if nan_row is not None:
        features[nan_row, 3] = np.nan
    if kind == "scenarios":
        prompts = precompute.PromptSet(kind, [s["id"] for s in scenarios], [s["input_prompt"] for s in scenarios],
                                       precompute.record_targets(CRE, scenarios), "synthetic", "0" * 64,
                                       domain_origin(CRE))
    else:
        prompts = precompute.PromptSet(kind, [f"neg_{i:04d}" for i in range(n)], ["?"] * n, None, "synthetic", "1" * 64,
                                       domain_origin(CRE))
    meta = precompute.store_metadata(prompts, path / "model", [LAYER], HIDDEN, [1] * n, dtype="float32",
                                     batch_size=8, bucket=32, fingerprint=fingerprint)
    store = precompute.create_store(path, meta)
    store.write_batch(np.arange(n), features[:, None], features[:, None])
    store.mark_complete()
    return store


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    store = write_store(root / "store", 48)
    assert probes_main(["--store", str(store.path), "--out", str(root / "run"), *RUN_ARGS]) == 0
    return store, root / "run"


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_folds_are_the_reference_permutation_and_splits_are_disjoint():
    folds = probe_training.fold_test_positions(23, 5, 42)
    np.random.seed(42)
    reference = np.random.permutation(23)
    assert [len(f) for f in folds] == [4, 4, 4, 4, 7]  # the last fold takes the remainder
    np.testing.assert_array_equal(np.concatenate(folds), reference)
    task = Task(("ltv", "loan"), np.arange(100, 123), np.zeros(23, np.float32))
    for split in split_task(task, Protocol(folds=5)):
        parts = [set(split[p]) for p in ("train", "validation", "test")]
        assert sum(map(len, parts)) == 23 and len(set.union(*parts)) == 23
        assert len(split["validation"]) == 2  # 10% of the 19 training scenarios, rounded


def _torch_probe_loop(initial: dict[str, np.ndarray], epochs: int):
    """The reference's probe (16 -> 512 -> 128 -> 1, SiLU) from our initial weights, its AdamW and its
    per-epoch cosine schedule."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.SiLU(), torch.nn.Linear(512, 128), torch.nn.SiLU(),
                                torch.nn.Linear(128, 1))
    with torch.no_grad():
        for i, layer in enumerate((model[0], model[2], model[4])):
            layer.weight.copy_(torch.from_numpy(initial[f"w{i + 1}"].T))
            layer.bias.copy_(torch.from_numpy(initial[f"b{i + 1}"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def test_one_member_matches_the_pytorch_reference_loop():
    """Full-batch epochs (36 rows, batch 64) make the shuffle irrelevant, dropout 0 makes the forward
    deterministic: then five epochs of our program and of the reference's PyTorch loop (AdamW,
    CosineAnnealingLR stepped per epoch, HuberLoss) must give the same probe and the same losses. The
    reference trains on raw features and targets: `standardize=False`."""
    import torch

    rng = np.random.default_rng(0)
    features = rng.standard_normal((80, 16)).astype(np.float32)
    targets = (features[:, :3].sum(1) + 10.0).astype(np.float32)
    task = Task(("ltv", "loan"), np.arange(80), targets)
    protocol = Protocol(folds=2, seeds=1, epochs=5, dropout=(0.0, 0.0), standardize=False)
    ensemble = build_ensemble([task], protocol, member_multiple=8, folds=[0])
    trainer = probe_training.EnsembleTrainer(features, ensemble, protocol, make_mesh())
    state = trainer.init_state()
    initial = {k: np.asarray(v[0]) for k, v in state["params"].items()}
    state = trainer.train(state, 0, protocol.epochs)
    ours = {k: np.asarray(v[0]) for k, v in state["params"].items()}

    rows = ensemble.train_rows[0, :ensemble.train_count[0]]
    x, y = torch.from_numpy(features[rows]), torch.from_numpy(targets[rows])
    model, optimizer, schedule = _torch_probe_loop(initial, protocol.epochs)
    losses = []
    for _ in range(protocol.epochs):
        optimizer.zero_grad()
        loss = torch.nn.HuberLoss(delta=1.0)(model(x).squeeze(-1), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for i, layer in enumerate((model[0], model[2], model[4])):
        assert rel_err(ours[f"w{i + 1}"], layer.weight.detach().numpy().T) < SAME_MEMBER_REL
        assert rel_err(ours[f"b{i + 1}"], layer.bias.detach().numpy()) < SAME_MEMBER_REL
    assert rel_err(np.asarray(state["train_loss"][0]), losses) < SAME_MEMBER_REL


def test_standardized_training_is_the_reference_loop_on_standardized_data_saved_as_a_raw_probe():
    """`standardize` (the default): a member equals the PyTorch loop run on its training rows'
    standardized features and targets (numpy's mean and std), and the probe it saves, applied to raw
    features, gives the standardized probe's prediction mapped back to raw units."""
    import torch

    rng = np.random.default_rng(3)
    features = (rng.standard_normal((80, 16)) * rng.uniform(0.1, 30, 16) + rng.uniform(-50, 50, 16)).astype(np.float32)
    targets = (features[:, :3].sum(1) * 0.01 + 15.0).astype(np.float32)
    protocol = Protocol(folds=2, seeds=1, epochs=5, dropout=(0.0, 0.0))
    ensemble = build_ensemble([Task(("ltv", "loan"), np.arange(80), targets)], protocol, member_multiple=8,
                              folds=[0])
    trainer = probe_training.EnsembleTrainer(features, ensemble, protocol, make_mesh())
    state = trainer.init_state()
    initial = {k: np.asarray(v[0]) for k, v in state["params"].items()}
    state = trainer.train(state, 0, protocol.epochs)

    rows = ensemble.train_rows[0, :ensemble.train_count[0]]
    x_raw, y_raw = features[rows].astype(np.float64), targets[rows].astype(np.float64)
    x_mean, x_std, y_mean, y_std = x_raw.mean(0), x_raw.std(0), y_raw.mean(), y_raw.std()
    x = torch.from_numpy(((x_raw - x_mean) / x_std).astype(np.float32))
    model, optimizer, schedule = _torch_probe_loop(initial, protocol.epochs)
    y = torch.from_numpy(y_raw.astype(np.float32))
    for _ in range(protocol.epochs):  # the loss in raw units: y_mean + y_std * f(x')
        optimizer.zero_grad()
        torch.nn.HuberLoss(delta=1.0)(float(y_mean) + float(y_std) * model(x).squeeze(-1), y).backward()
        optimizer.step()
        schedule.step()
    ours = {k: np.asarray(v[0]) for k, v in state["params"].items()}
    # The same function rounded another way in float32 ((x - mean) / std @ w1 against x @ (w1 / std) + ...),
    # which Adam's normalised steps carry into the weights at ~1e-4; unstandardized they differ at O(1).
    for i, layer in enumerate((model[0], model[2], model[4])):
        assert rel_err(ours[f"w{i + 1}"], layer.weight.detach().numpy().T) < 1e-3
    saved = {k: np.asarray(v[0], np.float64) for k, v in trainer.saved_params(state["params"]).items()}
    raw = features[:20].astype(np.float64)
    with torch.no_grad():
        expected = y_mean + y_std * model(torch.from_numpy(((raw - x_mean) / x_std).astype(np.float32))).numpy()[:, 0]
    silu = lambda h: h / (1 + np.exp(-h))  # noqa: E731
    got = (silu(silu(raw @ saved["w1"] + saved["b1"]) @ saved["w2"] + saved["b2"]) @ saved["w3"] + saved["b3"])[:, 0]
    assert rel_err(got, expected) < 1e-4


def test_a_member_trains_the_same_alone_on_one_device_as_in_a_sharded_ensemble():
    """vmap must not mix members and sharding must not change them: member (task 1, fold 1, seed 1)
    of a 2 x 2 x 2 ensemble on 8 devices equals that member trained alone on one device (several
    shuffled minibatches per epoch, dropout on)."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal((90, 16)).astype(np.float32)
    tasks = [Task(("ltv", "loan"), np.arange(0, 80), features[:80, 0] * 2 + 5),
             Task(("ltv", "value"), np.arange(10, 90), features[10:, 1] - 3)]
    protocol = Protocol(folds=2, seeds=2, epochs=3, batch_size=8)

    def train(task_list, mesh, folds):
        ensemble = build_ensemble(task_list, protocol, member_multiple=mesh.shape["data"], folds=folds)
        trainer = probe_training.EnsembleTrainer(features, ensemble, protocol, mesh)
        return ensemble, trainer.train(trainer.init_state(), 0, protocol.epochs)["params"]

    ensemble, together = train(tasks, make_mesh(), None)
    member = next(i for i, m in enumerate(ensemble.members) if (m.task, m.fold, m.seed) == (1, 1, 1))
    alone_ensemble, alone = train([tasks[1]], make_mesh(devices=jax.devices()[:1]), [1])
    alone_member = next(i for i, m in enumerate(alone_ensemble.members) if m.seed == 1)
    for name in together:
        assert rel_err(together[name][member], alone[name][alone_member]) < SAME_MEMBER_REL, name


def test_run_writes_table_curves_results_and_probes(finished_run):
    _, run = finished_run
    table = (run / "r2.md").read_text()
    for task in ("ltv/loan", "ltv/value", "ltv/output"):
        assert f"| {task} |" in table
    assert "honest" in table and "optimistic (the reference's protocol)" in table
    results = json.loads((run / probe_training.RESULTS_FILE).read_text())
    for entry in results["tasks"].values():
        assert len(entry["honest"]["per_fold"]) == 2
        # The reference's rule picks the best test score, so it can only be higher.
        assert all(o >= h for o, h in zip(entry["optimistic"]["per_fold"], entry["honest"]["per_fold"]))
    assert (run / "curves.png").stat().st_size > 10_000


def test_loaded_probes_reproduce_the_reported_test_scores(finished_run):
    """The orbax checkpoint holds, per task, each fold's selected probe (fold-stacked): applied to
    that fold's held-out scenarios they give exactly the R^2 of the table."""
    store, run = finished_run
    probes = artifacts.load_probes(run)
    assert set(probes) == {("ltv", "loan"), ("ltv", "value"), ("ltv", "output")}
    results = json.loads((run / probe_training.RESULTS_FILE).read_text())
    features = store.features(LAYER)
    protocol = Protocol(folds=2, seeds=2, epochs=8)
    for task in probe_training.probe_tasks(store, CRE, ("ltv",)):
        params = probes[task.key]
        assert params["w1"].shape == (2, HIDDEN, 512)
        for k, split in enumerate(split_task(task, protocol)):
            fold = jax.tree.map(lambda p: p[k], params)
            pred = np.asarray(probe_apply(fold, features[task.rows[split["test"]]]))[:, 0]
            r2 = probe_training.r2_score(task.targets[split["test"]], pred)
            assert r2 == pytest.approx(results["tasks"][task.name]["honest"]["per_fold"][k], abs=1e-5)


def test_extraction_probes_load_into_the_hybrid_layer(finished_run):
    """The hybrid layer's extraction MLPs, loaded with a run's probes, compute the paper's inference:
    the median over fold probes of the decoded outputs."""
    from flax import nnx

    from hmoe_jax import GptOssConfig, hybrid
    from hmoe_jax.checkpoint import synthetic
    from hmoe_jax.model.layers import MoE
    from hmoe_jax.runtime.options import RunOptions

    store, run = finished_run
    options = RunOptions(dtype="float32", param_dtype="float32").resolved()
    moe = MoE(GptOssConfig.from_dict(synthetic.tiny_config()), options, rngs=nnx.Rngs(0))
    layer = hybrid.HybridMoE(moe, hybrid.HybridConfig(layers=(LAYER,), experts=("ltv",), ensemble_size=2),
                             rngs=nnx.Rngs(0))
    for expert, probes in artifacts.extraction_probes(run).items():
        layer.load_probes(expert, probes)
    features = store.features(LAYER)[:6]
    arguments = np.asarray(layer.compute_experts(features)[0])
    probes = artifacts.load_probes(run)
    for i, arg in enumerate(formulas.get_expert("ltv").arg_names):
        outputs = jax.vmap(probe_apply, (0, None))(probes[("ltv", arg)], features)[..., 0]
        assert rel_err(arguments[:, i], np.median(np.asarray(decode(outputs)), axis=0)) < 1e-5


def test_killed_run_resumes_to_the_same_result(finished_run, tmp_path):
    """Kill the CLI after its second checkpoint; the same command resumes from it and ends with the
    results and probes of the uninterrupted run, bit for bit."""
    store, reference = finished_run
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "probes", "--store", str(store.path), "--out", str(out), *RUN_ARGS]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / probe_training.CHECKPOINT_DIR
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() else []
        if steps and max(steps) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / probe_training.RESULTS_FILE).exists(), "the kill should land before the end"

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    ours, theirs = (json.loads((p / probe_training.RESULTS_FILE).read_text()) for p in (out, reference))
    assert ours["tasks"] == theirs["tasks"] and ours["train_loss"] == theirs["train_loss"]
    a, b = artifacts.load_probes(out), artifacts.load_probes(reference)
    for key in a:
        for name in a[key]:
            np.testing.assert_array_equal(np.asarray(a[key][name]), np.asarray(b[key][name]))


def test_bad_inputs_are_refused_with_a_clear_error_and_nothing_written(finished_run, tmp_path, capsys):
    store, run = finished_run

    def refused(argv, message, main=probes_main):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err

    nan_store = write_store(tmp_path / "nan", 48, nan_row=5)
    refused(["--store", str(nan_store.path), "--out", str(tmp_path / "a"), *RUN_ARGS], "non-finite features")
    refused(["--store", str(store.path), "--out", str(tmp_path / "b"), "--experts", "ltv", "--folds", "60"],
            "empty fold")
    refused(["--store", str(store.path), "--out", str(tmp_path / "c"), "--layer", "5"], "not layer 5")
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    (other_model / "config.json").write_text("{}")
    refused(["--store", str(store.path), "--out", str(tmp_path / "d"), "--expect-model", str(other_model)],
            "holds features of model")
    off_schema = tmp_path / "off_schema"
    off_schema.mkdir()
    meta = json.loads((store.path / precompute.METADATA_FILE).read_text())
    (off_schema / precompute.METADATA_FILE).write_text(json.dumps({**meta, "version": 99}))
    refused(["--store", str(off_schema), "--out", str(tmp_path / "e")], "format version 99")
    assert not any((tmp_path / name).exists() for name in "abcde")

    # Resuming a run on features of another model: refused, the run untouched.
    before = snapshot(run)
    other = write_store(tmp_path / "other", 48, fingerprint="fedcba9876543210")
    refused(["--store", str(other.path), "--out", str(run), *RUN_ARGS], "holds another probe run")
    assert snapshot(run) == before


def test_router_classifier_separates_cre_prompts_from_negatives(tmp_path, monkeypatch):
    write_store(tmp_path / "pos", 60, seed=1)
    write_store(tmp_path / "neg", 30, kind="router_negatives", seed=2, shift=1.5)
    run = tmp_path / "router"
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert router_main(["--store", "pos", "--negatives", "neg", "--out", "router",
                        "--epochs", "30", "--folds", "2", "--seeds", "1", "--checkpoint-every", "30"]) == 0
    results = json.loads((run / probe_training.RESULTS_FILE).read_text())
    assert results["metric"] == "balanced_accuracy"
    assert results["tasks"]["router/asks_for_a_metric"]["honest"]["mean"] > 0.9
    assert "balanced accuracy" in (run / "accuracy.md").read_text()
    assert set(artifacts.load_probes(run)) == {probe_training.ROUTER_TASK}
