"""hmoe_jax.runtime.host: nothing changes on import; `configure_host_memory` selects XLA:CPU's
memory-minimising scheduler and gives the freed heap back to the OS after long compiles."""

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from hmoe_jax.runtime import host


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _glibc():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    if lib is None or not hasattr(lib, "malloc_trim"):
        pytest.skip("the C library has no malloc_trim")
    lib.malloc.restype = ctypes.c_void_p
    lib.malloc.argtypes = [ctypes.c_size_t]
    lib.free.argtypes = [ctypes.c_void_p]
    return lib


def test_release_freed_heap_returns_pages_glibc_keeps():
    libc = _glibc()
    chunk, count = 4096, 24_000  # ~94 MiB in chunks far below the mmap threshold
    pointers = [libc.malloc(chunk) for _ in range(count)]
    for p in pointers:
        ctypes.memset(p, 1, chunk)  # touch: resident
    pin = libc.malloc(chunk)  # keeps the freed region off the top of the heap, where free() would trim it
    for p in pointers:
        libc.free(p)
    held = _rss()
    released = host.release_freed_heap()
    after = _rss()
    libc.free(pin)
    assert released
    assert held - after > 64 << 20, f"malloc_trim gave back only {(held - after) >> 20} MiB"


def test_listener_trims_only_long_compiles(monkeypatch):
    calls = []
    monkeypatch.setattr(host, "release_freed_heap", lambda: calls.append(1) or True)
    host.trim_after_compile(host.COMPILE_EVENT, host.TRIM_AFTER_COMPILE_S / 5, fun_name="f")
    assert calls == []
    host.trim_after_compile(host.COMPILE_EVENT, host.TRIM_AFTER_COMPILE_S * 5, fun_name="f")
    assert calls == [1]
    host.trim_after_compile("/jax/some/other_event", 50.0)
    assert calls == [1]


_PROBE = """
import json, os, sys
import jax._src.monitoring as monitoring
before = (os.environ.get("XLA_FLAGS"), len(monitoring.get_event_duration_listeners()))
import hmoe_jax, hmoe_jax.evaluation.demo, hmoe_jax.training.hybrid  # the whole library
after_import = (os.environ.get("XLA_FLAGS"), len(monitoring.get_event_duration_listeners()))
from hmoe_jax.runtime.host import configure_host_memory
configure_host_memory()
configured = (os.environ.get("XLA_FLAGS"), len(monitoring.get_event_duration_listeners()))
print(json.dumps([before, after_import, configured]))
"""


def test_importing_the_library_changes_nothing_and_configuring_applies_both_settings():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    before, after_import, configured = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_import == before, "importing hmoe_jax changed XLA_FLAGS or registered a JAX listener"
    assert configured[0] == f"{host.SCHEDULER_FLAG}=false"
    assert configured[1] == before[1] + 1


def test_configured_listener_trims_after_a_real_compile(monkeypatch):
    calls = []
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    monkeypatch.setattr(host, "TRIM_AFTER_COMPILE_S", 0.0)
    monkeypatch.setattr(host, "release_freed_heap", lambda: calls.append(1) or True)
    with pytest.warns(UserWarning, match="after JAX started its backend"):
        host.configure_host_memory.__wrapped__()  # the test session's backend is already up
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.5)(jnp.arange(7.0))  # a shape and function not compiled before
    assert calls, "no trim after the compile: the listener is not installed"
