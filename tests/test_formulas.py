"""Tests for hmoe_jax.formulas: exactness against exact rational arithmetic, domain edges,
gradients, and the expert registry.

Accuracy is measured as |computed - exact| / ulp(exact), with ``exact`` the formula's real value at
the (already rounded) float arguments: a ``fractions.Fraction`` whenever the exponent of a power is
a whole number (up to 1500, beyond which the integers get slow), else mpmath at 256 bits (its own
error, ~2^-256 relative, is immaterial). The contract is "within 1 ulp"; what the implementation
achieves, and what is asserted, is <= 0.5 ulp (correct rounding) up to near-tie cases, for which
``_CORRECTLY_ROUNDED`` leaves 2^-10 ulp of room.

float64 runs inside ``jax.enable_x64(True)`` (a context manager) so that the rest of the test
session keeps JAX's default 32-bit mode. Compilation is the bulk of the run time, so all evaluations
go through ``run`` / ``run_grad``, which compile each formula once per dtype (and once more for its
gradient) on one padded array size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from hmoe_jax.formulas import (
    DeterministicExpert,
    annual_debt_service,
    default_expert_names,
    deterministic_expert,
    dscr,
    evaluate,
    get_expert,
    ltv,
    registered_experts,
    registry,
    resolve_experts,
)

DTYPES = (np.float32, np.float64)
_CORRECTLY_ROUNDED = 0.5 + 2.0**-10
_RATIO_SCALES = {"dscr": 1, "ltv": 100, "cap_rate": 100, "debt_yield": 100}
EVAL_SET = Path(__file__).resolve().parents[2] / "shared" / "reference" / "eval.json"


def precision(dtype) -> int:
    return np.finfo(dtype).nmant + 1


def x64(dtype):
    """Context in which ``dtype`` arrays exist: x64 on for float64, off (the default) otherwise."""
    return jax.enable_x64(np.dtype(dtype) == np.float64)


# ----------------------------------------------------------------------------------------------
# Exact references
# ----------------------------------------------------------------------------------------------


def to_fraction(x) -> Fraction:
    if isinstance(x, mpmath.mpf):
        mantissa, exponent = x.man_exp
        return Fraction(mantissa) * Fraction(2) ** exponent
    return Fraction(float(x))


def ulp_error(value, exact: Fraction, dtype) -> float:
    """|value - exact| in units of the last place of ``exact`` in ``dtype``."""
    if exact == 0:
        return 0.0 if value == 0 else math.inf
    magnitude = abs(exact)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1  # now 2^exponent <= |exact| < 2^(exponent + 1)
    ulp = Fraction(2) ** (exponent - precision(dtype) + 1)
    return float(abs(Fraction(float(value)) - exact) / ulp)


def exact_ratio(numerator, denominator, scale) -> Fraction:
    return Fraction(float(numerator)) * scale / Fraction(float(denominator))


def exact_annuity(principal, rate, years) -> Fraction:
    p, r, y = (Fraction(float(v)) for v in (principal, rate, years))
    m, n = r / 12, 12 * y
    if m == 0:
        return p / y
    if n.denominator == 1 and n <= 1500:  # whole months: exact rational arithmetic
        growth = (1 + m) ** int(n)
        return p * r * growth / (growth - 1)
    with mpmath.workprec(256):
        mp_m = mpmath.mpf(float(rate)) / 12
        growth = (1 + mp_m) ** (12 * mpmath.mpf(float(years)))
        interest = mpmath.mpf(float(principal)) * mpmath.mpf(float(rate))
        return to_fraction(interest * growth / (growth - 1))


def exact_projection(noi, growth, years) -> Fraction:
    q, g, y = (Fraction(float(v)) for v in (noi, growth, years))
    if y.denominator == 1 and abs(y) <= 1500:
        return q * (1 + g) ** int(y)
    with mpmath.workprec(256):
        return to_fraction(
            mpmath.mpf(float(noi)) * (1 + mpmath.mpf(float(growth))) ** mpmath.mpf(float(years))
        )


# ----------------------------------------------------------------------------------------------
# Accuracy grids (float64 values; cast to the dtype under test, the reference uses the cast values)
# ----------------------------------------------------------------------------------------------


def ratio_cases() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    # The data set's ranges: NOI 1e3..1e8 over loan / price / value / ADS 1e5..1e9 ...
    num, den = np.meshgrid(np.geomspace(1e3, 1e8, 23), np.geomspace(1e5, 1e9, 23))
    num, den = num.ravel(), den.ravel()
    # ... round dollar amounts as in the data ...
    whole_num = np.round(rng.uniform(1e3, 1e8, 400) / 1000) * 1000
    whole_den = np.round(rng.uniform(1e5, 1e9, 400) / 1e5) * 1e5
    # ... and far beyond: tiny and huge ratios, sub-dollar and 1e12 amounts.
    wide_num = np.exp(rng.uniform(np.log(1e-3), np.log(1e12), 600))
    wide_den = np.exp(rng.uniform(np.log(1e-3), np.log(1e12), 600))
    edge_num = np.array([1.0, 1e8, 1e3, 3.0, 1e12, 1e-3, 7.0, 123456.789])
    edge_den = np.array([1e9, 1e2, 1e9, 7.0, 1e-3, 1e12, 3.0, 0.1])
    return (
        np.concatenate([num, whole_num, wide_num, edge_num]),
        np.concatenate([den, whole_den, wide_den, edge_den]),
    )


def annuity_cases() -> np.ndarray:
    rng = np.random.default_rng(5678)
    # Data set: principal 1e5..2e8, rate 0.045..0.085 (4 decimals), 25 or 30 years.
    p, r, y = np.meshgrid(
        np.geomspace(1e5, 2e8, 7), np.round(np.linspace(0.045, 0.085, 9), 4), [25.0, 30.0]
    )
    data = np.stack([p.ravel(), r.ravel(), y.ravel()], -1)
    drawn = np.stack(
        [
            np.round(rng.uniform(1e5, 2e8, 150) / 1e5) * 1e5,
            np.round(rng.uniform(0.045, 0.085, 150), 4),
            rng.choice([25.0, 30.0], 150),
        ],
        -1,
    )
    # Beyond: high, tiny (incl. the small-rate expansion and zero) and negative rates, short and
    # long terms, whole and fractional month counts, and growth that saturates (rate 5 over 100
    # years: G ~ 2^600; harmless for a positive rate, see formulas.py).
    rates = [0.0, 1e-20, 1e-12, 1e-7, 1e-4, 0.01, 0.2, 1.0, 5.0, -0.01, -0.05, -0.5]
    years = [1 / 12, 0.5, 1.0, 2.75, 7.0, 40.0, 100.0]
    p, r, y = np.meshgrid([1e3, 1.234567e7], rates, years)
    beyond = np.stack([p.ravel(), r.ravel(), y.ravel()], -1)
    beyond = beyond[~((beyond[:, 1] <= -0.5) & (beyond[:, 2] > 40))]  # stay in double-word domain
    fractional = np.stack(
        [
            np.exp(rng.uniform(np.log(1e3), np.log(1e9), 150)),
            rng.uniform(-0.05, 0.3, 150),
            rng.uniform(0.01, 60.0, 150),
        ],
        -1,
    )
    return np.concatenate([data, drawn, beyond, fractional])


def projection_cases() -> np.ndarray:
    rng = np.random.default_rng(9012)
    # Data set: NOI 1e3..1e8 (whole thousands), growth 0.01..0.05 (3 decimals), 3 or 5 years.
    q, g, y = np.meshgrid(
        np.round(np.geomspace(1e3, 1e8, 7) / 1000) * 1000,
        np.round(np.linspace(0.01, 0.05, 9), 3),
        [3.0, 5.0],
    )
    data = np.stack([q.ravel(), g.ravel(), y.ravel()], -1)
    # Beyond: decline and strong growth, discounting (negative years), fractional years.
    q, g, y = np.meshgrid(
        [1e3, 7.654321e7],
        [-0.9, -0.5, -0.01, 1e-9, 0.2, 1.0],
        [-30.0, -1.0, 0.0, 0.5, 1.0, 2.75, 17.0, 40.0],
    )
    beyond = np.stack([q.ravel(), g.ravel(), y.ravel()], -1)
    beyond = beyond[np.abs(beyond[:, 2] * np.log2(1 + beyond[:, 1])) < 59]  # double-word domain
    fractional = np.stack(
        [
            np.exp(rng.uniform(np.log(1e3), np.log(1e8), 150)),
            rng.uniform(-0.5, 1.0, 150),
            rng.uniform(-40.0, 60.0, 150),
        ],
        -1,
    )
    fractional = fractional[np.abs(fractional[:, 2] * np.log2(1 + fractional[:, 1])) < 59]
    return np.concatenate([data, beyond, fractional])


# Compilation dominates the run time, so every formula is compiled once per dtype (and once more
# for its gradient): all calls go through these helpers, which pad the arguments to one fixed size.
_BUCKET = 2048


@functools.lru_cache(maxsize=None)
def _compiled(name: str, gradient: bool):
    expert = get_expert(name)
    if gradient:
        return jax.jit(jax.vmap(jax.grad(expert.fn, argnums=tuple(range(expert.num_args)))))
    return jax.jit(expert.fn)


def _call(name, dtype, columns, gradient):
    columns = np.broadcast_arrays(*(np.asarray(c, dtype) for c in columns))
    shape, size = columns[0].shape, columns[0].size
    assert size <= _BUCKET
    padded = [np.concatenate([c.ravel(), np.ones(_BUCKET - size, dtype)]) for c in columns]
    with x64(dtype):
        out = _compiled(name, gradient)(*padded)
        out = out if gradient else (out,)
        assert all(o.dtype == dtype for o in out)
        out = [np.asarray(o)[:size].reshape(shape) for o in out]
    return out if gradient else out[0]


def run(name: str, dtype, *columns) -> np.ndarray:
    """``name``'s values at the argument columns (broadcast together), computed in ``dtype``."""
    return _call(name, dtype, columns, gradient=False)


