"""Data files: the CRE data set's byte-exact reproduction of the reference, the domain-neutral record
checks, the CLI."""

import hashlib
import json
from pathlib import Path

import pytest

from hmoe_jax.domains import DomainError, read_records
from hmoe_jax.domains.cre import generator as cre_generator
from train.data_cli import main as data_main

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
# `git hash-object train.json` of the reference train set (3,000 scenarios, seed 42), from
# spec/data.md; the reference train file itself is not shipped.
REFERENCE_TRAIN_BLOB = "66dba65d98c95f4d0d97accbf406193cc671b9be"


def git_blob_id(content):
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dataset")
    cre_generator.write_dataset(out_dir)
    return out_dir


def test_default_eval_set_is_byte_identical_to_the_reference(dataset_dir):
    reference = REFERENCE_DIR / "eval.json"
    if not reference.exists():
        pytest.skip(f"reference eval set not found at {reference}")
    assert (dataset_dir / "eval.json").read_bytes() == reference.read_bytes()


def test_default_train_set_has_the_reference_git_blob_id(dataset_dir):
    assert git_blob_id((dataset_dir / "train.json").read_bytes()) == REFERENCE_TRAIN_BLOB


def test_embedded_vocabulary_equals_the_reference_file():
    reference = REFERENCE_DIR / "generator_vocab.json"
    if not reference.exists():
        pytest.skip(f"reference vocabulary not found at {reference}")
    assert cre_generator.VOCAB == json.loads(reference.read_text())


def test_eval_is_drawn_from_the_train_seed_plus_one_with_ids_from_10000():
    assert cre_generator.eval_seed(42) == 43
    scenarios = cre_generator.generate_scenarios(500, cre_generator.eval_seed(42), cre_generator.EVAL_ID_OFFSET)
    first, last = scenarios[0], scenarios[499]
    assert (first["id"], last["id"]) == ("cre_10000", "cre_10499")


def test_generated_files_pass_the_record_checks_and_record_no_domain(dataset_dir):
    train, recorded = read_records(dataset_dir / "train.json")
    assert len(train) == 3000 and recorded is None  # a bare list: the reference's own format
    assert len(read_records(dataset_dir / "eval.json")[0]) == 500


def _drop_output(records):
    del records[1]["computation_markers"][0]["output"]


def _input_as_string(records):
    records[1]["computation_markers"][0]["inputs"]["loan"] = "$1,000,000"


def _unknown_expert(records):
    records[1]["computation_markers"][0]["expert"] = "irr"


def _input_as_boolean(records):
    records[1]["computation_markers"][0]["inputs"]["loan"] = True


def _wrong_expert_args(records):
    records[1]["computation_markers"][0]["inputs"] = {"x": 1}


def _missing_argument(records):
    del records[1]["computation_markers"][0]["inputs"]["value"]


def _infinite_input(records):
    records[1]["computation_markers"][0]["inputs"]["loan"] = float("inf")


def _nan_output(records):
    records[1]["computation_markers"][0]["output"] = float("nan")


def _duplicate_id(records):
    records[2]["id"] = records[1]["id"]


def _empty_prompt(records):
    records[1]["input_prompt"] = "  "


def _wrong_expert_id(records):
    records[1]["computation_markers"][0]["expert_id"] = 7


def _ltv_first(records):
    # Record 1 of this seed is a complexity-1 question or not; make its first marker ltv either way.
    records[1]["computation_markers"] = [{"expert": "ltv", "inputs": {"loan": 1.0, "value": 2.0}, "output": 50.0}]


@pytest.mark.parametrize(
    "corrupt, expected_message",
    [
        (_drop_output, "record 'cre_10001': missing key 'computation_markers[0].output'"),
        (_input_as_string, "key 'computation_markers[0].inputs.loan' must be a number, got a string"),
        (_unknown_expert, "key 'computation_markers[0].expert': unknown expert 'irr'"),
        (_input_as_boolean, "key 'computation_markers[0].inputs.loan' must be a number, got a boolean"),
        (_wrong_expert_args, "expert 'ltv' takes ['loan', 'value'], got ['x']"),
        (_missing_argument, "(missing ['value'])"),
        (_infinite_input, "key 'computation_markers[0].inputs.loan' is inf"),
        (_nan_output, "key 'computation_markers[0].output' is nan"),
        (_duplicate_id, "record 'cre_10001': id 'cre_10001' is also record #1's"),
        (_empty_prompt, "key 'input_prompt' is empty"),
        (_wrong_expert_id, "7 does not match expert 'ltv' (id 33)"),
    ],
)
def test_record_errors_name_the_file_record_and_key(tmp_path, corrupt, expected_message):
    records = cre_generator.generate_scenarios(3, 43, cre_generator.EVAL_ID_OFFSET)
    _ltv_first(records)
    corrupt(records)
    path = tmp_path / "eval.json"
    # allow_nan: Python's json writes NaN/Infinity, which a hand-made file may hold too.
    path.write_text(json.dumps(records))
    with pytest.raises(DomainError) as err:
        read_records(path)
    assert str(path) in str(err.value)
    assert expected_message in str(err.value)


def test_only_the_neutral_keys_are_required(tmp_path):
    record = {"id": "a", "input_prompt": "LTV of a $1 loan on $2?",
              "computation_markers": [{"expert": "ltv", "inputs": {"loan": 1, "value": 2}, "output": 50.0}]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([record]))
    assert read_records(path) == ([record], None)


@pytest.mark.parametrize(
    "content, expected_message",
    [
        ('[{"id": "cre_00000",', "not valid JSON"),
        ('{"id": "cre_00000"}', "an object that is not a 'hmoe-jax-records' file"),
        ('[{}, 3]', "record #0: missing key 'id'"),
        ('{"format": "hmoe-jax-records", "version": 1, "domain": "x", "records": []}', "key 'domain' must be"),
    ],
)
def test_file_level_errors_name_the_problem(tmp_path, content, expected_message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected_message in str(err.value)


def test_cli_refuses_to_overwrite_without_flag(tmp_path, capsys):
    existing = tmp_path / "train.json"
    existing.write_text("keep me")
    assert data_main(["--out", str(tmp_path), "--n-train", "2", "--n-eval", "2"]) == 2
    assert f"train data: error: refusing to overwrite {existing}" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "eval.json").exists()


def test_cli_overwrites_with_flag(tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text("stale")
    monkeypatch.chdir(tmp_path.parent)
    argv = ["--out", tmp_path.name, "--seed", "7", "--n-train", "2", "--n-eval", "3", "--overwrite"]
    assert data_main(argv) == 0
    assert len(read_records(tmp_path / "train.json")[0]) == 2
    assert [s["id"] for s in read_records(tmp_path / "eval.json")[0]] == [
        "cre_10000", "cre_10001", "cre_10002"
    ]


def test_cli_writes_another_domain_and_records_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_main(["--domain", "circuits", "--out", "d", "--n-train", "5", "--n-eval", "4"]) == 0
    train, recorded = read_records(tmp_path / "d" / "train.json")
    held_out, _ = read_records(tmp_path / "d" / "eval.json")
    assert recorded == {"name": "circuits", "module": "hmoe_jax.domains.circuits"}
    assert len(train) == 5 and len(held_out) == 4
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
