"""The MoE dispatch backends (`hmoe_jax.moe`: dense, ragged, grouped) on this machine, at three sizes.

    python bench/bench_moe_backends.py                # writes bench/results/moe_backends.{md,json}
    python bench/bench_moe_backends.py --sizes full   # one size

Each size runs the experts alone (router output given), jitted, fp32, `Precision.HIGHEST`:
  tiny    hidden 64,   intermediate 64,   4 experts top-2,  80 tokens   (the test configs)
  medium  hidden 512,  intermediate 512,  16 experts top-4, 512 tokens  (bench_model's medium, 4 x 128)
  full    hidden 2880, intermediate 2880, 32 experts top-4, 128 tokens  (one gpt-oss-20b layer, 1 x 128)
Routing: top-k of N(0, 1) router logits (a random router: groups of about N*k/E tokens).
All backends are checked against `dense` (max abs error / max abs value) before timing. GFLOP/s counts
the FLOPs of the top-k experts actually routed (2 * N * k * (H*2I + I*H)); `dense` computes E/k times
that. Timing as in bench_model.py (interleaved repetitions, medians of repetitions during which other
processes stayed under `--busy` cores). The `auto` backend (`hmoe_jax.moe.auto_backend`) is whichever
is fastest here at real widths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

try:  # run as a script from anywhere (its directory is on sys.path) or as `python -m bench.bench_moe_backends`
    from bench_model import RESULTS, _cpu_name, time_interleaved
except ModuleNotFoundError:
    from bench.bench_model import RESULTS, _cpu_name, time_interleaved

SIZES = {
    "tiny": dict(E=4, k=2, H=64, I=64, N=80),
    "medium": dict(E=16, k=4, H=512, I=512, N=512),
    "full": dict(E=32, k=4, H=2880, I=2880, N=128),
}


def routed_flops(E, k, H, I, N) -> int:
    return 2 * N * k * (H * 2 * I + I * H)


def run_size(name: str, size: dict, backends: list[str], args) -> dict:
    import jax
    import jax.numpy as jnp

    from hmoe_jax import moe

    E, k, H, I, N = (size[key] for key in "EkHIN")
    rng = np.random.default_rng(0)
    std = 0.02
    w = moe.ExpertWeights(
        jnp.asarray(rng.standard_normal((E, H, 2 * I), dtype=np.float32) * std),
        jnp.asarray(rng.standard_normal((E, 2 * I), dtype=np.float32) * std),
        jnp.asarray(rng.standard_normal((E, I, H), dtype=np.float32) * std),
        jnp.asarray(rng.standard_normal((E, H), dtype=np.float32) * std),
    )
    x = jnp.asarray(rng.standard_normal((N, H), dtype=np.float32))
    logits = jnp.asarray(rng.standard_normal((N, E), dtype=np.float32))
    top, indices = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top, axis=-1)
    groups = np.bincount(np.asarray(indices).ravel(), minlength=E)
    act, precision = moe.SwiGLU(), jax.lax.Precision.HIGHEST

    fns, compile_s, outputs = {}, {}, {}
    for b in backends:
        f = jax.jit(lambda x, weights, indices, w, b=b: moe.BACKENDS[b](x, weights, indices, w, act, precision))
        t0 = time.perf_counter()
        outputs[b] = np.asarray(f(x, weights, indices, w))
        compile_s[b] = time.perf_counter() - t0
        fns[b] = lambda f=f: f(x, weights, indices, w).block_until_ready()
    ref = outputs["dense"] if "dense" in outputs else next(iter(outputs.values()))
    errors = {b: float(np.abs(o - ref).max() / np.abs(ref).max()) for b, o in outputs.items()}
    bad = {b: e for b, e in errors.items() if e > 1e-5}
    if bad:
        raise SystemExit(f"[{name}] backends disagree with dense: {bad}")
    del outputs
    print(f"[{name}] E={E} k={k} H={H} I={I} N={N}: groups {groups.min()}..{groups.max()}; timing ...", flush=True)
    t = time_interleaved(fns, args.reps, args.busy, args.max_wait)
    flops = routed_flops(E, k, H, I, N)
    return {
        "size": size, "group_sizes": groups.tolist(), "routed_flops": flops, "errors_vs_dense": errors,
        "first_call_s": compile_s, "timing": t,
    }


def table(results: dict) -> str:
    lines = [
        "| size | backend | median (ms) | GFLOP/s (routed) | vs fastest | first call (s) | clean reps | rel err vs dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["sizes"].items():
        best = min(v["median_s"] for v in r["timing"].values())
        for b, t in r["timing"].items():
            lines.append(
                f"| {name} | {b} | {1e3 * t['median_s']:.2f} | {r['routed_flops'] / t['median_s'] / 1e9:.1f} | "
                f"{t['median_s'] / best:.2f}x | {r['first_call_s'][b]:.1f} | {t['clean_reps']}/{t['all_reps']}"
                f"{' (contended)' if t['contended'] else ''} | {r['errors_vs_dense'][b]:.1e} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,medium,full")
    p.add_argument("--backends", default="dense,ragged,grouped")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--busy", type=float, default=0.25)
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--out", default=str(RESULTS / "moe_backends"))
    args = p.parse_args(argv)

    import jax

    from hmoe_jax import moe

    results = {
        "environment": {"jax": jax.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(),
                        "platform": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                        "auto": moe.auto_backend(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "sizes": {},
    }
    backends = [b for b in args.backends.split(",") if b]
    for name in [s for s in args.sizes.split(",") if s]:
        results["sizes"][name] = run_size(name, SIZES[name], backends, args)
    md = table(results)
    print(md)
    env = results["environment"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"# MoE dispatch backends (fp32, {env['platform']})\n\n`python bench/bench_moe_backends.py` on {env['cpu']} "
        f"({env['cores']} cores), jax {env['jax']}, {env['date']}. `auto` on this platform: `{env['auto']}`.\n\n"
        + md + "\n"
    )
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
