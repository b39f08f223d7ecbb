"""Training a gpt-oss language model from scratch (`hmoe_jax.training.lm`, `python -m train lm`).

A tiny config (2 layers, 4 experts, 320 ids) on two dozen CRE records, a few steps: what is checked
is the machinery (sequences, resumption, non-finite stops, the exported checkpoint), not the model's
quality. One length bucket of 320 tokens holds every sequence, so each run compiles its step once.
"""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.loading import from_pretrained
from hmoe_jax.domains import generate_records, load_domain
from hmoe_jax.training import lm

CRE = load_domain("cre")
CONFIG = synthetic.tiny_config()
SETTINGS = lm.LMSettings(steps=8, batch_size=4, learning_rate=1e-2, warmup_steps=1, checkpoint_every=2,
                         n_held_out=4, bucket=320)


def _records():
    records = generate_records(CRE, 24, seed=3)
    # A record that asks for no metric: its sequence is its prompt alone.
    return records + [{**records[0], "id": "no-question", "computation_markers": []}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    hf = lm.train_lm(out, CONFIG, _records(), CRE, SETTINGS, progress=False, log=lambda msg: None)
    return out, hf


def _weights(hf):
    return load_file(str(hf / "model.safetensors"))


def test_a_sequence_is_prompt_then_newline_answer_then_eos_and_padding_is_not_predicted(trained):
    out, _ = trained
    tokenizer = Tokenizer.from_file(str(out / lm.TOKENIZER_DIR / "tokenizer.json"))
    records = _records()
    corpus = lm.lm_corpus(CRE, records)
    assert corpus[0] == (records[0]["input_prompt"], CRE.answer_text(records[0])) and corpus[-1][1] is None
    eos = CONFIG["eos_token_id"]
    seqs = lm.encode_corpus(tokenizer, corpus, CONFIG["vocab_size"], eos)
    expected = tokenizer.encode(corpus[0][0]).ids + tokenizer.encode("\n" + corpus[0][1]).ids + [eos]
    assert seqs[0].tolist() == expected
    assert seqs[-1].tolist() == tokenizer.encode(records[-1]["input_prompt"]).ids + [eos]

    batch = lm.lm_batch(seqs, [0, 1, 2], 4, 320, pad_id=CONFIG["pad_token_id"])
    assert batch["ids"].shape == (4, 320) and batch["weight"].tolist() == [1, 1, 1, 0]
    n = len(seqs[0])
    # Left-padded: the first real token has padding as its input, so only the n - 1 after it are predicted.
    assert batch["mask"][0].sum() == n and batch["answer"][0].sum() == n - 1 and batch["answer"][0, -n] == 0


def test_training_lowers_the_loss_from_ln_vocab_and_transformers_loads_the_export(trained):
    """The untrained model's loss is a uniform guess's, ln(320) = 5.77 (the default init needs no
    correction); eight steps lower the training and held-out loss; transformers in fp32 computes our
    model's logits from hf/ to float32 rounding (measured ~2e-7; the bound leaves room for the
    different summation orders of two libraries)."""
    out, hf = trained
    curve = json.loads((out / lm.CURVE_FILE).read_text())
    assert len(curve["loss"]) == SETTINGS.steps
    assert abs(curve["loss"][0] - math.log(CONFIG["vocab_size"])) < 0.1, curve["loss"]
    assert np.mean(curve["loss"][-2:]) < curve["loss"][0] - 0.5, curve["loss"]
    held = curve["held_out"]
    assert [h["step"] for h in held] == [0, 2, 4, 6, 8]
    assert held[-1]["loss"] < held[0]["loss"] - 0.5 and held[-1]["accuracy"] > held[0]["accuracy"]
    report = (out / lm.REPORT_FILE).read_text()
    assert "tokens/s" in report and "held-out next-token loss" in report
    assert (out / lm.CURVE_PLOT).is_file()

    tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ids = np.asarray([tokenizer.encode(r["input_prompt"]).ids[:40] for r in _records()[:3]], np.int64)
    reference = synthetic.load_torch_reference(hf)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(from_pretrained(hf)(ids.astype(np.int32)).logits)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5)
    assert {"chat_template.jinja", "tokenizer_config.json"} <= {p.name for p in hf.iterdir()}


