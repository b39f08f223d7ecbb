"""Domains: a domain is one object; its bad definitions, bad records and bad choices stop with an error
that names them; data never runs code; the byte-level tokenizer loses no text; a user's formula gets
the built-ins' defined results."""

from __future__ import annotations

import json
import random
import re
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe_jax import formulas
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.domains import (
    Domain,
    DomainError,
    Metric,
    linear,
    load_domain,
    read_records,
    resolve_domain,
    sign_log,
    write_dataset,
)
from hmoe_jax.hybrid.layer import SIGN_LOG_LIMIT, exact_formula

CRE = load_domain("cre")
CIRCUITS = load_domain("circuits")


def _generate(n, seed):
    return [{"id": f"t_{seed}_{i}", "input_prompt": f"LTV of a $1 loan on a ${i + 2} property?",
             "computation_markers": [{"expert": "ltv", "inputs": {"loan": 1, "value": i + 2},
                                      "output": 100 / (i + 2)}]} for i in range(n)]


def _metric(**overrides):
    return Metric(**{"expert": "ltv", "answer": "LTV: {:.2f}%", "sanity_range": (0, 100),
                     "arguments": {"loan": "${:,}", "value": "${:,}"}, **overrides})


def _domain(**overrides):
    return Domain(**{"name": "tiny", "metrics": [_metric()], "generate": _generate, "negatives": ["Hi?"], **overrides})


# ------------------------------------------------------------------ a domain's definition


@pytest.mark.parametrize("build, message", [
    (lambda: _metric(expert="irr"), "unknown deterministic expert 'irr'"),
    (lambda: _metric(arguments={"loan": "{}"}), "expert 'ltv' takes 2 argument(s) ['loan', 'value']"),
    (lambda: _metric(arguments={"loan": "{}", "value": "{}", "x": "{}"}), "takes 2 argument(s)"),
    (lambda: _metric(answer="LTV"), "exactly one '{}' field"),
    (lambda: _metric(answer="{:.2f}%"), "names no label"),
    (lambda: _metric(sanity_range=(5, 1)), "low < high"),
    (lambda: _metric(scaling={"price": sign_log()}), "scaling given for ['price']"),
    (lambda: _metric(scaling={"loan": "log"}), "must be a Scaling"),
    (lambda: _metric(label_pattern="(unclosed"), "is not a regex"),
    (lambda: _domain(metrics=[]), "metrics must be a non-empty list"),
    (lambda: _domain(metrics=[_metric(), _metric()]), "have more than one metric"),
    (lambda: _domain(generate=None), "generate must be a function"),
    (lambda: _domain(negatives=[]), "negatives must be a non-empty list"),
    (lambda: _domain(name="my domain"), "a domain name is"),
])
def test_an_incomplete_or_inconsistent_domain_is_refused_when_defined(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)


def test_a_generator_whose_records_do_not_fit_is_refused_before_writing(tmp_path):
    def bad(n, seed):
        records = _generate(n, seed)
        records[1]["computation_markers"][0]["inputs"]["value"] = float("nan")
        return records

    with pytest.raises(DomainError, match=r"record 't_1_1': key 'computation_markers\[0\].inputs.value' is nan"):
        write_dataset(_domain(generate=bad), tmp_path / "d", 1, 3, 3)
    with pytest.raises(DomainError, match="must return a list of 3 records, got 2 records"):
        write_dataset(_domain(generate=lambda n, seed: _generate(2, seed)), tmp_path / "d", 1, 3, 3)
    with pytest.raises(DomainError, match="generate the same id"):
        write_dataset(_domain(generate=lambda n, seed: _generate(n, 0)), tmp_path / "d", 1, 3, 3)
    assert not (tmp_path / "d").exists()


