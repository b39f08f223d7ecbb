"""Full-size gpt-oss-20b on this 2-core, 24 GiB machine, with the defaults (no memory flags anywhere).

    python bench/bench_20b.py WORK_DIR [--parts precompute,hybrid,eval-hybrid,generate,cmd-...]

Uses (or writes, with make_synthetic_checkpoint.py) the random full-size 20b HF checkpoint in
WORK_DIR/hf (MXFP4 experts, bf16 elsewhere, like gpt-oss-20b), and a BPE tokenizer beside it. Every part
runs in a process of its own, so the peak RSS reported is that part's own. The defaults follow the
checkpoint (`RunOptions`): MXFP4 experts packed, bf16 weights as stored, float32 compute on the CPU,
and, the model being over 4 GiB on a CPU host, each block a jitted program of its own. Each library part
first calls `runtime.host.configure_host_memory()`, as the README asks of a library user on a CPU host
(the commands call it themselves).

Library parts (timed inside; each runs twice, from an empty and from a warm compile cache):
- precompute: `training.precompute.precompute_features` on the first N prompts of the data set, layer
  12 (blocks 0..11 loaded). Bound: peak RSS <= 12 GiB.
- hybrid: the whole model with the hybrid layer at 12 (randomly initialised: memory and time do not
  depend on its values), `model(ids)` on one prompt; before the hybrid layer goes in, the same forward
  without it, in the same process, for the hybrid layer's overhead (best of two calls after the first
  each). Bound: <= 16 GiB.
- eval-hybrid: `evaluation.hybrid.evaluate_hybrid` on 16 eval prompts (blocks 0..12), probes briefly
  trained on the precompute part's store.
- generate: greedy `model.generate` on the whole model, one prompt, 8 new tokens, twice (the first call
  compiles). Bound: <= 16 GiB.
- precompute-program, hybrid-program (not in the default parts): the same with `execution="program"`,
  one jitted program unrolling every layer, whose compile takes ~2.5 GiB beside the weights.

Command parts (`cmd-*`, not in the default parts): each pipeline command exactly as a user types it,
in a child process, with small workloads (`--n`, `--new-tokens`, `--layers`, ...) but no memory flag;
wall time and peak RSS of the command. `cmd-all` runs every one.

Writes WORK_DIR/bench_20b.json (merged by part) and prints a markdown table. Slow (minutes to an
hour): not part of the tests.
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
LIBRARY_PARTS = ("precompute", "hybrid", "eval-hybrid", "generate", "precompute-program", "hybrid-program")
DEFAULT_PARTS = "precompute,hybrid,eval-hybrid,generate"
REPO = Path(__file__).resolve().parents[1]
BOUNDS_GIB = {"precompute": 12, "hybrid": 16, "generate": 16, "precompute-program": 12, "hybrid-program": 16,
              "cmd-precompute": 12, "cmd-eval-hybrid": 16, "cmd-baselines": 16, "cmd-latency": 16,
              "cmd-parity": 8, "cmd-train-hybrid": None, "cmd-demo": 12}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _data(work: Path) -> dict[str, Path]:
    """The data set, its first 32 training and first 16 eval prompts."""
    from hmoe_jax.domains.cre import generator as scenarios
    from hmoe_jax.runtime.files import write_json_atomically

    full = work / "data"
    if not (full / "train.json").is_file():
        scenarios.write_dataset(full)
    paths = {"train": full / "train.json", "eval": full / "eval.json",
             "train32": full / "train_first32.json", "eval16": full / "eval_first16.json"}
    for key, source, n in (("train32", "train", 32), ("eval16", "eval", 16)):
        if not paths[key].is_file():
            write_json_atomically(paths[key], json.loads(paths[source].read_text())[:n])
    return paths


def _ensure_tokenizer(hf: Path, work: Path) -> None:
    from hmoe_jax.checkpoint import synthetic
    from hmoe_jax.domains.cre.negatives import NEGATIVE_PROMPTS

    if (hf / "tokenizer.json").is_file():
        return
    texts = [s["input_prompt"] for s in json.loads(_data(work)["train"].read_text())] + list(NEGATIVE_PROMPTS)
    config = json.loads((hf / "config.json").read_text())
    # A small trained BPE (ids far below the vocabulary size) with its own specials at ids 0 and 1:
    # gpt-oss's real tokenizer is not available offline; the forward cost depends only on the lengths.
    config.update(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    synthetic.write_tokenizer(hf, texts, config)


def _options(part: str):
    from hmoe_jax.runtime.options import RunOptions

    return RunOptions(execution="program") if part.endswith("-program") else RunOptions()


# ------------------------------------------------------------------ library parts (run in a child)


def child_precompute(args, part: str) -> dict:
    from hmoe_jax.data.features import scenario_prompts
    from hmoe_jax.runtime.sharding import make_mesh
    from hmoe_jax.training import precompute

    out = args.work_dir / f"store_layer12{'_program' if part.endswith('-program') else ''}"
    if out.exists():
        shutil.rmtree(out)
    timings = {}
    original = precompute.from_pretrained

    def timed_load(*a, **k):
        t = time.perf_counter()
        model = original(*a, **k)
        timings.update(load_s=time.perf_counter() - t, loaded_rss=_peak_rss(), options=model.options.to_dict())
        return model

    class Batches:  # the store's progress hook: a timestamp and the real tokens of every batch
        def start(self, *counts):
            self.marks = []

        def advance(self, prompts, tokens):
            self.marks.append((time.perf_counter(), tokens))

    precompute.from_pretrained = timed_load
    batches = Batches()
    start = time.perf_counter()
    store = precompute.precompute_features(args.work_dir / "hf", scenario_prompts(_data(args.work_dir)["train32"]),
                                           [12], out, mesh=make_mesh(), batch_size=args.batch_size,
                                           options=_options(part), progress=batches)
    total = time.perf_counter() - start
    tokens = int(sum(store.metadata["token_counts"]))
    forward_s = total - timings["load_s"]
    return {"part": part, "prompts": len(store.scenario_ids), "tokens": tokens, "batch_size": args.batch_size,
            "options": timings["options"], "wall_s": total, "load_s": timings["load_s"], "forward_s": forward_s,
            "first_batch_s": batches.marks[0][0] - (start + timings["load_s"]), "tokens_per_s": tokens / forward_s,
            "rss_after_load_gib": timings["loaded_rss"] / GIB, "peak_rss_gib": _peak_rss() / GIB}


def _whole_model_and_prompt(args, part: str):
    """The whole 20b with the defaults, its load time and peak RSS after loading, and the data set's first
    prompt as ids [1, T]."""
    from hmoe_jax.checkpoint.loading import from_pretrained
    from hmoe_jax.checkpoint.tokenizer import load_tokenizer
    from hmoe_jax.data.prompts import tokenize

    hf = args.work_dir / "hf"
    start = time.perf_counter()
    model = from_pretrained(hf, _options(part))
    load_s = time.perf_counter() - start
    prompt = json.loads(_data(args.work_dir)["train32"].read_text())[0]["input_prompt"]
    ids = tokenize(load_tokenizer(hf), [prompt], model.config.vocab_size)[0][None, :]
    return model, load_s, _peak_rss(), ids


def child_hybrid(args, part: str) -> dict:
    import numpy as np

    from hmoe_jax.hybrid.layer import HybridConfig, make_hybrid

    model, load_s, loaded_rss, ids = _whole_model_and_prompt(args, part)

    def calls(n: int) -> list[float]:  # the first call compiles
        times = []
        for _ in range(n):
            t = time.perf_counter()
            logits = np.asarray(model(ids).logits)
            times.append(time.perf_counter() - t)
        if not np.isfinite(logits).all():
            raise SystemExit("non-finite logits from the 20b forward")
        return times

    plain = calls(3)  # the same model before the hybrid layer goes in: the overhead's baseline
    config = HybridConfig()
    make_hybrid(model, config)
    hybrid = calls(3)
    plain_s, hybrid_s = min(plain[1:]), min(hybrid[1:])
    return {"part": part, "tokens": int(ids.shape[1]), "hybrid_layers": list(config.layers),
            "options": model.options.to_dict(), "load_s": load_s, "first_call_s": hybrid[0], "second_call_s": hybrid_s,
            "plain_call_s": plain_s, "hybrid_overhead": hybrid_s / plain_s - 1,
            "rss_after_load_gib": loaded_rss / GIB, "peak_rss_gib": _peak_rss() / GIB}


def child_generate(args, part: str) -> dict:
    import numpy as np

    from hmoe_jax.model.generate import generate

    model, load_s, _, ids = _whole_model_and_prompt(args, part)
    calls = []
    for _ in range(2):  # the first call compiles its programs
        t = time.perf_counter()
        np.asarray(generate(model, ids, max_new_tokens=8))
        calls.append(time.perf_counter() - t)
    return {"part": part, "tokens": int(ids.shape[1]), "new_tokens": 8, "options": model.options.to_dict(),
            "load_s": load_s, "first_call_s": calls[0], "second_call_s": calls[1], "peak_rss_gib": _peak_rss() / GIB}


def _probes(args) -> Path:
    """Probes briefly trained on the precompute part's layer-12 store (their values do not change memory
    or time)."""
    from hmoe_jax.data.features import FeatureStore
    from hmoe_jax.training.probes import Protocol, StoreChoice, train_probes_on_store

    store = args.work_dir / "store_layer12"
    if not (store / "metadata.json").is_file() or not FeatureStore.open(store).complete:
        raise SystemExit(f"{store} is unfinished: run the precompute part first")
    probes = args.work_dir / "probes_layer12"
    if not (probes / "results.json").is_file():
        if probes.exists():
            shutil.rmtree(probes)
        train_probes_on_store(store, probes, Protocol(epochs=5, folds=2, seeds=1), StoreChoice(), direct=False)
    return probes


def child_eval_hybrid(args, part: str) -> dict:
    from hmoe_jax.evaluation.hybrid import evaluate_hybrid

    paths, probes = _data(args.work_dir), _probes(args)
    start = time.perf_counter()
    summary = evaluate_hybrid(args.work_dir / "hf", probes, paths["eval16"], train_path=paths["train"], batch_size=8)
    return {"part": part, "prompts": summary["n_scenarios"], "batch_size": 8, "options": summary["options"],
            "loaded_layers": summary["loaded_layers"], "wall_s": time.perf_counter() - start,
            "median_batch_s": summary["median_batch_ms"] / 1000, "peak_rss_gib": _peak_rss() / GIB}


CHILDREN = {"precompute": child_precompute, "precompute-program": child_precompute, "hybrid": child_hybrid,
            "hybrid-program": child_hybrid, "eval-hybrid": child_eval_hybrid, "generate": child_generate}


# ------------------------------------------------------------------ command parts


def commands(work: Path) -> dict[str, list[str]]:
    """Each pipeline command as a user types it, on the 20b, with a small workload and no memory flag."""
    hf, paths, probes = str(work / "hf"), _data(work), str(work / "probes_layer12")
    out = work / "commands"
    return {
        "cmd-precompute": ["-m", "train", "precompute", "--model", hf, "--data", str(paths["train32"]), "--layer",
                           "12", "--out", str(out / "store"), "--batch-size", "32"],
        "cmd-eval-hybrid": ["-m", "eval", "hybrid", "--model", hf, "--probes", probes, "--data", str(paths["eval16"]),
                            "--train", str(paths["train"]), "--out", str(out / "results"), "--overwrite"],
        "cmd-baselines": ["-m", "eval", "baselines", "--model", hf, "--data", str(paths["eval16"]), "--n", "1",
                          "--new-tokens", "4", "--styles", "structured", "--out", str(out / "baselines"),
                          "--overwrite"],
        "cmd-latency": ["-m", "eval", "latency", "--model", hf, "--n-prompts", "1", "--new-tokens", "4", "--out",
                        str(out / "latency")],
        "cmd-parity": ["-m", "eval", "parity", "--model", hf, "--layers", "23:24", "--n-prompts", "2", "--out",
                       str(out / "parity")],
        "cmd-train-hybrid": ["-m", "train", "hybrid", "--model", hf, "--probes", probes, "--data",
                             str(paths["train32"]), "--eval", str(paths["eval16"]), "--n-train", "4", "--n-eval", "4",
                             "--n-generate", "0", "--batch-size", "4", "--out", str(out / "hybrid_training")],
        "cmd-demo": ["-m", "eval", "demo", "--model", hf, "--out", str(out / "demo"), "--n-train", "40",
                     "--n-eval", "8", "--epochs", "2"],
    }


def measure_command(argv: list[str]) -> dict:
    """Run `python ARGV` in a child; its exit status, wall time and peak RSS (this process does nothing
    else, so RUSAGE_CHILDREN is that command's)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO)
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - start,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB}


