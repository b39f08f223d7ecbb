"""How the tests compare our numbers with a reference's (transformers, OpenAI's reference, float64)."""

from __future__ import annotations

import numpy as np


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, in float64: one number per comparison, scale-free, so a bound such
    as 1e-6 reads the same for logits, hidden states and probe weights."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
