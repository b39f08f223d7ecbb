"""The whole Hybrid MoE pipeline in one call (`python -m eval demo`).

Without a model it builds a small random gpt-oss checkpoint in the real HF format (MXFP4 experts, a
byte-level BPE tokenizer trained on the domain's prompts and answers), so everything runs offline in
minutes on a CPU; with a model it runs on that checkpoint (e.g. the real gpt-oss-20b, layer 12). Each
stage is the library call its own command makes:

    data -> checkpoint -> convert (MXFP4 kept packed) -> precompute (train, eval) -> probes
    -> hybrid model -> eval hybrid -> end-to-end hybrid training -> report

for any domain (`DemoSettings.domain`, default CRE).

Every stage writes under `out` and is skipped when its output is already complete, so an interrupted
demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from ..checkpoint import synthetic
from ..checkpoint.convert import convert_checkpoint
from ..checkpoint.location import locate_checkpoint, resolve_checkpoint
from ..data.features import scenario_prompts
from ..domains import EVAL_FILE, TRAIN_FILE, Domain, load_domain, load_records, write_dataset
from ..runtime.files import user_path
from ..runtime.options import RunOptions
from ..runtime.sharding import make_mesh
from ..training import hybrid as hybrid_training
from ..training.precompute import ProgressBars, precompute_features
from ..training.probes import Protocol, StoreChoice, train_probes_on_store
from .hybrid import evaluate_and_write

# Small enough to run the full protocol (5 folds x 3 seeds) in minutes on 2 cores, real enough to use
# every code path: GQA, sliding and full layers, YaRN, MXFP4 experts (widths divisible by 32). 640 ids: the
# byte-level tokenizer's 256 bytes and specials leave ~370 merges, so a CRE prompt is ~89 tokens (384: ~117).
DEMO_MODEL = synthetic.tiny_config(
    vocab_size=640, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
)
DEMO_LAYER = 2  # of 4: the scaled-down analogue of the paper's layer 12 of 24
DEMO_EPOCHS = 20


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """`model` None: the embedded random demo model. `layer` and `epochs` None: the demo model's
    (DEMO_LAYER, DEMO_EPOCHS) or, for a given model, the paper's (12, 300)."""

    model: str | Path | None = None
    layer: int | None = None
    epochs: int | None = None
    n_train: int = 3000
    n_eval: int = 500
    seed: int = 0
    # None: on for the embedded demo model; off for a given model (end-to-end training of the 20b takes
    # hours and ~18.5 GiB on a CPU host: ask for it).
    hybrid_training: bool | None = None
    options: RunOptions | None = None
    domain: str | Domain | None = None


class _Stages:
    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def __call__(self, name: str, done: bool, fn: Callable[[], object]) -> None:
        if done:
            self.log(f"[skip] {name}: already complete")
            return
        self.log(f"[run ] {name}")
        start = time.perf_counter()
        fn()
        self.log(f"[done] {name} in {time.perf_counter() - start:.0f} s")


def _store_complete(store: Path) -> bool:
    meta = store / "metadata.json"
    return meta.is_file() and json.loads(meta.read_text()).get("complete", False)


