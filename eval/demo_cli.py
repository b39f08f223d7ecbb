"""`python -m eval demo`: the whole Hybrid MoE pipeline in one command.

Without --model it builds a small random gpt-oss checkpoint in the real HF format (MXFP4 experts,
a byte-level BPE tokenizer trained on the domain's prompts), so everything runs offline in minutes on a CPU;
with --model PATH it runs on that checkpoint (e.g. the real gpt-oss-20b, layer 12). Stages, each the
same library call its own command makes:

    train data -> checkpoint -> convert (--keep-mxfp4) -> precompute (train, eval) -> train probes
    -> hybrid model -> eval hybrid -> train hybrid (end to end: by default on the demo model only;
    --hybrid-training / --no-hybrid-training choose) -> report

--domain picks the domain (default: CRE, the reference's): a built-in name (cre, circuits), an installed
entry point, a module or a .py file.

Every stage writes under --out and is skipped when its output is already complete, so an interrupted
demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def main(argv=None) -> int:
    from hmoe_jax.evaluation.demo import DEMO_EPOCHS, DEMO_LAYER

    p = argparse.ArgumentParser(prog="python -m eval demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval demo --out demo_out --n-train 600 --n-eval 100")
    p.add_argument("--model", help="a gpt-oss checkpoint directory (HF, original/ or converted) or hub id; "
                                              "default: build a small random one")
    p.add_argument("--out", type=user_path, default=Path("demo_out"))
    p.add_argument("--layer", type=int,
                   help=f"hidden-state layer (default {DEMO_LAYER} for the demo model, 12 otherwise)")
    p.add_argument("--epochs", type=int,
                   help=f"probe epochs (default {DEMO_EPOCHS} for the demo model, the paper's 300 otherwise)")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the demo model's random weights")
    training = p.add_mutually_exclusive_group()
    training.add_argument("--hybrid-training", dest="hybrid_training", action="store_true", default=None,
                          help="train the hybrid layer's router rows and projections end to end on a quarter of the "
                               "training records (at most 240, one epoch), reported before vs after on at most 64 "
                               "held-out ones (default: on for the demo model, off with --model)")
    training.add_argument("--no-hybrid-training", dest="hybrid_training", action="store_false",
                          help="skip that, also on the demo model")
    arguments.add_domain_argument(p)
    arguments.add_model_options(p)
    args = p.parse_args(argv)
    from hmoe_jax.checkpoint.location import resolve_checkpoint
    from hmoe_jax.evaluation.demo import DemoSettings, run_demo

    try:
        model = None if args.model is None else resolve_checkpoint(args.model, args.revision)
    except (OSError, ValueError) as e:
        print(f"eval demo: error: {e}", file=sys.stderr)
        return 1
    settings = DemoSettings(model=model, layer=args.layer, epochs=args.epochs, n_train=args.n_train,
                            n_eval=args.n_eval, seed=args.seed, hybrid_training=args.hybrid_training,
                            options=arguments.options_from_args(args), domain=args.domain)
    try:
        report = run_demo(args.out, settings, log=lambda msg: print(msg, flush=True))
    except (OSError, ValueError) as e:  # every stage's errors name the file and what is wrong with it
        print(f"eval demo: error: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0
