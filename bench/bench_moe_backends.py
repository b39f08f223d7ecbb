"""The MoE dispatch backends (`hmoe_jax.model.moe`: dense, ragged, grouped, auto) on this machine, at three sizes.

    python bench/bench_moe_backends.py                # writes bench/results/moe_backends.{md,json}
    python bench/bench_moe_backends.py --sizes full   # one size
    taskset -c 1 python bench/bench_moe_backends.py --metric cpu --out bench/results/moe_backends_1core

Each size runs the experts alone (router output given), jitted, fp32, `Precision.HIGHEST`:
  tiny    hidden 64,   intermediate 64,   4 experts top-2,  80 tokens   (the test configs)
  medium  hidden 512,  intermediate 512,  16 experts top-4, 512 tokens  (bench_model's medium, 4 x 128)
  full    hidden 2880, intermediate 2880, 32 experts top-4, 128 tokens  (one gpt-oss-20b layer, 1 x 128)
  (small, small2: in between, for the dense/grouped crossover; not in the default run)
with the experts stored [in, out] (`moe.ExpertWeights`, HF's bf16 layout and the model's before it
switched) and [out, in] (`moe.ExpertWeightsOutIn`, the layout of `hmoe_jax.model.layers.Experts` and of
decoded MXFP4). Routing: top-k of N(0, 1) router logits (a random router: groups of about N*k/E tokens).
All backends are checked against `dense` (max abs error / max abs value) before timing.
GFLOP/s counts the FLOPs of the top-k experts actually routed (2 * N * k * (H*2I + I*H)); `dense`
computes E/k times that. Timing as in bench_model.py (interleaved repetitions, medians of repetitions
during which other processes stayed under `--busy` cores; or CPU time with `--metric cpu`).
`hmoe_jax.model.moe.auto_backend` is set from these numbers: `dense` while all experts on all tokens stay
under `moe.DENSE_MAX_FLOPS`, `grouped` above, on CPU.
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
    import bench_model as bm
except ModuleNotFoundError:
    from bench import bench_model as bm

SIZES = {
    "tiny": dict(E=4, k=2, H=64, I=64, N=80),
    "medium": dict(E=16, k=4, H=512, I=512, N=512),
    "full": dict(E=32, k=4, H=2880, I=2880, N=128),
    # between tiny and medium, for the dense/grouped crossover of `auto` (not in the default run)
    "small": dict(E=8, k=2, H=128, I=128, N=256),
    "small2": dict(E=16, k=4, H=256, I=256, N=256),
}


def routed_flops(E, k, H, inter, N) -> int:
    """FLOPs of the routed experts: N tokens, top-k, hidden H, intermediate `inter` (the sizes' "I")."""
    return 2 * N * k * (H * 2 * inter + inter * H)


def run_size(name: str, size: dict, backends: list[str], layouts: list[str], args) -> dict:
    import jax
    import jax.numpy as jnp

    from hmoe_jax.model import moe

    E, k, H, inter, N = (size[key] for key in "EkHIN")
    rng = np.random.default_rng(0)
    std = 0.02
    w = moe.ExpertWeights(
        jnp.asarray(rng.standard_normal((E, H, 2 * inter), dtype=np.float32) * std),
        jnp.asarray(rng.standard_normal((E, 2 * inter), dtype=np.float32) * std),
        jnp.asarray(rng.standard_normal((E, inter, H), dtype=np.float32) * std),
        jnp.asarray(rng.standard_normal((E, H), dtype=np.float32) * std),
    )
    stores = {}
    if "out_in" in layouts:  # the same matrices stored [E, out, in]
        t = jax.jit(lambda a: jnp.swapaxes(a, 1, 2))
        stores["out_in"] = moe.ExpertWeightsOutIn(t(w.gate_up), w.gate_up_bias, t(w.down), w.down_bias)
    if "in_out" in layouts:
        stores["in_out"] = w
    del w
    x = jnp.asarray(rng.standard_normal((N, H), dtype=np.float32))
    logits = jnp.asarray(rng.standard_normal((N, E), dtype=np.float32))
    top, indices = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top, axis=-1)
    groups = np.bincount(np.asarray(indices).ravel(), minlength=E)
    act, precision = moe.SwiGLU(), jax.lax.Precision.HIGHEST

    fns, compile_s, outputs = {}, {}, {}
    for layout in layouts:
        for b in backends:
            key = f"{b} [{layout}]" if len(layouts) > 1 else b
            f = jax.jit(lambda x, weights, indices, w, b=b: moe.dispatch(b)(x, weights, indices, w, act, precision))
            ws = stores[layout]
            t0 = time.perf_counter()
            outputs[key] = np.asarray(f(x, weights, indices, ws))
            compile_s[key] = time.perf_counter() - t0
            fns[key] = lambda f=f, ws=ws: f(x, weights, indices, ws).block_until_ready()
    auto = {layout: moe.auto_backend(x, stores[layout]) for layout in layouts}
    ref = next((o for k, o in outputs.items() if k.startswith("dense")), next(iter(outputs.values())))
    errors = {b: float(np.abs(o - ref).max() / np.abs(ref).max()) for b, o in outputs.items()}
    bad = {b: e for b, e in errors.items() if e > 1e-5}
    if bad:
        raise SystemExit(f"[{name}] backends disagree with dense: {bad}")
    del outputs
    print(f"[{name}] E={E} k={k} H={H} I={inter} N={N}: groups {groups.min()}..{groups.max()}; timing ...", flush=True)
    t = bm.time_interleaved(fns, args.reps, args.busy, args.max_wait)
    flops = routed_flops(E, k, H, inter, N)
    return {
        "size": size, "group_sizes": groups.tolist(), "auto_picks": auto, "routed_flops": flops,
        "errors_vs_dense": errors, "first_call_s": compile_s, "timing": t,
    }


