"""`python -m eval parity`: the streaming, layer-by-layer check a user runs on their own checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch

import hmoe_jax
from eval.parity_cli import main as parity_main
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.convert import convert_checkpoint
from hmoe_jax.checkpoint.weight_source import WeightSource
from hmoe_jax.evaluation import parity


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = synthetic.tiny_config(num_hidden_layers=3)
    return synthetic.write_hf_checkpoint(tmp_path_factory.mktemp("parity_hf"), cfg, experts="mxfp4", seed=3)


def prompts(n=3, t=20, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (n, t))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0  # right padding, as the command tokenizes
    return np.where(mask == 1, ids, 0), mask


def test_parity_passes_on_an_hf_mxfp4_checkpoint_and_writes_readable_reports(hf_dir, tmp_path, monkeypatch):
    """Paths as a user types them: the model relative to the working directory, the report under `~`."""
    monkeypatch.chdir(hf_dir.parent)
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "report"
    assert parity_main(["--model", hf_dir.name, "--n-prompts", "3", "--out", "~/report"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and len(report["layers"]) == 3
    assert all(layer["residual_rel"] < 1e-5 and layer["router_agreement"] == 1.0 for layer in report["layers"])
    assert all(0 < layer["residual_abs"] < 1e-4 and 0 < layer["drift_abs"] < 1e-4 for layer in report["layers"])
    assert 0 < report["logits_abs"] < 1e-4
    assert report["top1"] == 1.0 and report["logits_rel"] < 1e-5
    assert "| layer |" in (out / "parity.md").read_text() and "max abs err" in (out / "parity.md").read_text()
    assert (out / "parity.png").read_bytes()[:4] == b"\x89PNG"


def test_streaming_result_equals_the_whole_model_result(hf_dir):
    ids, mask = prompts()
    report = parity.check_parity(hf_dir, ids, mask)
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    whole_ours = hmoe_jax.from_pretrained(hf_dir)(ids, attention_mask=mask, position_ids=positions)
    ref = synthetic.load_torch_reference(hf_dir)
    with torch.no_grad():
        whole_ref = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions)).logits.double().numpy()
    real = mask.astype(bool)
    ours = np.asarray(whole_ours.logits, np.float64)[real]
    # Streaming feeds the same computations layer by layer: the same logits error to float32 noise.
    assert report.logits_rel == pytest.approx(parity.rel_err(ours, whole_ref[real]), abs=2e-7)
    # ...and its last layer's drift is our whole forward's last hidden state error before the norm.
    assert report.layers[-1].drift_rel < 1e-5


def test_a_corrupted_weight_in_a_converted_copy_fails_and_is_named(hf_dir, tmp_path):

    corrupt_src = tmp_path / "corrupt_src"
    shutil.copytree(hf_dir, corrupt_src)
    from safetensors.torch import load_file, save_file

    f = corrupt_src / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.1.self_attn.o_proj.weight"
    tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])
    save_file(tensors, str(f), metadata={"format": "pt"})
    converted = tmp_path / "converted"
    convert_checkpoint(corrupt_src, converted)
    out = tmp_path / "report"
    code = parity_main(["--model", str(converted), "--source", str(hf_dir), "--n-prompts", "2", "--out", str(out)])
    assert code == 1
    report = json.loads((out / "parity.json").read_text())
    assert not report["passed"]
    assert report["layers"][0]["residual_rel"] < 1e-5  # layer 0 is intact
    failure = report["failures"][0]
    assert failure.startswith("layer 1:") and "layers/1/self_attn/o_proj" in failure
    assert "attention" in failure


def test_converted_checkpoint_paired_with_its_source_passes(hf_dir, tmp_path):
    converted = tmp_path / "converted"
    convert_checkpoint(hf_dir, converted, keep_mxfp4=True)
    ids, mask = prompts(seed=1)
    report = parity.check_parity(converted, ids, mask, source=hf_dir, layers=(1, 3))
    assert report.passed, report.failures
    assert [r.layer for r in report.layers] == [1, 2]


def test_bad_arguments_give_clear_errors(hf_dir, tmp_path, capsys):
    assert parity_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    converted = tmp_path / "conv"
    convert_checkpoint(hf_dir, converted)
    assert parity_main(["--model", str(converted), "--out", str(tmp_path / "o")]) == 2
    assert "needs an HF checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parity_main(["--model", str(hf_dir), "--layers", "x"])


def test_vocabulary_chunks_and_rows_equal_the_whole_tensor(hf_dir, tmp_path):
    """The lm_head is applied in vocabulary chunks and the embedding gathered row by row, so a 20b's
    2.3 GB matrices never sit whole in memory: slices must equal the whole tensor, both layouts."""
    import jax.numpy as jnp

    converted = tmp_path / "converted"
    convert_checkpoint(hf_dir, converted)
    from flax import nnx

    from hmoe_jax.model.transformer import EmbeddingAndHead

    cfg = parity.config_of(hf_dir)
    head = embed = nnx.eval_shape(lambda: EmbeddingAndHead(cfg, parity._storage_options("float32", False),
                                                           rngs=nnx.Rngs(0)))
    for path in (hf_dir, converted):
        source = WeightSource(path, cfg, jnp.float32)
        whole_head = source.params("", head)["lm_head"]
        chunks = list(source.vocab_chunks("lm_head", head, 7))
        assert [c[0] for c in chunks] == list(range(0, cfg.vocab_size, 7))
        np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks], axis=1), whole_head)
        rows = np.array([0, 5, 6, 77, cfg.vocab_size - 1])
        np.testing.assert_array_equal(source.vocab_rows("embed_tokens", rows, embed),
                                      source.params("", embed)["embed_tokens"][rows])


def test_chunked_logits_equal_one_chunk(hf_dir, monkeypatch):
    ids, mask = prompts(seed=2)
    whole = parity.check_parity(hf_dir, ids, mask, layers=(2, 3))
    monkeypatch.setattr(parity, "UNEMBED_CHUNK", 11)
    chunked = parity.check_parity(hf_dir, ids, mask, layers=(2, 3))
    assert chunked.top1 == whole.top1
    # float32 noise of a differently blocked matmul, the same size either way
    assert max(chunked.logits_rel, whole.logits_rel) < 2e-6
    assert chunked.kl == pytest.approx(whole.kl, abs=1e-10)


def test_parity_prompts_come_from_a_file_or_the_eval_set(tmp_path):
    from hmoe_jax.evaluation.parity_prompts import parity_prompts

    (tmp_path / "p.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "p.txt").write_text("first\n\nsecond line\n")
    assert parity_prompts(tmp_path / "p.json") == ["one", "two"]
    assert parity_prompts(tmp_path / "p.txt") == ["first", "second line"]
    defaults = parity_prompts(n=3)
    assert len(defaults) == 3 and all(isinstance(p, str) and p for p in defaults)
    for bad in ('{"a": 1}', "[1, 2]", "[]", "\n"):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(ValueError, match="expected a JSON list of strings or one prompt per line"):
            parity_prompts(tmp_path / "bad")
