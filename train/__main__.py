"""`python -m train STAGE [options]`: the stages of the training pipeline, run in this order.

    data        write the synthetic CRE data sets (train.json, eval.json)
    lm          train a small gpt-oss language model from scratch on a domain's corpus (an HF checkpoint)
    precompute  store hidden-state features of the frozen model for a data set (or router negatives)
    probes      train the argument and direct-output probes on a feature store
    router      train the router classifier on CRE features against negative features
    hybrid      train the hybrid layer's router rows and projections end to end (frozen model and probes)

Each stage's module is imported only when asked for.
"""

import importlib
import sys

STAGES = {
    "data": "train.data_cli",
    "lm": "train.lm_cli",
    "precompute": "train.precompute_cli",
    "probes": "train.probes_cli",
    "router": "train.router_cli",
    "hybrid": "train.hybrid_cli",
}


def main(argv):
    if not argv or argv[0] not in STAGES:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] != "data":
        from hmoe_jax.runtime.host import configure_host_memory

        configure_host_memory()  # before JAX starts its backend
    return importlib.import_module(STAGES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
