"""The C++ CPU kernels (`hmoe_jax.kernels.cpu`) against the XLA path, at gpt-oss-20b shapes, on this CPU.

    python bench/bench_cpu_kernel.py [--tokens 1 16 128 512] [--rows 1 4 16] [--runs 5]
                                     [--out bench/results/cpu_kernel.md]

Both variants of each row run the model's own code with only `RunOptions.kernels` changed ("xla" or
"native"), jitted, warmed up, then timed (median of `--runs`, `block_until_ready`):
- MoE, one layer after the router (hidden 2880, intermediate 2880, 32 experts top-4, MXFP4 experts with
  random bytes), `--tokens` tokens routed at random: `hmoe_jax.model.layers.PackedExperts`. XLA decodes
  the experts to float32 in memory, then multiplies; the kernel decodes inside the product.
- bfloat16-stored weights times `--rows` float32 rows (decode): an attention projection (2880 -> 64 x 64)
  through `layers.project`, and the lm_head (2880 -> 201088) through `transformer.unembed`. XLA widens the
  weight to a float32 copy first; the kernel widens each weight in registers.

Beside each row the hardware limit, measured here: the bytes the product must read (the routed experts'
MXFP4 blocks and scales, or the bf16 weight) over the memory bandwidth (a numpy copy), or its FLOPs over
the float32 matmul peak (numpy's BLAS), whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2880, 2880, 32, 4
HEADS, HEAD_DIM, VOCAB = 64, 64, 201088
MXFP4_BYTES_PER_VALUE = 17 / 32  # 16 bytes of codes and one scale byte per 32 values


def median_s(fn, runs: int) -> float:
    """Median wall time of `runs` calls of `fn` after one warm-up, each blocked on."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hardware() -> dict:
    a = np.ones(1 << 28, np.float32)
    b = np.empty_like(a)
    copy_s = min(_timed(lambda: np.copyto(b, a)) for _ in range(3))
    x = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    mm_s = min(_timed(lambda: x @ x) for _ in range(3))
    return {"bandwidth_gb_s": 2 * a.nbytes / copy_s / 1e9, "matmul_gflop_s": 2 * 2048**3 / mm_s / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _limit_s(hw: dict, nbytes: float, flops: float) -> float:
    return max(nbytes / (hw["bandwidth_gb_s"] * 1e9), flops / (hw["matmul_gflop_s"] * 1e9))


def packed_experts():
    """One 20b MoE layer's experts, MXFP4 with random bytes and scales near 2**-6 (filled from numpy: the
    module's own random initialisation costs seconds)."""
    import jax.numpy as jnp
    from flax import nnx

    from hmoe_jax.checkpoint.synthetic import GPT_OSS_20B_CONFIG
    from hmoe_jax.model.config import GptOssConfig
    from hmoe_jax.model.layers import PackedExperts
    from hmoe_jax.runtime.options import RunOptions

    config = GptOssConfig.from_dict(GPT_OSS_20B_CONFIG)
    assert (config.hidden_size, config.intermediate_size, config.num_local_experts) == (HIDDEN, INTERMEDIATE, EXPERTS)
    options = RunOptions(dtype="float32", param_dtype="bfloat16", experts="packed", moe_backend="auto",
                         kernels="xla", execution="program")
    module = nnx.eval_shape(lambda: PackedExperts(config, options, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        name = path[-1]
        if name.endswith("_blocks"):
            value = rng.integers(0, 256, variable.shape, dtype=np.uint8)
        elif name.endswith("_scales"):
            value = rng.integers(118, 124, variable.shape, dtype=np.uint8)
        else:
            value = 0.1 * rng.standard_normal(variable.shape)
        variable.set_value(jnp.asarray(value, variable.dtype))
    return module


def bench_moe(tokens: list[int], runs: int, hw: dict) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    module = packed_experts()
    graphdef, state = nnx.split(module)
    rows = []
    for n in tokens:
        rng = np.random.default_rng(n)
        x = jnp.asarray(rng.standard_normal((n, HIDDEN)), jnp.float32)
        top, indices = jax.lax.top_k(jnp.asarray(rng.standard_normal((n, EXPERTS)), jnp.float32), TOP_K)
        weights = jax.nn.softmax(top, axis=-1)
        touched = len(np.unique(np.asarray(indices)))
        nbytes = touched * 3 * INTERMEDIATE * HIDDEN * MXFP4_BYTES_PER_VALUE
        flops = 2 * n * TOP_K * 3 * INTERMEDIATE * HIDDEN
        row = {"workload": f"MoE layer, {n} token{'s' * (n > 1)} ({touched} experts)",
               "limit_s": _limit_s(hw, nbytes, flops)}
        for mode in ("xla", "native"):
            g = graphdef
            forward = jax.jit(lambda s, x, w, i, g=g, mode=mode: _with_kernels(nnx.merge(g, s), mode)(x, w, i))
            row[mode] = median_s(lambda: forward(state, x, weights, indices), runs)
        print(_line(row), flush=True)
        rows.append(row)
    return rows


def _with_kernels(module, mode: str):
    module.options = module.options.replace(kernels=mode)
    return module


def bench_projections(row_counts: list[int], runs: int, hw: dict) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from hmoe_jax.model.layers import project
    from hmoe_jax.model.transformer import unembed
    from hmoe_jax.runtime.options import RunOptions

    rng = np.random.default_rng(1)
    q_proj = jnp.asarray(0.02 * rng.standard_normal((HIDDEN, HEADS, HEAD_DIM)), jnp.bfloat16)
    lm_head = jnp.asarray(0.02 * rng.standard_normal((HIDDEN, VOCAB)), jnp.bfloat16)
    out = []
    for m in row_counts:
        x = jnp.asarray(rng.standard_normal((1, m, HIDDEN)), jnp.float32)
        for name, w, fn in (
            ("attention q projection 2880 -> 4096", q_proj,
             lambda x, w, mode: project("bte,ehd->bthd", x, w, 1, RunOptions(dtype="float32", kernels=mode))),
            ("lm_head 2880 -> 201088", lm_head, lambda x, w, mode: unembed(x, w, jnp.float32, mode)),
        ):
            size = w.size
            row = {"workload": f"{name}, {m} row{'s' * (m > 1)}",
                   "limit_s": _limit_s(hw, 2 * size, 2 * m * size)}
            for mode in ("xla", "native"):
                compiled = jax.jit(lambda x, w, fn=fn, mode=mode: fn(x, w, mode))
                row[mode] = median_s(lambda: compiled(x, w), runs)
            print(_line(row), flush=True)
            out.append(row)
    return out


def _line(row: dict) -> str:
    return (f"| {row['workload']} | {1e3 * row['xla']:.1f} | {1e3 * row['native']:.1f} | "
            f"{row['xla'] / row['native']:.1f}x | {1e3 * row['limit_s']:.1f} | {row['limit_s'] / row['native']:.0%} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python bench/bench_cpu_kernel.py --tokens 1 128 --rows 1 --runs 3")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu_kernel.md")
    args = p.parse_args(argv)
    out = args.out.expanduser().resolve()

    from hmoe_jax.kernels import cpu

    ok, why = cpu.load()
    if not ok:
        print(f"the CPU kernel cannot run here: {why}")
        return 1
    hw = hardware()
    print("| workload | XLA (ms) | kernel (ms) | speed-up | hardware limit (ms) | kernel at % of limit |")
    rows = bench_moe(args.tokens, args.runs, hw) + bench_projections(args.rows, args.runs, hw)
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    text = "\n".join([
        "# The C++ CPU kernels against the XLA path, gpt-oss-20b shapes",
        "",
        "`python bench/bench_cpu_kernel.py` (" + " ".join(sys.argv[1:]) + f"); {threads} threads, medians of "
        f"{args.runs} runs. Hardware measured here: memory bandwidth {hw['bandwidth_gb_s']:.1f} GB/s (numpy "
        f"copy), float32 matmul {hw['matmul_gflop_s']:.0f} GFLOP/s (numpy). The limit is the larger of bytes "
        "read / bandwidth and FLOPs / matmul peak.",
        "",
        "| workload | XLA (ms) | kernel (ms) | speed-up | hardware limit (ms) | kernel at % of limit |",
        "|---|---:|---:|---:|---:|---:|",
        *(_line(r) for r in rows),
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, body in ((out, text), (out.with_suffix(".json"), json.dumps({"hardware": hw, "rows": rows}, indent=1))):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(body)
        os.replace(partial, path)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
