"""`RunOptions`: every run-time choice of a model, in the one object the model holds.

A checkpoint fixes the architecture (`GptOssConfig`); how it runs is this object's business:

    dtype         compute dtype: "float32" or "bfloat16" (norms, softmax and attention scores stay float32)
    param_dtype   how floating-point weights are stored: "float32", "bfloat16", or "auto": each tensor as
                  the checkpoint stores it (float32 for a freshly initialised model)
    experts       "packed": MXFP4 experts stay as the checkpoint's uint8 blocks and scales, decoded inside
                  the expert product; "dense": decoded once, at load time
    moe_backend   how tokens reach their experts (`hmoe_jax.model.moe`): "dense", "ragged", "grouped", or
                  "auto" (chosen per call from the platform and the sizes)
    kernels       "xla"; "pallas": the Pallas kernels (compiled on a GPU), failing loudly where one does not
                  compile; "pallas-or-xla": each kernel where it compiles for the device, the XLA path with
                  one warning where it does not; "interpret": the kernels in Pallas interpret mode (tests
                  and debugging); "native": the C++ MXFP4 expert matmul for a host CPU
                  (`hmoe_jax.kernels.cpu`; attention stays XLA), failing loudly where it cannot be built;
                  "native-or-xla": it where it builds, the XLA path with one warning where it does not
    execution     "program": one jitted program for a whole forward (XLA schedules across layers), or
                  "layerwise": the embedding, each kind of block and the head compiled as programs of
                  their own and run one after another from Python (compiles in seconds, in little memory)

Every field may be "auto" when asked for. `resolved` replaces each "auto" by what fits the platform and
the checkpoint, following the checkpoint as `transformers`' `torch_dtype="auto"` does:

- dtype: float32 on a host CPU, where XLA's bfloat16 dots run 1.35-1.5x slower than float32 and a whole
  gpt-oss-20b block only 5-10% faster in bfloat16 (`bench/results/dtypes.md`): too little to give up
  float32's exactness, the parity oracle; on an accelerator the checkpoint's own dtype (bfloat16 for
  gpt-oss);
- param_dtype "auto" stays "auto": the loader keeps each tensor's stored dtype, so bfloat16 weights
  cost 2 bytes whatever the compute dtype (lossless: widening bfloat16 to float32 is exact);
- experts: packed when the checkpoint stores MXFP4 experts (a quarter of bfloat16's bytes; the decode
  is bit-exact), dense otherwise;
- kernels: "pallas-or-xla" on a GPU (the kernels have not been run on every GPU, driver and Triton: a
  kernel that does not compile must cost speed, not the run); on a host CPU "native-or-xla" for a model
  of `NATIVE_MIN_PARAM_BYTES` or more (the experts' decode is most of a gpt-oss-20b forward, and the
  C++ kernel does it several times faster, `bench/results/cpu_kernel.md`; a machine without a C++
  compiler runs the XLA path), "xla" for a smaller one (where the decode costs little, the exact
  float32 path, bit for bit the dense experts' results); it needs the model's `param_bytes` and stays
  "auto" on a CPU without them; "xla" elsewhere (TPU);
- execution: "layerwise" on a host CPU for a model of `LAYERWISE_MIN_PARAM_BYTES` or more (compiling the
  20b's 24 unrolled layers as one program took ~2.5 GiB beside its 12.8 GiB of weights, and ~100 s),
  "program" otherwise.

A model holds its resolved options in every module that reads them (`GptOssForCausalLM.options`), so
they are part of the model's graph definition: every jitted entry point, which keys its compile cache on
that graph, compiles anew for other options and never reuses another path's program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

AUTO = "auto"
COMPUTE_DTYPES = ("float32", "bfloat16")
EXPERT_STORAGE = ("packed", "dense")
MOE_BACKENDS = ("dense", "ragged", "grouped")
NATIVE = "native"  # our C++ CPU kernel (`hmoe_jax.kernels.cpu`), failing loudly where it cannot run
NATIVE_MODES = (NATIVE, "native-or-xla")
KERNEL_PATHS = ("xla", "pallas", "pallas-or-xla", "interpret", *NATIVE_MODES)
EXECUTIONS = ("program", "layerwise")
# From this many bytes of parameters, a host CPU runs the blocks as programs of their own ("layerwise").
LAYERWISE_MIN_PARAM_BYTES = 4 << 30
# From this many bytes of parameters, a host CPU runs the packed experts through the C++ kernel.
NATIVE_MIN_PARAM_BYTES = 4 << 30

# float64 too, for gradient checks under `jax_enable_x64` (the commands offer COMPUTE_DTYPES only).
_DTYPES = (*COMPUTE_DTYPES, "float64")
_CHOICES = {
    "dtype": _DTYPES,
    "param_dtype": _DTYPES,
    "experts": EXPERT_STORAGE,
    "moe_backend": MOE_BACKENDS,
    "kernels": KERNEL_PATHS,
    "execution": EXECUTIONS,
}
# What may change on a model that is already built; the others decide how its parameters are stored.
RUN_TIME_FIELDS = ("dtype", "moe_backend", "kernels", "execution")


def dtype_name(dtype: Any) -> str:
    """"float32" / "bfloat16" for a dtype given by name, numpy/JAX dtype or scalar type; "auto" stays."""
    if dtype is None or dtype == AUTO:
        return AUTO
    return jnp.dtype(dtype).name


def matmul_precision(dtype) -> jax.lax.Precision:
    """float32 runs are parity checks: IEEE float32 products (no TF32 or bfloat16 passes on GPU/TPU).
    bfloat16 runs take the platform's fast default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def default_platform() -> str:
    """The platform "auto" resolves for when none is named: JAX's default backend."""
    return jax.default_backend()


