"""Double-word arithmetic: exact sums, products and quotients of floats, rounded once at the end.

Each value is an unevaluated sum ``hi + lo`` of two floats (about twice the working precision), built
from error-free transformations, so a formula evaluated with it is correctly rounded but for values
within ~2^-20 ulp of a rounding tie (the accuracy argument, the measurements and the caveats are in
``underwriting``'s docstring, whose formulas were the first to use it). ``_guarded`` is the domain
handling every exact formula shares: a defined 0.0 outside the formula's domain, NaN for non-finite
arguments, and finite gradients everywhere ("double where").
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

# ----------------------------------------------------------------------------------------------
# Double-word arithmetic (a value is a pair (hi, lo) with hi = fl(hi + lo))
# ----------------------------------------------------------------------------------------------
# References for the algorithms: Dekker (1971) "A floating-point technique for extending the
# available precision"; Knuth TAOCP vol. 2, 4.2.2 (TwoSum); Joldes, Muller, Popescu (2017)
# "Tight and rigorous error bounds for basic building blocks of double-word arithmetic".

# Bit masks keeping the high half of the significand. float32: 24-bit significand -> 12 + 12 bits,
# so every partial product in _two_prod has <= 24 bits and is exact. float64: 53 bits -> 26 + 27;
# only lo*lo (<= 54 bits) can round, an error below 2^-106 of the product, far under what the
# double-word results need.
_SPLIT_MASKS = {
    np.dtype(np.float32): (np.uint32, np.uint32(0xFFFFF000)),
    np.dtype(np.float64): (np.uint64, np.uint64(0xFFFFFFFFF8000000)),
}


def _split(x):
    uint, mask = _SPLIT_MASKS[np.dtype(x.dtype)]
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, uint) & mask, x.dtype)
    return hi, x - hi  # x - hi is exact: it just drops the high bits


def _two_prod(a, b):
    """(p, e) with p = fl(a*b) and p + e == a*b (Dekker): exactly in float32, to 2^-106 relative
    in float64 (see _SPLIT_MASKS)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = (((ah * bh - p) + ah * bl) + al * bh) + al * bl
    return p, e


def _two_sum(a, b):
    """(s, e) with s = fl(a+b) and s + e == a+b exactly, for any magnitudes (Knuth)."""
    s = a + b
    b_virtual = s - a
    e = (a - (s - b_virtual)) + (b - b_virtual)
    return s, e


def _fast_two_sum(a, b):
    """As _two_sum, valid when |a| >= |b| (or a == 0); used to renormalise a double word."""
    s = a + b
    return s, b - (s - a)


def _constant(value, like):
    """``value`` broadcast like ``like``, hidden from XLA's algebraic simplifier.

    Under jit XLA reassociates floating-point adds with literal constants, e.g. it folds
    ``(1 + r) - 1`` to ``r``, which silently zeroes the error term of ``_two_sum(1, r)``. Behind an
    optimization barrier the constant is an opaque value, and XLA does not reassociate those. (Zero
    needs no barrier: every rewrite XLA can make with a zero operand is exact.)
    """
    scalar = lax.optimization_barrier(jnp.asarray(value, like.dtype))
    return jnp.broadcast_to(scalar, jnp.shape(like))


def _dw(x):
    return x, jnp.zeros_like(x)


def _scaled_exp(scale, exponent):
    """scale * exp(exponent) in working precision, without exp over- or underflowing on its own
    when the product is representable (the fallback of the compounding formulas)."""
    limit = -math.log(float(jnp.finfo(scale.dtype).tiny))  # exp(+-limit) is still normal
    direct = scale * jnp.exp(jnp.clip(exponent, -limit, limit))
    magnitude = jnp.abs(scale)
    logged = jnp.exp(exponent + jnp.log(jnp.where(magnitude > 0, magnitude, 1.0)))
    logged = jnp.where(magnitude > 0, jnp.sign(scale) * logged, 0.0)
    return jnp.where(jnp.abs(exponent) < limit, direct, logged)


def _log1p(x):
    """log(1 + x) for x > -1, accurate to ~1 ulp wherever ``log`` is.

    Used instead of ``jnp.log1p``, which XLA's CPU backend computes over 200 ulp off in float64
    (measured near x = -0.4). 1 + x is formed exactly as s + e, and log(s + e) = log(s) + e / s to
    far below an ulp since |e / s| <= 2^-p.
    """
    s, e = _two_sum(_constant(1.0, x), x)
    return jnp.log(s) + e / s


