"""`python -m eval baselines`: the same frozen model answering by greedy generation, regex-parsed.

For each prompt style (zero-shot, chain of thought, structured) every eval prompt is wrapped,
generated from with the KV-cache generator, decoded, parsed with the reference's sanity ranges and
scored under both protocols. Writes OUT/baselines.json, OUT/baselines.md and the raw generations.

The model is sharded over every device (--mesh-expert, --mesh-tensor; the rest split the batch).
Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); process 0 writes OUT. See README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hmoe_jax.evaluation.baselines import PROMPT_STYLES
from hmoe_jax.runtime import arguments, distributed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval baselines --model ckpt --data data/eval.json "
                                       "--out baselines --n 20")
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json, or hub id")
    p.add_argument("--data", required=True, help="eval.json")
    p.add_argument("--out", required=True)
    p.add_argument("--styles", nargs="+", default=list(PROMPT_STYLES), choices=list(PROMPT_STYLES))
    p.add_argument("--n", type=int, default=200, help="first N scenarios (the reference used 200)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward, a multiple of the data devices (default: 8, rounded up to one)")
    p.add_argument("--overwrite", action="store_true")
    arguments.add_model_options(p)
    arguments.add_mesh_arguments(p)
    arguments.add_distributed_arguments(p)
    args = p.parse_args(argv)
    out = Path(args.out).expanduser()
    from tqdm import tqdm

    from hmoe_jax.checkpoint.loading import from_pretrained
    from hmoe_jax.checkpoint.location import CheckpointError, resolve_checkpoint
    from hmoe_jax.checkpoint.tokenizer import load_tokenizer
    from hmoe_jax.data.scenarios import load_scenarios
    from hmoe_jax.evaluation.baselines import run_baselines, write_results
    from hmoe_jax.model.config import ConfigError
    from hmoe_jax.runtime.sharding import make_mesh

    try:
        info = distributed.initialize(args)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        checkpoint = resolve_checkpoint(args.model, args.revision)
        scenarios = load_scenarios(args.data)[: args.n]
        mesh = make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        model = from_pretrained(checkpoint, arguments.options_from_args(args), mesh=mesh)
        bars = []

        def progress(style):
            bars.append(tqdm(total=len(scenarios), unit="prompt", desc=style, disable=not info.is_coordinator))
            return bars[-1].update

        try:
            results, generations = run_baselines(model, load_tokenizer(checkpoint), scenarios, args.styles,
                                                 new_tokens=args.new_tokens, mesh=mesh, progress=progress,
                                                 batch_size=arguments.batch_size_for(args.batch_size, mesh))
        finally:
            for bar in bars:
                bar.close()
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info.is_coordinator:
        print(write_results(out, results, generations, args.styles, len(scenarios), args.new_tokens))
    distributed.sync("eval.baselines.written")
    return 0
