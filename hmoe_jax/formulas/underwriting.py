"""The built-in deterministic experts: exact underwriting formulas, registered on import.

Built-in experts (docs/hybrid-moe.md; ids 36 and 37 are registered with ``default_active=False``):

==== ===================== ======================== ========================================
id   name                  arguments                value
==== ===================== ======================== ========================================
32   dscr                  noi, ads                 noi / ads
33   ltv                   loan, value              loan / value * 100
34   cap_rate              noi, price               noi / price * 100
35   debt_yield            noi, loan                noi / loan * 100
36   annual_debt_service   principal, rate, years   12 P m (1+m)^n / ((1+m)^n - 1), m = rate/12,
                                                    n = 12 years
37   noi_projection        noi, growth, years       noi (1 + growth)^years
==== ===================== ======================== ========================================

Accuracy. Every formula returns the exact real value of the formula *at its (already rounded)
arguments*, rounded once, in float32 and in float64 (``jax_enable_x64``). This needs more than
ordering the operations: ``noi / loan * 100`` rounds twice and was measured at up to 1.28 ulp from
the exact value (``noi * 100 / loan``: 1.40 ulp), and the textbook annuity with ``exp`` / ``log1p``
/ ``expm1`` at up to 2.8 ulp on the data set's own ranges (2.4 ulp rewritten as P rate /
-expm1(-t)). XLA's float64 ``log1p`` on CPU is itself over 200 ulp off (near -0.41). So the
formulas are evaluated in double-word arithmetic (each value an unevaluated sum ``hi + lo`` of two
floats, about twice the working precision) built from error-free transformations, and rounded to a
float once at the end; the result is correctly rounded unless the exact value lies within ~2^-20 ulp
of a rounding tie, and is within 1 ulp by construction. (Results below the normal range, ~1e-38 in
float32, lose relative precision to underflow like any float computation.) Compound growth uses only
+, -, *, / and sqrt (which IEEE rounds correctly): binary powering for the whole periods, repeated
square roots for a fractional period, so no accuracy is borrowed from the backend's transcendental
functions.

Measured (tests/test_formulas.py asserts it, against exact ``fractions.Fraction`` values, or mpmath
at 256 bits for fractional exponents): at most 0.5 ulp, i.e. correctly rounded, at every tested
point of every formula, float32 and float64, on the data set's ranges and far beyond, whole or
fractional periods, tiny, zero and negative rates. Outside the double-word domain (growth factor
outside [2^-60, 2^60] in float32 or [2^-500, 2^500] in float64, or 2^16 or more whole periods) the
compounding formulas fall back to ``exp`` / ``expm1`` of ``t = n log1p(m)`` in working precision,
measured at up to 2.4 |t| + 4 ulp (asserted: 3 |t| + 4; the rounding of the exponent is amplified by
|t|; where exp(t) alone would leave the normal range it is rescaled by the prefactor's log, adding 3
|ln|prefactor|| ulp). No real loan or projection gets there (a 5,461-year loan, or growth beyond
2^60); annual_debt_service needs it only for negative rates that shrink the growth factor below
2^-60, since for large positive growth G / (G - 1) is 1 to far below an ulp and saturating G is
harmless.

The error-free transformations rely on IEEE rounding of each operation. The Dekker split is done
with a bit mask rather than Veltkamp's ``c = 4097 x; hi = c - (c - x)`` so that a compiler that
contracts ``a * b + c`` into an FMA (XLA's GPU backend may) cannot break it: with a masked split
every partial product is exact, and contracting an exact product changes nothing. XLA does
reassociate additions with *literal constants* under jit (it folds ``(1 + r) - 1`` to ``r``), so
every constant that enters an error-free transformation is hidden behind an optimization barrier
(``_constant``); the tests check that traced, constant-folded and eager evaluation agree bit for
bit. Verified on CPU; on GPU, division and sqrt are assumed IEEE-rounded (XLA's default).

Cost: the kernels are jitted (also when called eagerly) on flattened arguments, so each compiles
once per element count (about 1 s for a compounding formula on CPU); inside a jitted layer they are
inlined. A compounding formula runs 16 + 32 loop iterations (float64: 16 + 61) of roughly 100 flops
per element; a ratio about 30 flops.

Domains (a defined value, never inf/NaN, for finite arguments):

* ratios (dscr, ltv, cap_rate, debt_yield): a denominator <= 0 gives 0.0, as in the data set's
  ground truth (dscr = 0 if ads <= 0, debt_yield = 0 if loan <= 0); the same rule for ltv /
  cap_rate.
* annual_debt_service: years <= 0 or rate <= -12 (a monthly rate m <= -1) gives 0.0. A zero rate
  gives the limit 12 P / n = P / years. Any other rate, however small, uses the exact annuity: the
  data spec's ground-truth shortcut ``m <= 1e-6 -> loan / n`` (never taken by its data, rates >=
  4.5%) is an approximation, off by ~(n + 1) m / 2 relative, which we do not copy. Below |m| (n + 1)
  < eps/16 the first-order expansion P / years * (1 + (n + 1) m / 2) *is* exact to working precision
  and is used.
* noi_projection: growth <= -1 gives 0.0 (at growth = -1 the value is 0 for years > 0; below it the
  power is undefined). Negative years discount.

Gradients. Each formula has a ``jax.custom_jvp`` with its analytic derivative (the double-word
kernels use bit casts, which have no derivative) and the "double where" trick at domain edges: the
kernel only ever sees safe arguments, so ``jax.grad`` is finite everywhere, including at zero and
negative denominators (where the result is the constant 0.0 and the gradient is 0). Derivatives are
evaluated in working precision (not double-word); near a zero rate the annuity's rate derivative
loses relative accuracy to cancellation but stays finite.

Non-finite arguments: a NaN or +-inf argument gives NaN (propagated, never silently 0), so an
upstream bug stays visible; its gradient is 0. A caller that wants a "safe" value instead wraps the
result: ``jnp.nan_to_num(formula(...), nan=0.0, posinf=0.0, neginf=0.0)``. A finite argument can
still give +-inf when the true value overflows the dtype (e.g. noi = 1e38 over ads = 1e-5).

Dtypes: arguments are promoted together (JAX rules, Python scalars are weak) and computed in
float32, or float64 when that is the promoted type under x64; narrower floats (bfloat16, float16)
and integers are computed and returned as float32, since an "exact" formula in 8 bits of mantissa is
not one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .double_word import (
    _compound,
    _constant,
    _dw,
    _dw_div,
    _dw_mul,
    _guarded,
    _log1p,
    _promote,
    _scaled_exp,
    _two_prod,
    _two_sum,
)
from .registry import deterministic_expert

# ----------------------------------------------------------------------------------------------
# Ratios: scale * numerator / denominator
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
@functools.partial(jax.jit, static_argnums=2)  # compiled once per size, also for eager calls
def _scaled_quotient(numerator, denominator, scale):
    # scale * numerator is formed exactly as a double word, so the only rounding is the final one.
    product = _two_prod(_constant(scale, numerator), numerator)
    return _dw_div(product, _dw(denominator))[0]


@_scaled_quotient.defjvp
def _scaled_quotient_jvp(scale, primals, tangents):
    numerator, denominator = primals
    d_num, d_den = tangents
    value = _scaled_quotient(numerator, denominator, scale)
    return value, (scale * d_num - value * d_den) / denominator


def ratio(numerator, denominator, scale=1):
    """scale * numerator / denominator, correctly rounded (double-word), 0.0 where denominator <= 0,
    with an analytic gradient: the built-in ratios' kernel, for any formula that divides."""
    numerator, denominator = _promote(numerator, denominator)
    return _guarded(
        lambda n, d: _scaled_quotient(n, d, scale),
        (numerator, denominator),
        in_domain=denominator > 0,
        safe_args=(0.0, 1.0),
    )


