"""JAX (jitted, fp32) vs transformers (eager attention, eager experts) on the same weights and inputs.

    python bench/bench_model.py                 # both cases, writes bench/results/model.{md,json}
    python bench/bench_model.py --cases medium  # just one case
    python bench/bench_model.py --in-out        # also time the previous [in, out] expert layout

Cases (issue 2):
  medium  hidden 512, 4 layers, 8 heads / 2 KV heads, head_dim 64, 16 experts top-4, intermediate 512,
          vocab 2048; batch 4 x 128 tokens; the whole model (logits), loaded through
          `hmoe_jax.from_pretrained` (fp32 weights and compute, dense experts, one jitted program) from a
          checkpoint written by `hmoe_jax.checkpoint.synthetic.write_hf_checkpoint` vs
          `hmoe_jax.checkpoint.synthetic.load_torch_reference` on the same directory.
  full    one gpt-oss-20b decoder layer at the real width (hidden 2880, 64 q / 8 kv heads of 64,
          32 experts top-4, intermediate 2880; random weights), as a 1-layer GptOssForCausalLM with a
          256-token vocabulary (the lm_head is 0.6% of the FLOPs), batch 1 x 128 tokens.

The model runs as loaded: experts stored [out, in] (`hmoe_jax.model.layers.Experts`,
`hmoe_jax.model.moe.ExpertWeightsOutIn`). `--in-out` adds a row per case with the same weights stored
[in, out] (`hmoe_jax.model.moe.ExpertWeights`, the model's layout before format 2 of the converted
checkpoints), timed in a second interleaved loop beside torch.

Both outputs are compared (logits and every hidden state, max abs error / max abs value) before timing.
Timing: warm-up calls excluded, JAX and torch repetitions interleaved, median reported. The machine may
be shared: every repetition records how much CPU other processes used meanwhile (from /proc/stat);
repetitions during which others used more than `--busy` cores are discarded and retried (up to
`--max-wait` seconds per case), and the table says how many clean repetitions each median has.

FLOPs are counted analytically (2 per multiply-add): q/k/v/o projections, attention scores and the
probability-value product over the full T x T square (both implementations compute it), the router,
the experts actually computed (N * top_k token-expert pairs, gate_up and down), and the lm_head.
The machine's reference throughput is a jitted fp32 2048^3 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# ------------------------------------------------------------------ interference-aware timing

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> int | None:
    """CPU ticks spent by everything (user+nice+system+irq+softirq+steal), or None without /proc."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except OSError:
        return None


def _own_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])
    except OSError:
        return None


class Probe:
    """Wall time of a block, and the CPU cores other processes used during it (0 where unknown)."""

    def __enter__(self):
        self.busy, self.own = _busy_ticks(), _own_ticks()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        busy, own = _busy_ticks(), _own_ticks()
        if None in (busy, own, self.busy, self.own):
            self.others = 0.0
        else:
            self.others = max(0, (busy - self.busy) - (own - self.own)) / _HZ / max(self.seconds, 0.05)
        return False


def wait_until_quiet(busy: float, deadline: float, window: float = 1.0) -> bool:
    while time.time() < deadline:
        with Probe() as p:
            time.sleep(window)
        if p.others <= busy:
            return True
    return False


