"""`python -m train probes`: train the paper's probes on a feature store.

    python -m train probes --store STORE --out RUN [--layer 12] [--epochs 300 --folds 5 --seeds 3]

Writes RUN/r2.md (the score table), RUN/results.json, RUN/curves.png and the trained probes
(RUN/probes, an orbax checkpoint read by `hmoe_jax.probe_training.load_probes`). Checkpoints go to
RUN/checkpoints: after an interruption, the same command resumes and ends with the same result.

Multi-host: start the same command on every host with --coordinator-address, --num-processes and
--process-id (or their HMOE_* variables, or --distributed); the ensemble is split over every host's
devices and process 0 writes the reports. See README.md.
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm


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
    parser.add_argument("--expect-model", type=Path, default=None,
                        help="checkpoint the store must come from (refused otherwise)")
    parser.add_argument("--mesh-tensor", type=int, default=1,
                        help="devices splitting each member's minibatch; the rest split the ensemble (default 1)")
    from hmoe_jax import distributed

    distributed.add_arguments(parser)


def store_layer(store, layer):
    from hmoe_jax.precompute import StoreError

    if layer is None:
        if len(store.layers) != 1:
            raise StoreError(f"{store.path} holds layers {store.layers}: choose one with --layer")
        return store.layers[0]
    if layer not in store.layers:
        raise StoreError(f"{store.path} holds layers {store.layers}, not layer {layer}")
    return layer


def check_expected_model(store, checkpoint):
    from hmoe_jax.precompute import StoreError, checkpoint_fingerprint

    if checkpoint is not None and checkpoint_fingerprint(checkpoint) != store.metadata["model_fingerprint"]:
        raise StoreError(f"{store.path} holds features of model {store.metadata['model_path']} "
                         f"({store.metadata['model_fingerprint']}), not of {checkpoint}")


def store_identity(store, layer, pooling):
    return {"store": str(store.path.resolve()), "model_path": store.metadata["model_path"],
            "model_fingerprint": store.metadata["model_fingerprint"], "source_sha256": store.metadata["source_sha256"],
            "layer": layer, "pooling": pooling}


def train_and_report(args, features, scenario_ids, tasks, protocol, identity, table_name):
    """Train (or resume), then write the table and the curves; returns the results dict."""
    from hmoe_jax import distributed, make_mesh, probe_report, probe_training

    mesh = make_mesh(data=-1, tensor=args.mesh_tensor)
    coordinator = distributed.is_coordinator()
    bar = tqdm(total=protocol.epochs, unit="epoch", desc="ensemble", disable=not coordinator)

    calls = []

    def on_epochs(done, total):
        # The first report comes before any training: epochs done then were done by an earlier run.
        if not calls and done > 0 and coordinator:
            bar.write(f"resuming {args.out} from its epoch-{done} checkpoint", file=sys.stderr)
        calls.append(done)
        bar.update(done - bar.n)

    try:
        run = probe_training.train_run(args.out, features, scenario_ids, tasks, protocol, identity, mesh,
                                       checkpoint_every=args.checkpoint_every, on_epochs=on_epochs)
    finally:
        bar.close()
    if coordinator:
        table = probe_report.score_table(run.results)
        (args.out / table_name).write_text(table)
        probe_report.plot_curves(run.results, args.out / "curves.png")
        print(table)
    # Every file is written before any process returns.
    distributed.sync("train.probes.reported")
    return run.results


def _parser():
    parser = argparse.ArgumentParser(prog="python -m train probes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="feature store of a data set (train precompute)")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    add_protocol_options(parser)
    parser.add_argument("--experts", nargs="+", default=None,
                        help="experts to train probes for (default: dscr ltv cap_rate debt_yield)")
    parser.add_argument("--no-direct", action="store_true", help="skip the probes that read results directly")
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax import distributed, probe_training
    from hmoe_jax.precompute import FeatureStore, StoreError

    try:
        distributed.initialize(args)
        store = FeatureStore.open(args.store)
        check_expected_model(store, args.expect_model)
        layer = store_layer(store, args.layer)
        features = store.features(layer, args.pooling)
        experts = tuple(args.experts) if args.experts else probe_training.ACTIVE_EXPERTS
        tasks = probe_training.probe_tasks(store, experts, direct=not args.no_direct)
        protocol = probe_training.Protocol(folds=args.folds, seeds=args.seeds, epochs=args.epochs,
                                           validation_fraction=args.validation_fraction)
        train_and_report(args, features, store.scenario_ids, tasks, protocol,
                         store_identity(store, layer, args.pooling), "r2.md")
    except (StoreError, probe_training.ProbeTrainingError, distributed.DistributedError, FileNotFoundError) as err:
        print(f"train probes: error: {err}", file=sys.stderr)
        return 1
    return 0