def run_demo(out: str | Path, settings: DemoSettings, log: Callable[[str], None] = print) -> str:
    """Run (or finish) every stage under `out`; returns the reports, as markdown."""
    out = user_path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(log)
    demo = settings.model is None
    layer = settings.layer if settings.layer is not None else (DEMO_LAYER if demo else 12)
    epochs = settings.epochs if settings.epochs is not None else (DEMO_EPOCHS if demo else 300)

    domain = load_domain(settings.domain)
    data_dir = out / "data"
    train_json, eval_json = data_dir / TRAIN_FILE, data_dir / EVAL_FILE
    stage(f"data: python -m train data --domain {domain.name}", train_json.is_file() and eval_json.is_file(),
          lambda: write_dataset(domain, data_dir, 42, settings.n_train, settings.n_eval))
    load_records(train_json, domain)  # a resumed demo of another domain stops here
    model = _checkpoint(out, settings, domain, train_json, stage)

    stores = {split: out / f"features_{split}" for split in ("train", "eval")}
    mesh = make_mesh()
    for split, path in (("train", train_json), ("eval", eval_json)):
        stage(f"precompute {split}: python -m train precompute --layer {layer}", _store_complete(stores[split]),
              lambda s=split, p=path: _precompute(model, p, domain, layer, stores[s], mesh, settings.options))

    run = out / "probes"
    stage(f"probes: python -m train probes (5 folds x 3 seeds, {epochs} epochs)", (run / "probes.json").is_file(),
          lambda: train_probes_on_store(stores["train"], run, Protocol(epochs=epochs), StoreChoice(layer=layer),
                                        domain=domain))

    results = out / "results"
    stage("evaluate: python -m eval hybrid", (results / "summary.json").is_file(),
          lambda: evaluate_and_write(model, run, eval_json, results, train_path=train_json, domain=domain,
                                     overwrite=True, options=settings.options))

    trained = out / "hybrid_training"
    train_hybrid = settings.hybrid_training if settings.hybrid_training is not None else demo
    if train_hybrid:
        # A short run: a quarter of the training records (at most 240), one epoch, at most 64 held out.
        n_train = min(240, max(8, settings.n_train // 4))
        inputs = hybrid_training.Inputs(model, run, train_json, eval_json, n_train=n_train,
                                        n_eval=min(64, settings.n_eval), n_generate=0, domain=domain)
        stage("hybrid training: python -m train hybrid (router rows + projections, end to end)",
              (trained / "report.md").is_file(),
              # One length bucket of 256 tokens: a demo prompt and its answer fit, so the step compiles once.
              lambda: hybrid_training.run_from_files(inputs, trained, hybrid_training.Settings(bucket=256),
                                                     options=settings.options))
    return _reports(out, run, results, trained if train_hybrid else None, demo, epochs)


def _checkpoint(out: Path, settings: DemoSettings, domain: Domain, train_json: Path, stage: _Stages) -> Path:
    """The converted checkpoint the stages read (the demo model's built first); a converted `model` is
    used as it is."""
    source = resolve_checkpoint(settings.model) if settings.model is not None else out / "checkpoint_hf"
    if settings.model is None:
        def build():
            records, _ = load_records(train_json, domain)
            texts = [r["input_prompt"] for r in records] + [domain.answer_text(r) for r in records]
            synthetic.write_hf_checkpoint(source, DEMO_MODEL, seed=settings.seed, experts="mxfp4")
            synthetic.write_tokenizer(source, texts, DEMO_MODEL)

        stage(f"checkpoint: random gpt-oss in HF format (MXFP4 experts, byte-level BPE tokenizer of the "
              f"{domain.name} prompts)",
              (source / "tokenizer.json").is_file(), build)
    if locate_checkpoint(source).layout == "flax":
        return source
    model = out / "checkpoint"
    stage("convert: python -m convert SRC DST --keep-mxfp4", (model / "config.json").is_file(),
          lambda: convert_checkpoint(source, model, keep_mxfp4=True, progress=True))
    return model


def _precompute(model: Path, data_file: Path, domain: Domain, layer: int, store: Path, mesh, options) -> None:
    bars = ProgressBars()
    try:
        precompute_features(model, scenario_prompts(data_file, domain), [layer], store, mesh=mesh,
                            batch_size=8 * mesh.shape["data"], options=options, progress=bars)
    finally:
        bars.close()


def _reports(out: Path, run: Path, results: Path, trained: Path | None, demo: bool, epochs: int) -> str:
    parts = [(run / "r2.md").read_text()] if (run / "r2.md").is_file() else []
    parts.append((results / "report.md").read_text())
    if trained is not None:
        parts.append((trained / "report.md").read_text())
    if demo:
        parts.append(f"The demo model is random: these numbers exercise the pipeline, they are not gpt-oss's. "
                     f"Probes trained {epochs} epochs (the paper: 300). Outputs under {out}/.")
    return "\n".join(parts)
