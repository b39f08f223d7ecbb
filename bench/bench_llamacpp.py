"""gpt-oss-20b on this CPU: hmoe-jax side by side with llama.cpp, on the same synthetic full-size checkpoint.

    python bench/bench_llamacpp.py WORK_DIR [--llama-src DIR] [--llama-python PY] [--threads 2] [--runs 3]
                                   [--kernels auto] [--parts llama,ours]

WORK_DIR holds (or gets, as `bench/bench_20b.py` makes them) the random full-size 20b HF checkpoint in
WORK_DIR/hf (MXFP4 experts, bf16 elsewhere) and its tokenizer.

llama.cpp: the `llama_cpp` package (llama-cpp-python, which vendors and builds llama.cpp) in
`--llama-python` (default: this interpreter), e.g. a venv made with
`pip install llama-cpp-python==0.3.36` (about 5 minutes to build here). The checkpoint is converted to
GGUF once, with llama.cpp's own converter (`convert_hf_to_gguf.py` from `--llama-src`, the unpacked
source distribution's `vendor/llama.cpp`): MXFP4 experts stay MXFP4, the other weights take the
converter's default type. The converter recognises a tokenizer's pre-tokenizer by the hash of its
encoding of a test string and refuses one it does not know, such as the BPE trained for the synthetic
checkpoint; it is told that the pre-tokenizer is gpt-oss's own ("gpt-4o", o200k): both sides are fed
token ids, never text, so the choice changes no measured number. Where llama.cpp is not available the
script says so and measures ours alone.

Workloads, on both sides, from random token ids, `--runs` times each after one warm-up:
- pp64, pp128, pp512: a prompt of that many tokens through the whole model, logits of its last token
  (llama.cpp: `Llama.eval` from an empty cache; ours: `generate(max_new_tokens=1)`, the prefill and one
  greedy choice);
- tg32: 32 decode steps after an 8-token prompt, batch 1 (llama.cpp: `eval` of one token at a time;
  ours: `generate(max_new_tokens=33)` minus `generate(max_new_tokens=1)`, per decoded token).
Each side runs in a process of its own (both models do not fit in memory at once); its peak RSS is that
process's. Hardware limits next to each row: bytes a decode step must read (the routed experts' MXFP4
blocks and every other weight once) over the measured memory bandwidth (a numpy copy of 1 GiB), and
FLOPs per prompt over a measured float32 matmul peak (numpy).

Writes WORK_DIR/llamacpp/{comparison.json, comparison.md, comparison.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (64, 128, 512)
DECODE_TOKENS = 32
DECODE_PROMPT = 8
GIB = 1 << 30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _token_ids(n: int, seed: int, vocab: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, min(vocab, 20000), n)]


# ------------------------------------------------------------------------------------------- llama.cpp


CONVERT = """
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
# The synthetic checkpoint's BPE is unknown to the converter's pre-tokenizer table: it is gpt-oss's own.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-4o"
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3]]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""

LLAMA_RUN = """
import json, resource, sys, time
import llama_cpp
args = json.loads(sys.argv[1])
llm = llama_cpp.Llama(args["gguf"], n_threads=args["threads"], n_threads_batch=args["threads"], n_ctx=1024,
                      n_batch=512, n_ubatch=512, verbose=False)
out = {"llama_cpp_python": llama_cpp.__version__, "prefill": {}, "decode": {}}
def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t
for n, ids in args["prompts"].items():
    runs = []
    for r in range(args["runs"] + 1):  # the first run warms up
        llm.reset()
        runs.append(timed(lambda: llm.eval(ids)))
    out["prefill"][n] = runs[1:]
prompt, steps = args["decode_prompt"], args["decode_ids"]
runs = []
for r in range(args["runs"] + 1):
    llm.reset(); llm.eval(prompt)
    runs.append(timed(lambda: [llm.eval([t]) for t in steps]) / len(steps))
out["decode"] = runs[1:]
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
print("RESULT " + json.dumps(out))
"""


def llama_python_ok(python: str) -> str | None:
    """None where `python` imports llama_cpp, else why not."""
    r = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["no output"])[-1]


def convert_to_gguf(args, hf: Path) -> Path:
    gguf = args.out / "model-mxfp4.gguf"
    if gguf.is_file():
        return gguf
    if args.llama_src is None or not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"--llama-src must be llama.cpp's source tree with convert_hf_to_gguf.py "
                         f"(got {args.llama_src})")
    partial = gguf.with_suffix(".partial")
    print(f"converting {hf} to GGUF with llama.cpp's converter ...", flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CONVERT, str(args.llama_src), str(hf), str(partial)], check=True)
    os.replace(partial, gguf)
    print(f"converted in {time.perf_counter() - t:.0f} s: {gguf} ({gguf.stat().st_size / GIB:.2f} GiB)", flush=True)
    return gguf