@deterministic_expert(name="dscr", expert_id=32, args=("noi", "ads"))
def dscr(noi, ads):
    """Debt service coverage ratio, noi / ads; 0.0 when ads <= 0."""
    return ratio(noi, ads, 1)


@deterministic_expert(name="ltv", expert_id=33, args=("loan", "value"))
def ltv(loan, value):
    """Loan to value in percent, loan / value * 100; 0.0 when value <= 0."""
    return ratio(loan, value, 100)


@deterministic_expert(name="cap_rate", expert_id=34, args=("noi", "price"))
def cap_rate(noi, price):
    """Capitalisation rate in percent, noi / price * 100; 0.0 when price <= 0."""
    return ratio(noi, price, 100)


@deterministic_expert(name="debt_yield", expert_id=35, args=("noi", "loan"))
def debt_yield(noi, loan):
    """Debt yield in percent, noi / loan * 100; 0.0 when loan <= 0."""
    return ratio(noi, loan, 100)


# ----------------------------------------------------------------------------------------------
# Annual debt service of a fully amortising loan with monthly payments
# ----------------------------------------------------------------------------------------------
# 12 P m G / (G - 1) with G = (1+m)^n is rewritten as (P * rate) * G / (G - 1): 12 m = rate
# exactly, which saves two roundings, and G - 1 is carried separately to keep small rates exact.