def test_expert_ids_clash_with_another_expert_or_a_neural_expert(scratch_expert_names):
    scratch_expert_names.append("scratch_clash")
    with pytest.raises(ValueError, match="expert_id 32 is already used by 'dscr'"):
        formulas.deterministic_expert(name="scratch_clash", expert_id=32)(lambda a, b: a + b)
    with pytest.raises(ValueError, match="'dscr' is already registered"):
        formulas.deterministic_expert(name="dscr", expert_id=47)(lambda noi, ads: noi)
    with pytest.raises(DomainError, match=r"collide with the model's neural experts 0\.\.39"):
        CRE.check_router_ids(40)
    CRE.check_router_ids(32)  # gpt-oss-20b's 32 experts: ids 32.. are free


def test_the_same_declaration_registered_again_replaces_the_first(scratch_expert_names):
    """A domain file loaded again (another module name for the same file, a re-run cell) declares its
    experts again: that is no clash."""
    scratch_expert_names.append("scratch_twice")

    def scratch_twice(a, b):
        return a - b

    formulas.deterministic_expert(name="scratch_twice", expert_id=57)(scratch_twice)
    formulas.deterministic_expert(name="scratch_twice", expert_id=57)(scratch_twice)
    with pytest.raises(ValueError, match="already registered"):
        formulas.deterministic_expert(name="scratch_twice", expert_id=58)(scratch_twice)


# ------------------------------------------------------------------ finding a domain; data never runs code


USER_DOMAIN = textwrap.dedent('''
    import pathlib
    from hmoe_jax.domains import Domain, Metric
    from hmoe_jax.formulas import deterministic_expert, ratio

    pathlib.Path(__file__).with_suffix(".ran").write_text("imported")

    @deterministic_expert(name="scratch_speed", expert_id=59)
    def scratch_speed(distance, time):
        return ratio(distance, time)

    def generate(n, seed):
        return [{"id": f"s{seed}_{i}", "input_prompt": f"{i + 1} m in 2 s: speed?",
                 "computation_markers": [{"expert": "scratch_speed", "inputs": {"distance": i + 1, "time": 2},
                                          "output": (i + 1) / 2}]} for i in range(n)]

    DOMAIN = Domain(name="speeds", generate=generate, negatives=["Hello?"],
                    metrics=[Metric("scratch_speed", "Speed: {:.2f} m/s", (0, 1e3),
                                    {"distance": "{} m", "time": "{} s"})])
''')


@pytest.fixture
def user_domain_file(tmp_path, scratch_expert_names):
    scratch_expert_names.append("scratch_speed")
    path = tmp_path / "speeds.py"
    path.write_text(USER_DOMAIN)
    return path


def test_domains_are_found_by_name_module_file_and_entry_point(user_domain_file, tmp_path, monkeypatch):
    assert load_domain(None).name == "cre" and load_domain("circuits").name == "circuits"
    assert load_domain("hmoe_jax.domains.circuits:DOMAIN").origin == {
        "name": "circuits", "module": "hmoe_jax.domains.circuits:DOMAIN"}
    mine = load_domain(str(user_domain_file))
    assert mine.name == "speeds" and mine.origin == {"name": "speeds", "file": str(user_domain_file.resolve())}
    assert load_domain(str(user_domain_file)) == mine  # loaded once, found again
    # An installed package declares its domain as an entry point.
    site = tmp_path / "site"
    (site / "speedpkg").mkdir(parents=True)
    (site / "speedpkg" / "__init__.py").write_text(USER_DOMAIN)
    dist = site / "speedpkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: speedpkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hmoe_jax.domains]\nspeeds = speedpkg:DOMAIN\n")
    monkeypatch.syspath_prepend(str(site))
    installed = load_domain("speeds")
    assert installed.origin == {"name": "speeds", "module": "speedpkg:DOMAIN"}
    sys.modules.pop("speedpkg", None)


