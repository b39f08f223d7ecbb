"""The registry of deterministic computation experts: each expert's name, router id and argument names.

The one source of truth for the experts: the data set's computation markers, the probes' targets and
the hybrid layer all read it.

A deterministic expert is a pure ``jnp`` function of named scalar arguments, registered under a name
and an expert id (its slot in the extended router; the 32 neural experts of gpt-oss-20b use 0..31).
The hybrid layer extracts the arguments from the hidden state, calls the expert through
:func:`evaluate`, and projects the result back.

Registering an expert is one decorator; nothing else changes::

    @deterministic_expert(name="dscr", expert_id=32, args=("noi", "ads"))
    def dscr(noi, ads): ...

``args`` may be omitted: the argument names are then read from the function's signature, in order.
When given, they must equal the signature's names (a guard against typos); either way they define
the column order of the ``[..., n_args]`` tensor that :func:`evaluate` takes. The decorator returns
the function unchanged, so ``formulas.dscr(noi, ads)`` is the plain formula. Lookups:
:func:`get_expert`, :func:`registered_experts`, :func:`default_expert_names`, and
:func:`resolve_experts` to validate a configured list. Tests that register a throwaway expert remove
it again with ``_unregister(name)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeterministicExpert:
    """One registered formula: ``fn(*arg_names) -> value``, routed to as expert ``expert_id``."""

    name: str
    expert_id: int
    arg_names: tuple[str, ...]
    fn: Callable[..., jax.Array]
    default_active: bool = True

    @property
    def num_args(self) -> int:
        return len(self.arg_names)

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, DeterministicExpert] = {}


def _signature_arg_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    names = []
    for param in inspect.signature(fn).parameters.values():
        # evaluate() passes the arguments positionally, one column each: *args / **kwargs or
        # keyword-only parameters would make the column order ambiguous.
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            raise ValueError(
                f"deterministic expert {fn.__name__!r}: parameter {param.name!r} must be a plain "
                f"positional parameter (got {param.kind.description})"
            )
        names.append(param.name)
    return tuple(names)


def deterministic_expert(
    *,
    name: str,
    expert_id: int,
    args: Iterable[str] | None = None,
    default_active: bool = True,
) -> Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]:
    """Decorator registering ``fn`` as the deterministic expert ``name``, router id ``expert_id``.

    ``args`` names the arguments in column order; when omitted they are read from ``fn``'s
    signature, when given they must equal it. Registering a name or an id that is already taken
    raises ``ValueError``. Returns ``fn`` unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"expert name must be a non-empty string, got {name!r}")
    if isinstance(expert_id, bool) or not isinstance(expert_id, (int, np.integer)) or expert_id < 0:
        raise ValueError(
            f"expert {name!r}: expert_id must be a non-negative int, got {expert_id!r}"
        )
    expert_id = int(expert_id)

    def register(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        signature_names = _signature_arg_names(fn)
        if args is None:
            arg_names = signature_names
        else:
            arg_names = tuple(args)
            if arg_names != signature_names:
                raise ValueError(
                    f"expert {name!r}: args {arg_names} do not match the signature of "
                    f"{fn.__name__}{signature_names}"
                )
        if not arg_names:
            raise ValueError(f"expert {name!r} takes no arguments")
        existing = _REGISTRY.get(name)
        if existing is not None and not _same_declaration(existing, expert_id, arg_names, fn):
            raise ValueError(f"deterministic expert name {name!r} is already registered (id {existing.expert_id}, "
                             f"arguments {existing.arg_names})")
        for other in _REGISTRY.values():
            if other.expert_id == expert_id and other.name != name:
                raise ValueError(
                    f"expert {name!r}: expert_id {expert_id} is already used by {other.name!r}"
                )
        _REGISTRY[name] = DeterministicExpert(
            name=name,
            expert_id=expert_id,
            arg_names=arg_names,
            fn=fn,
            default_active=bool(default_active),
        )
        return fn

    return register


def _same_declaration(existing: DeterministicExpert, expert_id: int, arg_names: tuple[str, ...],
                      fn: Callable[..., jax.Array]) -> bool:
    """Whether a registration repeats one already made: a domain module imported a second time (a
    `.py` domain loaded again under another module name, a notebook re-running a cell) declares the
    same expert again; the new function replaces the old. A different id or argument list is a clash."""
    return (existing.expert_id == expert_id and existing.arg_names == arg_names
            and existing.fn.__qualname__ == fn.__qualname__)


def _unregister(name: str) -> None:
    """Remove ``name`` from the registry. For tests that register a throwaway expert."""
    if name not in _REGISTRY:
        raise ValueError(f"deterministic expert {name!r} is not registered")
    del _REGISTRY[name]


def get_expert(name: str) -> DeterministicExpert:
    """The registered expert ``name``; ``ValueError`` naming the registered ones if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown deterministic expert {name!r}; registered: {sorted(_REGISTRY)}"
        ) from None


def registered_experts() -> tuple[DeterministicExpert, ...]:
    """All registered experts, ordered by expert id."""
    return tuple(sorted(_REGISTRY.values(), key=lambda e: e.expert_id))


def default_expert_names() -> tuple[str, ...]:
    """Names of the experts active by default (dscr, ltv, cap_rate, debt_yield), by expert id."""
    return tuple(e.name for e in registered_experts() if e.default_active)


def resolve_experts(names: Iterable[str]) -> tuple[DeterministicExpert, ...]:
    """Validate a configured list of expert names and return the experts, in the given order.

    Config-time check: a bare string or a non-string entry is a ``TypeError``; unknown names,
    repeated names and repeated expert ids are a ``ValueError`` naming the offenders. An empty
    list is valid (no deterministic experts).
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"expected a sequence of expert names, got the string {names!r}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"expert names must be strings, got {bad!r}")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown deterministic expert(s) {unknown}; registered: {sorted(_REGISTRY)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"deterministic expert(s) listed more than once: {repeated}")
    experts = tuple(_REGISTRY[n] for n in names)
    by_id: dict[int, list[str]] = {}
    for e in experts:
        by_id.setdefault(e.expert_id, []).append(e.name)
    clashes = {i: ns for i, ns in by_id.items() if len(ns) > 1}
    if clashes:  # unreachable through the decorator, which refuses a taken id; kept as a guard
        raise ValueError(f"deterministic experts share an expert id: {clashes}")
    return experts


def check_router_ids(names: Iterable[str], num_neural_experts: int) -> None:
    """``ValueError`` naming the experts whose router id lies among a model's neural experts
    ``0..num_neural_experts - 1`` (a deterministic slot must not shadow one)."""
    clashes = [f"{e.name} (id {e.expert_id})" for e in resolve_experts(names) if e.expert_id < num_neural_experts]
    if clashes:
        raise ValueError(f"expert id(s) of {', '.join(clashes)} collide with the model's neural experts "
                         f"0..{num_neural_experts - 1}: register them with an expert_id >= {num_neural_experts}")


def evaluate(expert: DeterministicExpert | str, args: jax.Array) -> jax.Array:
    """Apply ``expert`` to an argument tensor ``[..., n_args]`` (columns in ``expert.arg_names``
    order) and return the values ``[...]``."""
    if isinstance(expert, str):
        expert = get_expert(expert)
    args = jnp.asarray(args)
    if args.ndim == 0 or args.shape[-1] != expert.num_args:
        raise ValueError(
            f"expert {expert.name!r} takes {expert.num_args} arguments {expert.arg_names}; "
            f"the argument tensor must have shape [..., {expert.num_args}], got {args.shape}"
        )
    return expert.fn(*(args[..., i] for i in range(expert.num_args)))