def _dw_add(x, y):
    s, e = _two_sum(x[0], y[0])
    t, f = _two_sum(x[1], y[1])
    s, e = _fast_two_sum(s, e + t)
    return _fast_two_sum(s, e + f)


def _dw_mul(x, y):
    p, e = _two_prod(x[0], y[0])
    return _fast_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def _dw_div(x, y):
    q = x[0] / y[0]
    # Remainder x - q*y carried in double word; its first digit corrects q to ~2^-2p.
    r = _dw_add(x, _dw_neg(_dw_mul(y, _dw(q))))
    return _fast_two_sum(q, (r[0] + r[1]) / y[0])


def _dw_neg(x):
    return -x[0], -x[1]


def _dw_clamp(x, lower, upper):
    """Saturate a double word into [lower, upper] (the bounds are floats)."""
    hi = jnp.clip(x[0], lower, upper)
    return hi, jnp.where(hi == x[0], x[1], 0.0)


def _dw_sqrt(x):
    """sqrt of a positive double word: the correctly rounded sqrt of hi plus a Newton correction."""
    root = jnp.sqrt(x[0])
    square, square_err = _two_prod(root, root)
    residual = ((x[0] - square) - square_err) + x[1]  # x[0] - square is exact (Sterbenz)
    return _fast_two_sum(root, residual / (2.0 * root))


def _growth_product_m1(u, w):
    """(1+u)(1+w) - 1 = u + w + u w, for u, w > -1 of one sign: never cancels catastrophically, so
    a tiny rate keeps all its digits (unlike forming (1+r)^k and subtracting 1 at the end)."""
    return _dw_add(_dw_add(u, w), _dw_mul(u, w))


def _select(mask, new, old):
    return tuple(jnp.where(mask, n, o) for n, o in zip(new, old))


# Whole exponents up to 2^16 - 1 go through binary powering. Its relative error grows like
# (exponent) * 2^-46 in float32 double words, so 2^16 keeps it below 2^-30, i.e. 1/64 ulp.
_EXPONENT_BITS = 16
# Growth factors are saturated at 2^+-60 (float32) / 2^+-500 (float64) so that squaring cannot
# overflow; a saturated factor switches the formula to its working-precision fallback.
_SATURATION_LOG2 = {np.dtype(np.float32): 60, np.dtype(np.float64): 500}
# Binary digits of a fractional exponent taken through square roots: the working precision plus 8,
# so that the linear treatment of what is left (below) is exact to ~2^-8 ulp even for log1p(r) ~ 1.
_FRACTION_BITS = {np.dtype(np.float32): 32, np.dtype(np.float64): 61}


def _whole_power(rate, periods):
    """((1+r)^k, (1+r)^k - 1, saturated) as double words; ``rate`` a double word > -1, ``periods``
    int32 in [0, 2^16). Binary powering (right to left), carrying both the growth and the growth
    minus one, each to full relative precision."""
    big = float(2.0 ** _SATURATION_LOG2[np.dtype(rate[0].dtype)])
    one = _dw(_constant(1.0, rate[0]))
    two = _dw(_constant(2.0, rate[0]))

    def step(bit, carry):
        acc_g, acc_u, base_g, base_u = carry
        take = ((periods >> bit) & 1) == 1
        acc_g = _select(take, _dw_mul(acc_g, base_g), acc_g)
        acc_u = _select(take, _growth_product_m1(acc_u, base_u), acc_u)
        base_g = _dw_mul(base_g, base_g)
        base_u = _dw_mul(base_u, _dw_add(base_u, two))  # (1+u)^2 - 1 = u (2 + u)
        return (
            _dw_clamp(acc_g, 1.0 / big, big),
            _dw_clamp(acc_u, -1.0, big),
            _dw_clamp(base_g, 1.0 / big, big),
            _dw_clamp(base_u, -1.0, big),
        )

    init = (one, _dw(jnp.zeros_like(rate[0])), _dw_add(one, rate), rate)
    growth, growth_m1, _, _ = lax.fori_loop(0, _EXPONENT_BITS, step, init)
    # All factors lie on the same side of 1, so a base that saturated and was used leaves the
    # accumulated growth saturated too; a saturated base that was never used does no harm.
    saturated = (growth[0] >= big) | (growth[0] <= 1.0 / big)
    return growth, growth_m1, saturated