def _small_rate(monthly, months):
    """Where the first-order expansion P/years * (1 + (n+1) m / 2) is exact to working precision:
    the next term, (n^2 - 1) m^2 / 12, is then below eps^2."""
    eps = jnp.finfo(monthly.dtype).eps
    return jnp.abs(monthly) * (months + 1.0) < eps / 16


@jax.custom_jvp
@jax.jit  # compiled once per size, also for eager calls (the loops are large)
def _annuity(principal, rate, years):
    twelve = _constant(12.0, rate)
    monthly = _dw_div(_dw(rate), _dw(twelve))
    months = _two_prod(twelve, years)
    interest = _two_prod(principal, rate)  # P * rate = 12 P m, exact

    growth, growth_m1, saturated, too_long = _compound(monthly, *months)
    # Saturating high (a positive rate) is harmless: G / (G - 1) is then 1 to far below an ulp, and
    # the saturated values give exactly that. Saturating low (a negative rate) is not.
    fallback = too_long | (saturated & (growth[0] < 1.0))
    zero = growth_m1[0] == 0.0  # only for a zero rate; reached by the small-rate branch anyway
    growth_m1 = tuple(jnp.where(zero, 1.0, x) for x in growth_m1)
    exact = _dw_mul(interest, _dw_div(growth, growth_m1))[0]

    small = _small_rate(monthly[0], months[0])
    first_order = _dw_mul(
        _dw_div(_dw(principal), _dw(years)),
        _two_sum(_constant(1.0, rate), 0.5 * (months[0] + 1.0) * monthly[0]),
    )[0]

    # Working precision: P rate G / (G - 1), G = exp(t), arranged so that nothing overflows on its
    # own: P rate / (1 - exp(-t)) for growth, P rate exp(t) / expm1(t) for decay.
    t = months[0] * _log1p(monthly[0])
    approx = jnp.where(
        t > 0, interest[0] / -jnp.expm1(-t), _scaled_exp(interest[0], t) / jnp.expm1(t)
    )

    return jnp.where(small, first_order, jnp.where(fallback, approx, exact))


