"""`python -m eval hybrid` and `python -m eval demo`: the integrated forward's predictions, reports."""

import json
import os

import numpy as np
import pytest

from eval import hybrid_cli
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.data.features import FeatureStore
from hmoe_jax.domains import read_records
from hmoe_jax.domains.cre import generator as cre_generator
from hmoe_jax.evaluation import hybrid as evaluation
from hmoe_jax.hybrid.inference import build_hybrid_model, hybrid_predictions
from train import precompute_cli, probes_cli

CONFIG = synthetic.tiny_config(vocab_size=320, hidden_size=64, num_hidden_layers=3)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny checkpoint with tokenizer, a small data set, features at layer 1 and briefly trained probes."""
    root = tmp_path_factory.mktemp("pipeline")
    train_json, eval_json = cre_generator.write_dataset(root / "data", n_train=240, n_eval=40)
    ckpt = synthetic.write_hf_checkpoint(root / "ckpt", CONFIG, seed=7)
    synthetic.write_tokenizer(ckpt, [s["input_prompt"] for s in json.loads(train_json.read_text())], CONFIG)
    stores = {split: root / f"features_{split}" for split in ("train", "eval")}
    run = root / "probes"
    cwd = os.getcwd()
    os.chdir(root)  # the commands get paths relative to the working directory, as a user types them
    try:
        for split in stores:
            assert precompute_cli.main(["--model", "ckpt", "--data", f"data/{split}.json", "--layer", "1",
                                        "--out", f"features_{split}"]) == 0
        assert probes_cli.main(["--store", "features_train", "--out", "probes", "--layer", "1", "--epochs", "3",
                                "--folds", "2", "--seeds", "1", "--no-direct"]) == 0
    finally:
        os.chdir(cwd)
    return dict(root=root, ckpt=ckpt, train=train_json, eval=eval_json, stores=stores, run=run)


def test_integrated_forward_equals_the_probe_ensemble_route(pipeline):
    """The hybrid layer's causal mean at the last token is the precompute's mean pool, its extraction
    is the fold-probe median, its formulas the registry's: both routes give the same predictions."""
    model, layer = build_hybrid_model(pipeline["ckpt"], pipeline["run"])
    assert layer == 1
    scenarios = read_records(pipeline["eval"])[0]
    from hmoe_jax.checkpoint.tokenizer import load_tokenizer

    integrated = hybrid_predictions(model, layer, load_tokenizer(pipeline["ckpt"]),
                                               [s["input_prompt"] for s in scenarios])["results"]
    features = FeatureStore.open(pipeline["stores"]["eval"]).features(1, "mean")
    separate = evaluation.probe_route_predictions(pipeline["run"], features)
    assert set(integrated) == set(separate) == {"dscr", "ltv", "cap_rate", "debt_yield"}
    for expert in integrated:
        # fp32 features from two programs (padding differs): ~1e-6 relative, amplified by expm1 and a ratio.
        np.testing.assert_allclose(integrated[expert], separate[expert], rtol=2e-4, err_msg=expert)


