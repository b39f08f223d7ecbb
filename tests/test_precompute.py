"""Hidden-state precompute: padding invariance, the store's contents, resuming after a kill, refusals.

Every test runs on a tiny random gpt-oss checkpoint written by `transformers` with a BPE tokenizer
trained on the test prompts beside it, on the 8-device CPU mesh of conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from comparisons import rel_err
from scenario_inputs import write_scenario_checkpoint

from hmoe_jax import formulas, from_pretrained, make_mesh
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.location import checkpoint_fingerprint
from hmoe_jax.checkpoint.tokenizer import load_tokenizer
from hmoe_jax.data import features
from hmoe_jax.data.features import StoreError, router_negative_prompts, scenario_prompts
from hmoe_jax.data.prompts import bucket_length, left_pad, length_sorted_batches, tokenize
from hmoe_jax.domains.cre.negatives import NEGATIVE_PROMPTS
from hmoe_jax.runtime.options import RunOptions
from hmoe_jax.training.precompute import pooled_features, precompute_features
from train.precompute_cli import main as precompute_main

REPO = Path(__file__).resolve().parents[1]
# fp32 throughout: the bound for a prompt's features padded vs alone.
PADDING_REL = 1e-5
LAYERS = [1, 2]
BATCH = 8
N_PROMPTS = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_scenario_checkpoint(tmp_path_factory.mktemp("precompute"), n_train=N_PROMPTS,
                                               extra_texts=tuple(NEGATIVE_PROMPTS))


@pytest.fixture(scope="module")
def store(checkpoint):
    """An uninterrupted run, in this process."""
    return precompute_features(
        checkpoint / "ckpt", scenario_prompts(checkpoint / "data" / "train.json"), LAYERS,
        checkpoint / "store", mesh=make_mesh(), batch_size=BATCH)


def read_array(path):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return np.asarray(ts.open(spec).result().read().result())


def test_features_from_padded_batches_equal_each_prompt_alone(checkpoint, store):
    """The reference saw batched caching corrupt features; ours must not. Each prompt's stored features
    (computed left-padded in a batch of 8, sharded over 8 devices) equal a forward of that prompt
    alone, unpadded, within 1e-5 relative."""
    model = from_pretrained(checkpoint / "ckpt")
    tokens = tokenize(load_tokenizer(checkpoint / "ckpt"),
                                 scenario_prompts(checkpoint / "data" / "train.json").prompts,
                      synthetic.tiny_config()["vocab_size"])
    # The most padded prompt of every other batch (each alone is one compile, so not all of them).
    padding = {}
    for rows in length_sorted_batches(store.metadata["token_counts"], BATCH)[::2]:
        length = bucket_length(max(tokens[r].size for r in rows), store.metadata["bucket"])
        row = min(rows, key=lambda r: tokens[r].size)
        padding[int(row)] = length - tokens[row].size
    assert max(padding.values()) >= 16, "the test needs heavily padded prompts"
    stored = {pooling: read_array(store.path / f"{pooling}.zarr") for pooling in ("mean", "last")}
    for row in padding:
        ids = tokens[row][None]
        alone = dict(zip(("mean", "last"), pooled_features(model, ids, np.ones_like(ids), LAYERS)))
        for pooling in ("mean", "last"):
            err = rel_err(stored[pooling][row], alone[pooling][0])
            assert err < PADDING_REL, (f"prompt {row} ({padding[row]} pads) {pooling}: padded vs alone differ by "
                                       f"{err:.3g}")


def test_store_records_ids_targets_model_and_layers(checkpoint, store):
    scenarios = json.loads((checkpoint / "data" / "train.json").read_text())
    meta = json.loads((store.path / features.METADATA_FILE).read_text())
    assert meta["complete"] and meta["layers"] == LAYERS
    assert meta["scenario_ids"] == [s["id"] for s in scenarios]
    assert meta["model_fingerprint"] == checkpoint_fingerprint(checkpoint / "ckpt")
    for i, s in enumerate(scenarios):
        markers = {m["expert"]: m for m in s["computation_markers"]}
        # The domain's experts (CRE's four); annual_debt_service and noi_projection markers are not its targets.
        assert set(meta["targets"]) == {"dscr", "ltv", "cap_rate", "debt_yield"}
        for expert, args in ((e, formulas.get_expert(e).arg_names) for e in meta["targets"]):
            marker = markers.get(expert)
            assert meta["targets"][expert]["output"][i] == (marker["output"] if marker else None)
            for arg in args:
                assert meta["targets"][expert][arg][i] == (marker["inputs"][arg] if marker else None)
    assert store.features(2, "mean").shape == (N_PROMPTS, synthetic.tiny_config()["hidden_size"])
    assert store.features(2).dtype == np.float32


def test_killed_run_resumes_to_the_same_store(checkpoint, store, tmp_path):
    """Kill a CLI run after some batches are stored; the same command finishes the store, and it
    holds exactly the bytes of the uninterrupted run (same batches, same program)."""
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "train", "precompute", "--model", str(checkpoint / "ckpt"),
           "--data", str(checkpoint / "data" / "train.json"), "--layer", *map(str, LAYERS),
           "--out", str(out), "--batch-size", str(BATCH)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = 0
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / features.DONE_ARRAY / "zarr.json").exists():
            done = int(read_array(out / features.DONE_ARRAY).sum())
            if done:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < done < N_PROMPTS, f"the kill should land part-way (done={done})"
    assert not json.loads((out / features.METADATA_FILE).read_text())["complete"]

    finished = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    for name in ("mean.zarr", "last.zarr", features.DONE_ARRAY):
        np.testing.assert_array_equal(read_array(out / name), read_array(store.path / name))
    resumed, uninterrupted = (json.loads((p / features.METADATA_FILE).read_text()) for p in (out, store.path))
    without_source = [{k: v for k, v in meta.items() if k != "source"} for meta in (resumed, uninterrupted)]
    assert without_source[0] == without_source[1]


def test_progress_counts_prompts_and_tokens(checkpoint, store, tmp_path):
    events = []

    class Record:
        def start(self, *totals):
            events.append(("start", *totals))

        def advance(self, prompts, tokens):
            events.append(("advance", prompts, tokens))

    negatives = router_negative_prompts()
    few = dataclasses.replace(negatives, ids=negatives.ids[:20], prompts=negatives.prompts[:20])
    precompute_features(checkpoint / "ckpt", few, [2], tmp_path / "neg", mesh=make_mesh(), batch_size=BATCH,
                                   progress=Record())
    meta = json.loads((tmp_path / "neg" / features.METADATA_FILE).read_text())
    total_tokens = sum(meta["token_counts"])
    assert events[0] == ("start", 20, total_tokens, 0, 0)
    assert sum(e[1] for e in events[1:]) == 20
    assert sum(e[2] for e in events[1:]) == total_tokens
    assert meta["kind"] == "router_negatives" and meta["targets"] is None


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_a_different_job_into_an_existing_store_is_refused_untouched(checkpoint, store, tmp_path):
    before = snapshot(store.path)
    mesh = make_mesh()
    prompts = scenario_prompts(checkpoint / "data" / "train.json")
    with pytest.raises(StoreError, match="layers"):
        precompute_features(checkpoint / "ckpt", prompts, [1], store.path, mesh=mesh, batch_size=BATCH)
    other = synthetic.write_hf_checkpoint(tmp_path / "other", synthetic.tiny_config(), seed=7)
    (other / "tokenizer.json").write_bytes((checkpoint / "ckpt" / "tokenizer.json").read_bytes())
    with pytest.raises(StoreError, match="model_fingerprint"):
        precompute_features(other, prompts, LAYERS, store.path, mesh=mesh, batch_size=BATCH)
    assert snapshot(store.path) == before


def test_data_file_off_schema_is_refused_before_any_store_exists(checkpoint, tmp_path, capsys):
    scenarios = json.loads((checkpoint / "data" / "train.json").read_text())
    del scenarios[3]["computation_markers"][0]["inputs"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(scenarios))
    rc = precompute_main(["--model", str(checkpoint / "ckpt"), "--data", str(bad), "--layer", "2",
                          "--out", str(tmp_path / "store")])
    assert rc == 2
    assert "cre_00003" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_batches_group_similar_lengths_and_pad_to_buckets():
    counts = [5, 40, 7, 33, 6, 90]
    batches = length_sorted_batches(counts, 2)
    assert [list(b) for b in batches] == [[0, 4], [2, 3], [1, 5]]
    assert [bucket_length(n, 32) for n in (1, 32, 33, 90)] == [32, 32, 64, 96]
    ids, mask = left_pad([np.array([7, 8]), np.array([9])], 4, 3, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 0, 7, 8], [0, 0, 0, 9], [0, 0, 7, 8]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]])


def test_tokenizer_beside_the_checkpoint_reads_as_transformers_reads_it(checkpoint):
    from transformers import AutoTokenizer

    prompts = scenario_prompts(checkpoint / "data" / "train.json").prompts[:5]
    ours = tokenize(load_tokenizer(checkpoint / "ckpt"), prompts, synthetic.tiny_config()["vocab_size"])
    theirs = AutoTokenizer.from_pretrained(checkpoint / "ckpt")(prompts)["input_ids"]
    assert [list(t) for t in ours] == theirs


def test_packed_experts_bf16_storage_and_layerwise_give_the_same_features(tmp_path_factory):
    """The 20b path (MXFP4 kept packed, bf16 storage, fp32 compute, only the needed layers loaded),
    with the blocks jitted as one program or one by one, stores the features of the plain fp32 path,
    on a bf16 MXFP4 checkpoint like gpt-oss's."""
    root = write_scenario_checkpoint(tmp_path_factory.mktemp("packed"), n_train=16,
                                               config=synthetic.tiny_config(num_hidden_layers=3),
                                               experts="mxfp4", dtype="bfloat16", seed=4)
    prompts = scenario_prompts(root / "data" / "train.json")
    # Layer 3 is the last: its state is final-normed, which the layerwise path must do too.
    plain = precompute_features(root / "ckpt", prompts, [1, 3], root / "plain", mesh=make_mesh(), batch_size=BATCH,
                                options=RunOptions(experts="dense", param_dtype="float32"))
    packed = precompute_features(root / "ckpt", prompts, [1, 3], root / "packed", mesh=make_mesh(),
                                 batch_size=BATCH, options=RunOptions(experts="packed", param_dtype="bfloat16"))
    layerwise = precompute_features(root / "ckpt", prompts, [1, 3], root / "layerwise", mesh=make_mesh(),
                                    batch_size=BATCH, options=RunOptions(experts="packed", param_dtype="bfloat16",
                                                                         execution="layerwise"))
    for pooling in features.POOLINGS:
        a = read_array(root / "plain" / f"{pooling}.zarr")
        for other in ("packed", "layerwise"):
            assert rel_err(read_array(root / other / f"{pooling}.zarr"), a) < 1e-6, (other, pooling)
    assert plain.metadata["model_fingerprint"] == packed.metadata["model_fingerprint"]
    assert layerwise.metadata == packed.metadata
