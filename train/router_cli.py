"""`python -m train router`: the reference's router classifier, CRE prompts against negatives.

    python -m train precompute --model CKPT --router-negatives --layer 12 --out NEG_STORE
    python -m train router --store STORE --negatives NEG_STORE --out RUN

Positives are the data set's prompts, negatives the library's unrelated and qualitative (no
computation) questions; trained with the probe protocol and the reference's classifier MLP, scored by
balanced accuracy. Writes RUN/accuracy.md, RUN/results.json, RUN/curves.png and RUN/probes.
"""

import argparse
import sys
from pathlib import Path

from train.probes_cli import add_protocol_options, check_expected_model, store_identity, store_layer, train_and_report


def _parser():
    parser = argparse.ArgumentParser(prog="python -m train router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="feature store of a data set (positives)")
    parser.add_argument("--negatives", type=Path, required=True, help="feature store of the router negatives")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    add_protocol_options(parser)
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax import distributed, probe_training
    from hmoe_jax.precompute import FeatureStore, StoreError

    try:
        distributed.initialize(args)
        positives, negatives = FeatureStore.open(args.store), FeatureStore.open(args.negatives)
        check_expected_model(positives, args.expect_model)
        layer = store_layer(positives, args.layer)
        features, ids, task = probe_training.router_task(positives, negatives, layer, args.pooling)
        protocol = probe_training.router_protocol(folds=args.folds, seeds=args.seeds, epochs=args.epochs,
                                                  validation_fraction=args.validation_fraction)
        identity = store_identity(positives, layer, args.pooling)
        identity["negatives"] = str(negatives.path.resolve())
        train_and_report(args, features, ids, [task], protocol, identity, "accuracy.md")
    except (StoreError, probe_training.ProbeTrainingError, distributed.DistributedError, FileNotFoundError) as err:
        print(f"train router: error: {err}", file=sys.stderr)
        return 1
    return 0