@dataclasses.dataclass(frozen=True)
class RunOptions:
    dtype: str = AUTO
    param_dtype: str = AUTO
    experts: str = AUTO
    moe_backend: str = AUTO
    kernels: str = AUTO
    execution: str = AUTO

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            try:
                object.__setattr__(self, name, dtype_name(getattr(self, name)))
            except TypeError:
                raise ValueError(f"RunOptions.{name}: {getattr(self, name)!r} is not a dtype") from None
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value != AUTO and value not in choices:
                raise ValueError(f"RunOptions.{name}: unknown value {value!r}; choose from {(AUTO, *choices)}")

    def replace(self, **changes) -> RunOptions:
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == AUTO:
            raise ValueError("RunOptions.dtype is 'auto': resolve the options first (RunOptions.resolved)")
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        """The dtype new floating-point weights are created in ("auto": float32, a fresh model's)."""
        return jnp.dtype("float32" if self.param_dtype == AUTO else self.param_dtype)

    @property
    def precision(self) -> jax.lax.Precision:
        return matmul_precision(self.compute_dtype)

    def resolved(self, *, platform: str | None = None, stored_dtype: str = "float32", mxfp4_source: bool = False,
                 param_bytes: int | None = None) -> RunOptions:
        """Every "auto" replaced by its choice for `platform` (default: JAX's default backend) and a
        checkpoint whose floating-point weights are `stored_dtype` and whose experts are MXFP4 when
        `mxfp4_source`. `execution` needs the model's `param_bytes` and stays "auto" without them;
        `param_dtype` "auto" and `moe_backend` "auto" are choices the loader and each call make."""
        platform = platform or default_platform()
        host = platform == "cpu"
        changes: dict[str, str] = {}
        if self.dtype == AUTO:
            stored = dtype_name(stored_dtype)
            changes["dtype"] = "float32" if host or stored not in COMPUTE_DTYPES else stored
        if self.experts == AUTO:
            changes["experts"] = "packed" if mxfp4_source else "dense"
        if self.kernels == AUTO and (not host or param_bytes is not None):
            big = param_bytes is not None and param_bytes >= NATIVE_MIN_PARAM_BYTES
            changes["kernels"] = "pallas-or-xla" if platform == "gpu" else "native-or-xla" if host and big else "xla"
        if self.execution == AUTO and param_bytes is not None:
            changes["execution"] = "layerwise" if host and param_bytes >= LAYERWISE_MIN_PARAM_BYTES else "program"
        return self.replace(**changes) if changes else self

    def describe(self) -> str:
        """One line for logs and reports."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)
