"""`python -m eval baselines`: the same frozen model answering by greedy generation, regex-parsed.

For each prompt style (zero-shot, chain of thought, structured) every eval prompt is wrapped,
generated from with the jitted KV-cache generator, decoded, parsed with the reference's sanity ranges
and scored under both protocols. Writes OUT/baselines.json, OUT/baselines.md and the raw generations.

The model is sharded over every device (--mesh-expert, --mesh-tensor; the rest split the batch).
Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); process 0 writes OUT. See README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hmoe_jax import baselines, data, distributed, metrics
from hmoe_jax.checkpoint import CheckpointError
from hmoe_jax.config import ConfigError
from hmoe_jax.loading import add_memory_arguments, memory_options


def generate_answers(model, tokenizer, prompts, new_tokens: int, batch_size: int, bar=None, mesh=None,
                     layerwise: bool = False) -> list[str]:
    """Greedy answers; with `mesh` (the model's), each batch is split over its data axis. `layerwise`:
    `generate(..., layerwise=True)`."""
    from hmoe_jax.generate import generate
    from hmoe_jax.precompute import bucket_length, left_padded_batch, tokenize
    from hmoe_jax.sharding import batch_sharding

    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {batch_size} is not a multiple of the mesh's {mesh.shape['data']} data devices")
    put = (lambda x: x) if mesh is None else (lambda x: distributed.global_array(x, batch_sharding(mesh)))  # noqa: E731

    c = model.config
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    tokens = tokenize(tokenizer, prompts, c.vocab_size)
    texts = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        ids, mask = left_padded_batch(batch, bucket_length(max(t.size for t in batch), 32), batch_size, pad)
        out = distributed.to_host(generate(model, put(ids), put(mask), max_new_tokens=new_tokens,
                                           eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) else None,
                                           pad_token_id=pad, layerwise=layerwise))
        texts += [tokenizer.decode(row.tolist()) for row in out[: len(batch)]]
        if bar is not None:
            bar.update(len(batch))
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval baselines", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="eval.json")
    p.add_argument("--out", required=True)
    p.add_argument("--styles", nargs="+", default=list(baselines.PROMPT_STYLES), choices=list(baselines.PROMPT_STYLES))
    p.add_argument("--n", type=int, default=200, help="first N scenarios (the reference used 200)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward, a multiple of the data devices (default: 8, rounded up to one)")
    p.add_argument("--mesh-expert", type=int, default=1, help="devices on the expert axis (default 1)")
    p.add_argument("--mesh-tensor", type=int, default=1, help="devices on the tensor axis (default 1)")
    add_memory_arguments(p)
    p.add_argument("--overwrite", action="store_true")
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        info = distributed.initialize(args)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        import hmoe_jax
        from hmoe_jax.precompute import load_tokenizer

        scenarios = data.load_scenarios(args.data)[: args.n]
        mesh = hmoe_jax.make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        batch_size = args.batch_size or mesh.shape["data"] * -(-8 // mesh.shape["data"])
        model = hmoe_jax.from_pretrained(args.model, mesh=mesh, **memory_options(args))
        tokenizer = load_tokenizer(args.model)
        results, generations = {}, {}
        for style in args.styles:
            prompts = [baselines.format_prompt(s["input_prompt"], style) for s in scenarios]
            start = time.perf_counter()
            with tqdm(total=len(prompts), unit="prompt", desc=style, disable=not info.is_coordinator) as bar:
                texts = generate_answers(model, tokenizer, prompts, args.new_tokens, batch_size, bar, mesh=mesh,
                                         layerwise=args.layerwise)
            parsed = [baselines.parse_metrics(t) for t in texts]
            preds = {m: np.array([x[m] for x in parsed]) for m in metrics.METRICS}
            results[style] = {protocol: metrics.score(scenarios, preds, protocol) for protocol in metrics.PROTOCOLS}
            results[style]["seconds"] = time.perf_counter() - start
            generations[style] = [{"id": s["id"], "text": t} for s, t in zip(scenarios, texts)]
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not info.is_coordinator:
        distributed.sync("eval.baselines.written")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    data.write_json_atomically(out / "baselines.json", results)
    data.write_json_atomically(out / "generations.json", generations)
    lines = [f"# Generation baselines ({len(scenarios)} scenarios, {args.new_tokens} greedy tokens)", ""]
    for protocol in metrics.PROTOCOLS:
        lines += [f"## {protocol} protocol", "", "| style | metric | N | within 10% | within 20% | median % error |",
                  "|---|---|---:|---:|---:|---:|"]
        for style in args.styles:
            for m, s in results[style][protocol].items():
                lines.append(f"| {style} | {m} | {s['n']} | {s['within_10']:.1f} | {s['within_20']:.1f} | "
                             f"{s['median_pct_error']:.1f} |")
        lines.append("")
    (out / "baselines.md").write_text("\n".join(lines))
    print("\n".join(lines))
    distributed.sync("eval.baselines.written")
    return 0
