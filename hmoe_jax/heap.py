"""Give memory the XLA compiler freed back to the operating system.

Compiling a full-size gpt-oss forward (24 unrolled layers) allocates ~2 GiB of compiler data
structures. They are freed when the compile ends, but glibc keeps freed chunks in its malloc arenas
instead of unmapping them, so the process's resident set stays that much higher for the rest of the
run: on the 20b hybrid forward, 0.7 GiB of the compile and 0.8 GiB more after the first execution
stayed resident (measured in `bench/bench_20b.py`), which is what pushed that run over its 16 GiB
bound. `malloc_trim(0)` returns every free page of every arena.

Importing `hmoe_jax` registers `trim_after_compile` as a JAX monitoring listener, so each XLA
compile (or compile-cache load) that took at least `HMOE_TRIM_AFTER_COMPILE_S` seconds (default 1;
`off` disables it) is followed by one trim. Short compiles leave little behind and are skipped, so
the many small jits of a test run pay nothing. Where the C library has no `malloc_trim` (macOS,
musl), everything here is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

ENV = "HMOE_TRIM_AFTER_COMPILE_S"
DEFAULT_MIN_COMPILE_S = 1.0
# The JAX monitoring event recorded once per backend compile (or persistent-cache load) of a jitted
# function: jax._src.dispatch.BACKEND_COMPILE_EVENT.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_heap() -> bool:
    """Return the free pages of every malloc arena to the OS (glibc `malloc_trim(0)`).
    False where the C library has no such call or nothing was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def min_compile_seconds() -> float | None:
    """The compile duration from which `trim_after_compile` trims; None when turned off."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return DEFAULT_MIN_COMPILE_S
    if raw in ("off", "none", "false", "no"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected a number of seconds or 'off'") from None
    if value < 0:
        raise ValueError(f"{ENV}={raw!r}: expected a non-negative number of seconds or 'off'")
    return value


def trim_after_compile(event: str, duration: float, **_) -> None:
    """JAX monitoring listener: trim the heap after a compile that took long enough to matter."""
    if event != COMPILE_EVENT:
        return
    threshold = min_compile_seconds()
    if threshold is not None and duration >= threshold:
        release_freed_heap()


@functools.cache
def install() -> None:
    """Register `trim_after_compile` with JAX, once per process."""
    import jax.monitoring

    min_compile_seconds()  # a malformed setting fails at import, not inside a compile
    jax.monitoring.register_event_duration_secs_listener(trim_after_compile)
