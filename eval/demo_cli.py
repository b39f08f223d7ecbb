"""`python -m eval demo`: the whole Hybrid MoE pipeline in one command.

Without --model it builds a small random gpt-oss checkpoint in the real HF format (MXFP4 experts,
a BPE tokenizer trained on the data set's prompts), so everything runs offline in minutes on a CPU;
with --model PATH it runs on that checkpoint (e.g. the real gpt-oss-20b, layer 12). Stages, each the
same code a user runs on its own:

    checkpoint -> convert (--keep-mxfp4) -> train data -> precompute (train, eval) -> train probes
    -> hybrid model -> eval hybrid -> report [-> train hybrid: end-to-end training, with --hybrid-training]

Every stage writes under --out and is skipped when its output is already complete, so an interrupted
demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hmoe_jax import data, synthetic

# Small enough to run the full protocol (5 folds x 3 seeds) in minutes on 2 cores, real enough to use
# every code path: GQA, sliding and full layers, YaRN, MXFP4 experts (widths divisible by 32).
DEMO_MODEL = synthetic.tiny_config(
    vocab_size=384, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
)
DEMO_LAYER = 2  # of 4: the scaled-down analogue of the paper's layer 12 of 24


def _stage(name: str, done: bool, fn, log):
    if done:
        log(f"[skip] {name}: already complete")
        return
    log(f"[run ] {name}")
    start = time.perf_counter()
    fn()
    log(f"[done] {name} in {time.perf_counter() - start:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a gpt-oss checkpoint directory (HF, original/ or converted); "
                                              "default: build a small random one")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--layer", type=int, help=f"hidden-state layer (default {DEMO_LAYER} for the demo model, 12 otherwise)")
    p.add_argument("--epochs", type=int, help="probe epochs (default 20 for the demo model, the paper's 300 otherwise)")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the demo model's random weights")
    p.add_argument("--hybrid-training", action="store_true",
                   help="also train the hybrid layer's router rows and projections end to end on 240 training "
                        "scenarios (one epoch) and report before vs after on 64 held-out ones (about a minute more "
                        "on the demo model)")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    demo = args.model is None
    layer = args.layer if args.layer is not None else (DEMO_LAYER if demo else 12)
    epochs = args.epochs if args.epochs is not None else (20 if demo else 300)

    data_dir = out / "data"
    train_json, eval_json = data_dir / data.TRAIN_FILE, data_dir / data.EVAL_FILE
    _stage("data: python -m train data", train_json.is_file() and eval_json.is_file(),
           lambda: data.write_dataset(data_dir, n_train=args.n_train, n_eval=args.n_eval), log)

    source = args.model
    if demo:
        source = out / "checkpoint_hf"

        def build():
            prompts = [s["input_prompt"] for s in json.loads(train_json.read_text())]
            synthetic.write_hf_checkpoint(source, DEMO_MODEL, seed=args.seed, experts="mxfp4")
            synthetic.write_tokenizer(source, prompts, DEMO_MODEL)

        _stage("checkpoint: random gpt-oss in HF format (MXFP4 experts, BPE tokenizer)",
               (source / "tokenizer.json").is_file(), build, log)

    from hmoe_jax.checkpoint import locate_checkpoint

    model = out / "checkpoint"
    if locate_checkpoint(source).layout == "flax":
        model = source
    else:
        from hmoe_jax.convert import convert_checkpoint

        _stage("convert: python -m convert SRC DST --keep-mxfp4", (model / "config.json").is_file(),
               lambda: convert_checkpoint(source, model, keep_mxfp4=True, progress=True), log)

    from train import precompute_cli, probes_cli

    stores = {}
    for split, path in (("train", train_json), ("eval", eval_json)):
        stores[split] = out / f"features_{split}"
        done = (stores[split] / "metadata.json").is_file() and json.loads(
            (stores[split] / "metadata.json").read_text()).get("complete", False)
        _stage(f"precompute {split}: python -m train precompute --layer {layer}", done,
               lambda s=split, pth=path: _check(precompute_cli.main(
                   ["--model", str(model), "--data", str(pth), "--layer", str(layer), "--out", str(stores[s])])), log)

    run = out / "probes"
    _stage(f"probes: python -m train probes (5 folds x 3 seeds, {epochs} epochs)", (run / "probes.json").is_file(),
           lambda: _check(probes_cli.main(["--store", str(stores["train"]), "--out", str(run), "--layer", str(layer),
                                           "--epochs", str(epochs)])), log)

    from eval import hybrid_cli

    results = out / "results"
    _stage("evaluate: python -m eval hybrid", (results / "summary.json").is_file(),
           lambda: hybrid_cli.run(model, run, eval_json, results, train=train_json, overwrite=True), log)

    trained = out / "hybrid_training"
    if args.hybrid_training:
        from train import hybrid_cli as train_hybrid_cli

        _stage("hybrid training: python -m train hybrid (router rows + projections, end to end)",
               (trained / "report.md").is_file(),
               lambda: _check(train_hybrid_cli.main(
                   ["--model", str(model), "--probes", str(run), "--data", str(train_json), "--eval", str(eval_json),
                    "--out", str(trained), "--n-train", "240", "--n-eval", "64", "--n-generate", "0",
                    "--bucket", "64"])), log)

    if (run / "r2.md").is_file():
        print((run / "r2.md").read_text())
    print((results / "report.md").read_text())
    if args.hybrid_training:
        print((trained / "report.md").read_text())
    if demo:
        print(f"The demo model is random: these numbers exercise the pipeline, they are not gpt-oss's. "
              f"Probes trained {epochs} epochs (the paper: 300). Outputs under {out}/.")
    return 0


def _check(code):
    if code:
        raise SystemExit(code)
