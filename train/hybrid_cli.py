"""`python -m train hybrid`: train the hybrid layer's router rows and projections end to end.

    python -m train hybrid --model CKPT --probes RUN --data DIR/train.json --out OUT
                           [--eval DIR/eval.json] [--epochs 1] [--lr 1e-2] [--batch-size 8] [--router-weight 1]

The model's probe layer is made hybrid with the run's probes (as `python -m eval hybrid` does); the
gpt-oss weights and the probes stay frozen; the new router rows, the projection MLPs and their output
scales learn the teacher-forced cross-entropy of each scenario's answer text (plus a router term on
CRE prompts against the library's negatives). Writes OUT/hybrid_params (read by `python -m eval
hybrid --hybrid-params OUT`), OUT/report.md (before vs after), OUT/summary.json, OUT/loss_curve.json
and .png; checkpoints go to OUT/checkpoints, so an interrupted run resumes where it stopped.
"""

import argparse

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path


def _parser():
    p = argparse.ArgumentParser(prog="python -m train hybrid", description=__doc__.split("\n\n")[0],
                                epilog="example: python -m train hybrid --model ckpt --probes probes "
                                       "--data data/train.json --out hybrid")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (HF or converted), with tokenizer.json, or hub id (openai/gpt-oss-20b)")
    p.add_argument("--probes", type=user_path, required=True, help="a run directory of `python -m train probes`")
    p.add_argument("--data", type=user_path, required=True, help="training scenarios (train.json)")
    p.add_argument("--eval", type=user_path, default=None,
                   help="held-out scenarios (default: eval.json beside --data)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out scenarios used (the first N; default 200)")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training scenarios")
    p.add_argument("--n-generate", type=int, default=32,
                   help="held-out scenarios answered by greedy generation before and after (default 32; 0: none)")
    p.add_argument("--out", type=user_path, required=True, help="run directory")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2,
                   help="AdamW peak learning rate, cosine-decayed to a tenth (default 1e-2: at 1e-3 the demo model's "
                        "router rows need > 25 steps before any deterministic expert is routed)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--router-weight", type=float, default=1.0,
                   help="weight of the router BCE term (0: answer loss only; default 1)")
    p.add_argument("--bucket", type=int, default=32, help="sequence lengths are padded to a multiple of this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    arguments.add_domain_argument(p)
    arguments.add_model_options(p)
    return p


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax.checkpoint.location import CheckpointError, resolve_checkpoint
    from hmoe_jax.data.features import StoreError
    from hmoe_jax.hybrid.artifacts import ArtifactError
    from hmoe_jax.model.config import ConfigError
    from hmoe_jax.training import hybrid

    try:
        settings = hybrid.Settings(
            epochs=args.epochs, learning_rate=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
            router_weight=args.router_weight, bucket=args.bucket, seed=args.seed,
            checkpoint_every=args.checkpoint_every)
        checkpoint = resolve_checkpoint(args.model, args.revision)
        inputs = hybrid.Inputs(checkpoint, args.probes, args.data, args.eval, n_train=args.n_train, n_eval=args.n_eval,
                               n_generate=args.n_generate, domain=args.domain)
        result = hybrid.run_from_files(inputs, args.out, settings, options=arguments.options_from_args(args))
    except (ArtifactError, StoreError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        return arguments.input_error("train hybrid", err)
    print((args.out / hybrid.REPORT_FILE).read_text())
    return 0 if result else 1