def run_grad(name: str, dtype, *columns) -> list[np.ndarray]:
    """The partial derivatives of ``name`` w.r.t. each argument, elementwise."""
    return _call(name, dtype, columns, gradient=True)


def max_ulp_error(values, exacts, dtype) -> tuple[float, int]:
    errors = [ulp_error(v, e, dtype) for v, e in zip(values, exacts)]
    worst = int(np.argmax(errors))
    return errors[worst], worst


# ----------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(_RATIO_SCALES))
def test_ratio_is_correctly_rounded(name, dtype):
    num, den = (c.astype(dtype) for c in ratio_cases())
    out = run(name, dtype, num, den)
    exact = [exact_ratio(a, b, _RATIO_SCALES[name]) for a, b in zip(num, den)]
    worst, i = max_ulp_error(out, exact, dtype)
    assert worst <= _CORRECTLY_ROUNDED, f"{name}({num[i]}, {den[i]}): {worst} ulp"


def test_naive_percentage_ordering_is_not_within_one_ulp():
    """Why the ratios use double-word arithmetic: noi / loan * 100 in float32 rounds twice and
    misses the exact value by more than 1 ulp on data-range arguments."""
    num, den = (c.astype(np.float32) for c in ratio_cases())
    naive = np.asarray(jax.jit(lambda a, b: a / b * 100)(num, den))
    worst, _ = max_ulp_error(naive, [exact_ratio(a, b, 100) for a, b in zip(num, den)], np.float32)
    assert worst > 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_annual_debt_service_is_correctly_rounded(dtype):
    cases = annuity_cases().astype(dtype)
    out = run("annual_debt_service", dtype, *cases.T)
    exact = [exact_annuity(*row) for row in cases]
    worst, i = max_ulp_error(out, exact, dtype)
    assert worst <= _CORRECTLY_ROUNDED, f"annual_debt_service{tuple(cases[i])}: {worst} ulp"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_noi_projection_is_correctly_rounded(dtype):
    cases = projection_cases().astype(dtype)
    out = run("noi_projection", dtype, *cases.T)
    exact = [exact_projection(*row) for row in cases]
    worst, i = max_ulp_error(out, exact, dtype)
    assert worst <= _CORRECTLY_ROUNDED, f"noi_projection{tuple(cases[i])}: {worst} ulp"


