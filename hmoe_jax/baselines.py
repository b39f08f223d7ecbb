"""Generation baselines: the reference's prompt styles and its regex parsing with sanity ranges.

The same frozen model answers each scenario's raw prompt by greedy generation, wrapped in one of
three styles; numbers are pulled out of the text per metric and kept only inside the reference's
sanity ranges (outside them, or absent, the metric counts as missing: an infinite error).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

PROMPT_STYLES: Mapping[str, str] = {
    "zeroshot": "{prompt}\n",
    "cot": "{prompt}\nLet's think step by step, showing each calculation, then state the final values.\n",
    "structured": (
        "{prompt}\nAnswer in exactly this format:\nDSCR: <number>\nLTV: <number>%\n"
        "Cap rate: <number>%\nDebt yield: <number>%\n"
    ),
}

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


def format_prompt(prompt: str, style: str) -> str:
    try:
        return PROMPT_STYLES[style].format(prompt=prompt)
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; choose from {sorted(PROMPT_STYLES)}") from None


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
