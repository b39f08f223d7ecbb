"""Scoring predictions of a domain's metrics, under two protocols.

- `reference`: a metric is scored on every record that has a truth for it (its marker, or the domain's
  implied one: CRE scores all four metrics on every scenario, as the PyTorch reference did, even where
  the prompt lacks the metric's inputs, which then measures the data set's narrow ranges, not the model).
- `honest`: a metric is scored only where all its inputs appear in the prompt, written as the domain
  writes them (`Metric.arguments`).

Each is reported next to the constant predictor (the training median), so no table hides that a
constant scores well. Accuracy "within p%" is strict: |pred - truth| / |truth| * 100 < p. Generated text
is read back by the domain (`Domain.parse_answer`: each metric's last in-range number after its label).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..domains import Domain, DomainError

PROTOCOLS = ("reference", "honest")


def scored(domain: Domain, record: Mapping, metric: str, protocol: str) -> bool:
    if protocol == "reference":
        return domain.marker(record, metric) is not None
    if protocol == "honest":
        return domain.inputs_in_prompt(record, metric)
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


def truths(domain: Domain, records: Sequence[Mapping], metric: str) -> np.ndarray:
    """Each record's truth for `metric` (NaN where it has none)."""
    values = [domain.truth(r, metric) for r in records]
    return np.asarray([math.nan if v is None else v for v in values], np.float64)


def score(domain: Domain, records: Sequence[Mapping], predictions: Mapping[str, Sequence[float]],
          protocol: str) -> dict[str, dict]:
    """Per metric: overall summary and one breakdown per grouping column (`by_group[column][label]`).
    `predictions[metric][i]` is the prediction for `records[i]` (NaN where the method gave none)."""
    labels = [domain.group_labels(r) for r in records]
    columns = sorted({c for lab in labels for c in lab})
    out = {}
    for metric in domain.experts:
        if metric not in predictions:
            continue
        preds = np.asarray(predictions[metric], np.float64)
        if preds.shape != (len(records),):
            raise ValueError(f"predictions for {metric} have shape {preds.shape}, expected ({len(records)},)")
        mask = np.array([scored(domain, r, metric, protocol) for r in records], bool)
        errors = percent_errors(preds, truths(domain, records, metric))
        by_group = {}
        for column in columns:
            values = [lab.get(column) for lab in labels]
            groups = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
            by_group[column] = {
                str(g): summarize(errors[mask & np.array([v == g for v in values], bool)]) for g in groups}
        out[metric] = {**summarize(errors[mask]), "by_group": by_group}
    return out


def training_medians(domain: Domain, train_records: Iterable[Mapping]) -> dict[str, float]:
    """Each metric's median truth over the training records that have one: the constant predictor."""
    train = list(train_records)
    medians = {}
    for metric in domain.experts:
        values = truths(domain, train, metric)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise DomainError(f"no training record has a truth for {metric!r}: the constant baseline needs some")
        medians[metric] = float(np.median(values))
    return medians


def constant_predictions(medians: Mapping[str, float], n: int) -> dict[str, np.ndarray]:
    return {m: np.full(n, value, np.float64) for m, value in medians.items()}


def r2(predicted: Sequence[float], target: Sequence[float]) -> float:
    p, t = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    ss_res = float(((t - p) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return math.nan if ss_tot == 0 else 1.0 - ss_res / ss_tot
