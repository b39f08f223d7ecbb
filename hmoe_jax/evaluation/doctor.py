"""What this machine runs, and whether the GPU kernels work on it (`python -m eval doctor`).

The report holds:
- the environment: JAX and jaxlib versions, the backend, every device with its memory;
- the kernel path each kernel takes under the options asked for (`RunOptions.kernels`; "auto" is
  "pallas-or-xla" on a GPU, "native-or-xla" on a CPU for a model the size of gpt-oss-20b, "xla" elsewhere);
- per kernel (flash sink attention, the MXFP4 expert matmul), at a tiny config's shapes, gpt-oss-20b's
  and the named checkpoint's, in float32 and bfloat16: whether it compiles for the default device on its
  own (compiled, never interpreted), and where it does, whether it agrees with the XLA path on random
  inputs (max |kernel - xla| / max |xla| within `TOLERANCE`); with `interpret`, the agreement is
  checked in Pallas interpret mode too (tiny shapes only: the interpreter is slow), which is how a CPU
  checks the kernels' arithmetic; on a CPU backend, the C++ CPU kernel likewise (whether it builds, and
  agreement on a few tokens);
- whether the named checkpoint's parameters, as `from_pretrained` would hold them, fit one device.

`Report.ok` is False on a kernel that compiles but disagrees with the XLA path, and where "pallas" or
"native" is asked for explicitly and a kernel does not compile (a run would fail).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..checkpoint import synthetic
from ..checkpoint.loading import planned_model
from ..checkpoint.location import resolve_checkpoint
from ..kernels import sink_attention
from ..model import kernel_dispatch
from ..model.config import GptOssConfig, load_config
from ..model.layers import PackedExperts, attention_masks, sink_attention_xla
from ..model.moe import SwiGLU, moe_packed_kernel
from ..model.transformer import GptOssForCausalLM, parameter_bytes
from ..runtime.files import user_path, write_json_atomically, write_text_atomically
from ..runtime.options import NATIVE, NATIVE_MODES, RunOptions, matmul_precision

# Relative error bound (max |kernel - xla| / max |xla|) per compute dtype: float32 runs IEEE dots on both
# paths, so only the summation order differs; bfloat16 rounds each product's inputs.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
DTYPES = ("float32", "bfloat16")
KERNELS = ("sink_attention", "expert_ffn_mxfp4", "expert_ffn_mxfp4_cpu")
# Tokens the CPU kernel's check runs at gpt-oss-20b's shapes: the XLA reference decodes every routed
# expert, which is slow on a CPU; a few tokens already route to most experts.
CPU_CHECK_TOKENS = 16
# Prompt positions (attention) and tokens (MoE) each check runs: the tiny config's, gpt-oss-20b's.
SEQUENCE = {"tiny": 64, "gpt-oss-20b": 256}
# A parameter set fits a device when it takes at most this share of its memory (the rest: activations,
# compiled programs, the framework).
FIT_SHARE = 0.85


def tiny_config() -> GptOssConfig:
    """The demo model's shapes (`python -m eval demo`), the first model a user runs."""
    from .demo import DEMO_MODEL

    return GptOssConfig.from_dict(DEMO_MODEL)


def gpt_oss_20b_config() -> GptOssConfig:
    return GptOssConfig.from_dict(synthetic.GPT_OSS_20B_CONFIG)


@dataclasses.dataclass
class KernelCheck:
    kernel: str
    shapes: str  # which config's shapes: "tiny", "gpt-oss-20b", "checkpoint"
    detail: str  # the call's sizes
    dtype: str
    compile_error: str | None  # None: the kernel compiled for the default device (or was not tried)
    rel_err: float | None = None  # compiled (or interpreted) kernel vs the XLA path, where run
    interpreted: bool = False  # rel_err measured in Pallas interpret mode
    bound: float = 0.0
    unsupported: str | None = None  # why the model never hands these shapes to the kernel (XLA runs them)

    @property
    def compiles(self) -> bool:
        return self.unsupported is None and self.compile_error is None

    @property
    def agrees(self) -> bool | None:
        return None if self.rel_err is None else bool(self.rel_err <= self.bound)


