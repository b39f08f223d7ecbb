"""The second built-in domain: two formulas of basic circuit design, in one module.

    voltage_divider(v_in, r_top, r_bottom)  V_out = v_in r_bottom / (r_top + r_bottom)   volts
    rc_time_constant(resistance, capacitance)  tau = 1000 R C                                milliseconds

Why this domain: it is unlike CRE in the ways a researcher's own domain is. Its prompts write values in
engineering units with non-ASCII symbols ("4.7 kΩ", "22 µF"), which the byte-level tokenizer must keep;
`voltage_divider` takes three arguments; and a capacitance (1e-7 to 1e-4 farads) is a value whose scale
defeats the reference's sign-log target (log1p is the identity there, so every target is ~0): its probe
learns it in microfarads (`sign_log(unit=1e-6)`).

Both formulas are exact in the project's sense (`formulas.double_word`): the products and the sum are
formed without rounding and the result is rounded once. A divider whose resistances sum to <= 0 gives
0.0, as the built-in ratios do for a denominator <= 0.
"""

from __future__ import annotations

import random
from typing import Any

import jax
import jax.numpy as jnp

from ..formulas import deterministic_expert
from ..formulas.double_word import _constant, _dw, _dw_div, _dw_mul, _guarded, _promote, _two_prod, _two_sum
from .cre.negatives import UNRELATED_QUESTIONS
from .domain import Domain, Metric
from .scaling import sign_log

# ---------------------------------------------------------------------------------------------- experts


@jax.custom_jvp
@jax.jit  # compiled once per size, also for eager calls
def _divider(v_in, r_top, r_bottom):
    return _dw_div(_two_prod(v_in, r_bottom), _two_sum(r_top, r_bottom))[0]


@_divider.defjvp
def _divider_jvp(primals, tangents):
    v_in, r_top, r_bottom = primals
    dv, dt, db = tangents
    total = r_top + r_bottom
    value = _divider(v_in, r_top, r_bottom)
    return value, (r_bottom * dv - value * dt + (v_in - value) * db) / total


@deterministic_expert(name="voltage_divider", expert_id=50, args=("v_in", "r_top", "r_bottom"),
                      default_active=False)
def voltage_divider(v_in, r_top, r_bottom):
    """Output voltage of an unloaded divider; 0.0 when r_top + r_bottom <= 0."""
    v_in, r_top, r_bottom = _promote(v_in, r_top, r_bottom)
    return _guarded(_divider, (v_in, r_top, r_bottom), in_domain=r_top + r_bottom > 0,
                    safe_args=(0.0, 1.0, 1.0))


@jax.custom_jvp
@jax.jit
def _time_constant_ms(resistance, capacitance):
    # 1000 R is exact as a double word; times C, rounded once.
    return _dw_mul(_two_prod(_constant(1000.0, resistance), resistance), _dw(capacitance))[0]


@_time_constant_ms.defjvp
def _time_constant_ms_jvp(primals, tangents):
    resistance, capacitance = primals
    dr, dc = tangents
    return _time_constant_ms(resistance, capacitance), 1000.0 * (capacitance * dr + resistance * dc)


@deterministic_expert(name="rc_time_constant", expert_id=51, args=("resistance", "capacitance"),
                      default_active=False)
def rc_time_constant(resistance, capacitance):
    """Time constant of an RC stage in milliseconds, 1000 R C (R in ohms, C in farads)."""
    resistance, capacitance = _promote(resistance, capacitance)
    return _guarded(_time_constant_ms, (resistance, capacitance), in_domain=jnp.ones_like(resistance, bool),
                    safe_args=(0.0, 0.0))


# ---------------------------------------------------------------------------------------------- writing values

# The E12 series: the preferred values resistors and capacitors are sold in.
E12 = (1.0, 1.2, 1.5, 1.8, 2.2, 2.7, 3.3, 3.9, 4.7, 5.6, 6.8, 8.2)


def volts(value: float) -> str:
    return f"{value:g} V"


def ohms(value: float) -> str:
    for scale, prefix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g} {prefix}Ω"
    return f"{value:g} Ω"


def farads(value: float) -> str:
    for scale, prefix in ((1e-6, "µ"), (1e-9, "n")):
        if value >= scale * (1 - 1e-9):
            return f"{value / scale:.3g} {prefix}F"
    return f"{value / 1e-12:.3g} pF"


def _e12(rng: random.Random, low_exponent: int, high_exponent: int) -> float:
    """A preferred value: an E12 mantissa times 10^k, as the decimal literal reads (no 4.699999e-6)."""
    return float(f"{rng.choice(E12)}e{rng.randint(low_exponent, high_exponent)}")


# ---------------------------------------------------------------------------------------------- data

_DIVIDER_QUESTIONS = (
    "A voltage divider takes {v} across a {rt} top resistor and a {rb} bottom resistor. What is the output voltage?",
    "What is Vout of a divider with {rt} on top and {rb} below, fed from {v}?",
    "Find the output of a resistive divider: input {v}, upper leg {rt}, lower leg {rb}.",
)
_RC_QUESTIONS = (
    "What is the RC time constant of a {r} resistor charging a {c} capacitor?",
    "A {c} capacitor charges through {r}. How long is one time constant?",
    "Compute tau for R = {r} and C = {c}.",
)
_BOTH = ("A {v} supply feeds a divider of {rt} (top) and {rb} (bottom); a {r} resistor then charges a {c} "
         "capacitor. Give the divider's output voltage and the RC time constant.")