@_annuity.defjvp
def _annuity_jvp(primals, tangents):
    principal, rate, years = primals
    d_principal, d_rate, d_years = tangents
    value = _annuity(principal, rate, years)

    monthly = rate / 12.0
    months = 12.0 * years
    log_growth = _log1p(monthly)
    small = _small_rate(monthly, months)
    # Closed-form partials of P rate H, H = G / (G - 1) = 1 / (1 - (1+m)^-n), u = G - 1:
    #   d/dP = rate H;  d/drate = P H (1 - n m / ((1+m) u));  d/dyears = -12 P rate H log1p(m) / u.
    # Lanes handled by the small-rate expansion get a harmless rate so that u != 0; their partials
    # come from the expansion P/years (1 + (n+1) m / 2) instead.
    safe_monthly = jnp.where(small, 0.01, monthly)
    safe_log = jnp.where(small, _log1p(jnp.full_like(monthly, 0.01)), log_growth)
    u = jnp.expm1(months * safe_log)
    h = -1.0 / jnp.expm1(-months * safe_log)
    safe_rate = 12.0 * safe_monthly
    dp = safe_rate * h
    dr = principal * h * (1.0 - months * safe_monthly / ((1.0 + safe_monthly) * u))
    dy = -12.0 * principal * safe_rate * h * safe_log / u

    expansion = 1.0 + 0.5 * (months + 1.0) * monthly
    dp = jnp.where(small, expansion / years, dp)
    dr = jnp.where(small, principal / years * (months + 1.0) / 24.0, dr)
    dy = jnp.where(small, -principal / years**2 * expansion + principal / years * 6.0 * monthly, dy)
    return value, dp * d_principal + dr * d_rate + dy * d_years


@deterministic_expert(
    name="annual_debt_service",
    expert_id=36,
    args=("principal", "rate", "years"),
    default_active=False,
)
def annual_debt_service(principal, rate, years):
    """Annual payment 12 P m (1+m)^n / ((1+m)^n - 1), m = rate / 12, n = 12 years.

    A zero rate gives P / years; years <= 0 or rate <= -12 gives 0.0.
    """
    principal, rate, years = _promote(principal, rate, years)
    return _guarded(
        _annuity,
        (principal, rate, years),
        in_domain=(years > 0) & (rate > -12.0),
        safe_args=(0.0, 0.05, 1.0),
    )


# ----------------------------------------------------------------------------------------------
# NOI projection with compound growth
# ----------------------------------------------------------------------------------------------


@jax.custom_jvp
@jax.jit  # compiled once per size, also for eager calls (the loops are large)
def _projection(noi, growth, years):
    periods = jnp.abs(years)
    factor, _, saturated, too_long = _compound(
        _dw(growth), periods, jnp.zeros_like(periods)
    )
    noi_dw = _dw(noi)
    exact = jnp.where(years >= 0, _dw_mul(noi_dw, factor)[0], _dw_div(noi_dw, factor)[0])
    approx = _scaled_exp(noi, years * _log1p(growth))
    return jnp.where(saturated | too_long, approx, exact)


@_projection.defjvp
def _projection_jvp(primals, tangents):
    noi, growth, years = primals
    d_noi, d_growth, d_years = tangents
    value = _projection(noi, growth, years)
    log_growth = _log1p(growth)
    factor = jnp.exp(years * log_growth)
    # d/dnoi = G;  d/dgrowth = noi G years / (1 + growth);  d/dyears = noi G log1p(growth).
    scaled = jnp.where(noi == 0, 0.0, noi * factor)
    return value, (
        factor * d_noi + scaled * years / (1.0 + growth) * d_growth + scaled * log_growth * d_years
    )


@deterministic_expert(
    name="noi_projection",
    expert_id=37,
    args=("noi", "growth", "years"),
    default_active=False,
)
def noi_projection(noi, growth, years):
    """NOI after ``years`` of compound growth, noi (1 + growth)^years; 0.0 when growth <= -1."""
    noi, growth, years = _promote(noi, growth, years)
    return _guarded(
        _projection,
        (noi, growth, years),
        in_domain=growth > -1.0,
        safe_args=(0.0, 0.0, 0.0),
    )
