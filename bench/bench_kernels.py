"""Pallas kernels vs the XLA path at gpt-oss-20b shapes, on a GPU.

    python bench/bench_kernels.py [--seq 1024 4096] [--tokens 1 64 512 4096] [--dtype bfloat16]
                                  [--runs 20] [--out bench/results/kernels.md]

Attention (one layer's core, after the projections): batch 1, 64 query heads on 8 KV heads, head_dim
64, sliding window 128 and full causal, `--seq` tokens. XLA: `model.Attention.attend` on the mask from
`model.attention_masks` (materialises [B, KV, G, T, S] scores). Pallas: `kernels.sink_attention`.

MoE (one layer, after the router): hidden 2880, intermediate 2880, 32 experts top-4, `--tokens` tokens,
experts MXFP4-packed as in the checkpoint. Variants:
- `xla packed`: `model.PackedExperts` as the model runs it today (decode every expert with
  `dequantize_mxfp4` inside the jitted forward, then the `ragged` backend);
- `xla predecoded`: `moe_ragged` on experts decoded once ahead (4x the weight bytes resident: the
  XLA ceiling without a decode per call);
- `pallas`: `kernels.moe_pallas_mxfp4` (decode fused into the grouped matmul tiles).

Each variant is jitted, warmed up, then timed (median of `--runs`, `block_until_ready`). The report also
gives max |pallas - xla| / max |xla| per shape as a sanity check (bf16: expect ~1e-2).
Without a GPU this prints why and exits 0: interpret mode says nothing about kernel speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmoe_jax import kernels, moe
from hmoe_jax.config import GptOssConfig
from hmoe_jax.model import Attention, PackedExperts, _precision, attention_masks

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 64, 8, 64, 128
HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2880, 2880, 32, 4


def gpt_oss_20b_moe_config() -> GptOssConfig:
    return GptOssConfig(
        vocab_size=201088, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K, sliding_window=WINDOW, layer_types=("sliding_attention",),
    )


def median_seconds(fn, args, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def bench_attention(seq: int, window: int | None, dtype, runs: int) -> dict:
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (1, seq, HEADS, HEAD_DIM), dtype)
    k = jax.random.normal(keys[1], (1, seq, KV_HEADS, HEAD_DIM), dtype)
    v = jax.random.normal(keys[2], (1, seq, KV_HEADS, HEAD_DIM), dtype)
    sinks = jax.random.normal(keys[3], (HEADS,), jnp.float32)
    full, sliding = attention_masks(jnp.ones((1, seq), jnp.int32), WINDOW)
    allowed = sliding if window else full

    @jax.jit
    def xla(q, k, v, sinks, allowed):
        # `Attention.attend` reads only these attributes; no need to build (and time) the projections.
        layer = SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype, sinks=sinks)
        return Attention.attend(layer, q, k, v, allowed)

    @jax.jit
    def pallas(q, k, v, sinks, allowed):
        key_mask = jnp.diagonal(allowed, axis1=1, axis2=2)
        return kernels.sink_attention(q, k, v, sinks, window=window, key_mask=key_mask, scale=HEAD_DIM**-0.5)

    args = (q, k, v, sinks, allowed)
    visible = seq * (seq + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(seq))
    flops = 4 * HEADS * HEAD_DIM * visible  # QK^T and PV over the allowed pairs only
    t_xla, t_pallas = median_seconds(xla, args, runs), median_seconds(pallas, args, runs)
    return dict(seq=seq, window=window, xla=t_xla, pallas=t_pallas, tflops=flops / t_pallas / 1e12,
                err=rel_err(pallas(*args), xla(*args)))


def random_packed_experts(dtype) -> PackedExperts:
    """`PackedExperts` at full size with random bytes, scales near 2**-6 and small biases, made on device."""
    module = nnx.eval_shape(lambda: PackedExperts(gpt_oss_20b_moe_config(), dtype=dtype, param_dtype=dtype,
                                                  backend="ragged", rngs=nnx.Rngs(0)))
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


def bench_moe(module: PackedExperts, tokens: int, runs: int) -> dict:
    dt = module.dtype
    graphdef, state = nnx.split(module)
    keys = jax.random.split(jax.random.key(tokens), 2)
    x = jax.random.normal(keys[0], (tokens, HIDDEN), dt)
    top, indices = jax.lax.top_k(jax.random.normal(keys[1], (tokens, EXPERTS)), TOP_K)
    weights = jax.nn.softmax(top, axis=-1).astype(dt)

    @jax.jit
    def xla_packed(state, x, weights, indices):
        return nnx.merge(graphdef, state)(x, weights, indices)

    predecoded = jax.jit(module.weights)()

    @jax.jit
    def xla_predecoded(w, x, weights, indices):
        return moe.moe_ragged(x, weights, indices, w, module.activation, _precision(dt))

    @jax.jit
    def pallas(state, x, weights, indices):
        m = nnx.merge(graphdef, state)
        packed = kernels.PackedExpertWeights(
            m.gate_up_proj_blocks[...], m.gate_up_proj_scales[...], m.gate_up_proj_bias[...].astype(dt),
            m.down_proj_blocks[...], m.down_proj_scales[...], m.down_proj_bias[...].astype(dt),
        )
        return kernels.moe_pallas_mxfp4(x, weights, indices, packed, m.activation, _precision(dt))

    args = (x, weights, indices)
    result = dict(tokens=tokens)
    result["xla packed"] = median_seconds(xla_packed, (state, *args), runs)
    result["xla predecoded"] = median_seconds(xla_predecoded, (predecoded, *args), runs)
    result["pallas"] = median_seconds(pallas, (state, *args), runs)
    result["err"] = rel_err(pallas(state, *args), xla_packed(state, *args))
    del predecoded
    return result


def report(args, attention: list[dict], moe_rows: list[dict]) -> str:
    device = jax.devices()[0]
    lines = [
        "# Pallas kernels vs the XLA path (gpt-oss-20b shapes)",
        "",
        f"{device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}, {args.dtype}; median of "
        f"{args.runs} runs after warm-up (`python bench/bench_kernels.py`). Error: max |pallas - xla| / "
        "max |xla|.",
        "",
        f"## Attention: 1 x T tokens, {HEADS} heads on {KV_HEADS} KV heads, head_dim {HEAD_DIM}, sinks",
        "",
        "| T | mask | xla ms | pallas ms | speedup | pallas TFLOP/s | error |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in attention:
        mask = "full causal" if r["window"] is None else f"sliding {r['window']}"
        lines.append(f"| {r['seq']} | {mask} | {1e3 * r['xla']:.3f} | {1e3 * r['pallas']:.3f} | "
                     f"{r['xla'] / r['pallas']:.2f}x | {r['tflops']:.1f} | {r['err']:.1e} |")
    lines += [
        "",
        f"## MoE layer: hidden {HIDDEN}, intermediate {INTERMEDIATE}, {EXPERTS} experts top-{TOP_K}, MXFP4 experts",
        "",
        "| tokens | xla packed ms | xla predecoded ms | pallas ms | speedup vs packed | error |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in moe_rows:
        lines.append(f"| {r['tokens']} | {1e3 * r['xla packed']:.3f} | {1e3 * r['xla predecoded']:.3f} | "
                     f"{1e3 * r['pallas']:.3f} | {r['xla packed'] / r['pallas']:.2f}x | {r['err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)

    if not kernels.available():
        print(f"bench_kernels: no GPU (JAX backend is {jax.default_backend()!r}); the Pallas kernels only "
              "compile on a GPU, so there is nothing to time here. Install the CUDA extra "
              "(`pip install .[cuda]`) on a GPU host and rerun.")
        return 0

    dtype = jnp.dtype(args.dtype)
    attention = []
    for seq in args.seq:
        for window in (WINDOW, None):
            attention.append(bench_attention(seq, window, dtype, args.runs))
            print(attention[-1], flush=True)
    module = random_packed_experts(dtype)
    moe_rows = []
    for tokens in args.tokens:
        moe_rows.append(bench_moe(module, tokens, args.runs))
        print(moe_rows[-1], flush=True)

    text = report(args, attention, moe_rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
