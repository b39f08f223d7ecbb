"""Where a gpt-oss-20b forward spends its time on this CPU: one decode step and one prefill
(128 tokens unless told).

    python bench/profile_20b_cpu.py WORK_DIR [--kernels auto] [--runs 3] [--prompt-tokens 128]

Loads WORK_DIR/hf (the synthetic full-size 20b of `bench/bench_20b.py`) with the defaults (layerwise on a
CPU: the embedding, each block and the head are programs of their own), then times, blocking after each
program:
- per part of the step: the embedding, the 24 blocks, the head (final norm and lm_head on the last
  position); what remains of the step's wall time is Python and dispatch;
- inside a block, at the same shapes: the MoE half (router, the routed experts' MXFP4 products, combine)
  and the attention half (projections, rotary, attention over the cache), each jitted alone on layer 0;
  "other" is the block's time not in either (norms, residual adds, program boundaries).

Writes WORK_DIR/profile_cpu_<kernels>_<prompt tokens>.json and .md (medians of --runs after a warm-up).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_cpu_kernel import median_s  # this folder is on sys.path when a script here runs
from flax import nnx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work_dir", type=Path)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128, help="the prefill's prompt length")
    args = p.parse_args(argv)

    from hmoe_jax.checkpoint.loading import from_pretrained
    gen = importlib.import_module("hmoe_jax.model.generate")  # the module (the package exports the function)
    from hmoe_jax.model import transformer
    from hmoe_jax.runtime.host import configure_host_memory
    from hmoe_jax.runtime.options import RunOptions

    configure_host_memory()
    work = args.work_dir.expanduser().resolve()
    model = from_pretrained(work / "hf", RunOptions(kernels=args.kernels))
    assert model.options.execution == "layerwise", "the profile times the layerwise parts"

    spent = defaultdict(float)
    original = transformer._jitted

    def timed(fn, static, graphdef, state, *a):  # every part, blocking, by the function it runs
        t = time.perf_counter()
        out = jax.block_until_ready(original(fn, static, graphdef, state, *a))
        spent[getattr(fn, "__qualname__", str(fn))] += time.perf_counter() - t
        return out

    transformer._jitted = timed
    rng = np.random.default_rng(0)
    length = args.prompt_tokens
    prompt = jnp.asarray(rng.integers(100, 20000, (1, length)), jnp.int32)
    mask = jnp.ones_like(prompt)
    total = length + 2

    def prefill():
        return gen._prefill(model, prompt, mask, total)

    logits, caches, position = prefill()
    token = jnp.argmax(logits, -1).astype(jnp.int32)

    def decode():
        return gen._decode_step(model, token, position, jnp.asarray(length, jnp.int32), caches)

    results = {"options": model.options.to_dict()}
    prefill_name = f"prefill_{length}"
    for name, step in ((prefill_name, prefill), ("decode_step", decode)):
        step()  # warm
        walls, parts = [], []
        for _ in range(args.runs):
            spent.clear()
            t = time.perf_counter()
            jax.block_until_ready(step())
            walls.append(time.perf_counter() - t)
            parts.append(dict(spent))
        i = int(np.argsort(walls)[len(walls) // 2])
        results[name] = {"wall_s": walls[i], "parts_s": parts[i]}
    transformer._jitted = original

    # Inside a block, layer 0 at the same shapes: the MoE half and the attention half, each alone.
    layer = model.layers[0]
    graphdef, state = nnx.split(layer)
    hidden = model.config.hidden_size
    for name, tokens in ((prefill_name, length), ("decode_step", 1)):
        x = jnp.asarray(rng.standard_normal((1, tokens, hidden)), jnp.float32)
        moe = jax.jit(lambda s, x: nnx.merge(graphdef, s).mlp(x)[0])
        results[name]["moe_per_block_s"] = median_s(lambda: moe(state, x), args.runs)
    n = model.config.num_hidden_layers
    lines = ["| step | wall | embedding | 24 blocks | of which MoE (24 x layer 0's) | of which the rest of the blocks"
             " (attention, norms) | head | Python and dispatch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("decode_step", prefill_name):
        r = results[name]
        parts = r["parts_s"]
        embed = sum(v for k, v in parts.items() if "embed" in k)
        blocks = sum(v for k, v in parts.items() if "DecoderLayer" in k)
        head = sum(v for k, v in parts.items() if "logits" in k or "final_norm" in k)
        moe = n * r["moe_per_block_s"]
        r.update(embedding_s=embed, blocks_s=blocks, head_s=head, moe_s=moe,
                 dispatch_s=r["wall_s"] - sum(parts.values()))
        lines.append(f"| {name} | {r['wall_s']:.3f} s | {embed:.3f} | {blocks:.3f} | {moe:.3f} | {blocks - moe:.3f} | "
                     f"{head:.3f} | {r['dispatch_s']:.3f} |")
    kernels = results["options"]["kernels"]
    text = (f"# Where the time goes: gpt-oss-20b (synthetic), kernels={kernels}\n\nOptions: "
            + ", ".join(f"{k}={v}" for k, v in results["options"].items()) + "\n\n" + "\n".join(lines) + "\n")
    (work / f"profile_cpu_{kernels}_{length}.json").write_text(json.dumps(results, indent=1))
    (work / f"profile_cpu_{kernels}_{length}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
