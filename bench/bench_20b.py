"""Full-size gpt-oss-20b on this 2-core, 24 GiB machine: layer-12 precompute and the 24-layer hybrid forward.

    python bench/bench_20b.py WORK_DIR [--parts precompute,precompute-layerwise,hybrid,eval-hybrid,generate,hybrid-fused]
                                       [--n-prompts 32] [--batch-size 32]

Uses (or writes, with make_synthetic_checkpoint.py) the random full-size 20b HF checkpoint in
WORK_DIR/hf (MXFP4 experts, bf16 elsewhere, like gpt-oss-20b), and a BPE tokenizer beside it. Each part
runs in a child process, so the peak RSS reported is that part's own:

- precompute: `train precompute`'s library call on the first N prompts of the data set
  (`train.json`, seed 42), layer 12, experts kept packed (MXFP4 decoded inside the forward), weights
  stored bf16 and computed fp32, only layers 0..11 loaded, the 12 blocks jitted as one program.
  Targets: peak RSS <= 12 GiB, >= 20 tokens/s.
- precompute-layerwise: the same with `layerwise=True` (`train precompute --layerwise`): the blocks
  jitted one by one.
- hybrid: the whole model (24 layers, packed experts, bf16 storage, fp32 compute) with the hybrid
  layer installed (randomly initialised extraction and projection MLPs: memory and time do not depend
  on their values), one prompt, `model(ids, layerwise=True)`: the blocks jitted one by one, a
  compiled program per kind of block. Target: peak RSS <= 16 GiB.
- eval-hybrid: `eval hybrid`'s library call on 16 eval prompts with the 20b options (blocks 0..12
  only, packed, bf16, layerwise), probes briefly trained on the precompute part's store.
- generate: greedy `generate(..., layerwise=True)` on the whole model (packed, bf16 storage), one
  prompt, 8 new tokens, twice (the first call compiles).
- hybrid-fused (not in the default parts): the same forward as one jitted program with all 24 layers
  unrolled, whose compile (or compile-cache load) takes ~2.5 GiB on top of the resident parameters.

Writes WORK_DIR/bench_20b.json and prints a markdown table. Slow (minutes): not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
PARTS = ("precompute", "precompute-layerwise", "hybrid", "hybrid-fused", "eval-hybrid", "generate")
REPO = Path(__file__).resolve().parents[1]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _train_set(work: Path) -> Path:
    from hmoe_jax import data

    full = work / "data" / "train.json"
    if not full.is_file():
        data.write_dataset(work / "data")
    return full


def _subset(work: Path, n: int) -> Path:
    from hmoe_jax import data

    full = _train_set(work)
    subset = work / "data" / f"train_first{n}.json"
    if not subset.is_file():
        data.write_json_atomically(subset, json.loads(full.read_text())[:n])
    return subset


def _ensure_tokenizer(hf: Path, work: Path) -> None:
    from hmoe_jax import synthetic
    from hmoe_jax.router_negatives import NEGATIVE_PROMPTS

    if (hf / "tokenizer.json").is_file():
        return
    texts = [s["input_prompt"] for s in json.loads(_train_set(work).read_text())] + list(NEGATIVE_PROMPTS)
    config = json.loads((hf / "config.json").read_text())
    # A small trained BPE (ids far below the vocabulary size) with its own specials at ids 0 and 1:
    # gpt-oss's real tokenizer is not available offline; the forward cost depends only on the lengths.
    config.update(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    synthetic.write_tokenizer(hf, texts, config)


def child_precompute(args, layerwise: bool = False) -> dict:
    import jax.numpy as jnp  # noqa: F401  (jax starts before timing)

    from hmoe_jax import make_mesh, precompute

    data_file = _subset(args.work_dir, args.n_prompts)
    out = args.work_dir / "store_layer12"
    if out.exists():
        shutil.rmtree(out)
    timings = {}
    original = precompute.from_pretrained

    def timed_load(*a, **k):
        t = time.perf_counter()
        model = original(*a, **k)
        timings["load_s"] = time.perf_counter() - t
        timings["loaded_rss"] = _peak_rss()
        return model

    class Batches:  # the store's progress hook: a timestamp and the real tokens of every batch
        def start(self, *counts):
            self.marks = []

        def advance(self, prompts, tokens):
            self.marks.append((time.perf_counter(), tokens))

    precompute.from_pretrained = timed_load
    batches = Batches()
    start = time.perf_counter()
    store = precompute.precompute_features(
        args.work_dir / "hf", precompute.scenario_prompts(data_file), [12], out, mesh=make_mesh(),
        batch_size=args.batch_size, keep_mxfp4=True, param_dtype="bfloat16", progress=batches, layerwise=layerwise)
    total = time.perf_counter() - start
    tokens = int(sum(store.metadata["token_counts"]))
    forward_s = total - timings["load_s"]
    # The first batch compiles the 12-layer program; later batches (same padded length: the bench's
    # prompts fall in one length bucket) show the rate a long run settles at.
    marks = batches.marks
    steady = None
    if len(marks) > 1:
        steady = sum(t for _, t in marks[1:]) / (marks[-1][0] - marks[0][0])
    return {"part": "precompute-layerwise" if layerwise else "precompute", "prompts": args.n_prompts, "tokens": tokens, "batch_size": args.batch_size,
            "batches": len(marks), "wall_s": total, "load_s": timings["load_s"], "forward_s": forward_s,
            "first_batch_s": marks[0][0] - (start + timings["load_s"]),
            "tokens_per_s": tokens / forward_s, "tokens_per_s_after_first_batch": steady,
            "tokens_per_s_incl_load": tokens / total,
            "rss_after_load_gib": timings["loaded_rss"] / GIB, "peak_rss_gib": _peak_rss() / GIB,
            "targets": {"peak_rss_gib": 12, "tokens_per_s": 20}}


def _whole_model_and_prompt(args):
    """The whole 20b (packed experts, bf16 storage, fp32 compute), its load time and peak RSS after
    loading, and the data set's first prompt as ids [1, T]."""
    import jax.numpy as jnp

    from hmoe_jax import from_pretrained, precompute

    hf = args.work_dir / "hf"
    start = time.perf_counter()
    model = from_pretrained(hf, dtype=jnp.float32, param_dtype=jnp.bfloat16, keep_mxfp4=True)
    load_s = time.perf_counter() - start
    loaded_rss = _peak_rss()
    prompt = json.loads(_subset(args.work_dir, 1).read_text())[0]["input_prompt"]
    ids = precompute.tokenize(precompute.load_tokenizer(hf), [prompt], model.config.vocab_size)[0][None, :]
    return model, load_s, loaded_rss, ids