def _marker(expert: str, inputs: dict[str, float], output: float) -> dict[str, Any]:
    return {"expert": expert, "inputs": inputs, "output": output}


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` circuit questions from `random.Random(seed)`: a divider, an RC stage, or both. Truths are
    computed in Python's float64 from the values as written, rounded to the answer's digits."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        asks = rng.choices(("divider", "rc", "both"), weights=(0.4, 0.4, 0.2))[0]
        v_in = round(rng.uniform(1.0, 48.0), 1)
        r_top, r_bottom = _e12(rng, 2, 5), _e12(rng, 2, 5)
        resistance, capacitance = _e12(rng, 2, 4), _e12(rng, -7, -5)
        words = {"v": volts(v_in), "rt": ohms(r_top), "rb": ohms(r_bottom), "r": ohms(resistance),
                 "c": farads(capacitance)}
        markers = []
        if asks in ("divider", "both"):
            markers.append(_marker("voltage_divider", {"v_in": v_in, "r_top": r_top, "r_bottom": r_bottom},
                                   round(v_in * r_bottom / (r_top + r_bottom), 4)))
        if asks in ("rc", "both"):
            markers.append(_marker("rc_time_constant", {"resistance": resistance, "capacitance": capacitance},
                                   round(1000.0 * resistance * capacitance, 4)))
        template = {"divider": rng.choice(_DIVIDER_QUESTIONS), "rc": rng.choice(_RC_QUESTIONS), "both": _BOTH}[asks]
        record = {"id": f"circuits_{seed}_{i:05d}", "input_prompt": template.format(**words),
                  "computation_markers": markers, "groups": {"asks": asks}}
        record["answer"] = DOMAIN.answer_text(record)
        records.append(record)
    return records


CIRCUIT_QUESTIONS = (
    "Why do voltage dividers make poor power supplies?",
    "What does the time constant of an RC circuit tell you?",
    "Explain how a pull-up resistor works.",
    "When should I use a ceramic capacitor instead of an electrolytic one?",
    "What is the difference between a resistor's power rating and its resistance?",
    "How does loading a voltage divider change its output?",
    "Why are resistor values sold in E12 steps?",
    "What is ripple in a power supply and how do capacitors reduce it?",
    "Explain what impedance means for a capacitor at high frequency.",
    "How do I read the colour bands on a resistor?",
    "What is a low-pass filter used for in audio?",
    "Why do capacitors have a voltage rating?",
    "What happens to a capacitor's charge when the supply is removed?",
    "Describe how a potentiometer works as a variable divider.",
    "Why might a circuit use two resistors instead of one?",
    "What is the role of a decoupling capacitor near a microcontroller?",
    "How do tolerances of resistors affect a divider's accuracy?",
    "What is Ohm's law, in words?",
    "Why does an RC circuit never fully charge in theory?",
    "What is the difference between series and parallel resistors?",
    "Should I measure resistance with the circuit powered? Explain.",
    "What are surface-mount resistor packages like 0603 and 0805?",
    "How does temperature affect a resistor's value?",
    "Explain debouncing a switch with a capacitor, without numbers.",
    "What is the purpose of a bleeder resistor?",
    "Why do electrolytic capacitors have polarity?",
    "What is a voltage reference and when is it better than a divider?",
    "How do I choose resistor values for an LED, conceptually?",
    "What is equivalent series resistance in a capacitor?",
    "Why do oscilloscopes show an RC charging curve as an exponential?",
    "What is a Schmitt trigger and why pair it with an RC network?",
    "Describe the safety risks of large charged capacitors.",
    "What does µF stand for on a capacitor?",
    "Why do high-value resistors pick up noise?",
    "What is the difference between kΩ and MΩ resistors in use?",
    "How do dividers set the gain of an op-amp circuit?",
    "What is a snubber circuit?",
    "Why is a capacitor said to block DC?",
    "How do I discharge a capacitor safely before working on a board?",
    "What is the difference between a time constant and a half-life?",
)

DOMAIN = Domain(
    name="circuits",
    description="circuit design: voltage divider output, RC time constant",
    metrics=(
        Metric("voltage_divider", "Vout: {:.3f} V", (0.0, 100.0),
               {"v_in": volts, "r_top": ohms, "r_bottom": ohms},
               label_pattern=r"v ?out|output voltage"),
        Metric("rc_time_constant", "Time constant: {:.4f} ms", (0.0, 1e6),
               {"resistance": ohms, "capacitance": farads},
               label_pattern=r"time constant|tau|τ",
               scaling={"capacitance": sign_log(unit=1e-6)}),
    ),
    generate=generate,
    negatives=CIRCUIT_QUESTIONS + UNRELATED_QUESTIONS[:40],
    # No `groups`: each record's own {"asks": "divider" | "rc" | "both"} is its report column.
)