def time_interleaved(fns: dict, reps: int, busy: float, max_wait: float, warmup: int = 2) -> dict:
    """Run each function `warmup` times, then interleave timed repetitions until each has `reps`
    clean ones (others used <= `busy` cores) or `max_wait` seconds pass. Returns per name: median
    and all times of the clean repetitions (of all repetitions when fewer than 3 are clean), the
    counts, and the mean load of others."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    # Fast functions run several times per repetition (>= ~0.2 s), so a repetition spans enough
    # scheduler ticks for the interference probe to mean something; times are per call.
    calls = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        f()
        calls[name] = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
    clean = {k: [] for k in fns}
    every = {k: [] for k in fns}
    loads = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    deadline = time.time() + max_wait
    attempts = 0
    while any(len(v) < reps for v in clean.values()):
        attempts += 1
        for name, f in fns.items():
            if len(clean[name]) >= reps:
                continue
            c0 = time.process_time()
            with Probe() as p:
                for _ in range(calls[name]):
                    f()
            cpu[name].append((time.process_time() - c0) / calls[name])
            every[name].append(p.seconds / calls[name])
            loads[name].append(p.others)
            if p.others <= busy:
                clean[name].append(p.seconds / calls[name])
        if time.time() > deadline or attempts > 50 * reps:
            break
        recent = [loads[n][-1] for n in fns if loads[n]]
        if any(len(v) < reps for v in clean.values()) and recent and max(recent) > busy:
            wait_until_quiet(busy, deadline)
    out = {}
    for name in fns:
        use = clean[name] if len(clean[name]) >= 3 else every[name]
        out[name] = {
            "median_s": statistics.median(use),
            "times_s": use,
            "clean_reps": len(clean[name]),
            "all_reps": len(every[name]),
            "contended": len(clean[name]) < 3,
            "others_load_mean": float(np.mean(loads[name])) if loads[name] else 0.0,
            "calls_per_rep": calls[name],
            # CPU seconds of this process (all threads) per call: with one thread (taskset -c N, --threads 1)
            # this is the work done, hardly inflated by other processes sharing the core.
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_min_s": min(cpu[name]),
        }
    return out


# ------------------------------------------------------------------ FLOPs and bytes

def layer_flops(c: dict, batch: int, seq: int) -> dict:
    n = batch * seq
    h, d, nq, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    e, k, i = c["num_local_experts"], c["num_experts_per_tok"], c["intermediate_size"]
    return {
        "attn_proj": 2 * n * h * (nq * d + 2 * nkv * d) + 2 * n * nq * d * h,
        "attn_scores": 2 * 2 * batch * nq * seq * seq * d,
        "router": 2 * n * h * e,
        "experts": 2 * n * k * (h * 2 * i + i * h),
    }


def model_flops(c: dict, batch: int, seq: int) -> dict:
    per = layer_flops(c, batch, seq)
    out = {key: v * c["num_hidden_layers"] for key, v in per.items()}
    out["lm_head"] = 2 * batch * seq * c["hidden_size"] * c["vocab_size"]
    out["total"] = sum(out.values())
    return out


def weight_bytes(c: dict) -> int:
    """fp32 bytes of the weights a forward reads (all experts: with N*k >> E every expert is hit)."""
    h, d, nq, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    e, i = c["num_local_experts"], c["intermediate_size"]
    attn = h * (nq * d + 2 * nkv * d) + nq * d * h
    experts = e * (h * 2 * i + i * h)
    return 4 * (c["num_hidden_layers"] * (attn + h * e + experts) + c["vocab_size"] * h * 2)


# ------------------------------------------------------------------ configs

def medium_config() -> dict:
    from hmoe_jax.checkpoint import synthetic

    return synthetic.tiny_config(
        vocab_size=2048, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_local_experts=16, num_experts_per_tok=4, sliding_window=64,
    )


def full_layer_config() -> dict:
    from hmoe_jax.checkpoint import synthetic

    return synthetic.tiny_config(
        vocab_size=256, hidden_size=2880, intermediate_size=2880, num_hidden_layers=1,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention"],
    )


# Weights N(0, 0.02^2) (norms 1 + N(0, 0.1^2), embeddings N(0, 1)): about gpt-oss's scale. Much larger random
# weights make the 4-layer stack chaotic and amplify fp32 rounding differences layer by layer.
CASES = {
    "medium": dict(config=medium_config, batch=4, seq=128, std=0.02),
    "full": dict(config=full_layer_config, batch=1, seq=128, std=0.02),
}


# ------------------------------------------------------------------ the run

def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


MATMUL_N = 2048


def matmul_thunk(n: int = MATMUL_N):
    """A jitted fp32 n^3 matmul: the machine's reference throughput, timed beside every case so it
    sees the same conditions."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    return lambda: f(a, b).block_until_ready()


def with_gflops(t: dict, n: int = MATMUL_N) -> dict:
    return dict(t, gflops=2 * n**3 / t[METRIC] / 1e9, n=n)


def stream_gbs(reps: int, busy: float, max_wait: float, gib: float = 1.0) -> dict:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    t = time_interleaved({"sum": lambda: f(x).block_until_ready()}, reps, busy, max_wait)["sum"]
    t["gbs"] = x.nbytes / t[METRIC] / 1e9
    return t  # x (1 GiB) is freed with this frame


