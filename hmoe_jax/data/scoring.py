"""Scoring predictions of the four underwriting metrics, under two protocols, and reading them out of
generated text.

- `reference`: every metric is scored for every scenario, as the PyTorch reference did, even when the
  prompt lacks the metric's inputs (it then measures the data set's narrow ranges, not the model).
- `honest`: a metric is scored only where all its inputs appear in the prompt (as the `${:,.0f}`
  amounts the generator writes).

Each is reported next to the constant predictor (the training median), so no table hides that a
constant scores well. Accuracy "within p%" is strict: |pred - truth| / |truth| * 100 < p.

`parse_metrics` reads a generated answer as the reference did: each metric's last number after its
label, kept only inside the reference's sanity ranges (outside them, or absent, the metric counts as
missing: an infinite error).
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..formulas import default_expert_names

# The metrics scored: the active deterministic experts (dscr, ltv, cap_rate, debt_yield).
METRICS = default_expert_names()

# The raw financial amounts each metric is computed from, by their record keys.
METRIC_INPUTS: Mapping[str, tuple[str, ...]] = {
    "dscr": ("noi", "annual_debt_service"),
    "ltv": ("loan_amount", "purchase_price"),
    "cap_rate": ("noi", "purchase_price"),
    "debt_yield": ("noi", "loan_amount"),
}

PROTOCOLS = ("reference", "honest")


def _amount(scenario: Mapping, key: str) -> float:
    if key == "annual_debt_service":
        return scenario["ground_truth"]["annual_debt_service"]
    return scenario["financials"][key]


def inputs_in_prompt(scenario: Mapping, metric: str) -> bool:
    prompt = scenario["input_prompt"]
    return all(f"${_amount(scenario, k):,.0f}" in prompt for k in METRIC_INPUTS[metric])


def scored(scenario: Mapping, metric: str, protocol: str) -> bool:
    if protocol == "reference":
        return True
    if protocol == "honest":
        return inputs_in_prompt(scenario, metric)
    raise ValueError(f"unknown scoring protocol {protocol!r}; choose from {PROTOCOLS}")


def percent_errors(predictions: Sequence[float], truths: Sequence[float]) -> np.ndarray:
    """|pred - truth| / |truth| * 100; a missing (NaN) prediction counts as an infinite error, a zero
    truth with a nonzero prediction too."""
    p = np.asarray(predictions, np.float64)
    t = np.asarray(truths, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(p - t) / np.abs(t) * 100.0
    err = np.where(np.isnan(p), np.inf, err)
    return np.where((t == 0) & (p == 0), 0.0, np.where(t == 0, np.inf, err))


def summarize(errors: np.ndarray) -> dict[str, float | int]:
    n = int(errors.size)
    if n == 0:
        return {"n": 0, "within_10": math.nan, "within_20": math.nan, "median_pct_error": math.nan}
    return {
        "n": n,
        "within_10": float((errors < 10).mean() * 100),
        "within_20": float((errors < 20).mean() * 100),
        "median_pct_error": float(np.median(errors)),
    }


def score(
    scenarios: Sequence[Mapping],
    predictions: Mapping[str, Sequence[float]],
    protocol: str,
) -> dict[str, dict]:
    """Per metric: overall summary and a per-complexity breakdown. `predictions[metric][i]` is the
    prediction for `scenarios[i]` (NaN where the method gave none)."""
    out = {}
    for metric in METRICS:
        if metric not in predictions:
            continue
        preds = np.asarray(predictions[metric], np.float64)
        if preds.shape != (len(scenarios),):
            raise ValueError(f"predictions for {metric} have shape {preds.shape}, expected ({len(scenarios)},)")
        mask = np.array([scored(s, metric, protocol) for s in scenarios], bool)
        truths = np.array([s["ground_truth"][metric] for s in scenarios], np.float64)
        errors = percent_errors(preds, truths)
        complexity = np.array([s["complexity"] for s in scenarios])
        out[metric] = {
            **summarize(errors[mask]),
            "by_complexity": {int(c): summarize(errors[mask & (complexity == c)]) for c in sorted(set(complexity))},
        }
    return out


def training_medians(train_scenarios: Iterable[Mapping]) -> dict[str, float]:
    train = list(train_scenarios)
    return {m: float(np.median([s["ground_truth"][m] for s in train])) for m in METRICS}


def constant_predictions(medians: Mapping[str, float], n: int) -> dict[str, np.ndarray]:
    return {m: np.full(n, medians[m], np.float64) for m in METRICS}


def r2(predicted: Sequence[float], target: Sequence[float]) -> float:
    p, t = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    ss_res = float(((t - p) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return math.nan if ss_tot == 0 else 1.0 - ss_res / ss_tot


# Open intervals, as the reference filtered parsed values.
SANITY_RANGES: Mapping[str, tuple[float, float]] = {
    "dscr": (0.2, 8.0),
    "ltv": (10.0, 100.0),
    "cap_rate": (1.0, 20.0),
    "debt_yield": (2.0, 30.0),
}

_NUMBER = r"(-?\d[\d,]*\.?\d*)"
_LABELS: Mapping[str, str] = {
    "dscr": r"(?:dscr|debt service coverage(?: ratio)?)",
    "ltv": r"(?:ltv|loan[- ]to[- ]value(?: ratio)?)",
    "cap_rate": r"(?:cap(?:italization)? rate)",
    "debt_yield": r"(?:debt yield)",
}
# A label, then up to 40 characters that are not a digit or another sentence, then the number.
_PATTERNS = {m: re.compile(label + r"[^\d\n.]{0,40}?" + _NUMBER, re.IGNORECASE) for m, label in _LABELS.items()}


def parse_metrics(text: str) -> dict[str, float]:
    """Each metric's LAST in-range value mentioned after its label (a chain of thought ends with the
    answer); NaN where none is found."""
    out = {}
    for metric, pattern in _PATTERNS.items():
        low, high = SANITY_RANGES[metric]
        value = math.nan
        for match in pattern.finditer(text):
            try:
                v = float(match.group(1).replace(",", ""))
            except ValueError:
                continue
            if low < v < high:
                value = v
        out[metric] = value
    return out