@dataclasses.dataclass
class Report:
    environment: dict[str, Any]
    options: dict[str, str]
    kernel_paths: dict[str, str]
    checks: list[KernelCheck]
    checkpoint: dict[str, Any] | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for check, row in zip(self.checks, d["checks"]):
            row.update(compiles=check.compiles, agrees=check.agrees)
        d["ok"] = self.ok
        return d


def device_memory_bytes(device) -> int | None:
    """A device's memory: the allocator's limit on an accelerator, physical memory on a host CPU."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def environment() -> dict[str, Any]:
    import jaxlib.version

    return {
        "jax": jax.__version__, "jaxlib": jaxlib.version.__version__, "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind,
                     "memory_bytes": device_memory_bytes(d)} for d in jax.local_devices()],
    }


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if not np.isfinite(ours).all():
        return float("inf")
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), np.finfo(np.float32).tiny))


def _verdict(name: str, fn: Callable, args: tuple) -> str | None:
    with warnings.catch_warnings():  # the report says it; no warning besides
        warnings.simplefilter("ignore", kernel_dispatch.KernelFallbackWarning)
        return kernel_dispatch.compile_verdict(name, fn, args)


def check_attention(config: GptOssConfig, shapes: str, dtype: str, seq: int, *, window: int | None,
                    interpret: bool) -> KernelCheck:
    """The sink-attention kernel over a batch of two prompts (one left-padded) against the XLA path."""
    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(seq), 4)
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = jax.random.normal(keys[0], (2, seq, heads, d), dt)
    k = jax.random.normal(keys[1], (2, seq, kv, d), dt)
    v = jax.random.normal(keys[2], (2, seq, kv, d), dt)
    sinks = jax.random.normal(keys[3], (heads,), jnp.float32)
    key_mask = jnp.ones((2, seq), jnp.int32).at[1, : seq // 4].set(0)
    scale = d**-0.5
    name = f"sink_attention(window={window})"
    detail = f"B=2, T={seq}, H={heads}, KV={kv}, D={d}, window={window}"
    check = KernelCheck("sink_attention", shapes, detail, dtype, None, bound=TOLERANCE[dtype])
    if not kernel_dispatch.attention_supported(q.shape, k.shape):
        check.unsupported = "head dim not a power of two >= 16, or heads not a multiple of the KV heads"
        return check

    def compiled(q, k, v, sinks, key_mask):
        return sink_attention(q, k, v, sinks, window=window, key_mask=key_mask, scale=scale, interpret=False)

    check.compile_error = _verdict(name, compiled, (q, k, v, sinks, key_mask))
    if check.compile_error is not None and not interpret:
        return check
    mode = "pallas" if check.compile_error is None else "interpret"
    full, sliding = attention_masks(key_mask, window or 1)

    @jax.jit
    def both(q, k, v, sinks, key_mask):
        ours = kernel_dispatch.attention(q, k, v, sinks, key_mask, window=window, scale=scale, mode=mode)
        return ours, sink_attention_xla(q, k, v, sinks, sliding if window else full, dt)

    ours, ref = both(q, k, v, sinks, key_mask)
    # Padded query rows attend to nothing but the sink: compare the real rows.
    real = np.asarray(key_mask, bool)
    check.rel_err = _rel_err(np.asarray(ours, np.float32)[real], np.asarray(ref, np.float32)[real])
    check.interpreted = mode == "interpret"
    return check


def random_packed_experts(config: GptOssConfig, dtype: str) -> PackedExperts:
    """`PackedExperts` at a config's shapes with random MXFP4 bytes, scales near 2**-6 and small biases,
    made on the default device."""
    options = RunOptions(dtype=dtype, param_dtype=dtype, experts="packed", moe_backend="ragged", kernels="xla",
                         execution="program")
    module = nnx.eval_shape(lambda: PackedExperts(config, options, rngs=nnx.Rngs(0)))
    key = jax.random.key(0)
    for path, param in nnx.to_flat_state(nnx.state(module)):
        key, sub = jax.random.split(key)
        name = path[-1]
        if name.endswith("_blocks"):
            value = jax.random.bits(sub, param.shape, jnp.uint8)
        elif name.endswith("_scales"):
            value = (118 + jax.random.randint(sub, param.shape, 0, 6)).astype(jnp.uint8)
        else:
            value = (0.02 * jax.random.normal(sub, param.shape)).astype(param.dtype)
        param.set_value(value)
    return module


def _moe_inputs(config: GptOssConfig, dtype: str, tokens: int):
    """(packed experts module, x [N, H], routing weights and indices [N, k]): random."""
    module = random_packed_experts(config, dtype)
    keys = jax.random.split(jax.random.key(tokens), 2)
    x = jax.random.normal(keys[0], (tokens, config.hidden_size), jnp.dtype(dtype))
    top, indices = jax.lax.top_k(jax.random.normal(keys[1], (tokens, config.num_local_experts)),
                                 config.num_experts_per_tok)
    return module, x, jax.nn.softmax(top, axis=-1).astype(jnp.dtype(dtype)), indices


def check_moe(config: GptOssConfig, shapes: str, dtype: str, tokens: int, *, interpret: bool) -> KernelCheck:
    """The MXFP4 expert matmul kernel (both of an expert's products, decode inside) against the XLA
    path of the same packed experts, on random routing. The compile check needs shapes only: the
    gpt-oss-20b-sized experts are made only where the kernel runs."""
    dt = jnp.dtype(dtype)
    x, weights, indices, packed = jax.eval_shape(
        lambda: (lambda m, *rest: (*rest, m.packed_weights()))(*_moe_inputs(config, dtype, tokens)))
    act, precision = SwiGLU(limit=config.swiglu_limit, alpha=config.swiglu_alpha), matmul_precision(dt)
    detail = (f"N={tokens}, E={config.num_local_experts}, k={config.num_experts_per_tok}, H={config.hidden_size}, "
              f"I={config.intermediate_size}")
    check = KernelCheck("expert_ffn_mxfp4", shapes, detail, dtype, None, bound=TOLERANCE[dtype])
    tile_n = kernel_dispatch.moe_tile_n(packed.gate_up_blocks.shape[1], packed.down_blocks.shape[1])
    if tile_n is None:
        check.unsupported = "no output tile fits the widths"
        return check
    compiled = functools.partial(moe_packed_kernel, act=act, precision=precision, tile_n=tile_n, interpret=False)
    check.compile_error = _verdict(f"expert_ffn_mxfp4(tile_n={tile_n})", compiled, (x, weights, indices, packed))
    if check.compile_error is not None and not interpret:
        return check
    mode = "pallas" if check.compile_error is None else "interpret"
    module, x, weights, indices = _moe_inputs(config, dtype, tokens)
    graphdef, state = nnx.split(module)

    @jax.jit
    def both(state, x, weights, indices):
        m = nnx.merge(graphdef, state)
        ours = kernel_dispatch.packed_moe(x, weights, indices, m.packed_weights(), act, precision, mode=mode)
        return ours, m(x, weights, indices)  # the module's own option: kernels="xla"

    ours, ref = both(state, x, weights, indices)
    check.rel_err = _rel_err(ours, ref)
    check.interpreted = mode == "interpret"
    return check


def check_moe_cpu(config: GptOssConfig, shapes: str, dtype: str, tokens: int) -> KernelCheck:
    """The C++ CPU kernel (`hmoe_jax.kernels.cpu`): whether it builds and runs here (on a CPU backend), and
    the whole MoE through it against the XLA path of the same packed experts."""
    tokens = min(tokens, CPU_CHECK_TOKENS)
    detail = (f"N={tokens}, E={config.num_local_experts}, k={config.num_experts_per_tok}, H={config.hidden_size}, "
              f"I={config.intermediate_size}")
    check = KernelCheck("expert_ffn_mxfp4_cpu", shapes, detail, dtype, None, bound=TOLERANCE[dtype])
    with warnings.catch_warnings():  # the report says it; no warning besides
        warnings.simplefilter("ignore", kernel_dispatch.KernelFallbackWarning)
        check.compile_error = kernel_dispatch.native_verdict("native-or-xla")
    if check.compile_error is not None:
        return check
    module, x, weights, indices = _moe_inputs(config, dtype, tokens)
    module.options = module.options.replace(moe_backend="grouped")  # the CPU's XLA backend
    graphdef, state = nnx.split(module)
    act, precision = module.activation, matmul_precision(jnp.dtype(dtype))

    @jax.jit
    def both(state, x, weights, indices):
        m = nnx.merge(graphdef, state)
        ours = kernel_dispatch.packed_moe(x, weights, indices, m.packed_weights(), act, precision, mode="native")
        return ours, m(x, weights, indices)  # the module's own option: kernels="xla"

    ours, ref = both(state, x, weights, indices)
    check.rel_err = _rel_err(ours, ref)
    return check


def checkpoint_fit(checkpoint: str | Path, options: RunOptions) -> dict[str, Any]:
    """The named checkpoint's parameters as `from_pretrained` would hold them, against one device."""
    model = planned_model(checkpoint, options)
    need = parameter_bytes(model)
    device = jax.local_devices()[0]
    have = device_memory_bytes(device)
    fits = None if have is None else need <= FIT_SHARE * have
    n = len(jax.local_devices())
    return {"path": str(checkpoint), "options": model.options.to_dict(), "parameter_bytes": need,
            "device_bytes": have, "fits_one_device": fits, "devices": n,
            "per_device_bytes_sharded": need // n}


def kernel_paths(mode: str, checks: list[KernelCheck], shapes: str, dtype: str, platform: str) -> dict[str, str]:
    """Which path each kernel takes under `mode` (a resolved `RunOptions.kernels`) on `platform`, judged
    by the checks at `shapes` in the run's compute `dtype`."""
    paths = {}
    for kernel in KERNELS:
        mine = [c for c in checks if c.kernel == kernel and c.shapes == shapes and c.dtype == dtype]
        native = mode in NATIVE_MODES
        if mode == "xla":
            paths[kernel] = "xla"
        elif (kernel == "expert_ffn_mxfp4_cpu") != native:
            paths[kernel] = "xla (no CPU kernel)" if kernel == "sink_attention" else f"not used (kernels={mode})"
        elif native:
            why = next((c.compile_error for c in mine if c.compile_error), None)
            paths[kernel] = "native" if why is None else \
                f"native: FAILS ({why})" if mode == NATIVE else f"xla (the CPU kernel cannot run here: {why})"
        elif mode in ("xla", "interpret"):
            paths[kernel] = mode
        elif mine and all(c.unsupported for c in mine):
            paths[kernel] = f"xla (these shapes never reach the kernel: {mine[0].unsupported})"
        elif mode == "pallas" and platform != "gpu":
            paths[kernel] = "pallas, interpreted (Pallas compiles for GPUs; on this platform it interprets)"
        elif mode == "pallas":
            paths[kernel] = "pallas" if all(c.compiles for c in mine) else "pallas: FAILS (does not compile here)"
        else:
            paths[kernel] = "pallas" if mine and all(c.compiles for c in mine) else \
                "xla (the kernel does not compile here)"
    return paths


def run_doctor(checkpoint: str | Path | None = None, options: RunOptions | None = None, *, interpret: bool = False,
               revision: str | None = None, shape_sets: tuple[str, ...] = ("tiny", "gpt-oss-20b"),
               progress: Callable[[str], None] | None = None) -> Report:
    """Every check of the module doc; `checkpoint` (a path or hub id) adds its shapes and its fit."""
    options = options or RunOptions()
    configs = {"tiny": tiny_config, "gpt-oss-20b": gpt_oss_20b_config}
    sets = {name: configs[name]() for name in shape_sets}
    fit = None
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint, revision)
        fit = checkpoint_fit(checkpoint, options)
        own = load_config(checkpoint)
        if all(own != c for c in sets.values()):
            sets["checkpoint"] = own
        judged = next(name for name, c in sets.items() if c == own)
        resolved = RunOptions(**fit["options"])
    else:  # as for gpt-oss's checkpoints: bfloat16 weights, MXFP4 experts, the size of the judged config
        judged = "gpt-oss-20b" if "gpt-oss-20b" in sets else next(iter(sets))
        stored = RunOptions(param_dtype="bfloat16", experts="packed", kernels="xla", execution="program")
        size = parameter_bytes(nnx.eval_shape(lambda: GptOssForCausalLM(sets[judged], stored, rngs=nnx.Rngs(0))))
        resolved = options.resolved(stored_dtype="bfloat16", mxfp4_source=True, param_bytes=size)
    checks = []
    for name, config in sets.items():
        seq = SEQUENCE.get(name, SEQUENCE["gpt-oss-20b"])
        may_interpret = interpret and name == "tiny"
        for dtype in DTYPES:
            for window in dict.fromkeys((config.sliding_window, None)):
                if progress:
                    progress(f"sink_attention {name} {dtype} window={window}")
                checks.append(check_attention(config, name, dtype, seq, window=window, interpret=may_interpret))
            if progress:
                progress(f"expert_ffn_mxfp4 {name} {dtype}")
            checks.append(check_moe(config, name, dtype, seq, interpret=may_interpret))
            if jax.default_backend() == "cpu":
                if progress:
                    progress(f"expert_ffn_mxfp4_cpu {name} {dtype}")
                checks.append(check_moe_cpu(config, name, dtype, seq))
    paths = kernel_paths(resolved.kernels, checks, judged, resolved.dtype, jax.default_backend())
    if resolved.experts == "dense" and resolved.kernels != "xla":
        for kernel in ("expert_ffn_mxfp4", "expert_ffn_mxfp4_cpu"):
            if not paths[kernel].startswith("not used"):
                paths[kernel] = "xla (dense experts; the kernel reads packed MXFP4)"
    problems = [f"{c.kernel} ({c.shapes}, {c.dtype}, {c.detail}) disagrees with the XLA path: relative error "
                f"{c.rel_err:.2e} > {c.bound:.0e}" + (" (interpret mode)" if c.interpreted else "")
                for c in checks if c.agrees is False]
    problems += [f"kernels='{resolved.kernels}' was asked for, but {k} does not compile here: a run would fail"
                 for k, path in paths.items() if "FAILS" in path]
    return Report(environment(), resolved.to_dict(), paths, checks, fit, problems)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def report_markdown(report: Report) -> str:
    env = report.environment
    lines = ["# hmoe-jax doctor", "", f"**{'OK' if report.ok else 'PROBLEMS FOUND'}**", "",
             f"JAX {env['jax']} (jaxlib {env['jaxlib']}), backend **{env['backend']}**, "
             f"{env['process_count']} process(es).", "", "| device | platform | kind | memory |", "|---|---|---|---:|"]
    lines += [f"| {d['id']} | {d['platform']} | {d['kind']} | {_gib(d['memory_bytes'])} |"
              for d in env["devices"]]
    lines += ["", "Options: " + ", ".join(f"{k}={v}" for k, v in report.options.items()), "",
              "| kernel | path |", "|---|---|"]
    lines += [f"| {k} | {p} |" for k, p in report.kernel_paths.items()]
    lines += ["", "## Kernels at real shapes", "",
              "| kernel | shapes | sizes | dtype | compiles here | vs XLA (max rel. error) | bound | agrees |",
              "|---|---|---|---|---|---:|---:|---|"]
    for c in report.checks:
        compiles = f"not used: {c.unsupported}" if c.unsupported else \
            "yes" if c.compile_error is None else f"no: {c.compile_error}"
        err = "-" if c.rel_err is None else f"{c.rel_err:.2e}" + (" (interpreted)" if c.interpreted else "")
        agrees = {None: "-", True: "yes", False: "**NO**"}[c.agrees]
        lines.append(f"| {c.kernel} | {c.shapes} | {c.detail} | {c.dtype} | {compiles} | {err} | {c.bound:.0e} | "
                     f"{agrees} |")
    if report.checkpoint:
        fit = report.checkpoint
        verdict = {None: "unknown (the device reports no memory)", True: "fits", False: "does NOT fit"}[
            fit["fits_one_device"]]
        lines += ["", "## Checkpoint", "", f"`{fit['path']}`: parameters {_gib(fit['parameter_bytes'])} as loaded "
                  f"({fit['options']['experts']} experts, storage {fit['options']['param_dtype']}); one device "
                  f"has {_gib(fit['device_bytes'])}: **{verdict}** (at most {FIT_SHARE:.0%} of a device's memory "
                  f"for parameters). Sharded over all {fit['devices']} devices (--mesh-expert, --mesh-tensor): "
                  f"~{_gib(fit['per_device_bytes_sharded'])} each."]
    if report.problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out: str | Path) -> Path:
    """doctor.json and doctor.md in `out`."""
    out = user_path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "doctor.json", report.to_dict())
    write_text_atomically(out / "doctor.md", report_markdown(report))
    return out