# Outside the double-word domain (see formulas.py): growth factor beyond 2^+-60 (float32) or
# 2^+-500 (float64), or 2^16+ whole periods.
_FALLBACK_CASES = {
    np.float32: [
        ("noi_projection", (1e3, 1.0, 61.5)),
        ("noi_projection", (1e3, 1.0, 100.0)),
        ("noi_projection", (1e6, -0.5, 70.0)),
        ("noi_projection", (1e6, 0.05, 1000.0)),
        ("noi_projection", (1e-30, 1.0, 130.0)),  # exp(90) alone would overflow
        ("annual_debt_service", (1e6, -2.0, 30.0)),  # G = (5/6)^360 ~ 2^-95
        ("annual_debt_service", (1e6, -2.0, 45.0)),  # exp(-98.5) alone would be subnormal
        ("annual_debt_service", (1e6, 1e-5, 6000.0)),  # 72,000 months
    ],
    np.float64: [
        ("noi_projection", (1e3, 1.0, 501.0)),
        ("noi_projection", (1e3, 1.0, 900.5)),
        ("noi_projection", (1e6, -0.5, 600.0)),
        ("noi_projection", (1e-200, 1.0, 1100.0)),  # exp(762) alone would overflow
        ("annual_debt_service", (6e6, -6.0, 60.0)),  # G = 0.5^720
        ("annual_debt_service", (1e6, 1e-5, 6000.0)),
    ],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fallback_error_bound(dtype):
    """The documented bound of the working-precision fallback: 3 (|t| + L) + 4 ulp, t = n log1p(m),
    L = |ln|scale|| where exp(t) alone would leave the normal range, else 0."""
    limit = -math.log(float(np.finfo(dtype).tiny))
    for name in ("annual_debt_service", "noi_projection"):
        cases = np.array([args for n, args in _FALLBACK_CASES[dtype] if n == name], dtype)
        values = run(name, dtype, *cases.T)
        for value, args in zip(values, cases):
            if name == "annual_debt_service":
                exact = exact_annuity(*args)
                exponent = 12 * float(args[2]) * math.log1p(float(args[1]) / 12)
                scale = float(args[0]) * float(args[1])
            else:
                exact = exact_projection(*args)
                exponent = float(args[2]) * math.log1p(float(args[1]))
                scale = float(args[0])
            rescaling = abs(math.log(abs(scale))) if abs(exponent) >= limit else 0.0
            bound = 3 * (abs(exponent) + rescaling) + 4
            assert ulp_error(value, exact, dtype) <= bound, (name, args)


@pytest.mark.skipif(not EVAL_SET.exists(), reason="reference eval set not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_eval_set_ground_truth(dtype):
    """The data set's ground truth is each formula rounded to 2 (3 for dscr) decimals."""
    scenarios = json.loads(EVAL_SET.read_text())

    def column(section, key):
        return np.array([s[section][key] for s in scenarios], float)

    fin = {k: column("financials", k) for k in scenarios[0]["financials"]}
    truth = {k: column("ground_truth", k) for k in scenarios[0]["ground_truth"]}
    price, loan, noi = fin["purchase_price"], fin["loan_amount"], fin["noi"]
    ads = run("annual_debt_service", dtype, loan, fin["interest_rate"], fin["amortization_years"])
    growth = fin["noi_growth_rate"]
    computed = {
        "annual_debt_service": (ads, 2),
        "dscr": (run("dscr", dtype, noi, truth["annual_debt_service"]), 3),
        "ltv": (run("ltv", dtype, loan, price), 2),
        "cap_rate": (run("cap_rate", dtype, noi, price), 2),
        "debt_yield": (run("debt_yield", dtype, noi, loan), 2),
        "noi_year_3": (run("noi_projection", dtype, noi, growth, 3.0), 2),
        "noi_year_5": (run("noi_projection", dtype, noi, growth, 5.0), 2),
    }
    for key, (values, decimals) in computed.items():
        # Half a unit of the rounding, plus a few ulp for rounding the arguments to the dtype
        # (0.0623 is not a float; float32 ADS ~ 1e7 has ulp 1), plus the float64 noise of the
        # generator's own arithmetic.
        relative = 8 * 2.0 ** -precision(dtype) + 1e-12
        slack = 0.5 * 10.0**-decimals + np.abs(truth[key]) * relative
        np.testing.assert_array_less(np.abs(values - truth[key]), slack, err_msg=key)


def test_jit_with_constant_arguments_agrees_bitwise():
    """XLA folds literal constants into additions under jit; the double-word kernels must give the
    same bits whether their arguments are traced or compile-time constants (and eagerly)."""
    cases = annuity_cases().astype(np.float32)[::9]  # data, tiny/negative rates, fractional
    traced = run("annual_debt_service", np.float32, *cases.T)
    constant = jax.jit(lambda: annual_debt_service(*(jnp.asarray(c) for c in cases.T)))()
    np.testing.assert_array_equal(traced, np.asarray(constant))
    num, den = (c.astype(np.float32)[:64] for c in ratio_cases())
    eager = np.asarray(ltv(num, den))
    np.testing.assert_array_equal(eager, run("ltv", np.float32, num, den))
    np.testing.assert_array_equal(eager, np.asarray(jax.jit(lambda: ltv(num, den))()))


# ----------------------------------------------------------------------------------------------
# Domain edges: zero / negative denominators, limits, non-finite arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_RATIO_SCALES))
def test_ratio_with_non_positive_denominator_is_zero(name):
    num = [1e6, -5.0, 0.0, 3e7, 1e6, 1.0]
    den = [0.0, 0.0, -0.0, -1.0, -1e9, 1e-30]
    values = run(name, np.float32, num, den)
    np.testing.assert_array_equal(values[:-1], 0.0)
    assert 1e29 < values[-1] < np.inf  # a tiny positive denominator: huge but finite, not 0
    for grad in run_grad(name, np.float32, num, den):
        np.testing.assert_array_equal(grad[:-1], 0.0)  # constant 0 there: finite, zero gradient


def test_annual_debt_service_domain_and_zero_rate():
    # years <= 0 and rate <= -12 (monthly rate <= -1) are outside the domain -> 0.0
    rates, years = [0.06, 0.06, -12.0, -20.0], [0.0, -5.0, 30.0, 30.0]
    outside = run("annual_debt_service", np.float32, 1e6, rates, years)
    np.testing.assert_array_equal(outside, 0.0)
    # A zero rate is the limit 12 P / n = P / years, correctly rounded.
    principal, years = np.float32([1e6, 7e6, 123457.0]), np.float32([30.0, 25.0, 7.0])
    at_zero = run("annual_debt_service", np.float32, principal, 0.0, years)
    np.testing.assert_array_equal(at_zero, principal / years)
    # The exact formula is continuous through zero, with slope (n + 1) / 2 relative to the monthly
    # rate (no 1e-6 cut-off as in the data spec's generator).
    near = run("annual_debt_service", np.float32, 1e6, [-1e-7, 0.0, 1e-7], 30.0)
    slope = 361 / 2 * 1e-7 / 12
    np.testing.assert_allclose(near / near[1] - 1, [-slope, 0.0, slope], rtol=0.05)


def test_noi_projection_domain():
    outside = run("noi_projection", np.float32, 1e6, [-1.0, -2.0, -1e9], [3.0, 5.0, 1.0])
    np.testing.assert_array_equal(outside, 0.0)
    noi, growth, years = [123456.0, 123456.0, 0.0], [0.03, 0.0, 1.0], [0.0, 17.5, 1000.0]
    flat = run("noi_projection", np.float32, noi, growth, years)
    # years 0 or growth 0: the NOI itself; NOI 0 with an overflowing fallback: 0, not 0 * inf = NaN
    np.testing.assert_array_equal(flat, [123456.0, 123456.0, 0.0])


_TYPICAL_ARGUMENTS = {"noi": 6e5, "ads": 5e5, "loan": 7e6, "value": 1e7, "price": 1e7,
                      "principal": 7e6, "rate": 0.065, "years": 30.0, "growth": 0.03,
                      # the circuits domain's (registered once any test has loaded it)
                      "v_in": 12.0, "r_top": 4.7e3, "r_bottom": 1e4, "resistance": 2.2e3, "capacitance": 4.7e-5}


@pytest.mark.parametrize("name", [e.name for e in registered_experts()])
def test_non_finite_arguments_give_nan(name):
    expert = get_expert(name)
    rows = []
    for bad in (np.nan, np.inf, -np.inf):
        for k in range(expert.num_args):
            row = [_TYPICAL_ARGUMENTS[a] for a in expert.arg_names]
            row[k] = bad
            rows.append(row)
    columns = np.array(rows, np.float32).T
    assert np.all(np.isnan(run(name, np.float32, *columns)))
    assert all(np.all(np.isfinite(g)) for g in run_grad(name, np.float32, *columns))


def test_finite_arguments_never_give_inf_or_nan():
    rng = np.random.default_rng(3)
    amounts = np.concatenate([[0.0, -0.0, -1.0, -1e9, 1e-30], rng.uniform(-1e9, 1e9, 40)])
    amounts = amounts.astype(np.float32)
    a, b = (x.ravel() for x in np.meshgrid(amounts, amounts))
    with np.errstate(divide="ignore", invalid="ignore"):
        representable = ~(np.abs(a.astype(float) * 100 / b) >= 1e38)  # no true overflow
    for name in _RATIO_SCALES:
        assert np.all(np.isfinite(run(name, np.float32, a, b)[representable])), name
    p, r, y = np.meshgrid(
        amounts[:16],
        np.float32([-50, -12, -11.9, -1, -1e-9, 0, 1e-30, 0.05, 3, 40]),
        np.float32([-3, 0, 1e-6, 0.5, 1, 30, 1e4, 1e5]),
    )
    assert np.all(np.isfinite(run("annual_debt_service", np.float32, p, r, y)))
    q, g, y = np.meshgrid(
        amounts[:16],
        np.float32([-5, -1, -0.999, -0.3, 0, 1e-9, 0.05, 2]),
        np.float32([-5, -0.5, 0, 0.25, 3, 5, 40]),  # no true overflow
    )
    assert np.all(np.isfinite(run("noi_projection", np.float32, q, g, y)))


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

_GRADIENT_POINTS = {
    "dscr": [(1.3e6, 8.7e5), (-2e5, 4e5)],
    "ltv": [(7.2e6, 1.05e7)],
    "cap_rate": [(6e5, 1e7)],
    "debt_yield": [(6e5, 7.3e6)],
    "annual_debt_service": [(7e6, 0.065, 30.0), (1e6, 1e-3, 10.0), (1e6, -0.02, 15.0),
                            (2e5, 0.0, 20.0), (1e6, 0.3, 2.75), (5e5, 0.04, 0.05)],
    "noi_projection": [(6e5, 0.03, 5.0), (6e5, -0.2, 2.5), (1e4, 0.5, -3.0), (2e6, 0.0, 4.0)],
}


@pytest.mark.parametrize("name", list(_GRADIENT_POINTS))
def test_gradient_matches_finite_differences(name):
    """jax.grad (through the custom JVP rules) against central differences, in float64."""
    points = np.array(_GRADIENT_POINTS[name])
    analytic = run_grad(name, np.float64, *points.T)
    steps = 1e-6 * np.maximum(np.abs(points), 1e-2)
    for k in range(points.shape[1]):
        up, down = points.copy(), points.copy()
        up[:, k] += steps[:, k]
        down[:, k] -= steps[:, k]
        difference = run(name, np.float64, *up.T) - run(name, np.float64, *down.T)
        numeric = difference / (2 * steps[:, k])
        # A natural size for d/dx_k: value / x_k (partials can vanish, e.g. d/dgrowth at years 0).
        natural = np.abs(run(name, np.float64, *points.T)) / np.maximum(np.abs(points[:, k]), 1e-2)
        error = np.abs(analytic[k] - numeric)
        np.testing.assert_array_less(error, 1e-6 * (np.abs(numeric) + natural))


def test_compounding_gradients_finite_at_domain_edges():
    edges = np.float32([
        (1e6, 0.0, 30.0), (1e6, 0.06, 0.0), (1e6, 0.06, -1.0), (1e6, -12.0, 30.0),
        (1e6, 1e-30, 30.0), (1e6, 0.06, 1e4), (1e6, -11.0, 100.0), (0.0, 0.0, 1e-6),
    ])
    grads = run_grad("annual_debt_service", np.float32, *edges.T)
    assert all(np.all(np.isfinite(g)) for g in grads)
    edges = np.float32([(6e5, -1.0, 3.0), (6e5, -2.0, 3.0), (6e5, 0.03, 0.0), (0.0, 0.03, 5.0),
                        (6e5, 1.0, 70.0), (6e5, -0.999, -3.0)])
    assert all(np.all(np.isfinite(g)) for g in run_grad("noi_projection", np.float32, *edges.T))


# ----------------------------------------------------------------------------------------------
# Registry and evaluate()
# ----------------------------------------------------------------------------------------------


def test_builtin_experts_match_the_spec():
    spec = {
        "dscr": (32, ("noi", "ads"), True),
        "ltv": (33, ("loan", "value"), True),
        "cap_rate": (34, ("noi", "price"), True),
        "debt_yield": (35, ("noi", "loan"), True),
        "annual_debt_service": (36, ("principal", "rate", "years"), False),
        "noi_projection": (37, ("noi", "growth", "years"), False),
    }
    builtin = {
        e.name: (e.expert_id, e.arg_names, e.default_active)
        for e in registered_experts()
        if e.name in spec
    }
    assert builtin == spec
    assert default_expert_names() == ("dscr", "ltv", "cap_rate", "debt_yield")
    assert get_expert("dscr").fn is dscr and get_expert("debt_yield")(6e5, 6e6) == 10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_expert("dscr").expert_id = 40


def test_resolve_experts_validates_config_lists():
    assert [e.name for e in resolve_experts(["ltv", "dscr"])] == ["ltv", "dscr"]  # order kept
    assert resolve_experts([]) == ()
    with pytest.raises(ValueError, match="unknown.*'dsrc'"):
        resolve_experts(["dscr", "dsrc"])
    with pytest.raises(ValueError, match="more than once.*'ltv'"):
        resolve_experts(["ltv", "dscr", "ltv"])
    with pytest.raises(TypeError, match="string"):
        resolve_experts("dscr")
    with pytest.raises(TypeError, match="strings"):
        resolve_experts(["dscr", 33])
    with pytest.raises(ValueError, match="unknown deterministic expert 'nope'"):
        get_expert("nope")


def test_resolve_experts_rejects_shared_ids(monkeypatch):
    # The decorator refuses a taken id, so fake a corrupted registry to reach the guard.
    clone = dataclasses.replace(get_expert("dscr"), name="dscr_clone")
    monkeypatch.setitem(registry._REGISTRY, "dscr_clone", clone)
    with pytest.raises(ValueError, match="share an expert id.*32"):
        resolve_experts(["dscr", "dscr_clone"])


def test_new_expert_is_one_decorated_function(scratch_expert_names):
    scratch_expert_names.append("interest_only_payment")

    @deterministic_expert(name="interest_only_payment", expert_id=40)  # args from the signature
    def interest_only_payment(principal, rate):
        return principal * rate

    expert = get_expert("interest_only_payment")
    assert expert == DeterministicExpert(
        "interest_only_payment", 40, ("principal", "rate"), interest_only_payment, True
    )
    assert "interest_only_payment" in default_expert_names()
    resolved = resolve_experts(["dscr", "interest_only_payment"])
    assert [e.name for e in resolved] == ["dscr", "interest_only_payment"]
    args = jnp.array([[1e6, 0.05], [2e6, 0.1]], jnp.float32)
    np.testing.assert_allclose(np.asarray(evaluate("interest_only_payment", args)), [5e4, 2e5])

    registry._unregister("interest_only_payment")
    assert "interest_only_payment" not in [e.name for e in registered_experts()]
    with pytest.raises(ValueError, match="unknown"):
        resolve_experts(["interest_only_payment"])
    with pytest.raises(ValueError, match="not registered"):
        registry._unregister("interest_only_payment")


def test_registration_errors(scratch_expert_names):
    scratch_expert_names.extend(["scratch_a", "scratch_b"])

    def two_args(a, b):
        return a + b

    with pytest.raises(ValueError, match="'dscr' is already registered"):
        deterministic_expert(name="dscr", expert_id=41)(two_args)
    with pytest.raises(ValueError, match="expert_id 33 is already used by 'ltv'"):
        deterministic_expert(name="scratch_a", expert_id=33)(two_args)
    with pytest.raises(ValueError, match="do not match the signature"):
        deterministic_expert(name="scratch_a", expert_id=41, args=("b", "a"))(two_args)
    with pytest.raises(ValueError, match="positional"):
        deterministic_expert(name="scratch_a", expert_id=41)(lambda *xs: xs[0])
    for bad_id in (-1, True, "41", 41.0):
        with pytest.raises(ValueError, match="expert_id"):
            deterministic_expert(name="scratch_a", expert_id=bad_id)
    with pytest.raises(ValueError, match="name"):
        deterministic_expert(name="", expert_id=41)
    assert "scratch_a" not in registry._REGISTRY  # failed registrations leave no trace
    deterministic_expert(name="scratch_a", expert_id=41, args=("a", "b"))(two_args)
    with pytest.raises(ValueError, match="expert_id 41 is already used by 'scratch_a'"):
        deterministic_expert(name="scratch_b", expert_id=41)(two_args)


def test_evaluate_stacks_arguments_in_declared_order():
    rng = np.random.default_rng(0)
    principal, rate = rng.uniform(1e5, 1e8, (2, 3)), rng.uniform(0.01, 0.1, (2, 3))
    args = np.stack([principal, rate, np.full((2, 3), 30.0)], -1)
    out = evaluate(get_expert("annual_debt_service"), jnp.asarray(args, jnp.float32))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    expected = run("annual_debt_service", np.float32, args[..., 0], args[..., 1], args[..., 2])
    np.testing.assert_array_equal(np.asarray(out), expected)
    # By name, under jit and under vmap.
    ratio_args = jnp.array([[7e6, 1e7], [1.0, 0.0]], jnp.float32)
    jitted = jax.jit(evaluate, static_argnums=0)("ltv", ratio_args)
    mapped = jax.vmap(lambda a: evaluate("ltv", a))(ratio_args)
    np.testing.assert_array_equal(np.asarray(jitted), [70.0, 0.0])
    np.testing.assert_array_equal(np.asarray(mapped), [70.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]"):
        evaluate("dscr", jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="shape"):
        evaluate("dscr", jnp.float32(1.0))


def test_dtype_policy():
    assert dscr(6e5, 5e5).dtype == jnp.float32  # Python scalars
    assert dscr(jnp.bfloat16(6e5), jnp.bfloat16(5e5)).dtype == jnp.float32  # no "exact" bf16
    assert evaluate("ltv", jnp.array([[7, 10]], jnp.int32)).dtype == jnp.float32
    assert ltv(jnp.array([7, 3]), 10.0).tolist() == [70.0, 30.0]
    with jax.enable_x64(True):
        assert dscr(jnp.float64(6e5), 5e5).dtype == jnp.float64
        assert dscr(jnp.float32(6e5), 5e5).dtype == jnp.float32  # weak scalar does not promote
    assert dscr(6e5, 5e5).dtype == jnp.float32  # x64 was scoped to the context