def run_llama(args, gguf: Path, workload: dict) -> dict:
    payload = json.dumps({"gguf": str(gguf), "threads": args.threads, "runs": args.runs, **workload})
    r = subprocess.run([args.llama_python, "-c", LLAMA_RUN, payload], capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"llama.cpp run failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------- ours


def run_ours(args, hf: Path, workload: dict) -> dict:
    """In a child process of this interpreter (its own peak RSS)."""
    payload = json.dumps({"hf": str(hf), "runs": args.runs, "kernels": args.kernels, **workload})
    r = subprocess.run([sys.executable, __file__, str(hf.parent), "--child-ours", payload], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"our run failed ({r.returncode}): {r.stderr.strip()[-3000:]}")
    return json.loads(line[len("RESULT "):])


def child_ours(payload: str) -> None:
    from hmoe_jax.checkpoint.loading import from_pretrained
    from hmoe_jax.model.generate import generate
    from hmoe_jax.runtime.host import configure_host_memory
    from hmoe_jax.runtime.options import RunOptions

    configure_host_memory()
    args = json.loads(payload)
    t = time.perf_counter()
    model = from_pretrained(args["hf"], RunOptions(kernels=args["kernels"]))
    out = {"load_s": time.perf_counter() - t, "options": model.options.to_dict(), "prefill": {}, "first_call_s": {}}

    def timed(ids, new_tokens: int) -> float:
        t = time.perf_counter()
        np.asarray(generate(model, np.asarray([ids], np.int32), max_new_tokens=new_tokens))
        return time.perf_counter() - t

    for n, ids in args["prompts"].items():
        out["first_call_s"][n] = timed(ids, 1)  # compiles
        out["prefill"][n] = [timed(ids, 1) for _ in range(args["runs"])]
    prompt = args["decode_prompt"]
    steps = len(args["decode_ids"])
    timed(prompt, 1), timed(prompt, steps + 1)  # compile both
    out["decode"] = [(timed(prompt, steps + 1) - timed(prompt, 1)) / steps for _ in range(args["runs"])]
    out["peak_rss_gib"] = _peak_rss_gib()
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------ hardware limits


def hardware(threads: int) -> dict:
    """Memory bandwidth (a 1 GiB numpy copy: read + write) and float32 matmul peak (numpy's BLAS on
    `threads` threads), measured here."""
    a = np.ones(GIB // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    copy_s = min(_time(lambda: np.copyto(b, a)) for _ in range(3))
    n = 2048
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    x @ x
    mm_s = min(_time(lambda: x @ x) for _ in range(3))
    return {"bandwidth_gb_s": 2 * a.nbytes / copy_s / 1e9, "matmul_gflop_s": 2 * n**3 / mm_s / 1e9,
            "threads": threads}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_costs(hf: Path) -> dict:
    """Bytes one decode step reads and FLOPs per prompt token, from the checkpoint's config."""
    c = json.loads((hf / "config.json").read_text())
    h, i, e, k, layers = (c["hidden_size"], c["intermediate_size"], c["num_local_experts"],
                          c["num_experts_per_tok"], c["num_hidden_layers"])
    heads, kv, d, vocab = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    expert_params = 2 * i * h + h * i  # gate_up [2I, H] and down [H, I]
    attention_params = h * (heads + 2 * kv) * d + heads * d * h
    dense_params = layers * (attention_params + h * e) + 2 * vocab * h  # + router; embedding and lm_head
    mxfp4_bytes_per_value = 17 / 32  # 16 bytes of codes and 1 scale byte per 32 values
    decode_bytes = layers * k * expert_params * mxfp4_bytes_per_value + (dense_params - vocab * h) * 2 + h * 2
    flops_per_token = 2 * (layers * (k * expert_params + attention_params + h * e) + vocab * h)
    return {"decode_bytes": decode_bytes, "flops_per_token": flops_per_token}


# ----------------------------------------------------------------------------------------------- report


def _median_tok_s(seconds: list[float], tokens: int) -> float:
    return tokens / float(np.median(seconds))


def report(results: dict, out: Path) -> str:
    hw, costs, ours, llama = results["hardware"], results["costs"], results["ours"], results.get("llama")
    rows = []
    for n in PROMPTS:
        key = str(n)
        limit = hw["matmul_gflop_s"] * 1e9 / costs["flops_per_token"]
        o = _median_tok_s(ours["prefill"][key], n)
        ll = _median_tok_s(llama["prefill"][key], n) if llama else None
        rows.append((f"prefill pp{n} (tok/s)", o, ll, f"{limit:.1f} tok/s (FLOPs / fp32 matmul peak)"))
    limit = hw["bandwidth_gb_s"] * 1e9 / costs["decode_bytes"]
    o = 1 / float(np.median(ours["decode"]))
    ll = 1 / float(np.median(llama["decode"])) if llama else None
    rows.append((f"decode tg{DECODE_TOKENS}, batch 1 (tok/s)", o, ll, f"{limit:.1f} tok/s (bytes read / bandwidth)"))
    rows.append(("peak RSS (GiB)", ours["peak_rss_gib"], llama["peak_rss_gib"] if llama else None, "-"))
    lines = ["| workload | hmoe-jax | llama.cpp | hmoe-jax / llama.cpp | hardware limit |", "|---|---:|---:|---:|---|"]
    for name, o, ll, limit in rows:
        ratio = "-" if ll is None else f"{o / ll:.2f}x"
        lines.append(f"| {name} | {o:.2f} | {'-' if ll is None else f'{ll:.2f}'} | {ratio} | {limit} |")
    text = "\n".join([
        "# gpt-oss-20b (synthetic, full size) on this CPU: hmoe-jax and llama.cpp, one run",
        "",
        f"{results['threads']} threads; medians of {results['runs']} runs after a warm-up. hmoe-jax options: "
        + ", ".join(f"{k}={v}" for k, v in ours["options"].items()) + ". "
        + (f"llama.cpp: llama-cpp-python {llama['llama_cpp_python']}, MXFP4 GGUF from its own converter."
           if llama else f"llama.cpp: not measured ({results.get('llama_missing')})."),
        f"Measured here: memory bandwidth {hw['bandwidth_gb_s']:.1f} GB/s (numpy copy), float32 matmul "
        f"{hw['matmul_gflop_s']:.0f} GFLOP/s (numpy); a decode step reads {costs['decode_bytes'] / 1e9:.2f} GB, "
        f"a prompt token costs {costs['flops_per_token'] / 1e9:.2f} GFLOP.",
        "", *lines, ""])
    (out / "comparison.md").write_text(text)
    _plot(rows, out / "comparison.png")
    return text


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in rows if "tok/s" in r[0]]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(speed))
    ax.bar(x - 0.2, [r[1] for r in speed], 0.4, label="hmoe-jax")
    ax.bar(x + 0.2, [r[2] or 0 for r in speed], 0.4, label="llama.cpp")
    ax.set_xticks(x, [r[0].split(" (")[0] for r in speed], rotation=15)
    ax.set_ylabel("tokens / s")
    ax.set_title("gpt-oss-20b (synthetic) on this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python bench/bench_llamacpp.py /work/bench20b --llama-src "
                                       "llama_cpp_python-0.3.36/vendor/llama.cpp --llama-python venv/bin/python")
    p.add_argument("work_dir", type=Path)
    p.add_argument("--llama-src", type=Path, default=None)
    p.add_argument("--llama-python", default=sys.executable)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--kernels", default="auto", help="our RunOptions.kernels (auto: the C++ kernel on a CPU)")
    p.add_argument("--parts", default="llama,ours")
    p.add_argument("--child-ours", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_ours:
        child_ours(args.child_ours)
        return 0
    work = args.work_dir.expanduser().resolve()
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        raise SystemExit(f"no checkpoint in {hf}: run bench/bench_20b.py {work} first (it writes one)")
    sys.path.insert(0, str(REPO / "bench"))
    import bench_20b

    bench_20b._ensure_tokenizer(hf, work)
    args.out = work / "llamacpp"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.llama_src is not None:
        args.llama_src = args.llama_src.expanduser().resolve()
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    workload = {"prompts": {str(n): _token_ids(n, n, vocab) for n in PROMPTS},
                "decode_prompt": _token_ids(DECODE_PROMPT, 1, vocab), "decode_ids": _token_ids(DECODE_TOKENS, 2, vocab)}
    path = args.out / "comparison.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(threads=args.threads, runs=args.runs, hardware=hardware(args.threads), costs=model_costs(hf))
    parts = args.parts.split(",")

    def save():  # after each side: a later failure keeps what was measured (`--parts` reruns one side)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=1))
        os.replace(partial, path)

    if "llama" in parts:
        missing = llama_python_ok(args.llama_python)
        if missing:
            print(f"llama.cpp is not available ({args.llama_python}: {missing}); measuring hmoe-jax alone", flush=True)
            results["llama_missing"] = missing
            results.pop("llama", None)
        else:
            gguf = convert_to_gguf(args, hf)
            print("running llama.cpp ...", flush=True)
            results["llama"] = run_llama(args, gguf, workload)
            results.pop("llama_missing", None)
        save()
    if "ours" in parts:
        print("running hmoe-jax ...", flush=True)
        results["ours"] = run_ours(args, hf, workload)
        save()
    if "ours" not in results:
        raise SystemExit(f"no hmoe-jax results in {path} yet: run with --parts ours")
    print(report(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
