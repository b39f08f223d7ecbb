"""`python -m eval latency`: one hybrid forward versus N-token greedy generation, JAX and transformers.

Same model, same backend, one prompt at a time (batch 1, as the reference timed), one warm-up run
excluded, medians over prompts:
- hybrid forward: the jitted forward up to and including the hybrid layer (extraction, exact formulas,
  projection) — the whole cost of a Hybrid MoE answer;
- JAX generation: `hmoe_jax.generate`, N greedy tokens with the sliding-window KV cache;
- transformers: a full forward and `generate(max_new_tokens=N, do_sample=False)` on the same HF
  checkpoint (skipped with --no-torch).
Writes OUT/latency.json, OUT/latency.md and OUT/latency.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hmoe_jax import data
from hmoe_jax.checkpoint import CheckpointError, locate_checkpoint
from hmoe_jax.config import ConfigError

PAPER_SPEEDUP_256 = 173.2857041583295  # shared/reference/single_latency.json, one B200


def _timed(fn, runs):
    fn()  # warm-up: compilation, caches
    times = []
    for args in runs:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json (HF for the torch side)")
    p.add_argument("--probes", help="probe run for the hybrid layer (default: untrained extraction, same cost)")
    p.add_argument("--layer", type=int, help="hybrid layer when no --probes (default: middle layer)")
    p.add_argument("--n-prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default="latency_out")
    args = p.parse_args(argv)
    try:
        import hmoe_jax
        from hmoe_jax import evaluation
        from hmoe_jax.generate import generate
        from hmoe_jax.hybrid import HybridConfig, make_hybrid
        from hmoe_jax.model import default_position_ids
        from hmoe_jax.precompute import bucket_length, left_padded_batch, load_tokenizer, tokenize

        prompts = [s["input_prompt"] for s in data.generate_scenarios(args.n_prompts, data.eval_seed(42), data.EVAL_ID_OFFSET)]
        tokenizer = load_tokenizer(args.model)
        if args.probes:
            hybrid, layer = evaluation.build_hybrid_model(args.model, args.probes)
        else:
            hybrid = hmoe_jax.from_pretrained(args.model)
            layer = args.layer if args.layer is not None else hybrid.config.num_hidden_layers // 2
            make_hybrid(hybrid, HybridConfig(layers=(layer,)))
        base = hmoe_jax.from_pretrained(args.model)
        # Every prompt left-padded to one bucketed length: one compiled program for all of them.
        raw = tokenize(tokenizer, prompts, base.config.vocab_size)
        length = bucket_length(max(t.size for t in raw), 32)
        pad = base.config.pad_token_id or 0
        tokens = [tuple(a.astype(np.int64) for a in left_padded_batch([t], length, 1, pad)) for t in raw]
        n = args.new_tokens
        res = {"n_prompts": len(tokens), "new_tokens": n, "layer": layer, "device": str(jax.devices()[0].platform)}
        first = tokens[0]

        def hybrid_forward(ids=first[0], mask=first[1]):
            out = hybrid(ids, attention_mask=mask, position_ids=default_position_ids(mask), output_layer_info=True,
                         stop_after_layer=layer + 1)
            jax.block_until_ready(out.hidden_states[-1])

        res["jax_hybrid_forward_s"] = _timed(hybrid_forward, tokens)
        res["jax_generate_s"] = _timed(
            lambda ids=first[0], mask=first[1]: jax.block_until_ready(generate(base, ids, mask, max_new_tokens=n)), tokens)
        if not args.no_torch:
            import torch

            from hmoe_jax.synthetic import load_torch_reference

            if locate_checkpoint(args.model).layout != "hf":
                raise CheckpointError(f"{args.model}: the transformers side needs an HF checkpoint (or pass --no-torch)")
            ref = load_torch_reference(args.model)

            def torch_forward(ids=first[0], mask=first[1]):
                with torch.no_grad():
                    ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

            def torch_generate(ids=first[0], mask=first[1]):
                with torch.no_grad():
                    ref.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad)

            res["torch_forward_s"] = _timed(torch_forward, tokens)
            res["torch_generate_s"] = _timed(torch_generate, tokens)
    except (FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    med = {k[:-2]: statistics.median(v) * 1000 for k, v in res.items() if k.endswith("_s")}
    res["median_ms"] = med
    res["jax_generate_tokens_per_s"] = n / (med["jax_generate"] / 1000)
    lines = [f"# Latency ({res['n_prompts']} prompts, batch 1, {n} new tokens, {res['device']}; medians after one warm-up)", "",
             "| what | median ms |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in med.items()]
    speedup = med["jax_generate"] / med["jax_hybrid_forward"]
    res["hybrid_vs_generation_speedup"] = speedup
    lines += ["", f"Hybrid forward vs {n}-token generation (JAX): **{speedup:.0f}x** faster "
                  f"(the paper: {PAPER_SPEEDUP_256:.0f}x for 256 tokens on a B200, full forward vs generate).",
              f"JAX generation: {res['jax_generate_tokens_per_s']:.1f} tokens/s."]
    if "torch_generate" in med:
        res["torch_generate_tokens_per_s"] = n / (med["torch_generate"] / 1000)
        res["jax_vs_torch_generation"] = med["torch_generate"] / med["jax_generate"]
        lines.append(f"transformers generate: {res['torch_generate_tokens_per_s']:.1f} tokens/s; JAX is "
                     f"**{res['jax_vs_torch_generation']:.2f}x** its throughput (target >= 2x).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data.write_json_atomically(out / "latency.json", res)
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    _plot(med, out / "latency.png")
    print("\n".join(lines))
    return 0


def _plot(med, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(med)
    ax.barh(names, [med[k] for k in names], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