def run_case(name: str, spec: dict, workdir: Path, args) -> dict:
    import torch

    import hmoe_jax
    from hmoe_jax.checkpoint import synthetic

    config = spec["config"]()
    batch, seq = spec["batch"], spec["seq"]
    ckpt = workdir / f"ckpt_{name}"
    written = (ckpt / "config.json").is_file() and \
        json.loads((ckpt / "config.json").read_text()).get("hidden_size") == config["hidden_size"]
    if not written:
        print(f"[{name}] writing checkpoint to {ckpt} ...", flush=True)
        synthetic.write_hf_checkpoint(ckpt, config, seed=0, std=spec["std"])
    # JAX first: the loader's transient copies then do not stack on top of the torch model.
    print(f"[{name}] loading JAX model (moe_backend={args.moe_backend}) ...", flush=True)
    # What this benchmark has always measured: fp32 weights and compute, the experts decoded (dense), one
    # jitted program per forward (not the loader's defaults, which follow the checkpoint and the platform).
    model = hmoe_jax.from_pretrained(ckpt, dtype="float32", param_dtype="float32", experts="dense",
                                     moe_backend=args.moe_backend, execution="program")
    print(f"[{name}] loading transformers reference ...", flush=True)
    ref = synthetic.load_torch_reference(ckpt)

    ids = np.random.default_rng(1).integers(3, config["vocab_size"], (batch, seq))
    ids_t = torch.from_numpy(ids)

    def run_jax():
        return model(ids).logits.block_until_ready()

    def run_torch():
        with torch.inference_mode():
            return ref(ids_t).logits

    # Parity on the timed computation's inputs, every hidden state and the logits.
    out = model(ids, output_hidden_states=True)
    with torch.inference_mode():
        tout = ref(ids_t, output_hidden_states=True)
    errors = {"logits": rel_err(out.logits, tout.logits.numpy())}
    for i, (a, b) in enumerate(zip(out.hidden_states, tout.hidden_states)):
        errors[f"hidden_{i}"] = rel_err(a, b.numpy())
    worst = max(errors.values())
    print(f"[{name}] parity: max rel err {worst:.2e} (logits {errors['logits']:.2e})", flush=True)
    if worst > args.tolerance:
        raise SystemExit(f"[{name}] JAX and transformers disagree: {errors}")

    print(f"[{name}] timing ...", flush=True)
    t = time_interleaved({"jax": run_jax, "torch": run_torch, "matmul": args.matmul}, args.reps, args.busy,
                         args.max_wait)
    t["matmul"] = with_gflops(t["matmul"])
    if args.in_out:
        # The previous expert layout ([E, in, out], `moe.ExpertWeights`), on the same weights: the loaded
        # model's experts transposed in place.
        print(f"[{name}] experts as [in, out] (previous layout) ...", flush=True)
        to_in_out(model)
        out = model(ids, output_hidden_states=True)
        errors_io = {"logits": rel_err(out.logits, tout.logits.numpy())}
        errors_io.update({f"hidden_{i}": rel_err(a, b.numpy())
                          for i, (a, b) in enumerate(zip(out.hidden_states, tout.hidden_states))})
        if max(errors_io.values()) > args.tolerance:
            raise SystemExit(f"[{name}] in-out experts disagree with transformers: {errors_io}")
        errors.update({f"in_out_{k}": v for k, v in errors_io.items()})
        t2 = time_interleaved({"jax_in_out": run_jax, "torch": run_torch, "matmul": args.matmul}, args.reps, args.busy,
                              args.max_wait)
        t["jax_in_out"], t["torch_in_out_run"] = t2["jax_in_out"], t2["torch"]
        t["matmul_in_out_run"] = with_gflops(t2["matmul"])
    flops = model_flops(config, batch, seq)
    result = {
        "config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim",
                                          "num_local_experts", "num_experts_per_tok", "vocab_size",
                                          "sliding_window")},
        "batch": batch, "seq": seq, "flops": flops, "weight_bytes": weight_bytes(config),
        "parity_rel_err": errors, "timing": t,
    }
    return result  # the JAX and torch models are freed with this frame, before the next case loads


