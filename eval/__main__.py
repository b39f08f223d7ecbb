"""`python -m eval STAGE ...`: the evaluation stages; run a stage with --help for its options.

    hybrid      score the integrated hybrid forward on an eval set
    baselines   the frozen model answering by greedy generation, parsed and scored
    latency     one hybrid forward versus N-token generation, JAX and transformers
    parity      layer-by-layer parity against transformers
    demo        the whole pipeline on an embedded random model (or on --model)
    doctor      this machine's devices, and whether the GPU kernels compile and agree with XLA here
"""

import importlib
import sys

STAGES = {
    "parity": "eval.parity_cli",
    "hybrid": "eval.hybrid_cli",
    "baselines": "eval.baselines_cli",
    "latency": "eval.latency_cli",
    "demo": "eval.demo_cli",
    "doctor": "eval.doctor_cli",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from hmoe_jax.runtime.host import configure_host_memory

    configure_host_memory()  # before JAX starts its backend
    return importlib.import_module(STAGES[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