def test_a_killed_run_resumes_to_bit_identical_parameters_and_a_finished_run_is_reused(trained, tmp_path):
    out, hf = trained

    class Killed(Exception):
        pass

    def kill_after_5(done, total, aux):
        if done == 5:
            raise Killed

    run = tmp_path / "run"
    with pytest.raises(Killed):
        lm.train_lm(run, CONFIG, _records(), CRE, SETTINGS, progress=False, log=lambda msg: None,
                    on_step=kill_after_5)
    assert not (run / lm.HF_DIR).exists() and not (run / lm.REPORT_FILE).exists()
    messages = []
    lm.train_lm(run, CONFIG, _records(), CRE, SETTINGS, progress=False, log=messages.append)
    assert any("step-4 checkpoint" in m for m in messages), messages
    expected, resumed = _weights(hf), _weights(run / lm.HF_DIR)
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    resumed_curve, expected_curve = (json.loads((d / lm.CURVE_FILE).read_text()) for d in (run, out))
    del resumed_curve["seconds"], expected_curve["seconds"]  # wall-clock time: the one thing that may differ
    assert resumed_curve == expected_curve

    messages.clear()
    assert lm.train_lm(run, CONFIG, _records(), CRE, SETTINGS, progress=False, log=messages.append) == run / lm.HF_DIR
    assert any("already trained" in m for m in messages)
    with pytest.raises(lm.LMTrainingError, match="holds another language model training run"):
        lm.train_lm(run, CONFIG, _records(), CRE, dataclasses.replace(SETTINGS, seed=1), progress=False)


