"""The built-in domain: commercial real estate underwriting, the reference's four metrics.

Experts (`formulas.underwriting`): DSCR, LTV, cap rate and debt yield, each a ratio of two amounts that
the prompts write as `$1,234,567`. Its generator (`generator`) reproduces the reference's data sets byte
for byte; its records keep the reference's extra blocks (`property`, `financials`, `ground_truth`,
`complexity`), from which every metric has a truth on every scenario, asked for or not (the reference's
scoring protocol scores all four everywhere: `implied_marker`). The report breaks results down by the
prompt's complexity (1: one metric, 4: a full underwriting request). Router negatives (`negatives`):
unrelated questions, and qualitative CRE questions in the same vocabulary that ask for no number.
"""

from __future__ import annotations

from typing import Any, Mapping

from ... import formulas  # noqa: F401  (registers the underwriting experts)
from ..domain import Domain, Metric
from .generator import generate_scenarios, write_dataset
from .negatives import NEGATIVE_PROMPTS

MONEY = "${:,.0f}"  # how the generator writes every amount

METRICS = (
    Metric("dscr", "DSCR: {:.3f}", (0.2, 8.0), {"noi": MONEY, "ads": MONEY},
           label_pattern=r"dscr|debt service coverage(?: ratio)?"),
    Metric("ltv", "LTV: {:.2f}%", (10.0, 100.0), {"loan": MONEY, "value": MONEY},
           label_pattern=r"ltv|loan[- ]to[- ]value(?: ratio)?"),
    Metric("cap_rate", "Cap rate: {:.2f}%", (1.0, 20.0), {"noi": MONEY, "price": MONEY},
           label_pattern=r"cap(?:italization)? rate"),
    Metric("debt_yield", "Debt yield: {:.2f}%", (2.0, 30.0), {"noi": MONEY, "loan": MONEY},
           label_pattern=r"debt yield"),
)


def implied_marker(record: Mapping[str, Any], expert: str) -> dict[str, Any] | None:
    """A metric's marker read from the scenario's `financials` and `ground_truth` (None without them)."""
    fin, truth = record.get("financials"), record.get("ground_truth")
    if not isinstance(fin, Mapping) or not isinstance(truth, Mapping):
        return None
    try:
        inputs = {
            "dscr": lambda: {"noi": fin["noi"], "ads": truth["annual_debt_service"]},
            "ltv": lambda: {"loan": fin["loan_amount"], "value": fin["purchase_price"]},
            "cap_rate": lambda: {"noi": fin["noi"], "price": fin["purchase_price"]},
            "debt_yield": lambda: {"noi": fin["noi"], "loan": fin["loan_amount"]},
        }[expert]()
        return {"expert": expert, "inputs": inputs, "output": truth[expert]}
    except KeyError:  # a hand-made record with partial blocks: its own markers are all it has
        return None


# The PyTorch reference's published results on gpt-oss-20b (its final_results.json): probe R^2 (sign-log
# space, mean over folds, optimistic selection) and within 20% of its ensemble-input hybrid on the first
# 200 eval scenarios, under its protocol.
PUBLISHED_R2 = {
    "dscr/noi": "0.885 +- 0.183", "dscr/ads": "0.980", "cap_rate/noi": "0.975", "cap_rate/price": "0.982",
    "ltv/loan": "0.982", "ltv/value": "0.983", "debt_yield/loan": "0.983", "debt_yield/noi": "0.977",
    "dscr/output": "0.46 to 0.56", "cap_rate/output": "0.46 to 0.56", "debt_yield/output": "0.46 to 0.56",
    "ltv/output": "-0.50",
}
PUBLISHED_WITHIN_20 = {"dscr": 60.0, "ltv": 86.5, "cap_rate": 65.0, "debt_yield": 65.0}


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` scenarios from `seed`, ids cre_00000 onwards."""
    return generate_scenarios(n, seed, 0)


def _write_data(out_dir, seed, n_train, n_eval):
    return write_dataset(out_dir, seed=seed, n_train=n_train, n_eval=n_eval)


DOMAIN = Domain(
    name="cre",
    description="commercial real estate underwriting: DSCR, LTV, cap rate, debt yield",
    metrics=METRICS,
    generate=generate,
    negatives=NEGATIVE_PROMPTS,
    groups={"complexity": lambda record: record.get("complexity")},
    implied_marker=implied_marker,
    write_data=_write_data,
    published_r2=PUBLISHED_R2,
    published_within_20=PUBLISHED_WITHIN_20,
    published_source="the PyTorch reference on gpt-oss-20b (its protocol, first 200 eval scenarios)",
)
