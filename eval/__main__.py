"""`python -m eval STAGE ...`; run a stage with --help for its options."""

import sys

STAGES = {
    "parity": "eval.parity_cli",
    "hybrid": "eval.hybrid_cli",
    "baselines": "eval.baselines_cli",
    "latency": "eval.latency_cli",
    "demo": "eval.demo_cli",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m eval {{{','.join(STAGES)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(STAGES[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
