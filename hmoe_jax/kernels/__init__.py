"""Pallas kernels for the GPU path: sink attention and the MXFP4 grouped expert matmul.

Both kernels compute exactly what the XLA path computes (`model.Attention.attend`, the `moe` backends
over `mxfp4.dequantize_mxfp4`), are tested against it in Pallas interpret mode on CPU, and are written
for the Pallas Triton backend (2-D dots, power-of-two tiles, no gathers inside the kernel).

The model routes through them by itself (`hmoe_jax.kernels.ops`): `Attention.attend` on prefill
(causal + padding key mask + optional sliding window; KV-cache decode stays on XLA) and
`PackedExperts` (MXFP4 experts decoded inside the forward). Which path runs is `select(requested)`:

- `"xla"`: the XLA path; `"pallas"`: the kernels, compiled where they compile (a GPU backend) and
  interpreted elsewhere; `"interpret"`: the kernels in Pallas interpret mode everywhere (slow: tests,
  debugging on GPU);
- `"auto"` (the default) resolves, first match wins, from: the innermost `with kernels.use(mode)`,
  the `HMOE_KERNELS` environment variable (`auto|xla|pallas|interpret`; the older `HMOE_PALLAS=0/1`
  means `xla`/`pallas`), then the backend: `"pallas"` on a GPU, `"xla"` everywhere else.

A model built with `kernels=` other than `"auto"` (`GptOssForCausalLM(..., kernels="xla")`,
`from_pretrained(..., kernels=...)`) ignores the context and the environment. The choice is made at
trace time; the model's own jitted entry points (`GptOssForCausalLM.__call__`, `generate`) key their
compile caches on it, any other `jax.jit` around the model keeps what it traced first.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import jax

from .attention import sink_attention
from .moe import PackedExpertWeights, grouped_matmul_mxfp4, moe_pallas_mxfp4

__all__ = [
    "MODES",
    "PackedExpertWeights",
    "available",
    "check_mode",
    "grouped_matmul_mxfp4",
    "moe_pallas_mxfp4",
    "select",
    "sink_attention",
    "use",
    "use_pallas",
]

MODES = ("auto", "xla", "pallas", "interpret")
_LEGACY = {"0": "xla", "false": "xla", "no": "xla", "off": "xla", "1": "pallas", "true": "pallas", "yes": "pallas",
           "on": "pallas"}
_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("hmoe_kernels", default=None)


def _backend() -> str:
    return jax.default_backend()


def available() -> bool:
    """True where the kernels compile natively: JAX's default backend is a GPU (CUDA or ROCm)."""
    return _backend() == "gpu"


def check_mode(mode: str, where: str = "kernels") -> str:
    """`mode` if it is one of `MODES`, else ValueError."""
    if mode not in MODES:
        raise ValueError(f"{where}: unknown kernel mode {mode!r}; choose from {MODES}")
    return mode


def _from_environment() -> str | None:
    value = os.environ.get("HMOE_KERNELS", "").strip().lower()
    if value:
        return None if check_mode(value, "HMOE_KERNELS") == "auto" else value
    legacy = os.environ.get("HMOE_PALLAS", "").strip().lower()
    return _LEGACY.get(legacy)


def select(requested: str | None = "auto") -> str:
    """The path to run: `"xla"`, `"pallas"` or `"interpret"` (see the module docstring for the order)."""
    if requested not in (None, "auto"):
        return check_mode(requested, "kernels")
    context = _context.get()
    if context not in (None, "auto"):
        return context
    return _from_environment() or ("pallas" if available() else "xla")


@contextlib.contextmanager
def use(mode: str | None) -> Iterator[None]:
    """Within the block, models built with `kernels="auto"` trace the `mode` path (`None`: no change)."""
    if mode is None:
        yield
        return
    token = _context.set(check_mode(mode, "kernels.use"))
    try:
        yield
    finally:
        _context.reset(token)


def use_pallas() -> bool:
    """Whether models built with `kernels="auto"` route attention and packed experts through the kernels."""
    return select() != "xla"
