"""Multi-host runs: two local processes on 127.0.0.1 (gloo collectives, 4 CPU devices each) against
one process with 8 devices, on a tiny random gpt-oss checkpoint.

The commands are the real CLIs, started through tests/distributed_worker.py (which gives the feature
store 8 rows per chunk, so both processes own chunks of a small store). A 2-process precompute store
and 2-process trained probes must equal the single-process ones; the flags' refusals are checked
without starting any process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from scenario_inputs import write_scenario_checkpoint

from hmoe_jax.data import features as precompute
from hmoe_jax.hybrid import artifacts
from hmoe_jax.runtime import arguments, distributed
from hmoe_jax.training import probes as probe_training
from train import precompute_cli, probes_cli

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
ROWS_PER_CHUNK = 8
N_PROMPTS = 24  # 3 chunks of 8: process 0 owns chunks 0 and 2, process 1 chunk 1
LAYERS = ["1", "2"]
BATCH = "8"
# One padded length for every batch: one compile per process.
BUCKET = "256"
PROBE_ARGS = ["--layer", "1", "--experts", "ltv", "--epochs", "4", "--folds", "2", "--seeds", "2",
              "--checkpoint-every", "2"]
TIMEOUT_S = 240
GLOO_LINE = re.compile(r"\[Gloo\]|is connected to \d+ peer ranks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(module: str, args: list[str], n: int = 2, devices: int = 4) -> list[str]:
    """`module`'s CLI as `n` processes of one run; their stdouts. Any failure (or the timeout) kills
    every process and fails the test with each one's stderr."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               HMOE_TEST_ROWS_PER_CHUNK=str(ROWS_PER_CHUNK), TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen([sys.executable, str(WORKER), module, *args, "--coordinator-address", address,
                               "--num-processes", str(n), "--process-id", str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    deadline = time.time() + TIMEOUT_S
    try:
        while time.time() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                # One failed: give the others a moment to fail too, then stop them.
                time.sleep(3)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    if codes != [0] * n:
        report = "\n".join(f"--- process {i} (exit {code}) stderr:\n{err[-6000:]}"
                           for i, (code, (_, err)) in enumerate(zip(codes, outputs)))
        pytest.fail(f"{module} over {n} processes failed:\n{report}")
    # gloo reports its connections on stdout, one line per device from concurrent threads, so its lines
    # can interleave ("[Gloo] Rank [Gloo] Rank 4 ...\n5 is connected to 7 peer ranks ..."): drop every
    # line that holds either part; the rest is the command's.
    return ["".join(line for line in out.splitlines(keepends=True) if not GLOO_LINE.search(line))
            for out, _ in outputs]


def read_array(path):
    return np.asarray(ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
                      .read().result())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_scenario_checkpoint(tmp_path_factory.mktemp("distributed"), n_train=N_PROMPTS)


def precompute_args(root: Path, out: Path) -> list[str]:
    return ["--model", str(root / "ckpt"), "--data", str(root / "data" / "train.json"), "--layer", *LAYERS,
            "--out", str(out), "--batch-size", BATCH, "--bucket", BUCKET]


