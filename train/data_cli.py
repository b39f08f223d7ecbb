"""`python -m train data`: write the synthetic CRE data sets (train.json and eval.json).

The defaults reproduce the reference files: `--seed` is the train seed and eval uses `--seed + 1`,
so `--seed 42` writes train from seed 42 and eval from seed 43.
"""

import argparse

from hmoe_jax.data import scenarios as data
from hmoe_jax.runtime.files import user_path


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m train data",
        description="Generate the synthetic CRE underwriting data sets.",
        epilog="example: python -m train data --out data",
    )
    parser.add_argument(
        "--out", type=user_path, required=True, help="directory for train.json and eval.json"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=data.TRAIN_SEED,
        help="train seed; eval uses seed + 1 (default %(default)s, the reference)",
    )
    parser.add_argument(
        "--n-train", type=int, default=3000, help="train scenarios (default %(default)s)"
    )
    parser.add_argument(
        "--n-eval", type=int, default=500, help="eval scenarios (default %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing data set files")
    return parser


def main(argv):
    """Write both data sets and return 0.

    Exits with status 2 (argparse's usage error) when a data set file already exists in --out and
    --overwrite is not given: a regenerated file with other settings would silently replace the one
    a trained probe was fitted on.
    """
    parser = _parser()
    args = parser.parse_args(argv)

    targets = [args.out / data.TRAIN_FILE, args.out / data.EVAL_FILE]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not args.overwrite:
        parser.error(f"refusing to overwrite {', '.join(existing)}; pass --overwrite to replace")

    train_path, eval_path = data.write_dataset(args.out, args.seed, args.n_train, args.n_eval)
    print(f"wrote {args.n_train} train scenarios (seed {args.seed}) to {train_path}")
    print(f"wrote {args.n_eval} eval scenarios (seed {data.eval_seed(args.seed)}) to {eval_path}")
    return 0
