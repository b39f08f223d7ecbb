"""The MXFP4 grouped expert matmul for a host CPU: our C++ kernel (`mxfp4_cpu.cc`), called from the jitted
program through XLA's FFI (`jax.ffi`).

On a CPU the XLA path decodes each routed expert's weights into memory (a gather per value, about 3 ns
each here) before it multiplies them; decode of a gpt-oss-20b token touches 2.4 billion values that way.
The kernel decodes a tile of 16 output rows at a time into a buffer that stays in cache, with register
permutes instead of gathers, and multiplies all of the expert's rows against it (`mxfp4_cpu.cc` says how).

The source is compiled on first use for the machine it runs on (`c++ -O3 -march=native -fopenmp`, against
the FFI headers jaxlib ships) into a per-user cache, keyed by the source, the compiler, jaxlib and the
CPU, and written atomically, so concurrent first uses and a second machine sharing the home directory
are safe. `load()` returns None and the reason where it cannot be built or loaded (no compiler, a CPU or
OS the build does not support); `hmoe_jax.model.kernel_dispatch` then runs the XLA path with one warning.
The source holds an AVX-512, an AVX2 and a scalar body; `-march=native` picks the best this CPU runs, and
`load(isa)` also builds the others here (`ISA_FLAGS`), so one AVX-512 host tests all three.

Registering the FFI target is the one process-wide effect, and it happens on the first call, not at
import.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .moe import PackedExpertWeights

SOURCE = Path(__file__).with_name("mxfp4_cpu.cc")
TARGET = "hmoe_mxfp4_grouped_matmul"
BF16_TARGET = "hmoe_bf16_matmul"
_VERSION = 2  # HmoeMxfp4KernelVersion() of the source this loader expects
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Which of the source's bodies a build compiles (`mxfp4_cpu.cc` picks AVX-512, AVX2 or scalar by the
# compiler's target macros). The model uses "native", the best this CPU has; the others exist so that an
# AVX-512 host also builds and tests the bodies an AVX2-only or older x86-64 CPU would run.
ISA_FLAGS = {
    "native": ("-march=native",),
    "avx2": ("-march=native", "-mno-avx512f"),  # AVX2 + FMA, no AVX-512 (on any AVX2 host)
    "scalar": ("-march=x86-64",),  # the x86-64 baseline: SSE2, no AVX
}


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be built or loaded here; the message says why."""


def cache_dir() -> Path:
    """Where built kernels live: `$XDG_CACHE_HOME/hmoe-jax/kernels` (default `~/.cache/...`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hmoe-jax" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelBuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")


def _cpu_identity() -> str:
    """The CPU model and feature flags: -march=native code built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str, isa: str = "native") -> Path:
    flags = (*_FLAGS, *ISA_FLAGS[isa])
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, jax.ffi.include_dir(), jax.__version__,
                                    " ".join(flags), _cpu_identity()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"mxfp4_cpu-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        result = subprocess.run([compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)],
                                capture_output=True, text=True, check=False)
        if result.returncode:
            raise KernelBuildError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-800:]}")
        os.replace(partial, library)  # atomic: a reader sees the whole library or none
    return library


def _target(name: str, isa: str) -> str:
    return name if isa == "native" else f"{name}_{isa}"


@functools.cache
def load(isa: str = "native") -> tuple[bool, str | None]:
    """(True, None) once the kernel (the `isa` build: `ISA_FLAGS`) is built, loaded and registered with XLA
    for the CPU platform, else (False, why). Built at most once per process; the verdict is kept."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown kernel build {isa!r}; choose from {sorted(ISA_FLAGS)}")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return False, f"the CPU kernel is built for Linux on x86-64 or arm64, not {platform.system()} " \
                      f"{platform.machine()}"
    if isa != "native" and platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the {isa} build is an x86-64 one"
    try:
        library = ctypes.CDLL(str(_build(_compiler(), isa)))
        if library.HmoeMxfp4KernelVersion() != _VERSION:
            return False, "the built CPU kernel is not the version this package expects"
        jax.ffi.register_ffi_target(_target(TARGET, isa), jax.ffi.pycapsule(library.HmoeMxfp4GroupedMatmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_target(BF16_TARGET, isa), jax.ffi.pycapsule(library.HmoeBf16Matmul),
                                    platform="cpu")
    except (KernelBuildError, OSError, AttributeError) as e:
        return False, f"{type(e).__name__}: {e}"
    return True, None


def body(isa: str = "native") -> str:
    """Which body the `isa` build compiled ("avx512", "avx2" or "scalar"), as the library reports it."""
    ok, why = load(isa)
    if not ok:
        raise KernelBuildError(why)
    library = ctypes.CDLL(str(_build(_compiler(), isa)))
    return {2: "avx512", 1: "avx2", 0: "scalar"}[library.HmoeKernelBody()]


def available() -> bool:
    return load()[0]


def grouped_matmul_mxfp4_cpu(rows, group_sizes, blocks, scales, table, isa: str = "native") -> jax.Array:
    """rows [M, K] sorted by expert, group_sizes [E] -> float32 [M, N]: row r of group e times
    `decode(blocks[e], scales[e]).T` (blocks [E, N, K/32, 16], scales [E, N, K/32] uint8), where
    `table` [256, 16] is the decoded value of each (scale, code) pair. Rows past the groups give zeros.
    Products and sums in float32 whatever the rows' dtype. `isa`: which build runs it (`ISA_FLAGS`)."""
    ok, why = load(isa)
    if not ok:
        raise KernelBuildError(why)
    out = jax.ShapeDtypeStruct((rows.shape[0], blocks.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_target(TARGET, isa), out)(rows.astype(jnp.float32), group_sizes.astype(jnp.int32),
                                         blocks, scales, jnp.asarray(table, jnp.float32))


def matmul_bf16_cpu(rows, weights, isa: str = "native") -> jax.Array:
    """rows [M, K] (float32) @ weights [K, N] (bfloat16, widened in registers) -> float32 [M, N]: what
    `rows @ weights.astype(float32)` computes, to float32 summation order, reading each weight once."""
    ok, why = load(isa)
    if not ok:
        raise KernelBuildError(why)
    out = jax.ShapeDtypeStruct((rows.shape[0], weights.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_target(BF16_TARGET, isa), out)(rows.astype(jnp.float32), weights)


def expert_ffn_mxfp4_cpu(rows, group_sizes, expert, w: PackedExpertWeights, act, table: np.ndarray) -> jax.Array:
    """Each expert's FFN on its rows, as `expert_ffn_mxfp4` (the Pallas kernel) computes it: rows [M, H]
    sorted by expert (`group_sizes` [E] rows each, `expert` [M] the expert of each row) ->
    `down(act(gate_up(row)))` [M, H] in the rows' dtype. Rows past the groups give garbage the caller
    drops (their routing weight is 0)."""
    dtype = rows.dtype
    expert = jnp.minimum(expert, w.gate_up_bias.shape[0] - 1)  # the hybrid layer's slots >= E: weight 0
    gate_up = grouped_matmul_mxfp4_cpu(rows, group_sizes, w.gate_up_blocks, w.gate_up_scales, table)
    gate_up = gate_up.astype(dtype) + w.gate_up_bias[expert].astype(dtype)
    y = grouped_matmul_mxfp4_cpu(act(gate_up), group_sizes, w.down_blocks, w.down_scales, table)
    return y.astype(dtype) + w.down_bias[expert].astype(dtype)
