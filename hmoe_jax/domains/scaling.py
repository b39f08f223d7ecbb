"""How a probe's target is scaled: the space a probe learns in, and the way back to the raw value.

The reference trains every probe on `sign(y) log1p(|y|)` of the raw value. That suits amounts from $1
to $1e8, and it is the default (`sign_log()`). It fails for a value whose scale is far from 1: a monthly
rate of 0.002-0.008 becomes 0.002-0.008 again (log1p is the identity there), a near-constant target; a
capacitance of 1e-9..1e-4 farads likewise. `sign_log(unit=...)` measures the value in a unit that
brings it near 1 first (a rate in per-mille, a capacitance in microfarads); `linear(center, unit)` is a
plain affine map for a value that is neither positive-and-wide nor signed-and-heavy-tailed.

    sign_log(unit):       encode(y) = sign(y / unit) log1p(|y / unit|)
    linear(center, unit): encode(y) = (y - center) / unit

Both are elementwise, invertible and differentiable. A scaling is data (`to_dict` / `from_dict`), so a
probe run records each target's scaling and the hybrid layer decodes with the same one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

KINDS = ("sign_log", "linear")


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A probe target's training space: `kind` ("sign_log" or "linear"), `unit` (> 0) and, for linear,
    `center`."""

    kind: str = "sign_log"
    unit: float = 1.0
    center: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown scaling kind {self.kind!r}; choose from {KINDS}")
        for name in ("unit", "center"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"scaling {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.unit <= 0:
            raise ValueError(f"scaling unit must be > 0, got {self.unit}")
        if self.kind == "sign_log" and self.center != 0.0:
            raise ValueError("a sign_log scaling has no center (use linear(center, unit))")

    def encode(self, y):
        """Raw values -> training space (works on numpy and jax arrays)."""
        if self.kind == "sign_log":
            scaled = y / self.unit
            return jnp.sign(scaled) * jnp.log1p(jnp.abs(scaled))
        return (y - self.center) / self.unit

    def decode(self, v):
        """Training space -> raw values."""
        if self.kind == "sign_log":
            return jnp.sign(v) * jnp.expm1(jnp.abs(v)) * self.unit
        return v * self.unit + self.center

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scaling:
        if not isinstance(d, Mapping) or set(d) - {"kind", "unit", "center"}:
            raise ValueError(f"a scaling is {{kind, unit, center}}, got {d!r}")
        return cls(**d)

    def __str__(self) -> str:
        if self.kind == "sign_log":
            return "sign-log" if self.unit == 1.0 else f"sign-log of y / {self.unit:g}"
        return f"(y - {self.center:g}) / {self.unit:g}"


def sign_log(unit: float = 1.0) -> Scaling:
    """sign(y / unit) log1p(|y / unit|): the reference's transform (unit 1), for values spanning decades."""
    return Scaling("sign_log", unit)


def linear(center: float = 0.0, unit: float = 1.0) -> Scaling:
    """(y - center) / unit: for a value in a known, narrow band."""
    return Scaling("linear", unit, center)


SIGN_LOG = sign_log()