def _fractional_power_m1(rate, fraction, fraction_lo):
    """(1+r)^f - 1 as a double word, f = fraction + fraction_lo (fraction in [0, 1), lo tiny).

    (1+r)^f is the product of (1+r)^(2^-i) over the binary digits b_i = 1 of f, and those roots come
    from repeated square roots, (1+v)^(1/2) - 1 = v / (1 + sqrt(1+v)): only +, -, *, / and sqrt,
    which IEEE rounds correctly, so no accuracy is borrowed from the backend's log1p / expm1 (XLA's
    float64 log1p on CPU was measured over 200 ulp off near -0.41). After K digits the rest t < 2^-K
    enters linearly, (1+r)^t - 1 = t log1p(r) (1 + O(t log1p r)), with log1p(r) = 2^K v_K
    (1 + O(2^-K log1p r)), v_K = (1+r)^(2^-K) - 1.
    """
    digits = _FRACTION_BITS[np.dtype(rate[0].dtype)]
    one = _dw(_constant(1.0, rate[0]))

    def step(_, carry):
        acc, root_m1, rest = carry
        root_m1 = _dw_div(root_m1, _dw_add(one, _dw_sqrt(_dw_add(one, root_m1))))
        doubled = 2.0 * rest  # exact, as is subtracting 1 from a value in [1, 2)
        take = doubled >= 1.0
        rest = jnp.where(take, doubled - 1.0, doubled)
        acc = _select(take, _growth_product_m1(acc, root_m1), acc)
        return acc, root_m1, rest

    init = (_dw(jnp.zeros_like(fraction)), rate, fraction)
    acc, root_m1, rest = lax.fori_loop(0, digits, step, init)
    tail = _two_sum(rest * 2.0**-digits, fraction_lo)  # power-of-two scalings are exact
    log_growth = (root_m1[0] * 2.0**digits, root_m1[1] * 2.0**digits)
    return _growth_product_m1(acc, _dw_mul(tail, log_growth))


def _compound(rate, periods_hi, periods_lo):
    """(1+r)^n and (1+r)^n - 1 as double words, for a double-word rate > -1 and an exponent
    n = periods_hi + periods_lo >= 0 (periods_lo a rounding error of periods_hi, or 0).

    Also returns two masks that make the double-word result meaningless: ``saturated`` (the
    whole-part growth left [2^-60, 2^60] resp. [2^-500, 2^500]) and ``too_long`` (2^16 or more whole
    periods, not powered at all).
    """
    whole = jnp.floor(periods_hi)
    too_long = whole >= 2.0**_EXPONENT_BITS
    periods = jnp.where(too_long, 0.0, whole).astype(jnp.int32)
    growth_i, growth_m1_i, saturated = _whole_power(rate, periods)
    # periods_hi - whole is exact; both parts are 0 for a whole exponent: the factor is exactly 1
    frac_m1 = _fractional_power_m1(rate, periods_hi - whole, periods_lo)
    growth = _dw_mul(growth_i, _dw_add(_dw(_constant(1.0, rate[0])), frac_m1))
    growth_m1 = _growth_product_m1(growth_m1_i, frac_m1)
    return growth, growth_m1, saturated, too_long


# ----------------------------------------------------------------------------------------------
# Domain handling shared by the formulas
# ----------------------------------------------------------------------------------------------


def _promote(*args):
    """Arguments as arrays of one float dtype (float32, or float64 under x64), broadcast."""
    dtype = jnp.result_type(*args)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        dtype = jnp.float32
    return jnp.broadcast_arrays(*(jnp.asarray(a, dtype) for a in args))


def _all_finite(*args):
    finite = jnp.isfinite(args[0])
    for a in args[1:]:
        finite = finite & jnp.isfinite(a)
    return finite


def _guarded(kernel, args, in_domain, safe_args):
    """Run ``kernel`` on arguments that are always safe ("double where"), then give 0.0 outside
    the domain and NaN for non-finite arguments.

    Substituting safe arguments *before* the kernel keeps the kernel, and so its derivative, free of
    inf/NaN in lanes that the outer ``where`` discards; otherwise reverse mode would multiply a zero
    cotangent by an infinite partial derivative and produce NaN.

    The (jitted) kernel sees flat arrays, so it compiles once per element count, not per shape.
    """
    finite = _all_finite(*args)
    ok = finite & in_domain
    safe = (jnp.where(ok, a, s).reshape(-1) for a, s in zip(args, safe_args))
    value = kernel(*safe).reshape(ok.shape)
    value = jnp.where(ok, value, 0.0)
    return jnp.where(finite, value, jnp.nan)