def to_in_out(model) -> None:
    """Replace every layer's experts by a module holding the same matrices as [E, in, out]
    (`hmoe_jax.model.moe.ExpertWeights`): what `hmoe_jax.model.layers.Experts` was before it stored them
    [out, in]. The new module holds the model's `RunOptions` (compute dtype, MoE backend) as `Experts` does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hmoe_jax.model import moe

    class InOutExperts(nnx.Module):
        def __init__(self, src):
            t = jax.jit(lambda a: jnp.swapaxes(a, 1, 2), donate_argnums=0)
            self.gate_up_proj = nnx.Param(t(src.gate_up_proj[...]), axes=("experts", "embed", "mlp"))
            self.down_proj = nnx.Param(t(src.down_proj[...]), axes=("experts", "mlp", "embed"))
            self.gate_up_proj_bias = nnx.Param(src.gate_up_proj_bias[...], axes=("experts", "mlp"))
            self.down_proj_bias = nnx.Param(src.down_proj_bias[...], axes=("experts", "embed"))
            self.activation, self.options = src.activation, src.options

        @property
        def dtype(self):
            return self.options.compute_dtype

        def weights(self):
            dt = self.dtype
            return moe.ExpertWeights(self.gate_up_proj[...].astype(dt), self.gate_up_proj_bias[...].astype(dt),
                                     self.down_proj[...].astype(dt), self.down_proj_bias[...].astype(dt))

        def __call__(self, x, weights, indices):
            return moe.dispatch(self.options.moe_backend)(x, weights, indices, self.weights(), self.activation,
                                                          self.options.precision)

    for layer in model.layers:
        layer.mlp.experts = InOutExperts(layer.mlp.experts)


METRIC = "median_s"  # or "cpu_median_s" (--metric cpu)


def _row(case, label, t, gf, torch_s, mm_gflops, parity) -> str:
    flag = " (contended)" if t["contended"] and METRIC == "median_s" else ""
    t = dict(t, median_s=t[METRIC])
    speed = f"{torch_s / t['median_s']:.2f}x"
    return (f"| {case} | {label} | {t['median_s']:.4f} | {gf:.2f} | {gf / t['median_s']:.1f} | "
            f"{100 * gf / t['median_s'] / mm_gflops:.0f}% | {speed} | {t['clean_reps']}/{t['all_reps']}{flag} | "
            f"{parity} |")


def table(results: dict) -> str:
    """Markdown table. GFLOP/s percentages are against the matmul timed in the same interleaved loop."""
    bw = results.get("stream", {}).get("gbs")
    lines = [
        "| case | implementation | median time (s) | GFLOP / forward | GFLOP/s | % of matmul | "
        "speedup vs transformers | clean reps | parity (rel) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name in ("medium", "full"):
        if name not in results["cases"]:
            continue
        r = results["cases"][name]
        t = r["timing"]
        gf = r["flops"]["total"] / 1e9
        mm = t["matmul"]["gflops"]
        base_err = max(v for k, v in r["parity_rel_err"].items() if not k.startswith("in_out"))
        lines.append(_row(name, "JAX jit fp32", t["jax"], gf, t["torch"][METRIC], mm, f"{base_err:.1e}"))
        lines.append(_row(name, "transformers eager fp32", t["torch"], gf, t["torch"][METRIC], mm, "ref"))
        if "jax_in_out" in t:
            io_err = max(v for k, v in r["parity_rel_err"].items() if k.startswith("in_out"))
            lines.append(_row(name, "JAX jit fp32, experts stored [in, out] (previous layout)", t["jax_in_out"], gf,
                              t["torch_in_out_run"][METRIC], t["matmul_in_out_run"]["gflops"], f"{io_err:.1e}"))
            lines.append(_row(name, "transformers eager fp32 (timed beside the row above)", t["torch_in_out_run"], gf,
                              t["torch_in_out_run"][METRIC], t["matmul_in_out_run"]["gflops"], "ref"))
        m = t["matmul"]
        lines.append(f"| {name} | jitted fp32 {m['n']}^3 matmul (timed beside) | {m[METRIC]:.4f} | "
                     f"{2 * m['n'] ** 3 / 1e9:.2f} | {mm:.1f} | 100% | | {m['clean_reps']}/{m['all_reps']} | |")
        if name == "full":
            gb = r["weight_bytes"] / 1e9
            tj, tt = t["jax"][METRIC], t["torch"][METRIC]
            notes.append(
                f"Full-width layer: {gb:.2f} GB of fp32 weights per forward"
                + (f"; at the measured stream-read bandwidth ({bw:.1f} GB/s) the memory roofline is "
                   f"{gb / bw:.3f} s" if bw else "")
                + f". JAX reads them at {gb / tj:.1f} GB/s effective."
            )
            notes.append(
                f"Targets on the full-width layer (the model as loaded): >= 2.5x transformers: "
                f"{'MET' if tt / tj >= 2.5 else 'NOT met'} ({tt / tj:.2f}x); >= 50% of matmul throughput: "
                f"{'MET' if gf / tj >= 0.5 * mm else 'NOT met'} ({100 * gf / tj / mm:.0f}%)."
            )
    m = results["matmul"]
    lines.append(f"| machine | jitted fp32 {m['n']}^3 matmul (alone) | {m[METRIC]:.4f} | {2 * m['n'] ** 3 / 1e9:.2f} | "
                 f"{m['gflops']:.1f} | | | {m['clean_reps']}/{m['all_reps']} | |")
    if METRIC != "median_s":
        notes.append("Times are median CPU seconds of the benchmark process per call (--metric cpu), not wall time.")
    elif any(t["contended"] for r in results["cases"].values() for t in r["timing"].values()):
        notes.append("Rows marked (contended): fewer than 3 repetitions ran while other processes stayed under the "
                     "--busy threshold; their medians are over all repetitions, taken while the machine was shared "
                     "(see others_load_mean in the .json). Ratios are fairer than absolute times there: "
                     "every row of a case was timed in the same interleaved loop.")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="medium,full", help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation (median reported)")
    p.add_argument("--busy", type=float, default=0.25,
                   help="a repetition counts as clean when other processes used at most this many cores meanwhile")
    p.add_argument("--max-wait", type=float, default=900.0, help="seconds per measurement to collect clean repetitions")
    p.add_argument("--moe-backend", default="auto")
    p.add_argument("--in-out", action="store_true",
                   help="also time every case with its experts stored [in, out] (moe.ExpertWeights, the previous "
                        "layout; the model stores them [out, in])")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max parity rel error before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores); pin XLA with taskset, e.g. `taskset -c 1 ... --threads 1`")
    p.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                   help="report median wall time (default) or median CPU time of this process (for single-thread runs "
                        "on a shared machine)")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary directory); "
                                                   "an existing checkpoint there is reused")
    p.add_argument("--out", default=str(RESULTS / "model"), help="output path prefix (.md and .json)")
    args = p.parse_args(argv)

    import jax
    import torch

    global METRIC
    METRIC = "median_s" if args.metric == "wall" else "cpu_median_s"
    if args.metric == "cpu":  # CPU time needs no quiet machine: take every repetition
        args.busy = float("inf")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or cores)
    cases = [c for c in args.cases.split(",") if c]
    results = {
        "environment": {
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "moe_backend": args.moe_backend,
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "metric": args.metric,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "cases": {},
    }
    print("measuring matmul throughput ...", flush=True)
    args.matmul = matmul_thunk()
    results["matmul"] = with_gflops(
        time_interleaved({"matmul": args.matmul}, args.reps, args.busy, args.max_wait)["matmul"])
    print(f"  {results['matmul']['gflops']:.1f} GFLOP/s", flush=True)
    results["stream"] = stream_gbs(args.reps, args.busy, args.max_wait)
    print(f"  stream read {results['stream']['gbs']:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="hmoe_bench_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in cases:
            results["cases"][name] = run_case(name, CASES[name], workdir, args)
    md = table(results)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = results["environment"]
    header = (
        f"# JAX vs transformers forward (fp32, CPU)\n\n"
        f"`python bench/bench_model.py` on {env['cpu']} ({env['cores']} cores), jax {env['jax']}, "
        f"torch {env['torch']}, "
        f"transformers {env['transformers']}, MoE backend `{env['moe_backend']}`"
        + (f", XLA_FLAGS=`{env['XLA_FLAGS']}`" if env["XLA_FLAGS"] else "")
        + f", {env['date']}.\n\n"
    )
    out.with_suffix(".md").write_text(header + md + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