@pytest.mark.parametrize("spec, message", [
    ("nowhere.py", "does not exist"),
    ("no_such_module_anywhere", "no module named 'no_such_module_anywhere'"),
    ("hmoe_jax.domains.cre:NOPE", "has no attribute 'NOPE'"),
    ("hmoe_jax.formulas", "defines 0 Domain objects"),
    ("not a domain!", "unknown domain"),
])
def test_a_domain_that_cannot_be_found_says_why(spec, message):
    with pytest.raises(DomainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_domain(spec)


def test_a_broken_domain_file_is_named(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('my bug')\n")
    with pytest.raises(DomainError, match=f"domain file {path}: RuntimeError: my bug"):
        load_domain(str(path))


def test_a_recorded_file_is_never_run_unless_named_and_a_different_domain_is_refused(user_domain_file, tmp_path):
    recorded = {"name": "speeds", "file": str(user_domain_file)}
    with pytest.raises(DomainError, match=f"pass --domain {user_domain_file}"):
        resolve_domain(None, recorded, "data.json")
    assert not user_domain_file.with_suffix(".ran").exists()  # the file did not run
    assert resolve_domain(str(user_domain_file), recorded, "data.json").name == "speeds"
    with pytest.raises(DomainError, match="was made with domain 'speeds', not 'circuits'"):
        resolve_domain("circuits", recorded, "data.json")
    # A bare list of records records nothing: any domain may read it; none named means CRE.
    assert resolve_domain("circuits", None, "data.json").name == "circuits"
    assert resolve_domain(None, None, "data.json").name == "cre"
    # A recorded module is imported again by itself.
    assert resolve_domain(None, {"name": "circuits", "module": "hmoe_jax.domains.circuits"}, "x").name == "circuits"


def test_the_user_domain_writes_recorded_data(user_domain_file, tmp_path):
    domain = load_domain(str(user_domain_file))
    write_dataset(domain, tmp_path / "d", 5, 4, 3)
    records, recorded = read_records(tmp_path / "d" / "train.json")
    assert recorded == domain.origin and [r["id"] for r in records] == ["s5_0", "s5_1", "s5_2", "s5_3"]


# ------------------------------------------------------------------ records read as the domain says


def test_circuits_records_answer_parse_and_score_as_written():
    records = CIRCUITS.generate(60, 3)
    for r in records:
        asked = CIRCUITS.asked(r)
        assert asked and r["answer"] == CIRCUITS.answer_text(r)
        parsed = CIRCUITS.parse_answer(r["answer"])
        for e in asked:
            # The answer rounds the truth to its printed digits; parsing reads those digits back.
            assert parsed[e] == pytest.approx(CIRCUITS.truth(r, e), abs=6e-4, rel=1e-3)
            assert CIRCUITS.inputs_in_prompt(r, e), (r["input_prompt"], e)
    assert {CIRCUITS.group_labels(r)["asks"] for r in records} == {"divider", "rc", "both"}


def test_circuits_truths_are_the_formulas_values():
    for r in CIRCUITS.generate(40, 9):
        for m in r["computation_markers"]:
            args = jnp.asarray([[m["inputs"][a] for a in formulas.get_expert(m["expert"]).arg_names]], jnp.float64
                               if jax.config.jax_enable_x64 else jnp.float32)
            value = float(formulas.evaluate(m["expert"], args)[0])
            assert value == pytest.approx(m["output"], rel=2e-4, abs=1e-4)


def test_a_capacitance_defeats_sign_log_and_its_unit_restores_it():
    farads = np.asarray([r["computation_markers"][-1]["inputs"]["capacitance"] for r in CIRCUITS.generate(200, 1)
                         if r["groups"]["asks"] != "divider"])
    plain = np.asarray(sign_log().encode(farads))
    assert plain.std() < 1e-4  # every target ~0: nothing for a probe to learn
    in_microfarads = np.asarray(CIRCUITS.metric("rc_time_constant").scaling_of("capacitance").encode(farads))
    assert in_microfarads.std() > 0.5
    for scaling in (sign_log(), sign_log(unit=1e-6), linear(center=3.0, unit=0.5)):
        assert np.allclose(np.asarray(scaling.decode(scaling.encode(farads))), farads, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ a user's formula, defined as the built-ins are


def test_a_user_formula_gets_the_builtins_defined_results(user_domain_file):
    load_domain(str(user_domain_file))
    speed, dscr = formulas.get_expert("scratch_speed"), formulas.get_expert("dscr")
    # A zero denominator: 0.0, as DSCR gives for ads = 0.
    args = jnp.asarray([[5.0, 0.0], [5.0, -1.0], [3e38, 1e-5], [6.0, 3.0]], jnp.float32)
    assert np.asarray(formulas.evaluate(speed, args)).tolist()[:2] == [0.0, 0.0]
    assert np.asarray(formulas.evaluate(dscr, args)).tolist()[:2] == [0.0, 0.0]
    # Inside the hybrid layer: the same result and encoding for both, saturated where the result
    # overflows float32, with a finite gradient everywhere.
    for expert in (speed, dscr):
        result, encoded = exact_formula(expert, args)
        assert float(result[3]) == 2.0 and float(encoded[2]) == SIGN_LOG_LIMIT
        grad = jax.grad(lambda a, e=expert: exact_formula(e, a)[1].sum())(args)
        assert np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------------ the tokenizer loses no text


def _random_text(rng: random.Random) -> str:
    planes = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x2190, 0x22FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F)]
    chars = []
    for _ in range(rng.randint(1, 40)):
        low, high = rng.choice(planes)
        chars.append(chr(rng.randint(low, high)))
    chars.insert(rng.randint(0, len(chars)), rng.choice(["\n", "\t", "  ", "\x00", "½", "µF", "kΩ"]))
    return "".join(chars)


def test_the_synthetic_tokenizer_round_trips_arbitrary_unicode(tmp_path):
    from tokenizers import Tokenizer

    synthetic.write_tokenizer(tmp_path, ["What is the DSCR for NOI of $1,234,000?"] * 20, synthetic.tiny_config())
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(0)
    for text in ["E = ½ m v^2 → 3 J", "A 4.7 kΩ resistor and 22 µF", *(_random_text(rng) for _ in range(300))]:
        ids = tokenizer.encode(text).ids
        assert max(ids) < synthetic.tiny_config()["vocab_size"]
        assert tokenizer.decode(ids) == text, repr(text)


def test_a_vocabulary_too_small_for_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a byte-level tokenizer needs vocab_size >= 266"):
        synthetic.write_tokenizer(tmp_path, ["x"], synthetic.tiny_config(vocab_size=200))


def test_write_dataset_refuses_existing_files_unless_overwrite(tmp_path):
    train, held_out = write_dataset(CIRCUITS, tmp_path, 1, 3, 2)
    before = train.read_bytes()
    held_out.unlink()  # one file left is enough to refuse
    with pytest.raises(FileExistsError, match=re.escape(f"refusing to overwrite {train}; pass --overwrite")):
        write_dataset(CIRCUITS, tmp_path, 2, 4, 2)
    assert train.read_bytes() == before and not held_out.exists()
    write_dataset(CIRCUITS, tmp_path, 2, 4, 2, overwrite=True)
    assert len(read_records(train)[0]) == 4 and len(read_records(held_out)[0]) == 2


def test_record_json_keeps_unicode(tmp_path):
    write_dataset(CIRCUITS, tmp_path, 1, 3, 2)
    text = (tmp_path / "train.json").read_text()
    assert json.loads(text)["records"][0]["input_prompt"] == CIRCUITS.generate(3, 1)[0]["input_prompt"]


def test_the_second_domain_runs_the_whole_demo(tmp_path):
    """`eval demo --domain circuits`, scaled down (a narrower LM too): data, the language model, convert,
    precompute, both extractors' probes, evaluation, the LM's own answers, end-to-end training and the report, for a
    domain other than CRE."""
    import subprocess

    run = subprocess.run([sys.executable, "-m", "eval", "demo", "--domain", "circuits", "--out", "demo_c", "--quick",
                          "--n-train", "160", "--n-eval", "32", "--epochs", "3", "--lm-steps", "12",
                          "--lm-hidden", "64", "--compare-extractors"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "demo_c"
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["domain"] == "circuits" and summary["metrics"] == ["voltage_divider", "rc_time_constant"]
    for protocol in ("reference", "honest"):
        for method in ("hybrid", "constant_median"):
            assert set(summary["scores"][protocol][method]) == {"voltage_divider", "rc_time_constant"}
    by_asks = summary["scores"]["honest"]["hybrid"]["voltage_divider"]["by_group"]["asks"]
    assert by_asks["rc"]["n"] == 0 and by_asks["divider"]["n"] > 0 and by_asks["both"]["n"] > 0
    assert set(summary["argument_r2"]["rc_time_constant"]) == {"resistance", "capacitance"}
    trained = json.loads((out / "hybrid_training" / "summary.json").read_text())
    assert trained["domain"]["name"] == "circuits" and trained["experts"] == ["voltage_divider", "rc_time_constant"]
    assert "Within 20% by asks" in run.stdout and "rc_time_constant" in run.stdout
    lm_answers = json.loads((out / "lm_answers" / "baselines.json").read_text())
    assert set(lm_answers["raw"]["continuation"]["honest"]) == {"voltage_divider", "rc_time_constant"}
    assert json.loads((out / "lm" / "hf" / "config.json").read_text())["hidden_size"] == 64  # --lm-hidden
    report = (out / "report.md").read_text()
    assert "hidden 64" in report and "| voltage_divider |" in report
    assert "attention-pooled" in report and "mean-pooled" in report
    assert json.loads((out / "probes" / "attention" / "probes.json").read_text())["extractor"]["kind"] == "attention"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ckpt")
    config = synthetic.tiny_config()
    synthetic.write_hf_checkpoint(root, config)
    synthetic.write_tokenizer(root, [r["input_prompt"] for r in CIRCUITS.generate(20, 0)], config)
    return root


def test_commands_refuse_bad_records_and_the_wrong_domain_before_writing(tiny_checkpoint, tmp_path, monkeypatch,
                                                                         capsys):
    from train import data_cli, precompute_cli

    monkeypatch.chdir(tmp_path)
    assert data_cli.main(["--domain", "circuits", "--out", "c", "--n-train", "6", "--n-eval", "2"]) == 0
    bad = json.loads((tmp_path / "c" / "train.json").read_text())
    bad["records"][3]["computation_markers"][0]["inputs"] = {}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    common = ["--model", str(tiny_checkpoint), "--layer", "1"]
    cases = [
        (["--data", "bad.json", "--out", "s1"], "record 'circuits_42_00003'"),
        (["--data", "c/train.json", "--domain", "cre", "--out", "s2"], "was made with domain 'circuits', not 'cre'"),
        (["--data", "c/train.json", "--domain", "nowhere.py", "--out", "s3"], "does not exist"),
    ]
    for argv, message in cases:
        assert precompute_cli.main(common + argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / argv[-1]).exists()
    # A domain whose module raises is named, and `train data` writes nothing.
    (tmp_path / "broken.py").write_text("import hmoe_jax\nraise ValueError('no generator yet')\n")
    assert data_cli.main(["--domain", "broken.py", "--out", "d"]) == 2
    assert "broken.py: ValueError: no generator yet" in capsys.readouterr().err and not (tmp_path / "d").exists()
    # The recorded built-in domain is found without --domain, and its store records it.
    assert precompute_cli.main(common + ["--data", "c/train.json", "--out", "ok"]) == 0
    meta = json.loads((tmp_path / "ok" / "metadata.json").read_text())
    assert meta["domain"] == {"name": "circuits", "module": "hmoe_jax.domains.circuits"}
    assert set(meta["targets"]) == {"voltage_divider", "rc_time_constant"}