@pytest.fixture(scope="module")
def single_store(tiny):
    """The single-process store (this process, 8 devices), chunked as the workers chunk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precompute, "ROWS_PER_CHUNK", ROWS_PER_CHUNK)
        assert precompute_cli.main(precompute_args(tiny, tiny / "store_1p")) == 0
    return tiny / "store_1p"


@pytest.fixture(scope="module")
def single_run(single_store, tiny):
    """Probes trained by a single process on the single-process store."""
    out = tiny / "run_1p"
    assert probes_cli.main(["--store", str(single_store), "--out", str(out), *PROBE_ARGS]) == 0
    return out


def assert_same_store(ours: Path, reference: Path):
    for name in ("mean.zarr", "last.zarr", precompute.DONE_ARRAY):
        a, b = read_array(ours / name), read_array(reference / name)
        assert a.shape == b.shape, name
        if name == precompute.DONE_ARRAY:
            assert a.all(), "every row is flagged done"
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=name)
    ours_meta, ref_meta = (json.loads((p / precompute.METADATA_FILE).read_text()) for p in (ours, reference))
    assert ours_meta == ref_meta


def assert_same_run(ours: Path, reference: Path):
    a, b = (json.loads((p / probe_training.RESULTS_FILE).read_text()) for p in (ours, reference))
    a["identity"].pop("store"), b["identity"].pop("store")
    assert a["tasks"].keys() == b["tasks"].keys()
    for task in a["tasks"]:
        for part in ("validation", "test"):
            np.testing.assert_allclose(a["tasks"][task][part], b["tasks"][task][part], rtol=1e-6, atol=1e-6)
        assert a["tasks"][task]["selected_seed"] == b["tasks"][task]["selected_seed"]
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-6)
    assert {k: v for k, v in a.items() if k not in ("tasks", "train_loss", "validation_curve")} == \
        {k: v for k, v in b.items() if k not in ("tasks", "train_loss", "validation_curve")}
    probes_a, probes_b = artifacts.load_probes(ours), artifacts.load_probes(reference)
    assert probes_a.keys() == probes_b.keys()
    for key in probes_a:
        for leaf in probes_a[key]:
            np.testing.assert_allclose(np.asarray(probes_a[key][leaf]), np.asarray(probes_b[key][leaf]),
                                       rtol=1e-6, atol=1e-7, err_msg=f"{key} {leaf}")


# ------------------------------------------------------------------------------------------------
# Settings: flags, environment, refusals (no process started)


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    arguments.add_distributed_arguments(parser)
    return distributed.settings_from_args(parser.parse_args(argv), environ or {})


def test_settings_come_from_flags_then_environment():
    assert not parse([]).enabled
    flags = parse(["--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3",
                   "--local-device-ids", "0,1"])
    assert (flags.coordinator_address, flags.num_processes, flags.process_id, flags.local_device_ids) == \
        ("10.0.0.1:1234", 4, 3, (0, 1))
    env = {distributed.ENV_COORDINATOR: "host:99", distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "1"}
    assert parse([], env) == distributed.Settings("host:99", 2, 1)
    assert parse(["--process-id", "0"], env).process_id == 0  # a flag wins over its variable
    auto = parse(["--distributed"])
    assert auto.enabled and auto.auto and auto.coordinator_address is None
    assert parse([], {distributed.ENV_AUTO: "1"}).auto


@pytest.mark.parametrize("argv, message", [
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], "out of range"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "-1"], ">= 0"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator-address"),
    (["--coordinator-address", "h:1", "--num-processes", "2"], "--process-id"),
    (["--coordinator-address", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--num-processes", "0"], ">= 1"),
    (["--process-id", "1"], "without --num-processes"),
])
def test_inconsistent_settings_are_refused(argv, message):
    with pytest.raises(distributed.DistributedError, match=message):
        parse(argv)


def test_a_cli_refuses_inconsistent_settings_before_touching_anything(tiny, tmp_path, capsys):
    out = tmp_path / "store"
    code = precompute_cli.main(precompute_args(tiny, out) + ["--num-processes", "2", "--process-id", "5",
                                                              "--coordinator-address", "127.0.0.1:1"])
    assert code == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists()


def test_chunks_are_dealt_to_processes_disjointly(single_store):
    store = precompute.FeatureStore.open(single_store)
    assert store.chunk_rows == ROWS_PER_CHUNK
    rows = np.arange(N_PROMPTS)
    owners = [store.owned_rows(rows, p, 2) for p in range(2)]
    assert not (owners[0] & owners[1]).any() and (owners[0] | owners[1]).all()
    for p in range(2):  # whole chunks only, and both processes own some
        chunks = set(rows[owners[p]] // ROWS_PER_CHUNK)
        assert chunks and all(set(rows[owners[p]]) >= set(range(c * 8, c * 8 + 8)) for c in chunks)


# ------------------------------------------------------------------------------------------------
# Two processes against one


def test_two_process_precompute_equals_single_process(tiny, single_store):
    out = tiny / "store_2p"
    stdout = run_processes("train.precompute_cli", precompute_args(tiny, out))
    # Process 0 alone reports. (Process 1's stdout is not required to be empty: gloo's threads print
    # their connection lines there, interleaved at any character, so fragments of them can remain.)
    assert "features of 24 prompts" in stdout[0] and "features of" not in stdout[1], "process 0 alone reports"
    assert_same_store(out, single_store)


def test_two_process_probe_training_equals_single_process(tiny, single_store, single_run):
    out = tiny / "run_2p"
    stdout = run_processes("train.probes_cli", ["--store", str(single_store), "--out", str(out), *PROBE_ARGS])
    assert "| ltv/loan |" in stdout[0] and "ltv/loan" not in stdout[1]
    assert (out / "r2.md").read_text() == (single_run / "r2.md").read_text()
    assert_same_run(out, single_run)


@pytest.mark.slow
def test_two_process_eval_hybrid_equals_single_process(tiny, single_run):
    from eval import hybrid_cli

    args = ["--model", str(tiny / "ckpt"), "--probes", str(single_run), "--data", str(tiny / "data" / "eval.json"),
            "--train", str(tiny / "data" / "train.json")]
    assert hybrid_cli.main(args + ["--out", str(tiny / "eval_1p")]) == 0
    run_processes("eval.hybrid_cli", args + ["--out", str(tiny / "eval_2p")])
    a, b = (json.loads((tiny / d / "summary.json").read_text()) for d in ("eval_2p", "eval_1p"))
    a.pop("median_batch_ms"), b.pop("median_batch_ms")
    assert a == b


@pytest.mark.slow
def test_two_processes_resume_a_single_process_precompute(tiny, single_store, tmp_path):
    """A store left half done (by any number of processes) is finished by two."""
    out = tmp_path / "store"
    shutil.copytree(single_store, out)
    store = precompute.FeatureStore.open(out)
    store.metadata["complete"] = False
    store.write_metadata()
    done = store.done_rows()
    done[::3] = False  # rows of every chunk, so both processes have work
    store._array(precompute.DONE_ARRAY).write(done.astype(np.uint8)).result()
    for name in ("mean.zarr", "last.zarr"):
        array = store._array(name)
        array[np.flatnonzero(~done)].write(np.zeros((int((~done).sum()), *array.shape[1:]), np.float32)).result()
    run_processes("train.precompute_cli", precompute_args(tiny, out))
    assert_same_store(out, single_store)


@pytest.mark.slow
def test_two_processes_resume_a_single_process_probe_run(tiny, single_store, single_run, tmp_path):
    """Orbax checkpoints are read back by any number of processes: a run cut after its first
    checkpoint (epoch 2 of 4) resumes on two processes to the single-process result."""
    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    for name in ("results.json", "probes.json", "r2.md", "curves.png"):
        (out / name).unlink()
    shutil.rmtree(out / "probes")
    shutil.rmtree(out / probe_training.CHECKPOINT_DIR / "4")
    run_processes("train.probes_cli", ["--store", str(single_store), "--out", str(out), *PROBE_ARGS])
    assert_same_run(out, single_run)


@pytest.mark.slow
def test_two_process_baselines_generate_what_one_process_generates(tiny):
    from eval import baselines_cli

    args = ["--model", str(tiny / "ckpt"), "--data", str(tiny / "data" / "eval.json"), "--n", "8",
            "--new-tokens", "4", "--styles", "zeroshot"]
    assert baselines_cli.main(args + ["--out", str(tiny / "baselines_1p")]) == 0
    run_processes("eval.baselines_cli", args + ["--out", str(tiny / "baselines_2p")])
    a, b = ((tiny / d / "generations.json").read_text() for d in ("baselines_2p", "baselines_1p"))
    assert a == b
