"""`python -m train precompute`: store the frozen model's pooled hidden states for probe training.

    python -m train precompute --model CKPT --data DIR/train.json --layer 12 --out STORE
    python -m train precompute --model CKPT --router-negatives --layer 12 --out NEG_STORE
    python -m train precompute --model CKPT --data DIR/train.json --layer 12 --out STORE --token-states

Rerunning the same command after an interruption finishes the store; a different job into an
existing store is refused.

Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed on a TPU pod or SLURM); see README.md.
"""

import argparse

from hmoe_jax.runtime import arguments, distributed
from hmoe_jax.runtime.files import user_path


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m train precompute", description=__doc__.split("\n\n")[0],
        epilog="example: python -m train precompute --model ckpt --data data/train.json --layer 12 --out store")
    parser.add_argument("--model", required=True,
                        help="checkpoint directory (with tokenizer.json) or hub id (openai/gpt-oss-20b)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=user_path, help="data set file (train.json or eval.json)")
    source.add_argument("--router-negatives", action="store_true",
                        help="the domain's non-computational prompts (router classifier negatives)")
    parser.add_argument("--layer", type=int, nargs="+", required=True,
                        help="hidden_states index (or indices) to store; 12 in the paper")
    parser.add_argument("--out", type=user_path, required=True, help="feature store directory")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per forward (default 8 per data device)")
    parser.add_argument("--bucket", type=int, default=32, help="padded lengths are multiples of this (default 32)")
    parser.add_argument("--token-states", action="store_true",
                        help="also store every token's hidden state at the layers (tokens.zarr), which the "
                             "attention extractor (train probes --extractor attention) reads; "
                             "about max_tokens times the pooled features' size")
    arguments.add_domain_argument(parser)
    arguments.add_model_options(parser)
    arguments.add_mesh_arguments(parser)
    arguments.add_distributed_arguments(parser)
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    # The model modules load only now, after argument errors had their chance to stop the run cheaply;
    # the multi-host runtime starts before anything touches a device.
    from hmoe_jax.checkpoint.location import CheckpointError, resolve_checkpoint
    from hmoe_jax.data.features import StoreError, router_negative_prompts, scenario_prompts
    from hmoe_jax.model.config import ConfigError
    from hmoe_jax.runtime.sharding import make_mesh
    from hmoe_jax.training.precompute import ProgressBars, precompute_features

    bars = ProgressBars()
    try:
        info = distributed.initialize(args)
        model = resolve_checkpoint(args.model, args.revision)
        prompt_set = (router_negative_prompts(args.domain) if args.router_negatives
                      else scenario_prompts(args.data, args.domain))
        mesh = make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        store = precompute_features(
            model, prompt_set, args.layer, args.out, mesh=mesh,
            batch_size=args.batch_size or 8 * mesh.shape["data"], bucket=args.bucket,
            options=arguments.options_from_args(args), progress=bars if info.is_coordinator else None,
            token_states=args.token_states)
        distributed.sync("train.precompute.done")
    except (StoreError, ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        return arguments.input_error("train precompute", err)
    finally:
        bars.close()
    if info.is_coordinator:
        print(f"{args.out}: features of {len(store.scenario_ids)} prompts at layers {store.layers} "
              f"(model {store.metadata['model_fingerprint']})")
    return 0
