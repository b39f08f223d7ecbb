"""Scoring protocols and the generation baselines' parser, driven by the domain (CRE here)."""

import math

import numpy as np
import pytest

from hmoe_jax.data import scoring as metrics
from hmoe_jax.domains import load_domain
from hmoe_jax.domains.cre.generator import generate_scenarios
from hmoe_jax.evaluation import baselines

CRE = load_domain("cre")


@pytest.fixture(scope="module")
def scenarios():
    return generate_scenarios(200, seed=43, id_offset=10_000)


def test_honest_protocol_scores_only_metrics_whose_inputs_are_in_the_prompt(scenarios):
    by_c = {c: [s for s in scenarios if s["complexity"] == c] for c in (1, 2, 3, 4)}
    # The data recipe: complexity 2 gives price, loan, NOI and ADS: every metric is answerable.
    assert all(CRE.inputs_in_prompt(s, m) for s in by_c[2] for m in CRE.experts)
    # Complexity 3 and 4 give no ADS: DSCR is not answerable from the prompt; the others are.
    for c in (3, 4):
        assert not any(CRE.inputs_in_prompt(s, "dscr") for s in by_c[c])
        assert all(CRE.inputs_in_prompt(s, m) for s in by_c[c] for m in ("ltv", "cap_rate", "debt_yield"))
    # Complexity 1 asks one question and gives exactly its inputs.
    for s in by_c[1]:
        asked = s["computation_markers"][0]["expert"]
        answerable = [m for m in CRE.experts if CRE.inputs_in_prompt(s, m)]
        assert answerable == [asked]


def test_honest_check_reads_amounts_as_the_generator_writes_them(scenarios):
    # The check is the literal "$1,234,567" in the prompt, not a number that merely appears.
    s = next(x for x in scenarios if x["complexity"] == 2)
    assert CRE.inputs_in_prompt(s, "ltv")
    stripped = dict(s, input_prompt=s["input_prompt"].replace("$", ""))
    assert not CRE.inputs_in_prompt(stripped, "ltv")


def test_accuracy_thresholds_are_strict_and_missing_predictions_count_as_errors(scenarios):
    s = scenarios[:4]
    truth = np.array([x["ground_truth"]["ltv"] for x in s])
    preds = {"ltv": np.array([truth[0] * 1.10, truth[1] * 1.0999, math.nan, truth[3]])}
    out = metrics.score(CRE, s, preds, "reference")["ltv"]
    assert out["n"] == 4
    assert out["within_10"] == pytest.approx(50.0)  # exactly 10% off is not "within 10%"
    assert out["within_20"] == pytest.approx(75.0)  # the NaN never counts


def test_constant_predictor_is_scored_like_any_method(scenarios):
    medians = metrics.training_medians(CRE, generate_scenarios(300, seed=42, id_offset=0))
    const = metrics.constant_predictions(medians, len(scenarios))
    ref = metrics.score(CRE, scenarios, const, "reference")
    honest = metrics.score(CRE, scenarios, const, "honest")
    for m in CRE.experts:
        assert ref[m]["n"] == len(scenarios)
        assert honest[m]["n"] < len(scenarios)
        # One breakdown per complexity present.
        assert sorted(ref[m]["by_group"]["complexity"]) == ["1", "2", "3", "4"]


def test_parser_reads_labelled_values_within_sanity_ranges():
    text = "First the DSCR is 1.42x. LTV: 65.5%. Cap rate of 7.25%. Debt yield = 11.3%."
    assert CRE.parse_answer(text) == {"dscr": 1.42, "ltv": 65.5, "cap_rate": 7.25, "debt_yield": 11.3}
    # Out of range values are dropped; the last in-range mention wins (chains of thought end with it).
    parsed = CRE.parse_answer("DSCR: 12.0 ... so DSCR: 1.10 and finally DSCR: 1.25")
    assert parsed["dscr"] == 1.25
    assert math.isnan(parsed["ltv"])
    # Long forms of the labels, as the reference's regexes read them.
    assert CRE.parse_answer("debt service coverage ratio of 1.3, loan-to-value 70")["dscr"] == 1.3
    assert CRE.parse_answer("debt service coverage ratio of 1.3, loan-to-value 70")["ltv"] == 70.0


def test_structured_prompt_asks_for_the_domains_answer_lines():
    prompt = baselines.format_prompt("Q?", "structured", CRE)
    assert prompt == ("Q?\nAnswer in exactly this format:\nDSCR: <number>\nLTV: <number>%\n"
                      "Cap rate: <number>%\nDebt yield: <number>%\n")


def test_unknown_prompt_style_and_protocol_are_rejected(scenarios):
    with pytest.raises(ValueError, match="unknown prompt style"):
        baselines.format_prompt("x", "poetry", CRE)
    with pytest.raises(ValueError, match="unknown scoring protocol"):
        metrics.score(CRE, scenarios[:2], {"ltv": [1.0, 2.0]}, "generous")
