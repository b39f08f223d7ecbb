"""Compute dtype on this host: float32 against bfloat16, the measurement behind `RunOptions.dtype="auto"`.

    python bench/bench_dtypes.py [--tokens 128] [--reps 5] [--out bench/results/dtypes]

Two measurements, each dtype timed in the same interleaved loop (medians after a warm-up):
- XLA's dot alone, at gpt-oss-20b's shapes: tokens x 2880 @ 2880 x 5760 (an expert's gate/up) and
  tokens x 2880 @ 2880 x 4096 (the query projection);
- one full-width gpt-oss-20b block (hidden 2880, 64 heads on 8 KV heads, 32 MXFP4 experts top-4, packed,
  weights stored bf16), its jitted forward on `tokens` tokens, computing in float32 or in bfloat16.

Writes OUT.md and OUT.json. On an accelerator the same script shows the other side of the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _median_seconds(fns: dict, reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # compile and warm up
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():  # interleaved: both dtypes see the same machine
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def dots(tokens: int, reps: int) -> list[dict]:
    rows = []
    for name, n in (("expert gate/up", 5760), ("query projection", 4096)):
        flops = 2 * tokens * 2880 * n
        fns = {}
        for dtype in ("float32", "bfloat16"):
            x = jnp.asarray(np.random.default_rng(0).standard_normal((tokens, 2880)), dtype)
            w = jnp.asarray(np.random.default_rng(1).standard_normal((2880, n)) * 0.02, dtype)
            f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=x.dtype))
            fns[dtype] = lambda f=f, x=x, w=w: f(x, w).block_until_ready()
        seconds = _median_seconds(fns, reps)
        rows.append({"case": f"dot, {name}: {tokens} x 2880 @ 2880 x {n}", "flops": flops, "seconds": seconds})
    return rows


def block(tokens: int, reps: int) -> dict:
    from flax import nnx

    from hmoe_jax.model.config import GptOssConfig
    from hmoe_jax.model.transformer import GptOssForCausalLM
    from hmoe_jax.runtime.options import RunOptions

    config = GptOssConfig(vocab_size=1024, hidden_size=2880, intermediate_size=2880, num_hidden_layers=1,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                          num_experts_per_tok=4, sliding_window=128, layer_types=("sliding_attention",))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 1024, (1, tokens)))
    model = GptOssForCausalLM(config, RunOptions(dtype="float32", param_dtype="bfloat16", experts="packed",
                                                 execution="program"), rngs=nnx.Rngs(0))
    fns = {}
    for dtype in ("float32", "bfloat16"):
        model.set_options(dtype=dtype)
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda state, ids, graphdef=graphdef: nnx.merge(graphdef, state).forward(
            ids, stop_after_layer=1).hidden_states[-1])
        fns[dtype] = lambda f=f, state=state: f(state, ids).block_until_ready()
    return {"case": f"one gpt-oss-20b block (packed MXFP4 experts, bf16 weights), {tokens} tokens",
            "seconds": _median_seconds(fns, reps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "dtypes"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    rows = dots(args.tokens, args.reps) + [block(args.tokens, args.reps)]
    platform = jax.devices()[0].platform
    lines = [f"# Compute dtype on {platform} (`python bench/bench_dtypes.py`, medians of {args.reps})", "",
             "| case | float32 | bfloat16 | bfloat16 / float32 time |", "|---|---:|---:|---:|"]
    def cell(r, dtype):
        t = r["seconds"][dtype]
        return f"{t * 1e3:.1f} ms" + (f" ({r['flops'] / t / 1e9:.0f} GFLOP/s)" if "flops" in r else "")

    for r in rows:
        ratio = r["seconds"]["bfloat16"] / r["seconds"]["float32"]
        lines.append(f"| {r['case']} | {cell(r, 'float32')} | {cell(r, 'bfloat16')} | {ratio:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"platform": platform, "tokens": args.tokens, "rows": rows},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
