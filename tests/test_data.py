"""The synthetic CRE data set: byte-exact reproduction of the reference, schema checks, the CLI."""

import hashlib
import json
from pathlib import Path

import pytest

from hmoe_jax.data import scenarios as data
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
    data.write_dataset(out_dir)
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
    assert data.VOCAB == json.loads(reference.read_text())


def test_eval_is_drawn_from_the_train_seed_plus_one_with_ids_from_10000():
    assert data.eval_seed(42) == 43
    first, last = data.generate_scenarios(500, data.eval_seed(42), data.EVAL_ID_OFFSET)[::499]
    assert (first["id"], last["id"]) == ("cre_10000", "cre_10499")


def test_generated_files_pass_schema_validation(dataset_dir):
    assert len(data.load_scenarios(dataset_dir / "train.json")) == 3000
    assert len(data.load_scenarios(dataset_dir / "eval.json")) == 500


def _drop_noi(scenarios):
    del scenarios[1]["financials"]["noi"]


def _price_as_string(scenarios):
    scenarios[1]["financials"]["purchase_price"] = "$1,000,000"


def _unknown_expert(scenarios):
    scenarios[1]["computation_markers"][0]["expert"] = "irr"


def _units_as_boolean(scenarios):
    scenarios[1]["property"]["units"] = True


def _wrong_expert_args(scenarios):
    scenarios[1]["computation_markers"][0]["inputs"] = {"x": 1}


@pytest.mark.parametrize(
    "corrupt, expected_message",
    [
        (_drop_noi, "scenario 'cre_10001': missing key 'financials.noi'"),
        (_price_as_string, "key 'financials.purchase_price' must be a number, got a string"),
        (_unknown_expert, "key 'computation_markers[0].expert': unknown expert 'irr'"),
        (_units_as_boolean, "key 'property.units' must be an integer or null, got a boolean"),
        (_wrong_expert_args, "expert 'ltv' takes ['loan', 'value'], got ['x']"),
    ],
)
def test_schema_errors_name_the_file_scenario_and_key(tmp_path, corrupt, expected_message):
    scenarios = data.generate_scenarios(3, 43, data.EVAL_ID_OFFSET)
    corrupt(scenarios)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(scenarios))
    with pytest.raises(ValueError) as err:
        data.load_scenarios(path)
    assert str(path) in str(err.value)
    assert expected_message in str(err.value)


@pytest.mark.parametrize(
    "content, expected_message",
    [
        ('[{"id": "cre_00000",', "not valid JSON"),
        ('{"id": "cre_00000"}', "expected a list of scenarios, got an object"),
        ('[{}, 3]', "scenario #0: missing key 'id'"),
    ],
)
def test_file_level_errors_name_the_problem(tmp_path, content, expected_message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        data.load_scenarios(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected_message in str(err.value)


def test_cli_refuses_to_overwrite_without_flag(tmp_path, capsys):
    existing = tmp_path / "train.json"
    existing.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        data_main(["--out", str(tmp_path), "--n-train", "2", "--n-eval", "2"])
    assert exit_info.value.code == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "eval.json").exists()


def test_cli_overwrites_with_flag(tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text("stale")
    monkeypatch.chdir(tmp_path.parent)
    argv = ["--out", tmp_path.name, "--seed", "7", "--n-train", "2", "--n-eval", "3", "--overwrite"]
    assert data_main(argv) == 0
    assert len(data.load_scenarios(tmp_path / "train.json")) == 2
    assert [s["id"] for s in data.load_scenarios(tmp_path / "eval.json")] == [
        "cre_10000", "cre_10001", "cre_10002"
    ]
