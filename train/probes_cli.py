"""`python -m train probes`: train the paper's probes on a feature store.

    python -m train probes --store STORE --out RUN [--layer 12] [--epochs 300 --folds 5 --seeds 3]
    python -m train probes --store STORE --out RUN --extractor both   # a store with --token-states

Writes RUN/r2.md (the score table), RUN/results.json, RUN/curves.png and the trained probes
(RUN/probes, an orbax checkpoint read by `hmoe_jax.hybrid.artifacts.load_probes`). Checkpoints go to
RUN/checkpoints: after an interruption, the same command resumes and ends with the same result.
--extractor attention trains the attention-pooled extractor (`hmoe_jax.hybrid.attention`) on the store's
token states instead; --extractor both trains the two into RUN/mean and RUN/attention on the same folds
and seeds and writes RUN/extractors.md comparing them.

Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); the ensemble is split over every host's
devices and process 0 writes the reports. See README.md.
"""

import argparse

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def add_protocol_options(parser):
    """Options shared with `train router`: which features, the protocol's size, the mesh."""
    parser.add_argument("--layer", type=int, default=None,
                        help="layer of the store to train on (default: the store's only layer)")
    parser.add_argument("--pooling", choices=("mean", "last"), default="mean",
                        help="mean over the prompt's tokens (the paper) or its last token")
    parser.add_argument("--epochs", type=int, default=300, help="default %(default)s (the paper)")
    parser.add_argument("--folds", type=int, default=5, help="default %(default)s (the paper)")
    parser.add_argument("--seeds", type=int, default=3, help="default %(default)s (the paper)")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="share of each fold's training scenarios held out to choose the seed (default 0.1)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints (default 10)")
    parser.add_argument("--expect-model", type=user_path, default=None,
                        help="checkpoint the store must come from (refused otherwise)")
    parser.add_argument("--mesh-tensor", type=int, default=1,
                        help="devices splitting each member's minibatch; the rest split the ensemble (default 1)")
    arguments.add_domain_argument(parser)
    arguments.add_distributed_arguments(parser)


def store_choice(args):
    from hmoe_jax.training.probes import StoreChoice

    return StoreChoice(layer=args.layer, pooling=args.pooling, expect_model=args.expect_model,
                       mesh_tensor=args.mesh_tensor, checkpoint_every=args.checkpoint_every,
                       extractor=getattr(args, "extractor", "mean"))


def protocol_settings(args) -> dict:
    return {"folds": args.folds, "seeds": args.seeds, "epochs": args.epochs,
            "validation_fraction": args.validation_fraction}


def _parser():
    parser = argparse.ArgumentParser(prog="python -m train probes", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m train probes --store store --out probes --epochs 20")
    parser.add_argument("--store", type=user_path, required=True, help="feature store of a data set (train precompute)")
    parser.add_argument("--out", type=user_path, required=True, help="run directory")
    add_protocol_options(parser)
    parser.add_argument("--experts", nargs="+", default=None,
                        help="experts to train probes for (default: the domain's; CRE: dscr ltv cap_rate debt_yield)")
    parser.add_argument("--no-direct", action="store_true", help="skip the probes that read results directly")
    parser.add_argument("--extractor", choices=("mean", "attention", "both"), default="mean",
                        help="mean: the probe MLP on the --pooling vector (the paper); attention: on each argument's "
                             "learned-query attention pooling of the store's token states (precompute "
                             "--token-states); both: the two into RUN/mean and RUN/attention and RUN/extractors.md "
                             "(default %(default)s)")
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax.data.features import StoreError
    from hmoe_jax.domains import DomainError
    from hmoe_jax.runtime import distributed
    from hmoe_jax.training import probes

    try:
        distributed.initialize(args)
        run, table = probes.train_probes(args.store, args.out, probes.Protocol(**protocol_settings(args)),
                                         store_choice(args), experts=args.experts, direct=not args.no_direct,
                                         domain=args.domain)
    except (StoreError, probes.ProbeTrainingError, DomainError, distributed.DistributedError,
            FileNotFoundError) as err:
        return arguments.input_error("train probes", err)
    if distributed.is_coordinator():
        print(table.read_text())
    return 0 if run else 1