def child_hybrid(args, layerwise: bool = True) -> dict:
    import numpy as np

    from hmoe_jax.hybrid import HybridConfig, make_hybrid

    model, load_s, loaded_rss, ids = _whole_model_and_prompt(args)
    config = HybridConfig()
    make_hybrid(model, config)
    t = time.perf_counter()
    out = model(ids, layerwise=layerwise)
    np.asarray(out.logits)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = model(ids, layerwise=layerwise)
    logits = np.asarray(out.logits)
    second = time.perf_counter() - t
    if not np.isfinite(logits).all():
        raise SystemExit("non-finite logits from the 20b hybrid forward")
    return {"part": "hybrid" if layerwise else "hybrid-fused", "tokens": int(ids.shape[1]), "hybrid_layers": list(config.layers),
            "load_s": load_s, "first_call_s": first, "second_call_s": second,
            "rss_after_load_gib": loaded_rss / GIB, "peak_rss_gib": _peak_rss() / GIB,
            "targets": {"peak_rss_gib": 16}}


def child_generate(args) -> dict:
    """Greedy generation on the whole 20b (packed, bf16 storage), layerwise: one prompt, 8 new tokens."""
    import numpy as np

    from hmoe_jax.generate import generate

    model, _, _, ids = _whole_model_and_prompt(args)
    timings = []
    for _ in range(2):  # the first call compiles its block programs
        t = time.perf_counter()
        np.asarray(generate(model, ids, max_new_tokens=8, layerwise=True))
        timings.append(time.perf_counter() - t)
    return {"part": "generate", "tokens": int(ids.shape[1]), "new_tokens": 8, "first_call_s": timings[0],
            "second_call_s": timings[1], "peak_rss_gib": _peak_rss() / GIB}


