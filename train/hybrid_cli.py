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
import sys
from pathlib import Path

from tqdm import tqdm


def _parser():
    p = argparse.ArgumentParser(prog="python -m train hybrid", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True,
                   help="checkpoint directory (HF or converted), with tokenizer.json")
    p.add_argument("--probes", type=Path, required=True, help="a run directory of `python -m train probes`")
    p.add_argument("--data", type=Path, required=True, help="training scenarios (train.json)")
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out scenarios (default: eval.json beside --data)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out scenarios used (the first N; default 200)")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training scenarios")
    p.add_argument("--n-generate", type=int, default=32,
                   help="held-out scenarios answered by greedy generation before and after (default 32; 0: none)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
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
    return p


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax import data, hybrid_training
    from hmoe_jax.checkpoint import CheckpointError
    from hmoe_jax.config import ConfigError
    from hmoe_jax.precompute import StoreError, checkpoint_fingerprint, load_tokenizer
    from hmoe_jax.probe_training import ProbeTrainingError

    try:
        settings = hybrid_training.Settings(
            epochs=args.epochs, learning_rate=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
            router_weight=args.router_weight, bucket=args.bucket, seed=args.seed,
            checkpoint_every=args.checkpoint_every)
        for name in ("n_eval", "n_generate", "n_train"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "n_generate" else 1):
                raise hybrid_training.HybridTrainingError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not args.data.is_file():
            raise FileNotFoundError(f"{args.data}: no such data file")
        eval_path = args.eval if args.eval is not None else args.data.parent / data.EVAL_FILE
        if not eval_path.is_file():
            raise FileNotFoundError(f"{eval_path}: no held-out data file (pass --eval)")
        if not (args.probes / "probes.json").is_file():
            raise FileNotFoundError(
                f"{args.probes}: no trained probes (probes.json missing; run `python -m train probes`)")
        train = data.load_scenarios(args.data)[:args.n_train]
        held_out = data.load_scenarios(eval_path)[:args.n_eval]
        if not train:
            raise hybrid_training.HybridTrainingError(f"{args.data}: no scenarios")
        if not held_out:
            raise hybrid_training.HybridTrainingError(f"{eval_path}: no scenarios")
        tokenizer = load_tokenizer(args.model)

        from hmoe_jax import evaluation
        from hmoe_jax.router_negatives import NEGATIVE_PROMPTS

        model, layer = evaluation.build_hybrid_model(args.model, args.probes)
        identity = {"model": str(args.model.resolve()), "model_fingerprint": checkpoint_fingerprint(args.model),
                    "probes": str(args.probes.resolve()), "data": str(args.data.resolve()),
                    "data_sha256": hybrid_training.file_sha256(args.data), "n_train_limit": args.n_train,
                    "eval": str(eval_path.resolve()), "eval_sha256": hybrid_training.file_sha256(eval_path),
                    "n_eval": args.n_eval}
        bar = tqdm(unit="step", desc="hybrid training")

        def on_step(done, total, aux):
            bar.total = total
            if "loss" in aux:
                bar.set_postfix(loss=f"{float(aux['loss']):.4f}", answer=f"{float(aux['answer_loss']):.4f}")
            bar.update(done - bar.n)

        try:
            result = hybrid_training.train_run(args.out, model, tokenizer, train, held_out, NEGATIVE_PROMPTS, settings,
                                               identity, n_generate=args.n_generate, on_step=on_step,
                                               log=lambda msg: bar.write(msg, file=sys.stderr))
        finally:
            bar.close()
    except (hybrid_training.HybridTrainingError, ProbeTrainingError, StoreError, CheckpointError, ConfigError,
            FileNotFoundError, ValueError) as err:
        print(f"train hybrid: error: {err}", file=sys.stderr)
        return 1
    print((args.out / hybrid_training.REPORT_FILE).read_text())
    return 0 if result else 1
