"""`python -m eval demo`: the whole Hybrid MoE pipeline in one command.

Without --model it first trains its own model: a small gpt-oss (4 layers, 8 experts, 0.53M parameters)
learns the domain's language from scratch on the training records' prompts and answers, in HF format
that transformers loads. With --model PATH it runs on that checkpoint (e.g. the real gpt-oss-20b,
layer 12). Stages, each the same library call its own command makes:

    train data -> train lm -> convert -> precompute (train, eval) -> train probes (--extractor; both,
    compared, with --compare-extractors) -> eval hybrid -> the LM's own answers -> train hybrid (end to
    end: by default on the demo model only; --hybrid-training / --no-hybrid-training choose) -> report.md

--quick runs every stage smaller (about 3 minutes on 2 cores; the default, about 15). --random-model
uses a random model instead of training one (its hidden states carry almost nothing: the hybrid is then
no better than a constant). --domain picks the domain (default: CRE, the reference's): a built-in name
(cre, circuits), an installed entry point, a module or a .py file.

Every stage writes under --out and is skipped when its output is already complete, so an interrupted
demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def main(argv=None) -> int:
    from hmoe_jax.evaluation.demo import DEFAULT_EXTRACTOR, DEMO_LAYER, EXTRACTORS, FULL, QUICK

    p = argparse.ArgumentParser(prog="python -m eval demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m eval demo --out demo_out --quick --domain circuits")
    p.add_argument("--model", help="a gpt-oss checkpoint directory (HF, original/ or converted) or hub id; "
                                   "default: train a small one on the domain")
    p.add_argument("--random-model", action="store_true",
                   help="the demo model with random weights instead of trained ones")
    p.add_argument("--quick", action="store_true",
                   help=f"every stage smaller: {QUICK.n_train} training and {QUICK.n_eval} held-out records, "
                        f"{QUICK.lm_steps} LM steps, {QUICK.epochs} probe epochs (default: {FULL.n_train}, "
                        f"{FULL.n_eval}, {FULL.lm_steps}, {FULL.epochs})")
    p.add_argument("--out", type=user_path, default=Path("demo_out"))
    p.add_argument("--layer", type=int,
                   help=f"hidden-state layer (default {DEMO_LAYER} for the demo model, 12 otherwise)")
    p.add_argument("--epochs", type=int, help="probe epochs (default: as above for the demo model, the paper's "
                                               "300 otherwise)")
    p.add_argument("--lm-steps", type=int, help="optimizer steps of the demo's language model (batch 32)")
    p.add_argument("--lm-hidden", type=int,
                   help="width of the demo's language model (default 64; a multiple of 64: heads of 32, two per "
                        "KV head; bench/extraction_frontier.py measures what another width buys)")
    p.add_argument("--n-train", type=int, help="training records")
    p.add_argument("--n-eval", type=int, help="held-out records")
    p.add_argument("--extractor", choices=EXTRACTORS,
                   help=f"the extraction probes the hybrid uses (default {DEFAULT_EXTRACTOR}; attention keeps each "
                        "prompt's token states in the feature stores)")
    p.add_argument("--compare-extractors", action="store_true",
                   help="train both extractors on the same store, folds and seeds and report them side by side "
                        "(about 3x the probe time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo model's weights")
    training = p.add_mutually_exclusive_group()
    training.add_argument("--hybrid-training", dest="hybrid_training", action="store_true", default=None,
                          help="train the hybrid layer's router rows and projections end to end (one epoch), "
                               "reported before vs after on held-out records (default: on for the demo model, "
                               "off with --model)")
    training.add_argument("--no-hybrid-training", dest="hybrid_training", action="store_false",
                          help="skip that, also on the demo model")
    arguments.add_domain_argument(p)
    arguments.add_model_options(p)
    args = p.parse_args(argv)
    from hmoe_jax.checkpoint.location import resolve_checkpoint
    from hmoe_jax.evaluation.demo import DemoSettings, run_demo
    from hmoe_jax.training.lm import widened

    try:
        model = None if args.model is None else resolve_checkpoint(args.model, args.revision)
    except (OSError, ValueError) as e:
        return arguments.input_error("eval demo", e)
    if args.model is not None and args.lm_hidden is not None:
        return arguments.input_error("eval demo", "--lm-hidden shapes the demo's own model; it cannot go with --model")
    try:
        lm_config = None if args.lm_hidden is None else widened(args.lm_hidden)
    except ValueError as e:
        return arguments.input_error("eval demo", f"--lm-hidden: {e}")
    if args.model is not None and args.random_model:
        return arguments.input_error("eval demo", "--random-model is the demo's own model; it cannot go with --model")
    settings = DemoSettings(model=model, random_model=args.random_model, quick=args.quick, layer=args.layer,
                            epochs=args.epochs, n_train=args.n_train, n_eval=args.n_eval, lm_steps=args.lm_steps,
                            seed=args.seed, hybrid_training=args.hybrid_training, extractor=args.extractor,
                            compare_extractors=args.compare_extractors, lm_config=lm_config,
                            options=arguments.options_from_args(args), domain=args.domain)
    try:
        report = run_demo(args.out, settings, log=lambda msg: print(msg, flush=True))
    except (OSError, ValueError) as e:  # every stage's errors name the file and what is wrong with it
        return arguments.input_error("eval demo", e)
    print(report)
    return 0
