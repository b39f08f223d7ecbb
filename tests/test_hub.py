"""Checkpoints named by hub id, read offline from a cache laid out as `huggingface_hub` lays it out:
`models--ORG--NAME/refs/REF` holding a commit, `snapshots/COMMIT/...` the files. No download happens:
every test runs with HF_HUB_OFFLINE=1 and a cache of its own."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from original_layout import write_original_layout

import hmoe_jax
from convert.__main__ import main as convert_main
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.location import CheckpointError, checkpoint_fingerprint, resolve_checkpoint
from hmoe_jax.checkpoint.tokenizer import load_tokenizer

MAIN, V2 = "a" * 40, "b" * 40
IDS = np.arange(12, dtype=np.int32)[None] % 100


def _leaves(model):
    from flax import nnx

    return jax.tree.leaves(nnx.state(model))


def _cache_repo(cache, repo_id, files_by_commit, refs):
    """A cache entry: each commit's snapshot holds a copy of a folder, each ref names a commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in files_by_commit.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    main = synthetic.write_hf_checkpoint(root / "main", synthetic.tiny_config(), experts="mxfp4", seed=1)
    synthetic.write_tokenizer(main, ["DSCR 1.25 loan 7,500,000"], synthetic.tiny_config())
    v2 = synthetic.write_hf_checkpoint(root / "v2", synthetic.tiny_config(), experts="mxfp4", seed=2)
    original = write_original_layout(main, root / "original_only" / "original")
    return dict(root=root, main=main, v2=v2, original_only=original.parent)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, checkpoints):
    cache = tmp_path / "hub"
    _cache_repo(cache, "openai/gpt-oss-tiny", {MAIN: checkpoints["main"], V2: checkpoints["v2"]},
                {"main": MAIN, "v2": V2})
    _cache_repo(cache, "openai/gpt-oss-orig", {MAIN: checkpoints["original_only"]}, {"main": MAIN})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


def test_a_hub_id_loads_the_cached_snapshot(offline_cache, checkpoints):
    path = resolve_checkpoint("openai/gpt-oss-tiny")
    assert path == offline_cache / "models--openai--gpt-oss-tiny" / "snapshots" / MAIN
    from_hub = hmoe_jax.from_pretrained("openai/gpt-oss-tiny")
    local = hmoe_jax.from_pretrained(checkpoints["main"])
    for a, b in zip(_leaves(from_hub), _leaves(local)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_tokenizer("openai/gpt-oss-tiny").get_vocab_size() > 0
    assert checkpoint_fingerprint("openai/gpt-oss-tiny") == checkpoint_fingerprint(checkpoints["main"])


def test_a_revision_picks_its_snapshot_by_ref_or_commit(offline_cache, checkpoints):
    for revision in ("v2", V2):
        assert resolve_checkpoint("openai/gpt-oss-tiny", revision).name == V2
    v2 = hmoe_jax.from_pretrained("openai/gpt-oss-tiny", revision="v2")
    local = hmoe_jax.from_pretrained(checkpoints["v2"])
    np.testing.assert_array_equal(np.asarray(v2(IDS).logits), np.asarray(local(IDS).logits))
    with pytest.raises(CheckpointError, match="revision nope"):
        resolve_checkpoint("openai/gpt-oss-tiny", "nope")


def test_hf_home_places_the_cache_under_hub(tmp_path, monkeypatch, offline_cache):
    home = tmp_path / "home"
    home.mkdir()
    shutil.move(offline_cache, home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    snapshot = home / "hub" / "models--openai--gpt-oss-tiny" / "snapshots" / MAIN
    assert resolve_checkpoint("openai/gpt-oss-tiny") == snapshot


def test_the_original_subfolder(offline_cache, checkpoints):
    """A download of only `original/*`: named with or without the subfolder, it is OpenAI's layout."""
    sub = resolve_checkpoint("openai/gpt-oss-orig/original")
    assert sub.name == "original" and (sub / "model.safetensors").is_file()
    reference = hmoe_jax.from_pretrained(checkpoints["main"])(IDS).logits
    for name in ("openai/gpt-oss-orig/original", "openai/gpt-oss-orig"):
        np.testing.assert_allclose(np.asarray(hmoe_jax.from_pretrained(name)(IDS).logits), np.asarray(reference),
                                   rtol=0, atol=1e-5)


def test_convert_reads_a_hub_id_offline(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert convert_main(["openai/gpt-oss-tiny", "flax_tiny"]) == 0
    assert json.loads((tmp_path / "flax_tiny" / "config.json").read_text())["num_hidden_layers"] == 2
    np.testing.assert_array_equal(np.asarray(hmoe_jax.from_pretrained("flax_tiny")(IDS).logits),
                                  np.asarray(hmoe_jax.from_pretrained("openai/gpt-oss-tiny")(IDS).logits))


def test_an_empty_cache_names_the_repository_and_the_cache(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    with pytest.raises(CheckpointError) as e:
        hmoe_jax.from_pretrained("openai/gpt-oss-20b")
    message = str(e.value)
    assert "openai/gpt-oss-20b" in message and str(empty) in message and "HF_HUB_OFFLINE=1" in message
    monkeypatch.chdir(tmp_path)
    assert convert_main(["openai/gpt-oss-20b", "out"]) == 2
    err = capsys.readouterr().err
    assert "openai/gpt-oss-20b" in err and str(empty) in err
    assert not (tmp_path / "out").exists()


def test_local_paths_win_over_hub_ids(offline_cache, checkpoints, tmp_path, monkeypatch):
    """A relative path that exists is a path, even when it looks like ORG/NAME; one that does not, with a
    ./ prefix, is a missing path, not a hub lookup."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoints["main"], tmp_path / "openai" / "gpt-oss-tiny")
    assert resolve_checkpoint("openai/gpt-oss-tiny") == tmp_path / "openai" / "gpt-oss-tiny"
    with pytest.raises(FileNotFoundError):
        hmoe_jax.from_pretrained("./missing/ckpt")
    with pytest.raises(FileNotFoundError, match="applies to hub ids, not to local paths"):
        resolve_checkpoint("openai/gpt-oss-tiny", "v2")
    # A mistyped relative path that looks like a hub id: the error names the local path it is not, too.
    with pytest.raises(CheckpointError, match=f"no local path {tmp_path}/opneai/gpt-oss-tiny"):
        resolve_checkpoint("opneai/gpt-oss-tiny")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
