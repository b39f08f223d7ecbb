"""`python -m train data`: write a domain's data sets (train.json and eval.json).

The train split is the domain's generator at `--seed`, the eval split at `--seed + 1`. For the default
domain (CRE) the defaults reproduce the reference files byte for byte: train from seed 42, eval from 43.
Another domain's files record it, so later stages find it without --domain (a built-in or installed
one; a domain loaded from a .py file is named again with --domain).
"""

import argparse

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.arguments import add_domain_argument
from hmoe_jax.runtime.files import user_path

TRAIN_SEED = 42


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m train data",
        description="Generate a domain's synthetic data sets (default: CRE underwriting, the reference's).",
        epilog="example: python -m train data --out data  |  python -m train data --domain circuits --out data",
    )
    parser.add_argument(
        "--out", type=user_path, required=True, help="directory for train.json and eval.json"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=TRAIN_SEED,
        help="train seed; eval uses seed + 1 (default %(default)s, the reference)",
    )
    parser.add_argument(
        "--n-train", type=int, default=3000, help="train records (default %(default)s)"
    )
    parser.add_argument(
        "--n-eval", type=int, default=500, help="eval records (default %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing data set files")
    add_domain_argument(parser)
    return parser


def main(argv):
    """Write both data sets and return 0.

    Returns 2 (an input error) when a data set file already exists in --out and --overwrite is not
    given (`write_dataset` refuses), when the domain cannot be loaded, or when its generator writes
    records that do not fit; nothing is written then.
    """
    from hmoe_jax.domains import DomainError, load_domain, write_dataset

    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("n_train", "n_eval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    try:
        domain = load_domain(args.domain)
        train_path, eval_path = write_dataset(domain, args.out, args.seed, args.n_train, args.n_eval,
                                              overwrite=args.overwrite)
    except (DomainError, ValueError, FileExistsError) as err:
        return arguments.input_error("train data", err)
    print(f"wrote {args.n_train} {domain.name} train records (seed {args.seed}) to {train_path}")
    print(f"wrote {args.n_eval} {domain.name} eval records (seed {args.seed + 1}) to {eval_path}")
    return 0