def child_eval_hybrid(args) -> dict:
    """`eval hybrid`'s library call with the 20b options (blocks 0..12 only, packed, bf16, layerwise), on
    the first 16 eval prompts, with probes briefly trained on the precompute part's layer-12 store
    (their values do not change memory or time)."""
    from hmoe_jax import evaluation, precompute
    from train import probes_cli

    store = args.work_dir / "store_layer12"
    if not precompute.FeatureStore.open(store).complete:
        raise SystemExit(f"{store} is unfinished: run the precompute part first")
    probes = args.work_dir / "probes_layer12"
    if not (probes / "results.json").is_file():
        if probes.exists():
            shutil.rmtree(probes)
        if probes_cli.main(["--store", str(store), "--out", str(probes), "--epochs", "5", "--folds", "2",
                            "--seeds", "1", "--no-direct"]):
            raise SystemExit("probe training failed")
    eval_file = args.work_dir / "data" / "eval_first16.json"
    if not eval_file.is_file():
        from hmoe_jax import data

        data.write_json_atomically(eval_file, json.loads((args.work_dir / "data" / "eval.json").read_text())[:16])
    start = time.perf_counter()
    summary = evaluation.evaluate_hybrid(args.work_dir / "hf", probes, eval_file,
                                         train_path=_train_set(args.work_dir), batch_size=8, keep_mxfp4=True,
                                         param_dtype="bfloat16", layerwise=True)
    return {"part": "eval-hybrid", "prompts": summary["n_scenarios"], "batch_size": 8,
            "loaded_layers": summary["loaded_layers"], "wall_s": time.perf_counter() - start,
            "median_batch_s": summary["median_batch_ms"] / 1000, "peak_rss_gib": _peak_rss() / GIB}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dir", type=Path)
    p.add_argument("--parts", default="precompute,precompute-layerwise,hybrid,eval-hybrid,generate",
                   help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        if args.child.startswith("precompute"):
            result = child_precompute(args, layerwise=args.child == "precompute-layerwise")
        elif args.child == "eval-hybrid":
            result = child_eval_hybrid(args)
        elif args.child == "generate":
            result = child_generate(args)
        else:
            result = child_hybrid(args, layerwise=args.child == "hybrid")
        print("RESULT " + json.dumps(result))
        return 0

    hf = args.work_dir / "hf"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_synthetic_checkpoint.py"), str(hf)], check=True)
    _ensure_tokenizer(hf, args.work_dir)
    results = []
    # Each part runs twice, in fresh processes sharing a JAX persistent compilation cache of its own:
    # the first (cold) run starts from an empty cache and compiles, the second (warm) shows the rate of
    # a long run, whose compile is amortised.
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        p.error(f"unknown part(s) {sorted(set(parts) - set(PARTS))}: choose from {', '.join(PARTS)}")
    for part, run in [(name, run) for name in parts for run in ("cold", "warm")]:
        cache = args.work_dir / "jax_cache" / part
        if run == "cold" and cache.exists():
            shutil.rmtree(cache)
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        cmd = [sys.executable, __file__, str(args.work_dir), "--child", part, "--n-prompts", str(args.n_prompts),
               "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            results.append({"part": part, "run": run, "error": f"exit {proc.returncode}"})
            continue
        results.append(dict(json.loads(lines[-1][len("RESULT "):]), run=run))
    # Parts not run this time keep their earlier results.
    out = args.work_dir / "bench_20b.json"
    done = {(r["part"], r["run"]) for r in results}
    earlier = json.loads(out.read_text()) if out.is_file() else []
    results = [r for r in earlier if (r["part"], r["run"]) not in done] + results
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print("| part | compile cache | tokens | load | forward | tokens/s | peak RSS | target |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['part']} | {r['run']} | failed ({r['error']}) | | | | | |")
        elif r["part"].startswith("precompute"):
            how = "layerwise" if r["part"] == "precompute-layerwise" else "one program"
            print(f"| precompute layer 12, {r['prompts']} prompts, batch {r['batch_size']}, {how} | {r['run']} | {r['tokens']} | "
                  f"{r['load_s']:.0f} s | {r['forward_s']:.0f} s | {r['tokens_per_s']:.1f} | "
                  f"{r['peak_rss_gib']:.2f} GiB | <= 12 GiB, >= 20 tok/s |")
        elif r["part"] == "generate":
            print(f"| greedy generate, whole model, 1 prompt, layerwise | {r['run']} | {r['tokens']} + {r['new_tokens']} | | "
                  f"{r['first_call_s']:.0f} s (1st call) / {r['second_call_s']:.0f} s (2nd) | | "
                  f"{r['peak_rss_gib']:.2f} GiB | - |")
        elif r["part"] == "eval-hybrid":
            print(f"| eval hybrid, blocks 0-12, {r['prompts']} prompts, batch {r['batch_size']}, layerwise | {r['run']} | | "
                  f"| {r['wall_s']:.0f} s (median batch {r['median_batch_s']:.0f} s) | | {r['peak_rss_gib']:.2f} GiB | - |")
        else:
            how = "layerwise" if r["part"] == "hybrid" else "one program"
            print(f"| hybrid forward, 24 layers, 1 prompt, {how} | {r['run']} | {r['tokens']} | {r['load_s']:.0f} s | "
                  f"{r['first_call_s']:.0f} s (1st call) / {r['second_call_s']:.1f} s (2nd) | "
                  f"{r['tokens'] / r['second_call_s']:.1f} | {r['peak_rss_gib']:.2f} GiB | <= 16 GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
