"""`python -m train router`: the reference's router classifier, a domain's prompts against its negatives.

    python -m train precompute --model CKPT --router-negatives --layer 12 --out NEG_STORE
    python -m train router --store STORE --negatives NEG_STORE --out RUN

Positives are the data set's prompts, negatives the domain's unrelated and qualitative (no
computation) questions (CRE's: questions in the same vocabulary that ask for no number); trained
with the probe protocol and the reference's classifier MLP, scored by balanced accuracy. Writes
RUN/accuracy.md, RUN/results.json, RUN/curves.png and RUN/probes.
"""

import argparse

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path
from train.probes_cli import add_protocol_options, protocol_settings, store_choice


def _parser():
    parser = argparse.ArgumentParser(prog="python -m train router", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m train router --store store --negatives neg_store "
                                            "--out router")
    parser.add_argument("--store", type=user_path, required=True, help="feature store of a data set (positives)")
    parser.add_argument("--negatives", type=user_path, required=True, help="feature store of the router negatives")
    parser.add_argument("--out", type=user_path, required=True, help="run directory")
    add_protocol_options(parser)
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax.data.features import StoreError
    from hmoe_jax.domains import DomainError
    from hmoe_jax.runtime import distributed
    from hmoe_jax.training import probes

    try:
        distributed.initialize(args)
        run = probes.train_router_on_stores(args.store, args.negatives, args.out,
                                            probes.router_protocol(**protocol_settings(args)), store_choice(args),
                                            domain=args.domain)
    except (StoreError, probes.ProbeTrainingError, DomainError, distributed.DistributedError,
            FileNotFoundError) as err:
        return arguments.input_error("train router", err)
    if distributed.is_coordinator():
        print((args.out / "accuracy.md").read_text())
    return 0 if run else 1
