"""Process-wide settings for running a full-size model on a host CPU, applied only when asked.

Importing `hmoe_jax` changes nothing in the process. The pipeline's commands (`python -m train|eval|convert`)
call `configure_host_memory()` first thing; a library user running a full-size model on a CPU calls it
once, before the first JAX computation. It does two things:

- XLA:CPU's default "concurrency-optimized" scheduler keeps independent work alive side by side; for a
  gpt-oss forward compiled as one program that means every layer's decoded MXFP4 experts at once
  (measured on the 20b, 12 layers, 32 x 128 tokens: 40 GiB of temporaries instead of 3.9 GiB). The
  memory-minimising scheduler (`--xla_cpu_enable_concurrency_optimized_scheduler=false` in `XLA_FLAGS`)
  reuses one layer's buffers for the next. XLA reads the flag when its CPU backend starts; a value
  already in `XLA_FLAGS` wins.
- Compiling a full-size forward allocates compiler data structures that glibc keeps resident after they
  are freed (0.7 GiB after the 20b's hybrid-forward compile, 0.8 GiB more after its first run, measured
  in `bench/bench_20b.py`). A JAX monitoring listener calls `malloc_trim(0)` after every compile (or
  compile-cache load) of `TRIM_AFTER_COMPILE_S` seconds or more; short compiles are skipped, so the many
  small jits of a test run pay nothing. Where the C library has no `malloc_trim` (macOS, musl), the
  trim is a no-op.

`release_freed_heap()` is the trim itself; the loader calls it after streaming a checkpoint in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import warnings

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
TRIM_AFTER_COMPILE_S = 1.0
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


def trim_after_compile(event: str, duration: float, **_) -> None:
    """JAX monitoring listener: trim the heap after a compile that took long enough to matter."""
    if event == COMPILE_EVENT and duration >= TRIM_AFTER_COMPILE_S:
        release_freed_heap()


def _xla_backend_started() -> bool:
    import jax._src.xla_bridge as xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


@functools.cache
def configure_host_memory() -> None:
    """Select XLA:CPU's memory-minimising scheduler (unless `XLA_FLAGS` already names the flag) and
    trim the heap after long compiles. Once per process; warns when JAX's backend already started,
    since XLA then no longer reads the flag."""
    import jax.monitoring

    if SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
        if _xla_backend_started():
            warnings.warn("configure_host_memory() came after JAX started its backend: XLA:CPU keeps its "
                          "default scheduler (call it before the first JAX computation)", stacklevel=2)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {SCHEDULER_FLAG}=false").strip()
    jax.monitoring.register_event_duration_secs_listener(trim_after_compile)