# ------------------------------------------------------------------ driver


def _child(args) -> dict:
    if args.child in CHILDREN:
        return CHILDREN[args.child](args, args.child)
    argv = commands(args.work_dir)[args.child]
    if args.child == "cmd-train-hybrid" or args.child == "cmd-eval-hybrid":
        _probes(args)
    for name in ("commands/hybrid_training", "commands/store", "commands/demo"):
        shutil.rmtree(args.work_dir / name, ignore_errors=True)  # a rerun starts afresh, not resumed
    return {"part": args.child, "argv": ["python", *argv], **measure_command(argv)}


def _row(r: dict) -> str:
    bound = BOUNDS_GIB.get(r["part"])
    bound = f"<= {bound} GiB" if bound else "-"
    if "error" in r:
        return f"| {r['part']} | {r['run']} | failed ({r['error']}) | | {bound} |"
    rss = f"{r['peak_rss_gib']:.2f} GiB"
    if r["part"].startswith("cmd-"):
        status = "ok" if r["returncode"] == 0 else f"exit {r['returncode']}"
        return f"| `{' '.join(r['argv'][1:4])}` | {status} | {r['wall_s']:.0f} s wall | {rss} | {bound} |"
    if r["part"].startswith("precompute"):
        speed = (f"{r['tokens_per_s']:.1f} tok/s ({r['tokens']} tokens, batch {r['batch_size']}; load "
                 f"{r['load_s']:.0f} s)")
    elif r["part"] == "eval-hybrid":
        speed = f"median batch of {r['batch_size']}: {r['median_batch_s']:.1f} s ({r['prompts']} prompts)"
    elif r["part"] == "generate":
        speed = (f"{r['first_call_s']:.0f} s first call, {r['second_call_s']:.0f} s second ({r['tokens']} + "
                 f"{r['new_tokens']} tokens)")
    else:
        speed = (f"{r['first_call_s']:.0f} s first call, {r['second_call_s']:.1f} s after ({r['tokens']} tokens; "
                 f"load {r['load_s']:.0f} s)")
        if "plain_call_s" in r:
            speed += f"; without the hybrid layer {r['plain_call_s']:.1f} s: overhead {r['hybrid_overhead']:+.1%}"
    return f"| {r['part']} ({r.get('options', {}).get('execution', '?')}) | {r['run']} | {speed} | {rss} | {bound} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dir", type=Path)
    p.add_argument("--parts", default=DEFAULT_PARTS,
                   help=f"comma-separated, of {', '.join(LIBRARY_PARTS)}, the cmd-* parts, or cmd-all")
    p.add_argument("--batch-size", type=int, default=32, help="precompute batch (default 32)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work_dir = args.work_dir.resolve()
    sys.path.insert(0, str(REPO))
    if args.child:
        if args.child in CHILDREN:  # as a library user on a CPU host does, before JAX starts (README)
            from hmoe_jax.runtime.host import configure_host_memory

            configure_host_memory()
        print("RESULT " + json.dumps(_child(args)))
        return 0

    hf = args.work_dir / "hf"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_synthetic_checkpoint.py"), str(hf)], check=True)
    _ensure_tokenizer(hf, args.work_dir)
    parts = args.parts.split(",")
    if "cmd-all" in parts:
        parts = [q for q in parts if q != "cmd-all"] + list(commands(args.work_dir))
    unknown = sorted(set(parts) - set(LIBRARY_PARTS) - set(commands(args.work_dir)))
    if unknown:
        p.error(f"unknown part(s) {unknown}")
    results = []
    # Library parts run twice, in fresh processes sharing a JAX persistent compilation cache of their own:
    # the first (cold) from an empty cache, the second (warm) shows a long run's rate, its compile amortised.
    for part in parts:
        for run in ("cold", "warm") if part in LIBRARY_PARTS else ("once",):
            cache = args.work_dir / "jax_cache" / part
            if run == "cold" and cache.exists():
                shutil.rmtree(cache)
            env = dict(os.environ)
            if part in LIBRARY_PARTS:
                env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
            cmd = [sys.executable, __file__, str(args.work_dir), "--child", part, "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
            lines = proc.stdout.splitlines()
            sys.stdout.write("".join(line + "\n" for line in lines if not line.startswith("RESULT ")))
            lines = [line for line in lines if line.startswith("RESULT ")]
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
    print("| part (execution) | compile cache / status | speed | peak RSS | bound |\n|---|---|---|---|---|")
    for r in results:
        print(_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
