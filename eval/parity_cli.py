"""`python -m eval parity`: layer-by-layer parity against transformers, exit 1 when a bound is exceeded."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hmoe_jax import parity
from hmoe_jax.checkpoint import CheckpointError, locate_checkpoint
from hmoe_jax.config import ConfigError


def _prompts(args) -> list[str]:
    if args.prompts:
        text = Path(args.prompts).read_text()
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError:
            prompts = [line for line in text.splitlines() if line.strip()]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise ValueError(f"{args.prompts}: expected a JSON list of strings or one prompt per line")
        return prompts
    from hmoe_jax.data import EVAL_ID_OFFSET, eval_seed, generate_scenarios

    return [s["input_prompt"] for s in generate_scenarios(args.n_prompts, eval_seed(42), EVAL_ID_OFFSET)]


def _tokenize(prompts: list[str], dirs: list[Path], vocab_size: int, seed: int):
    """Right-padded ids and mask from the first tokenizer.json found; without one, random ids of the
    prompts' character lengths (the weights are checked either way)."""
    for d in dirs:
        f = d / "tokenizer.json"
        if f.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(f))
            seqs = [tok.encode(p).ids for p in prompts]
            break
    else:
        rng = np.random.default_rng(seed)
        seqs = [list(rng.integers(0, vocab_size, max(1, min(len(p), 64)))) for p in prompts]
        print("no tokenizer.json beside the checkpoint: using random token ids", file=sys.stderr)
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int64)
    mask = np.zeros((len(seqs), t), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval parity", description=__doc__)
    p.add_argument("--model", required=True, help="HF checkpoint dir, or a converted checkpoint (then give --source)")
    p.add_argument("--source", help="the HF checkpoint a converted --model was made from (the reference runs on it)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="JSON list of strings, or a text file with one prompt per line")
    src.add_argument("--n-prompts", type=int, default=4, help="take the first N prompts of the eval data set")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--layers", help="A:B, layers A..B-1 (default all; logits only when B is the last)")
    p.add_argument("--out", default="parity_out", help="directory for parity.md, parity.json, parity.png")
    p.add_argument("--seed", type=int, default=0)
    defaults = parity.DEFAULT_BOUNDS
    p.add_argument("--max-residual-rel", type=float, help=f"default fp32 {defaults['float32'].residual_rel:g}, bf16 {defaults['bfloat16'].residual_rel:g}")
    p.add_argument("--min-router-agreement", type=float)
    p.add_argument("--max-logits-rel", type=float)
    p.add_argument("--min-top1", type=float)
    p.add_argument("--max-kl", type=float)
    args = p.parse_args(argv)

    bounds = defaults[args.dtype]
    overrides = {"residual_rel": args.max_residual_rel, "router_agreement": args.min_router_agreement,
                 "logits_rel": args.max_logits_rel, "top1": args.min_top1, "kl": args.max_kl}
    bounds = parity.Bounds(**{**bounds.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    layers = None
    if args.layers:
        try:
            a, b = (int(x) for x in args.layers.split(":"))
        except ValueError:
            p.error(f"--layers must look like A:B, got {args.layers!r}")
        layers = (a, b)
    try:
        model_dir = locate_checkpoint(args.model).path
        dirs = [model_dir] + ([locate_checkpoint(args.source).path] if args.source else [])
        config = parity._config_for(Path(args.model))
        ids, mask = _tokenize(_prompts(args), dirs, config.vocab_size, args.seed)
        from tqdm import tqdm

        bar = tqdm(total=(layers[1] - layers[0]) if layers else config.num_hidden_layers, unit="layer")
        report = parity.check_parity(args.model, ids, mask, source=args.source, dtype=args.dtype, layers=layers,
                                     bounds=bounds, progress=lambda msg: bar.update(1) if msg else None)
        bar.close()
    except (FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    parity.write_report(report, out)
    print((out / "parity.md").read_text())
    return 0 if report.passed else 1
