"""Pallas kernels vs the XLA path at gpt-oss-20b shapes, on a GPU, through the model's own code paths.

    python bench/bench_kernels.py [--seq 1024 4096] [--tokens 1 64 512 4096] [--model-seq 2048]
                                  [--layers 2] [--dtype bfloat16] [--runs 20] [--out bench/results/kernels.md]
    python bench/bench_kernels.py --smoke      # tiny shapes, interpret mode: checks the script, times nothing

Every "pallas" variant is the wired model path (the kernels the model's `RunOptions.kernels` "pallas"
selects), every "xla" variant the same code with the XLA path selected (`kernels="xla"`: on a built model
`model.using(kernels="xla")`, on a bare module `module.options.replace(kernels="xla")`).

Attention (one layer's core, after the projections): batch 1, 64 query heads on 8 KV heads, head_dim
64, sliding window 128 and full causal, `--seq` tokens. The two paths of
`hmoe_jax.model.layers.Attention.attend`, with the mask from `hmoe_jax.model.layers.attention_masks`:
XLA (`layers.sink_attention_xla`) materialises [B, KV, G, T, S] scores; with the padding `key_mask` the
kernel (`hmoe_jax.model.kernel_dispatch.attention`, running `kernels.sink_attention`) rebuilds the mask
per tile.

MoE (one layer, after the router): hidden 2880, intermediate 2880, 32 experts top-4, `--tokens` tokens,
experts MXFP4-packed as in the checkpoint (`hmoe_jax.model.layers.PackedExperts`). Variants:
- `xla packed`: decode every expert with `dequantize_mxfp4` inside the jitted forward, then `ragged`;
- `xla predecoded`: `moe_ragged` on experts decoded once ahead (4x the weight bytes resident: the
  XLA ceiling without a decode per call);
- `pallas`: `hmoe_jax.model.moe.moe_packed_kernel` (decode fused into the grouped matmul tiles).

Model: `GptOssForCausalLM` at gpt-oss-20b width with `--layers` blocks (sliding and full alternating),
packed MXFP4 experts, random weights, one sequence of `--model-seq` tokens: the jitted forward
(`model(ids)`) with XLA vs with both kernels.

Each variant is jitted, warmed up, then timed (median of `--runs`, `block_until_ready`). The report also
gives max |pallas - xla| / max |xla| per shape as a sanity check (bf16: expect ~1e-2).
Without a GPU this prints why and exits 0 (`--smoke` excepted): interpret mode says nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmoe_jax import kernels
from hmoe_jax.evaluation.doctor import random_packed_experts
from hmoe_jax.model import kernel_dispatch, moe
from hmoe_jax.model.config import GptOssConfig
from hmoe_jax.model.layers import PackedExperts, attention_masks, sink_attention_xla
from hmoe_jax.model.transformer import GptOssForCausalLM
from hmoe_jax.runtime.options import RunOptions, matmul_precision


class Shapes(NamedTuple):
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    window: int = 128
    hidden: int = 2880
    intermediate: int = 2880
    experts: int = 32
    top_k: int = 4
    vocab: int = 201088


GPT_OSS_20B = Shapes()
SMOKE = Shapes(heads=4, kv_heads=2, head_dim=16, window=8, hidden=64, intermediate=64, experts=4, top_k=2, vocab=128)


def config(shapes: Shapes, layers: int = 1) -> GptOssConfig:
    return GptOssConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
        num_hidden_layers=layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim, num_local_experts=shapes.experts, num_experts_per_tok=shapes.top_k,
        sliding_window=shapes.window,
        layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)),
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


def bench_attention(shapes: Shapes, seq: int, window: int | None, dtype, runs: int, mode: str) -> dict:
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (1, seq, shapes.heads, shapes.head_dim), dtype)
    k = jax.random.normal(keys[1], (1, seq, shapes.kv_heads, shapes.head_dim), dtype)
    v = jax.random.normal(keys[2], (1, seq, shapes.kv_heads, shapes.head_dim), dtype)
    sinks = jax.random.normal(keys[3], (shapes.heads,), jnp.float32)
    key_mask = jnp.ones((1, seq), jnp.int32)
    full, sliding = attention_masks(key_mask, shapes.window)
    allowed = sliding if window else full

    def attend(kernel_mode):
        @jax.jit
        def run(q, k, v, sinks, allowed, key_mask):
            # What `Attention.attend` runs over a prompt, without building (and timing) the projections: the
            # kernel where the mode is not "xla" and it takes the shapes, the XLA path otherwise.
            if kernel_mode != "xla":
                out = kernel_dispatch.attention(q, k, v, sinks, key_mask, window=window,
                                                scale=shapes.head_dim**-0.5, mode=kernel_mode)
                if out is not None:
                    return out
            return sink_attention_xla(q, k, v, sinks, allowed, dtype)
        return run

    xla, pallas = attend("xla"), attend(mode)
    args = (q, k, v, sinks, allowed, key_mask)
    visible = seq * (seq + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(seq))
    flops = 4 * shapes.heads * shapes.head_dim * visible  # QK^T and PV over the allowed pairs only
    t_xla, t_pallas = median_seconds(xla, args, runs), median_seconds(pallas, args, runs)
    return dict(seq=seq, window=window, xla=t_xla, pallas=t_pallas, tflops=flops / t_pallas / 1e12,
                err=rel_err(pallas(*args), xla(*args)))


def bench_moe(shapes: Shapes, module: PackedExperts, tokens: int, runs: int, mode: str) -> dict:
    dt = module.dtype
    graphdef, state = nnx.split(module)
    keys = jax.random.split(jax.random.key(tokens), 2)
    x = jax.random.normal(keys[0], (tokens, shapes.hidden), dt)
    top, indices = jax.lax.top_k(jax.random.normal(keys[1], (tokens, shapes.experts)), shapes.top_k)
    weights = jax.nn.softmax(top, axis=-1).astype(dt)

    def packed(kernel_mode):
        @jax.jit
        def run(state, x, weights, indices):
            m = nnx.merge(graphdef, state)
            m.options = m.options.replace(kernels=kernel_mode)  # the module's own option picks the path
            return m(x, weights, indices)
        return run

    predecoded = jax.jit(module.weights)()

    @jax.jit
    def xla_predecoded(w, x, weights, indices):
        return moe.moe_ragged(x, weights, indices, w, module.activation, matmul_precision(dt))

    xla_packed, pallas = packed("xla"), packed(mode)
    args = (x, weights, indices)
    result = dict(tokens=tokens)
    result["xla packed"] = median_seconds(xla_packed, (state, *args), runs)
    result["xla predecoded"] = median_seconds(xla_predecoded, (predecoded, *args), runs)
    result["pallas"] = median_seconds(pallas, (state, *args), runs)
    result["err"] = rel_err(pallas(state, *args), xla_packed(state, *args))
    del predecoded
    return result


def forward_seconds(model: GptOssForCausalLM, ids, kernel_mode: str, runs: int) -> tuple[float, jax.Array]:
    """(median seconds, logits) of `model(ids)` on one kernel path. The path is the model's own option,
    part of its graph: `model(...)` compiles (and caches) a program per path."""
    def forward(ids):
        return model(ids).logits

    with model.using(kernels=kernel_mode):
        return median_seconds(forward, (ids,), runs), forward(ids)


def bench_model(shapes: Shapes, layers: int, seq: int, dtype, runs: int, mode: str) -> dict:
    """The whole jitted forward (`model(ids)`), XLA vs both kernels: the model as it runs."""
    options = RunOptions(dtype=dtype, param_dtype=dtype, experts="packed", execution="program")
    model = GptOssForCausalLM(config(shapes, layers), options, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (1, seq), 0, shapes.vocab)
    result = dict(layers=layers, seq=seq)
    result["xla"], xla_logits = forward_seconds(model, ids, "xla", runs)
    result["pallas"], pallas_logits = forward_seconds(model, ids, mode, runs)
    result["err"] = rel_err(pallas_logits, xla_logits)
    del model
    return result


def report(args, shapes: Shapes, attention: list[dict], moe_rows: list[dict], model_rows: list[dict]) -> str:
    device = jax.devices()[0]
    s = shapes
    lines = [
        "# Pallas kernels vs the XLA path (gpt-oss-20b shapes)" if s == GPT_OSS_20B else
        "# Pallas kernels vs the XLA path (smoke run: tiny shapes, interpret mode, timings meaningless)",
        "",
        f"{device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}, {args.dtype}; median of "
        f"{args.runs} runs after warm-up (`python bench/bench_kernels.py`). Both paths are the model's own "
        "(`RunOptions.kernels`). Error: max |pallas - xla| / max |xla|.",
        "",
        f"## Attention: 1 x T tokens, {s.heads} heads on {s.kv_heads} KV heads, head_dim {s.head_dim}, sinks",
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
        f"## MoE layer: hidden {s.hidden}, intermediate {s.intermediate}, {s.experts} experts top-{s.top_k}, "
        "MXFP4 experts",
        "",
        "| tokens | xla packed ms | xla predecoded ms | pallas ms | speedup vs packed | error |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in moe_rows:
        lines.append(f"| {r['tokens']} | {1e3 * r['xla packed']:.3f} | {1e3 * r['xla predecoded']:.3f} | "
                     f"{1e3 * r['pallas']:.3f} | {r['xla packed'] / r['pallas']:.2f}x | {r['err']:.1e} |")
    lines += [
        "",
        f"## Model forward: `GptOssForCausalLM` at this width, packed MXFP4 experts, vocab {s.vocab}, batch 1",
        "",
        "| layers | T | xla ms | pallas ms | speedup | logits error |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in model_rows:
        lines.append(f"| {r['layers']} | {r['seq']} | {1e3 * r['xla']:.3f} | {1e3 * r['pallas']:.3f} | "
                     f"{r['xla'] / r['pallas']:.2f}x | {r['err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="attention sequence lengths")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096], help="MoE token counts")
    parser.add_argument("--model-seq", type=int, nargs="*", default=[2048], help="model forward lengths (none: skip)")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the model forward (sliding/full alternating)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, kernels in interpret mode, 1 run: runs anywhere, checks the script only")
    args = parser.parse_args(argv)

    if args.smoke:
        shapes, mode = SMOKE, "interpret"
        args.seq, args.tokens, args.model_seq, args.runs = [24], [5, 16], [12], 1
    elif not kernels.available():
        print(f"bench_kernels: no GPU (JAX backend is {jax.default_backend()!r}); the Pallas kernels only "
              "compile on a GPU, so there is nothing to time here. Install the CUDA extra "
              "(`pip install .[cuda]`) on a GPU host and rerun (`--smoke` runs the script at tiny shapes in "
              "interpret mode, timing nothing).")
        return 0
    else:
        shapes, mode = GPT_OSS_20B, "pallas"

    dtype = jnp.dtype(args.dtype)
    attention = []
    for seq in args.seq:
        for window in (shapes.window, None):
            attention.append(bench_attention(shapes, seq, window, dtype, args.runs, mode))
            print(attention[-1], flush=True)
    module = random_packed_experts(config(shapes), jnp.dtype(dtype).name)
    moe_rows = []
    for tokens in args.tokens:
        moe_rows.append(bench_moe(shapes, module, tokens, args.runs, mode))
        print(moe_rows[-1], flush=True)
    del module
    model_rows = []
    for seq in args.model_seq:
        model_rows.append(bench_model(shapes, args.layers, seq, dtype, args.runs, mode))
        print(model_rows[-1], flush=True)

    text = report(args, shapes, attention, moe_rows, model_rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
