"""`python -m eval hybrid`: score the integrated hybrid forward on an eval set.

Writes RESULTS/summary.json, RESULTS/report.md and PNG plots; refuses an existing RESULTS directory
unless --overwrite. Only blocks 0..L of the model are loaded (L the hybrid layer).

The model is sharded over every device (--mesh-expert, --mesh-tensor; the rest split the batch).
Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); process 0 writes RESULTS. See README.md.
"""

from __future__ import annotations

import argparse

from hmoe_jax.runtime import arguments, distributed
from hmoe_jax.runtime.files import user_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval hybrid --model ckpt --probes probes "
                                       "--data data/eval.json --out results")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (HF or converted), with tokenizer.json, or hub id (openai/gpt-oss-20b)")
    p.add_argument("--probes", type=user_path, required=True, help="a run directory of `python -m train probes`")
    p.add_argument("--data", type=user_path, required=True, help="eval.json")
    p.add_argument("--train", type=user_path,
                   help="train.json for the constant-predictor baseline (default: the domain's generator, seed 42, "
                        "3000 records: for CRE the reference's train set)")
    p.add_argument("--out", type=user_path, required=True)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward, a multiple of the data devices (default: 8, rounded up to one)")
    p.add_argument("--hybrid-params", type=user_path,
                   help="a run directory of `python -m train hybrid`: its trained router rows and projections "
                        "replace the initial ones")
    p.add_argument("--overwrite", action="store_true")
    arguments.add_domain_argument(p)
    arguments.add_model_options(p)
    arguments.add_mesh_arguments(p)
    arguments.add_distributed_arguments(p)
    args = p.parse_args(argv)
    from hmoe_jax.checkpoint.location import CheckpointError, resolve_checkpoint
    from hmoe_jax.evaluation.hybrid import evaluate_and_write
    from hmoe_jax.hybrid.artifacts import ArtifactError
    from hmoe_jax.model.config import ConfigError
    from hmoe_jax.runtime.sharding import make_mesh

    try:
        info = distributed.initialize(args)
        mesh = make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        checkpoint = resolve_checkpoint(args.model, args.revision)
        evaluate_and_write(checkpoint, args.probes, args.data, args.out, train_path=args.train, domain=args.domain,
                           batch_size=arguments.batch_size_for(args.batch_size, mesh),
                           hybrid_params=args.hybrid_params, mesh=mesh, options=arguments.options_from_args(args),
                           overwrite=args.overwrite)
        distributed.sync("eval.hybrid.written")
    except (FileNotFoundError, FileExistsError, ArtifactError, CheckpointError, ConfigError, ValueError) as e:
        return arguments.input_error("eval hybrid", e)
    if info.is_coordinator:
        print((args.out / "report.md").read_text())
    return 0
