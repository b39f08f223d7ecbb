"""`python -m eval parity`: layer-by-layer parity against transformers, exit 1 when a bound is exceeded."""

from __future__ import annotations

import argparse
import sys

from hmoe_jax.checkpoint.location import CheckpointError, resolve_checkpoint
from hmoe_jax.evaluation import parity
from hmoe_jax.evaluation.parity_prompts import parity_prompts
from hmoe_jax.model.config import ConfigError
from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path
from hmoe_jax.runtime.options import KERNEL_PATHS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval parity", description=__doc__,
                                epilog="example: python -m eval parity --model hf_ckpt --layers 0:2 --out parity_out")
    p.add_argument("--model", required=True,
                   help="HF checkpoint dir or hub id, or a converted checkpoint (then give --source)")
    p.add_argument("--revision", help="with a hub id as --model: the branch, tag or commit (default main)")
    p.add_argument("--source", help="the HF checkpoint a converted --model was made from (the reference runs on it)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="JSON list of strings, or a text file with one prompt per line")
    src.add_argument("--n-prompts", type=int, default=4, help="take the first N prompts of the eval data set")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--kernels", choices=("auto", *KERNEL_PATHS), default="auto",
                   help="our layers' kernel path (auto: the Pallas kernels where they compile on a GPU, else XLA)")
    p.add_argument("--layers", help="A:B, layers A..B-1 (default all; logits only when B is the last)")
    p.add_argument("--out", type=user_path, default="parity_out",
                   help="directory for parity.md, parity.json, parity.png")
    p.add_argument("--seed", type=int, default=0)
    defaults = parity.DEFAULT_BOUNDS
    fp32, bf16 = defaults["float32"].residual_rel, defaults["bfloat16"].residual_rel
    p.add_argument("--max-residual-rel", type=float, help=f"default fp32 {fp32:g}, bf16 {bf16:g}")
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
        model = resolve_checkpoint(args.model, args.revision)
        config = parity.config_of(model)
        prompts = parity_prompts(args.prompts or None, args.n_prompts)
        ids, mask = parity.prompt_inputs(prompts, [model] + ([args.source] if args.source else []),
                                         config.vocab_size, args.seed,
                                         warn=lambda msg: print(msg, file=sys.stderr))
        from tqdm import tqdm

        bar = tqdm(total=(layers[1] - layers[0]) if layers else config.num_hidden_layers, unit="layer")
        report = parity.check_parity(model, ids, mask, source=args.source, dtype=args.dtype, layers=layers,
                                     bounds=bounds, progress=lambda msg: bar.update(1) if msg else None,
                                     kernels=args.kernels)
        bar.close()
    except (FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
        return arguments.input_error("eval parity", e)
    out = user_path(args.out)
    parity.write_report(report, out)
    print((out / "parity.md").read_text())
    return 0 if report.passed else 1