def test_a_non_finite_loss_stops_naming_the_step_and_writes_nothing_more(tmp_path):
    settings = dataclasses.replace(SETTINGS, steps=4, warmup_steps=0, learning_rate=1e30, clip_norm=1e30)
    with pytest.raises(lm.LMTrainingError, match=r"non-finite loss or gradient at step \d+ of 4"):
        lm.train_lm(tmp_path / "nan", CONFIG, _records(), CRE, settings, progress=False, log=lambda msg: None)
    for name in (lm.HF_DIR, lm.FLAX_DIR, lm.REPORT_FILE, lm.CURVE_FILE):
        assert not (tmp_path / "nan" / name).exists()


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"vocab_size": 100}, "needs vocab_size >="),
    ({"eos_token_id": None}, "eos_token_id is missing"),
])
def test_a_config_that_cannot_be_trained_is_refused_before_the_run_directory_exists(tmp_path, change, match):
    with pytest.raises(lm.LMTrainingError, match=match):
        lm.train_lm(tmp_path / "out", {**CONFIG, **change}, _records(), CRE, SETTINGS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_settings_and_record_counts_are_checked():
    with pytest.raises(lm.LMTrainingError, match="learning_rate"):
        lm.LMSettings(learning_rate=-1.0)
    with pytest.raises(lm.LMTrainingError, match="warmup_steps"):
        lm.LMSettings(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="record"):
        lm.train_lm("unused", CONFIG, [], CRE, lm.LMSettings(), progress=False)


def test_a_wider_demo_model_keeps_the_heads_and_grouping_and_is_checked():
    wide = lm.widened(256)
    assert (wide["hidden_size"], wide["intermediate_size"], wide["num_attention_heads"],
            wide["num_key_value_heads"], wide["head_dim"]) == (256, 256, 8, 4, 32)
    assert {k: v for k, v in wide.items() if k not in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads")} == {
        k: v for k, v in lm.DEFAULT_CONFIG.items() if k not in ("hidden_size", "intermediate_size",
                                                                "num_attention_heads", "num_key_value_heads")}
    assert lm.widened(128) == lm.DEFAULT_CONFIG
    for bad in (0, 96, -64):
        with pytest.raises(lm.LMTrainingError, match="multiple of 64"):
            lm.widened(bad)


def test_default_warmup_is_at_most_a_fifth_of_the_run():
    assert lm.LMSettings.warmup_steps == 50
    assert [lm.default_warmup(steps) for steps in (1, 4, 5, 100, 250, 251, 1500)] == [0, 0, 1, 20, 50, 50, 50]
    for steps in (1, 7, 300):
        lm.LMSettings(steps=steps, warmup_steps=lm.default_warmup(steps))  # always accepted


def test_config_from_changes_the_shape_and_derives_the_layer_types_again():
    assert lm.config_from({}) == lm.DEFAULT_CONFIG
    deeper = lm.config_from({"num_hidden_layers": 6, "hidden_size": 64})
    assert (deeper["num_hidden_layers"], deeper["hidden_size"]) == (6, 64)
    assert deeper["layer_types"] == synthetic.tiny_config(num_hidden_layers=6)["layer_types"]
    assert len(deeper["layer_types"]) == 6 and len(lm.DEFAULT_CONFIG["layer_types"]) == 4
    assert {k: v for k, v in deeper.items() if k not in ("num_hidden_layers", "hidden_size", "layer_types")} == {
        k: v for k, v in lm.DEFAULT_CONFIG.items() if k not in ("num_hidden_layers", "hidden_size", "layer_types")}
    with pytest.raises(lm.LMTrainingError, match="num_layers"):
        lm.config_from({"num_layers": 6})


def test_training_records_read_the_data_file_or_generate(tmp_path):
    from hmoe_jax.domains import write_records

    records, domain = lm.training_records(None, "circuits", 3, 5)
    assert domain.name == "circuits" and records == generate_records(domain, 3, 5)
    path = write_records(tmp_path / "train.json", _records()[:4], None)
    records, domain = lm.training_records(path, None, 0, 5)  # n_train is not used with a file
    assert domain.name == "cre" and [r["id"] for r in records] == [r["id"] for r in _records()[:4]]
    with pytest.raises(lm.LMTrainingError, match="--n-train must be positive, got 0"):
        lm.training_records(None, "circuits", 0, 5)


def test_the_demo_refuses_a_width_it_cannot_build(tmp_path, monkeypatch, capsys):
    from eval import demo_cli

    monkeypatch.chdir(tmp_path)
    assert demo_cli.main(["--out", "d", "--lm-hidden", "100"]) == 2
    assert "--lm-hidden" in capsys.readouterr().err and not (tmp_path / "d").exists()


# ------------------------------------------------------------------ the command


def test_help_ends_with_an_example(capsys):
    from train import lm_cli

    with pytest.raises(SystemExit) as exit_:
        lm_cli.main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("example: python -m train lm ")


@pytest.mark.parametrize("argv, match", [
    (["--domain", "no-such-domain"], "unknown domain"),
    (["--data", "absent.json"], "no such data file"),
    (["--lr", "-1"], "learning_rate"),
    (["--heads", "3"], "not a multiple of num_key_value_heads"),
    (["--n-train", "0"], "--n-train must be positive"),
])
def test_the_command_refuses_bad_input_before_writing(tmp_path, monkeypatch, capsys, argv, match):
    from train import lm_cli

    monkeypatch.chdir(tmp_path)
    assert lm_cli.main(["--out", "out", "--n-train", "8", *argv]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_trains_on_generated_records_with_relative_paths(tmp_path, monkeypatch, capsys):
    from train import lm_cli

    monkeypatch.chdir(tmp_path)
    shape = [x for flag, key, _ in lm_cli.SHAPE for x in (flag, str(CONFIG[key]))]
    argv = ["--out", os.path.join("runs", "lm"), "--domain", "circuits", "--n-train", "10", "--n-held-out", "2",
            "--steps", "2", "--warmup-steps", "1", "--batch-size", "4", "--bucket", "320", *shape]
    assert lm_cli.main(argv) == 0
    assert "Language model trained from scratch" in capsys.readouterr().out
    run = tmp_path / "runs" / "lm"
    assert (run / lm.HF_DIR / "config.json").is_file()
    assert json.loads((run / lm.RUN_FILE).read_text())["domain"]["name"] == "circuits"