def test_layerwise_and_truncated_loading_give_the_same_predictions(pipeline):
    """`eval hybrid` loads blocks 0..layer only and may run them one by one: the predictions of the
    whole model's one-program forward, to float32 rounding."""
    from hmoe_jax.checkpoint.tokenizer import load_tokenizer

    prompts = [s["input_prompt"] for s in read_records(pipeline["eval"])[0]][:12]
    tokenizer = load_tokenizer(pipeline["ckpt"])
    whole, layer = build_hybrid_model(pipeline["ckpt"], pipeline["run"])
    truncated, _ = build_hybrid_model(pipeline["ckpt"], pipeline["run"], through_hybrid_layer=True)
    assert len(whole.layers) == CONFIG["num_hidden_layers"] and len(truncated.layers) == layer + 1
    reference = hybrid_predictions(whole, layer, tokenizer, prompts)
    for model, layerwise in ((truncated, False), (truncated, True), (whole, True)):
        with model.using(execution="layerwise" if layerwise else "program"):
            got = hybrid_predictions(model, layer, tokenizer, prompts)
        for part in ("results", "arguments", "selected"):
            assert set(got[part]) == set(reference[part])
            for name in reference[part]:
                np.testing.assert_allclose(got[part][name], reference[part][name], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{part}/{name}, layerwise={layerwise}")


def test_eval_hybrid_writes_summary_report_and_plots_and_refuses_to_overwrite(pipeline, capsys, monkeypatch):
    out = pipeline["root"] / "results"
    monkeypatch.chdir(pipeline["root"] / "data")  # relative paths from a directory below the inputs
    argv = ["--model", "../ckpt", "--probes", "../probes", "--data", "eval.json", "--train", "train.json",
            "--out", "../results"]
    assert hybrid_cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for protocol in ("reference", "honest"):
        for method in ("hybrid", "constant_median"):
            ltv = summary["scores"][protocol][method]["ltv"]
            assert set(ltv) >= {"n", "within_10", "within_20", "median_pct_error", "by_group"}
    assert summary["scores"]["reference"]["hybrid"]["dscr"]["n"] == 40
    assert summary["scores"]["honest"]["hybrid"]["dscr"]["n"] < 40
    report = (out / "report.md").read_text()
    assert "Honest protocol" in report and "constant median" in report
    assert (out / "error_distributions.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "summary.json").read_bytes()
    assert hybrid_cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    # The 20b-on-a-small-host options give the same scores.
    assert hybrid_cli.main(argv + ["--overwrite", "--layerwise", "--param-dtype", "float32"]) == 0
    layerwise = json.loads((out / "summary.json").read_text())
    options = layerwise["options"]
    assert options["execution"] == "layerwise" and options["param_dtype"] == "float32"
    assert layerwise["loaded_layers"] == 2
    for protocol in ("reference", "honest"):
        for metric, score in summary["scores"][protocol]["hybrid"].items():
            assert layerwise["scores"][protocol]["hybrid"][metric]["n"] == score["n"]
            np.testing.assert_allclose(layerwise["scores"][protocol]["hybrid"][metric]["median_pct_error"],
                                       score["median_pct_error"], rtol=1e-4, err_msg=metric)


def test_probes_of_another_hidden_size_are_refused(pipeline, tmp_path, capsys):
    other = synthetic.write_hf_checkpoint(tmp_path / "other", synthetic.tiny_config(hidden_size=32, vocab_size=320))
    (other / "tokenizer.json").write_bytes((pipeline["ckpt"] / "tokenizer.json").read_bytes())
    code = hybrid_cli.main(["--model", str(other), "--probes", str(pipeline["run"]), "--data", str(pipeline["eval"]),
                            "--out", str(tmp_path / "r")])
    assert code == 2
    assert "hidden size 32" in capsys.readouterr().err


def test_eval_file_with_unknown_experts_is_refused(pipeline, tmp_path, capsys):
    bad = json.loads(pipeline["eval"].read_text())
    bad[0]["computation_markers"][0]["expert"] = "irr"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    code = hybrid_cli.main(["--model", str(pipeline["ckpt"]), "--probes", str(pipeline["run"]), "--data", str(path),
                            "--out", str(tmp_path / "r")])
    assert code == 2
    assert "irr" in capsys.readouterr().err


def test_latency_command_reports_medians_and_speedups(pipeline, tmp_path, monkeypatch):
    from eval import latency_cli

    out = tmp_path / "lat"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(pipeline["root"]))
    assert latency_cli.main(["--model", "~/ckpt", "--n-prompts", "3", "--new-tokens", "8", "--out", "lat"]) == 0
    res = json.loads((out / "latency.json").read_text())
    assert len(res["jax_generate_s"]) == 3 and len(res["torch_generate_s"]) == 3
    assert res["hybrid_vs_generation_speedup"] > 0 and res["jax_vs_torch_generation"] > 0
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_baselines_command_generates_parses_and_scores(pipeline, tmp_path, capsys):
    from eval import baselines_cli

    out = tmp_path / "base"
    assert baselines_cli.main(["--model", str(pipeline["ckpt"]), "--data", str(pipeline["eval"]), "--n", "4",
                               "--new-tokens", "6", "--styles", "zeroshot", "structured", "--prompt-format", "raw",
                               "--out", str(out)]) == 0
    res = json.loads((out / "baselines.json").read_text())
    assert res["raw"]["zeroshot"]["reference"]["ltv"]["n"] == 4
    gens = json.loads((out / "generations.json").read_text())
    assert len(gens["raw"]["structured"]) == 4 and all(isinstance(g["text"], str) for g in gens["raw"]["structured"])
    # A written OUT is refused, before the model loads.
    assert baselines_cli.main(["--model", str(pipeline["ckpt"]), "--data", str(pipeline["eval"]),
                               "--out", str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    # The 20b-on-a-small-host options generate the same text.
    layerwise = tmp_path / "layerwise"
    assert baselines_cli.main(["--model", str(pipeline["ckpt"]), "--data", str(pipeline["eval"]), "--n", "4",
                               "--new-tokens", "6", "--styles", "zeroshot", "structured", "--prompt-format", "raw",
                               "--out", str(layerwise),
                               "--layerwise", "--param-dtype", "float32"]) == 0
    assert json.loads((layerwise / "generations.json").read_text()) == gens
