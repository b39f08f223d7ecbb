"""`python -m train lm`: train a small gpt-oss language model from scratch on a domain's corpus.

    python -m train lm --data DIR/train.json --out LM [--steps 1500] [--batch-size 32] [--lr 2e-3]
                       [--hidden-size 128 --layers 4 --num-experts 8 ...]
    python -m train lm --domain circuits --n-train 3000 --out LM     (records from the domain's generator)

Each record is one sequence, tokens(prompt) + tokens("\\n" + answer text) + eos, as end-to-end hybrid
training reads it; the loss is next-token cross-entropy over every real token. A byte-level BPE
tokenizer is trained on the corpus first. Writes LM/hf (an HF checkpoint transformers loads, with the
tokenizer and chat template: the --model of the other stages), LM/flax (the same, converted), LM/report.md,
LM/loss_curve.json and .png; checkpoints go to LM/checkpoints, so an interrupted run resumes where it
stopped, and a finished one is reused.
"""

import argparse
import sys

from hmoe_jax.runtime import arguments
from hmoe_jax.runtime.files import user_path

# Model-shape flags: (flag, config key, help). Defaults: the demo model's (`training.lm.DEFAULT_CONFIG`).
SHAPE = (
    ("--vocab-size", "vocab_size", "token ids (the byte-level BPE's 256 bytes, specials and merges)"),
    ("--hidden-size", "hidden_size", "residual width"),
    ("--intermediate-size", "intermediate_size", "each expert's hidden width"),
    ("--layers", "num_hidden_layers", "decoder layers (sliding and full attention alternate)"),
    ("--heads", "num_attention_heads", "query heads"),
    ("--kv-heads", "num_key_value_heads", "key/value heads (grouped-query attention)"),
    ("--head-dim", "head_dim", "width of each head"),
    ("--num-experts", "num_local_experts", "neural experts per layer"),
    ("--experts-per-token", "num_experts_per_tok", "experts each token is routed to (top-k)"),
    ("--sliding-window", "sliding_window", "window of the sliding-attention layers"),
)


def _parser():
    from hmoe_jax.training.lm import DEFAULT_CONFIG, LMSettings

    defaults = LMSettings()
    p = argparse.ArgumentParser(prog="python -m train lm", description=__doc__.split("\n\n")[0],
                                epilog="example: python -m train lm --data data/train.json --out lm --steps 1500")
    p.add_argument("--data", type=user_path, default=None,
                   help="training records (train.json); default: --n-train records from the domain's generator")
    p.add_argument("--n-train", type=int, default=3000,
                   help="without --data: records generated at --seed (default %(default)s)")
    p.add_argument("--out", type=user_path, required=True, help="run directory")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    p.add_argument("--lr", type=float, default=defaults.learning_rate,
                   help="AdamW peak learning rate, after a linear warmup, cosine-decayed to a tenth (default "
                        "%(default)s)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default %(default)s")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warmup (default {defaults.warmup_steps}, at most a fifth of --steps)")
    p.add_argument("--clip-norm", type=float, default=defaults.clip_norm,
                   help="global gradient-norm clip (default %(default)s)")
    p.add_argument("--bucket", type=int, default=defaults.bucket,
                   help="sequence lengths are padded to a multiple of this (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="initialisation, data order and generated records (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints and held-out evaluations (default %(default)s)")
    p.add_argument("--n-held-out", type=int, default=defaults.n_held_out,
                   help="the last N records are held out for the held-out loss (default %(default)s)")
    shape = p.add_argument_group("model shape", "the gpt-oss to train (defaults: the demo model's)")
    for flag, key, text in SHAPE:
        shape.add_argument(flag, dest=key, type=int, metavar="N", default=DEFAULT_CONFIG[key],
                           help=f"{text} (default %(default)s)")
    arguments.add_domain_argument(p)
    return p


def main(argv):
    args = _parser().parse_args(argv)
    from hmoe_jax.domains import DomainError
    from hmoe_jax.training import lm

    try:
        settings = lm.LMSettings(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps if args.warmup_steps is not None else lm.default_warmup(args.steps),
            clip_norm=args.clip_norm, bucket=args.bucket, seed=args.seed, checkpoint_every=args.checkpoint_every,
            n_held_out=args.n_held_out)
        config = lm.config_from({key: getattr(args, key) for _, key, _ in SHAPE})
        records, domain = lm.training_records(args.data, args.domain, args.n_train, args.seed)
        lm.train_lm(args.out, config, records, domain, settings,
                    log=lambda msg: print(msg, file=sys.stderr))
    except (lm.LMTrainingError, DomainError, FileNotFoundError, ValueError) as err:
        return arguments.input_error("train lm", err)
    print((args.out / lm.REPORT_FILE).read_text())
    print(f"trained checkpoint: {args.out / lm.HF_DIR}")
    return 0
