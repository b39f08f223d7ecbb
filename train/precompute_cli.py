"""`python -m train precompute`: store the frozen model's pooled hidden states for probe training.

    python -m train precompute --model CKPT --data DIR/train.json --layer 12 --out STORE
    python -m train precompute --model CKPT --router-negatives --layer 12 --out NEG_STORE

Rerunning the same command after an interruption finishes the store; a different job into an
existing store is refused.

Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed on a TPU pod or SLURM); see README.md.
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from hmoe_jax import distributed
from hmoe_jax.loading import add_memory_arguments, memory_options


def _parser():
    parser = argparse.ArgumentParser(prog="python -m train precompute", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory (with tokenizer.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="data set file (train.json or eval.json)")
    source.add_argument("--router-negatives", action="store_true",
                        help="the library's fixed non-computational prompts (router classifier negatives)")
    parser.add_argument("--layer", type=int, nargs="+", required=True,
                        help="hidden_states index (or indices) to store; 12 in the paper")
    parser.add_argument("--out", type=Path, required=True, help="feature store directory")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per forward (default 8 per data device)")
    parser.add_argument("--bucket", type=int, default=32, help="padded lengths are multiples of this (default 32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model compute dtype; features are always stored as float32")
    add_memory_arguments(parser)
    parser.add_argument("--mesh-expert", type=int, default=1, help="devices on the expert axis (default 1)")
    parser.add_argument("--mesh-tensor", type=int, default=1, help="devices on the tensor axis (default 1)")
    distributed.add_arguments(parser)
    return parser


class _Bars:
    """Two tqdm bars, prompts and real tokens, starting from what an earlier run already stored."""

    def start(self, total_prompts, total_tokens, done_prompts, done_tokens):
        self.prompts = tqdm(total=total_prompts, initial=done_prompts, unit="prompt", desc="prompts", position=0)
        self.tokens = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="tokens",
                           position=1)

    def advance(self, prompts, tokens):
        self.prompts.update(prompts)
        self.tokens.update(tokens)

    def close(self):
        for bar in (getattr(self, "prompts", None), getattr(self, "tokens", None)):
            if bar is not None:
                bar.close()


def main(argv):
    args = _parser().parse_args(argv)
    # The model modules load only now, after argument errors had their chance to stop the run cheaply;
    # the multi-host runtime starts before anything touches a device.
    from hmoe_jax import make_mesh, precompute
    from hmoe_jax.checkpoint import CheckpointError
    from hmoe_jax.config import ConfigError

    bars = _Bars()
    try:
        info = distributed.initialize(args)
        prompt_set = (precompute.router_negative_prompts() if args.router_negatives
                      else precompute.scenario_prompts(args.data))
        mesh = make_mesh(data=-1, expert=args.mesh_expert, tensor=args.mesh_tensor)
        batch_size = args.batch_size or 8 * mesh.shape["data"]
        store = precompute.precompute_features(
            args.model, prompt_set, args.layer, args.out, mesh=mesh, batch_size=batch_size, bucket=args.bucket,
            dtype=args.dtype, progress=bars if info.is_coordinator else None,
            layerwise=args.layerwise, **memory_options(args),
        )
        distributed.sync("train.precompute.done")
    except (precompute.StoreError, ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        bars.close()
        print(f"train precompute: error: {err}", file=sys.stderr)
        return 1
    bars.close()
    if not info.is_coordinator:
        return 0
    n = len(store.scenario_ids)
    print(f"{args.out}: features of {n} prompts at layers {store.layers} (model {store.metadata['model_fingerprint']})")
    return 0
