"""The deterministic experts: exact formulas (pure `jnp`, no model) and the registry that names them.

`registry` is the one source of truth for each expert's name, router id and argument names;
`underwriting` holds the built-in commercial real estate formulas (DSCR, LTV, cap rate, debt yield,
annual debt service, NOI projection), registered when this package is imported; `double_word` the exact
arithmetic they are built from. Adding an expert is one decorated function:
`@deterministic_expert(name="...", expert_id=40, args=("a", "b"))`; `ratio(numerator, denominator,
scale)` is the built-ins' exact quotient (0.0 where the denominator is <= 0) for a formula of one's own.
"""

from .registry import (
    DeterministicExpert,
    check_router_ids,
    default_expert_names,
    deterministic_expert,
    evaluate,
    get_expert,
    registered_experts,
    resolve_experts,
)
from .underwriting import annual_debt_service, cap_rate, debt_yield, dscr, ltv, noi_projection, ratio

__all__ = [
    "check_router_ids",
    "DeterministicExpert",
    "annual_debt_service",
    "cap_rate",
    "debt_yield",
    "default_expert_names",
    "deterministic_expert",
    "dscr",
    "evaluate",
    "get_expert",
    "ltv",
    "noi_projection",
    "ratio",
    "registered_experts",
    "resolve_experts",
]
