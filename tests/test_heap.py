"""hmoe_jax.heap: freed heap goes back to the OS after long compiles."""

import ctypes
import ctypes.util

import jax
import jax.numpy as jnp
import pytest

import hmoe_jax  # noqa: F401  (installs the listener)
from hmoe_jax import heap


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
    released = heap.release_freed_heap()
    after = _rss()
    libc.free(pin)
    assert released
    assert held - after > 64 << 20, f"malloc_trim gave back only {(held - after) >> 20} MiB"


def test_listener_trims_only_long_compiles(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_freed_heap", lambda: calls.append(1) or True)
    monkeypatch.delenv(heap.ENV, raising=False)
    heap.trim_after_compile(heap.COMPILE_EVENT, 0.2, fun_name="f")
    assert calls == []
    heap.trim_after_compile(heap.COMPILE_EVENT, 5.0, fun_name="f")
    assert calls == [1]
    heap.trim_after_compile("/jax/some/other_event", 50.0)
    assert calls == [1]
    monkeypatch.setenv(heap.ENV, "off")
    heap.trim_after_compile(heap.COMPILE_EVENT, 50.0, fun_name="f")
    assert calls == [1]
    monkeypatch.setenv(heap.ENV, "0.1")
    heap.trim_after_compile(heap.COMPILE_EVENT, 0.2, fun_name="f")
    assert calls == [1, 1]


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_bad_setting_is_named(monkeypatch, value):
    monkeypatch.setenv(heap.ENV, value)
    with pytest.raises(ValueError, match=heap.ENV):
        heap.min_compile_seconds()


def test_importing_hmoe_jax_trims_after_a_real_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_freed_heap", lambda: calls.append(1) or True)
    monkeypatch.setenv(heap.ENV, "0")
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.5)(jnp.arange(7.0))  # a shape and function not compiled before
    assert calls, "no trim after the compile: the listener is not installed"
