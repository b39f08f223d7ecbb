"""The deterministic experts: exact formulas (pure `jnp`, no model) and the registry that names them.

`registry` is the one source of truth for each expert's name, router id and argument names;
`underwriting` holds the built-in commercial real estate formulas (DSCR, LTV, cap rate, debt yield,
annual debt service, NOI projection), registered when this package is imported. Adding an expert is one
decorated function: `@deterministic_expert(name="...", expert_id=38, args=("a", "b"))`.
"""

from .registry import (
    DeterministicExpert,
    default_expert_names,
    deterministic_expert,
    evaluate,
    get_expert,
    registered_experts,
    resolve_experts,
)
from .underwriting import annual_debt_service, cap_rate, debt_yield, dscr, ltv, noi_projection

__all__ = [
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
    "registered_experts",
    "resolve_experts",
]