def table(results: dict) -> str:
    lines = [
        f"| size | backend | median {'CPU ' if bm.METRIC != 'median_s' else ''}time (ms) | GFLOP/s (routed) | "
        "vs fastest | first call (s) | clean reps | rel err vs dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["sizes"].items():
        best = min(v[bm.METRIC] for v in r["timing"].values())
        for b, t in r["timing"].items():
            m = t[bm.METRIC]
            if b.startswith("auto") and "auto_picks" in r:  # same program as the backend it picks
                layout = b[b.find("[") + 1:-1] if "[" in b else next(iter(r["auto_picks"]))
                b_label = b.replace("auto", f"auto (= {r['auto_picks'][layout]})", 1)
            else:
                b_label = b
            contended = " (contended)" if t["contended"] and bm.METRIC == "median_s" else ""
            lines.append(
                f"| {name} | {b_label} | {1e3 * m:.2f} | {r['routed_flops'] / m / 1e9:.1f} | "
                f"{m / best:.2f}x | {r['first_call_s'][b]:.1f} | {t['clean_reps']}/{t['all_reps']}"
                f"{contended} | {r['errors_vs_dense'][b]:.1e} |"
            )
    lines.append("")
    lines.append("`auto (= x)` runs the same program as `x`, timed separately: the difference between the two rows "
                 "shows the run-to-run noise of this machine.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,medium,full")
    p.add_argument("--backends", default="dense,ragged,grouped,auto")
    p.add_argument("--layouts", default="in_out,out_in",
                   help="expert storage: in_out (moe.ExpertWeights) and/or out_in (moe.ExpertWeightsOutIn, "
                        "the model's)")
    p.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                   help="median wall time, or median CPU time of this process (single-thread runs on a shared machine)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--busy", type=float, default=0.25)
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--out", default=str(bm.RESULTS / "moe_backends"))
    args = p.parse_args(argv)

    import jax

    bm.METRIC = "median_s" if args.metric == "wall" else "cpu_median_s"
    if args.metric == "cpu":  # CPU time needs no quiet machine: take every repetition
        args.busy = float("inf")
    results = {
        "environment": {"jax": jax.__version__, "cpu": bm._cpu_name(), "cores": os.cpu_count(),
                        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                        "platform": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                        "metric": args.metric, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "sizes": {},
    }
    backends = [b for b in args.backends.split(",") if b]
    layouts = [lay for lay in args.layouts.split(",") if lay]
    for name in [s for s in args.sizes.split(",") if s]:
        results["sizes"][name] = run_size(name, SIZES[name], backends, layouts, args)
    md = table(results)
    print(md)
    env = results["environment"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"# MoE dispatch backends (fp32, {env['platform']})\n\n`python bench/bench_moe_backends.py` on {env['cpu']} "
        f"({env['cores']} cores, affinity {env['affinity']}), jax {env['jax']}, metric {env['metric']}, "
        f"{env['date']}.\n\n"
        + md + "\n"
    )
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
