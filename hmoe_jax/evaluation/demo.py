"""The whole Hybrid MoE pipeline in one call (`python -m eval demo`).

Without a model it first trains one: a small gpt-oss (sinks, sliding windows, MoE; `training.lm`) learns
the domain's language from scratch on the training records' prompts and answers, so its hidden states
carry the numbers the extraction probes must read and its own greedy answers are a baseline (a random
model's carry almost nothing: on it the hybrid is no better than a constant, `random_model=True` shows
that). With a model it runs on that checkpoint (e.g. the real gpt-oss-20b, layer 12). Each stage is the
library call its own command makes:

    data -> language model (train lm) -> convert -> precompute (train, eval) -> probes (mean-pooled and
    attention-pooled extractors, compared) -> eval hybrid -> the LM's own answers (eval baselines)
    -> end-to-end hybrid training -> eval hybrid (trained router) -> report

for any domain (`DemoSettings.domain`, default CRE). `report.md` puts side by side, per metric: the
LM's own greedy answers, the hybrid's exact formula results, its generated answers before and after
end-to-end training, the constant predictor, and the published numbers where the domain ships them.

Every stage writes under `out` and is skipped when its output is already complete, so an interrupted
demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import synthetic
from ..checkpoint.convert import convert_checkpoint
from ..checkpoint.loading import from_pretrained
from ..checkpoint.location import locate_checkpoint, resolve_checkpoint
from ..checkpoint.tokenizer import load_tokenizer
from ..data.features import scenario_prompts
from ..domains import EVAL_FILE, TRAIN_FILE, Domain, generate_records, load_domain, load_records, write_dataset
from ..runtime.files import user_path, write_text_atomically
from ..runtime.options import RunOptions
from ..runtime.sharding import make_mesh
from ..training import hybrid as hybrid_training
from ..training import lm
from ..training.precompute import ProgressBars, precompute_features
from ..training.probes import COMPARISON_FILE, Protocol, StoreChoice, compare_extractors, train_probes_on_store
from . import baselines
from .hybrid import evaluate_and_write

# The embedded demo model's shape: small enough to train from scratch and run the full protocol (5 folds x
# 3 seeds) in minutes on 2 cores, real enough to use every code path: GQA, sliding and full layers, YaRN,
# MoE top-2 of 8 with MXFP4-exportable experts (widths divisible by 32). 640 ids: the byte-level
# tokenizer's 256 bytes and specials leave ~370 merges, so a CRE prompt is ~89 tokens.
# Width 64 (`lm.widened(64)`, 0.53M parameters), not `train lm`'s default 128: measured
# (bench/extraction_frontier.py, CRE), probe R^2 follows the LM's training steps far more than its width
# (400 steps: 0.947 at 64, 0.950 at 128; 800 steps: 0.959 at 64, 0.963 at 128), and a width-64 step
# takes about a third of the time, so the demo's budget buys twice the steps at width 64.
DEMO_MODEL = lm.widened(64)
# The middle block (2 of 4): the scaled-down analogue of the paper's layer 12 of 24.
DEMO_LAYER = DEMO_MODEL["num_hidden_layers"] // 2


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each stage of the demo does."""

    n_train: int  # training records: the LM's corpus, the probes' and the end-to-end training's
    n_eval: int  # held-out records every score is computed on
    lm_steps: int  # optimizer steps of the LM (batch 32)
    epochs: int  # probe epochs (5 folds x 3 seeds)
    hybrid_train: int  # records of end-to-end hybrid training (batch 8)
    hybrid_epochs: int  # its epochs
    hybrid_eval: int  # held-out records its routing is measured on, before and after
    n_generate: int  # of those, the ones the hybrid generates answers for


# The default fits the README's 15 minutes on a 2-core host, LM training included; --quick, 3.
FULL = Sizes(n_train=3000, n_eval=500, lm_steps=800, epochs=20, hybrid_train=320, hybrid_epochs=2, hybrid_eval=64,
             n_generate=16)
QUICK = Sizes(n_train=400, n_eval=80, lm_steps=80, epochs=5, hybrid_train=64, hybrid_epochs=1, hybrid_eval=32,
              n_generate=8)
EXTRACTORS = ("mean", "attention")
# The seed of the LM's corpus (plus the demo's --seed): apart from the data's 42 (train) and 43 (eval).
LM_CORPUS_SEED = 1000
# Measured on the demo's trained LM (README, "The method, shown working"): the attention-pooled extractor
# scored +0.002 R^2 over the mean-pooled one on every CRE argument (within the folds' spread) for 3.2x the
# probe training time and a slower hybrid forward, so the demo defaults to the mean-pooled probes and
# trains both, with their table, when asked (`compare_extractors`).
DEFAULT_EXTRACTOR = "mean"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """`model` None: the demo's own model, a language model trained on the domain (`random_model`: a
    random one instead, to see what extraction reads from hidden states that carry nothing). `layer` and
    `epochs` None: the demo model's (DEMO_LAYER, the sizes') or, for a given model, the paper's (12, 300).
    `quick`: the QUICK sizes instead of FULL; n_train, n_eval and lm_steps override either."""

    model: str | Path | None = None
    random_model: bool = False
    quick: bool = False
    layer: int | None = None
    epochs: int | None = None
    n_train: int | None = None
    n_eval: int | None = None
    lm_steps: int | None = None
    seed: int = 0
    # None: on for the embedded demo model; off for a given model (end-to-end training of the 20b takes
    # hours and ~18.5 GiB on a CPU host: ask for it).
    hybrid_training: bool | None = None
    extractor: str | None = None  # the probes the hybrid uses; None: DEFAULT_EXTRACTOR
    compare_extractors: bool = False  # train both extractors on the same store and report them side by side
    options: RunOptions | None = None
    domain: str | Domain | None = None
    # The trained LM's shape (an HF-style gpt-oss config dict); None: DEMO_MODEL. Its hybrid layer
    # defaults to the middle one, as DEMO_LAYER is of DEMO_MODEL's 4 (`lm.widened`: --lm-hidden;
    # bench/extraction_frontier.py measures what a wider LM buys).
    lm_config: dict[str, Any] | None = None

    def lm_model(self) -> dict[str, Any]:
        return DEMO_MODEL if self.lm_config is None else dict(self.lm_config)

    def sizes(self) -> Sizes:
        base = QUICK if self.quick else FULL
        changes = {k: getattr(self, k) for k in ("n_train", "n_eval", "lm_steps", "epochs") if getattr(self, k)}
        return dataclasses.replace(base, **changes)


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
    """Run (or finish) every stage under `out`; returns the report (also `out/report.md`)."""
    out = user_path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(log)
    demo = settings.model is None
    sizes = settings.sizes()
    layer = settings.layer if settings.layer is not None else (
        settings.lm_model()["num_hidden_layers"] // 2 if demo else 12)
    epochs = settings.epochs if settings.epochs is not None else (sizes.epochs if demo else 300)
    extractor = settings.extractor or DEFAULT_EXTRACTOR
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose from {EXTRACTORS}")

    domain = load_domain(settings.domain)
    data_dir = out / "data"
    train_json, eval_json = data_dir / TRAIN_FILE, data_dir / EVAL_FILE
    stage(f"data: python -m train data --domain {domain.name}", train_json.is_file() and eval_json.is_file(),
          # overwrite: the stage check above decides; a half-written pair from an interrupted run is replaced.
          lambda: write_dataset(domain, data_dir, 42, sizes.n_train, sizes.n_eval, overwrite=True))
    load_records(train_json, domain)  # a resumed demo of another domain stops here
    model = _checkpoint(out, settings, sizes, domain, train_json, stage)

    stores = {split: out / f"features_{split}" for split in ("train", "eval")}
    mesh = make_mesh()
    token_states = extractor == "attention" or settings.compare_extractors
    for split, path in (("train", train_json), ("eval", eval_json)):
        stage(f"precompute {split}: python -m train precompute --layer {layer}"
              + (" --token-states" if token_states else ""), _store_complete(stores[split]),
              lambda s=split, p=path: _precompute(model, p, domain, layer, stores[s], mesh, settings.options,
                                                  token_states))

    probes = out / "probes"
    runs = {e: probes / e for e in EXTRACTORS}
    # The demo model's hybrid reads the argument probes only: its direct-output probes (the reference's
    # other table) are left out to save a third of the time. A given model's run keeps them.
    direct = not demo
    if settings.compare_extractors:  # both on the same store, folds and seeds, and their table
        compared = EXTRACTORS
        stage(f"probes: python -m train probes --extractor both (5 folds x 3 seeds, {epochs} epochs)",
              (probes / COMPARISON_FILE).is_file(),
              lambda: compare_extractors(stores["train"], probes, Protocol(epochs=epochs),
                                         StoreChoice(layer=layer, extractor="both"), direct=direct, domain=domain))
    else:
        compared = (extractor,)
        stage(f"probes: python -m train probes --extractor {extractor} (5 folds x 3 seeds, {epochs} epochs)",
              (runs[extractor] / "probes.json").is_file(),
              lambda: train_probes_on_store(stores["train"], runs[extractor], Protocol(epochs=epochs),
                                            StoreChoice(layer=layer, extractor=extractor), direct=direct,
                                            domain=domain))
    run = runs[extractor]

    results = out / "results"
    stage(f"evaluate: python -m eval hybrid --probes {run.name}", (results / "summary.json").is_file(),
          lambda: evaluate_and_write(model, run, eval_json, results, train_path=train_json, domain=domain,
                                     batch_size=32, overwrite=True, options=settings.options))

    answers = out / "lm_answers"
    if demo and not settings.random_model:
        stage("the language model's own greedy answers: python -m eval baselines",
              (answers / "baselines.json").is_file(),
              lambda: _lm_answers(model, eval_json, domain, answers, settings.options))

    trained = out / "hybrid_training"
    train_hybrid = settings.hybrid_training if settings.hybrid_training is not None else demo
    if train_hybrid:
        inputs = hybrid_training.Inputs(model, run, train_json, eval_json,
                                        n_train=min(sizes.hybrid_train, sizes.n_train),
                                        n_eval=min(sizes.hybrid_eval, sizes.n_eval),
                                        n_generate=min(sizes.n_generate, sizes.hybrid_eval),
                                        domain=domain)
        stage("hybrid training: python -m train hybrid (router rows + projections, end to end)",
              (trained / "report.md").is_file(),
              # One length bucket of 256 tokens: a demo prompt and its answer fit, so the step compiles once.
              lambda: hybrid_training.run_from_files(inputs, trained,
                                                     hybrid_training.Settings(bucket=256, epochs=sizes.hybrid_epochs),
                                                     options=settings.options))
    report = demo_report(out, domain, extractor, compared, settings, sizes, epochs)
    write_text_atomically(out / "report.md", report)
    return report


def _checkpoint(out: Path, settings: DemoSettings, sizes: Sizes, domain: Domain, train_json: Path,
                stage: _Stages) -> Path:
    """The converted checkpoint the stages read (the demo's model trained or built first); a converted
    `model` is used as it is."""
    packed = False
    if settings.model is not None:
        source = resolve_checkpoint(settings.model)
        packed = True  # a given checkpoint's MXFP4 experts stay packed (the 20b's 12.8 GiB)
    elif settings.random_model:
        source = out / "checkpoint_hf"
        packed = True

        def build():
            records, _ = load_records(train_json, domain)
            texts = [r["input_prompt"] for r in records] + [domain.answer_text(r) for r in records]
            synthetic.write_hf_checkpoint(source, settings.lm_model(), seed=settings.seed, experts="mxfp4")
            synthetic.write_tokenizer(source, texts, settings.lm_model())

        stage(f"checkpoint: random gpt-oss in HF format (MXFP4 experts, byte-level BPE tokenizer of the "
              f"{domain.name} prompts)", (source / "tokenizer.json").is_file(), build)
    else:
        lm_dir = out / "lm"
        source = lm_dir / "hf"
        lm_settings = lm.LMSettings(steps=sizes.lm_steps, warmup_steps=lm.default_warmup(sizes.lm_steps),
                                    seed=settings.seed)
        # A corpus of its own, each record read once, so the probes' records and the held-out ones are
        # equally unseen by the LM (on the probes' own records it read each ~4.5 times; measured, that
        # changed little: cross-validated probe R^2 0.95-0.96 there, 0.946-0.957 here).
        n_corpus = sizes.lm_steps * lm_settings.batch_size + lm_settings.n_held_out
        stage(f"language model: python -m train lm --domain {domain.name} --n-train {n_corpus} --steps "
              f"{sizes.lm_steps} (from scratch, on {n_corpus} records of its own)", (source / "config.json").is_file(),
              lambda: lm.train_lm(lm_dir, settings.lm_model(),
                                  generate_records(domain, n_corpus, LM_CORPUS_SEED + settings.seed), domain,
                                  lm_settings))
    if locate_checkpoint(source).layout == "flax":
        return source
    model = out / "checkpoint"
    stage("convert: python -m convert SRC DST" + (" --keep-mxfp4" if packed else ""), (model / "config.json").is_file(),
          lambda: convert_checkpoint(source, model, keep_mxfp4=packed, progress=True))
    return model


def _precompute(model: Path, data_file: Path, domain: Domain, layer: int, store: Path, mesh, options,
                token_states: bool) -> None:
    bars = ProgressBars()
    try:
        precompute_features(model, scenario_prompts(data_file, domain), [layer], store, mesh=mesh,
                            batch_size=8 * mesh.shape["data"], options=options, progress=bars,
                            token_states=token_states)
    finally:
        bars.close()


def _lm_answers(model: Path, eval_json: Path, domain: Domain, out: Path, options) -> None:
    """The trained LM's own greedy continuation of each held-out prompt, read back and scored as the
    generation baselines are. The prompt is exactly what the LM saw before an answer in training (no
    instruction around it), so this is its best shot."""
    records, _ = load_records(eval_json, domain)
    tokenizer = load_tokenizer(model)
    answers = [domain.answer_text(r) for r in records if domain.asked(r)]
    new_tokens = max(len(tokenizer.encode("\n" + a).ids) for a in answers) + 4
    lm_model = from_pretrained(model, options)
    generated = baselines.generate_answers(lm_model, tokenizer, [r["input_prompt"] for r in records], new_tokens, 32)
    results = {"raw": {LM_STYLE: baselines.score_style(domain, records, [a.text for a in generated])}}
    generations = {"raw": {LM_STYLE: [{"id": r["id"], **a.to_dict()} for r, a in zip(records, generated)]}}
    baselines.write_results(out, results, generations, [LM_STYLE], len(records), new_tokens)


LM_STYLE = "continuation"


# ------------------------------------------------------------------ the report


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(x, fmt="{:.1f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def demo_report(out: Path, domain: Domain, extractor: str, compared, settings: DemoSettings, sizes: Sizes,
                epochs: int) -> str:
    """report.md: the methods side by side, the extractors compared, routing, then each stage's report."""
    results = _json(out / "results" / "summary.json")
    trained = _json(out / "hybrid_training" / "summary.json")
    lm_answers = _json(out / "lm_answers" / "baselines.json")
    lm_run = _json(out / "lm" / lm.CURVE_FILE)
    demo = settings.model is None
    what = ("a random gpt-oss-shaped model (--random-model)" if settings.random_model else
            f"a gpt-oss-shaped language model trained from scratch on {domain.name} records of its own "
            f"({sizes.lm_steps} steps, each record read once"
            + (f"; hidden {settings.lm_model()['hidden_size']}" if settings.lm_config else "") + ")"
            if demo else f"`{settings.model}`")
    lines = [f"# Hybrid MoE demo: domain `{domain.name}`", "",
             f"Model: {what}; hybrid layer {results['layer']}; extraction: the {extractor}-pooled probes; "
             f"{results['n_scenarios']} held-out records.", ""]
    if lm_run is not None and lm_run.get("held_out"):
        held = lm_run["held_out"][-1]
        lines += [f"Language model: {len(lm_run['step'])} steps in {lm_run['seconds']:.0f} s; held-out next-token "
                  f"loss {held['loss']:.3f} nats, accuracy {100 * held['accuracy']:.1f}% (`lm/report.md`).", ""]
    for protocol in ("honest", "reference"):
        lines += [f"## Within 20% ({protocol} protocol)", "",
                  "| metric | LM's own answer | hybrid: exact formula | hybrid generated, before e2e | "
                  "hybrid generated, after e2e | constant median | published |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in domain.experts:
            own = (lm_answers or {}).get("raw", {}).get(LM_STYLE, {}).get(protocol, {}).get(m, {}).get("within_20")
            formula = results["scores"][protocol]["hybrid"].get(m, {}).get("within_20")
            constant = results["scores"][protocol]["constant_median"].get(m, {}).get("within_20")
            gen_b = gen_a = None
            if trained is not None and protocol == "honest" and "generated" in trained["after"]:
                gen_b = trained["before"]["generated"]["within_20_honest"].get(m)
                gen_a = trained["after"]["generated"]["within_20_honest"].get(m)
            lines.append(f"| {m} | {_cell(own)} | {_cell(formula)} | {_cell(gen_b)} | {_cell(gen_a)} | "
                         f"{_cell(constant)} | {_cell(domain.published_within_20.get(m))} |")
        lines.append("")
    if trained is not None and "generated" in trained["after"]:
        n = trained["after"]["generated"]["n"]
        lines += [f"Generated answers are the first {n} held-out records' greedy continuations (honest protocol "
                  "only); the exact formula and the LM's own answers cover every held-out record. Published: "
                  f"{domain.published_source or '-'}.", ""]
    lines += _extractor_table(out, domain, compared)
    if trained is not None and "routing" in trained["after"]:
        lines += ["## Routing after end-to-end training", "",
                  "| expert | prompts asking for it | prompts not asking | router negatives (held out) |",
                  "|---|---:|---:|---:|"]
        for expert, r in trained["after"]["routing"].items():
            lines.append(f"| {expert} | {_cell(100 * r['asked'])}% | {_cell(100 * r['not_asked'])}% | "
                         f"{_cell(100 * r.get('negatives', float('nan')))}% |")
        within_1 = trained["after"].get("generated", {}).get("within_1_parsed")
        if within_1:
            lines += ["", "Generated answers that parse and are within 1% of the exact value, after end-to-end "
                      "training: " + ", ".join(f"{m} {_cell(v)}%" for m, v in within_1.items()) + "."]
        lines.append("")
    for name in ("lm/report.md", f"probes/{COMPARISON_FILE}", f"probes/{extractor}/r2.md", "results/report.md",
                 "lm_answers/baselines.md",
                 "hybrid_training/report.md"):
        if (out / name).is_file():
            lines += [f"<details><summary>{name}</summary>", "", (out / name).read_text(), "</details>", ""]
    if settings.random_model:
        lines.append("The model is random: these numbers exercise the pipeline, they are not a trained model's.")
    lines.append(f"Probes trained {epochs} epochs (the paper: 300). Outputs under {out}/.")
    return "\n".join(lines) + "\n"


def _extractor_table(out: Path, domain: Domain, compared) -> list[str]:
    """Cross-validated R^2 of each argument's probe, per extractor, on the same features, folds and seeds:
    test R^2 of each fold's seed picked on validation (honest), mean over folds; the reference's optimistic
    pick (best test seed) after it."""
    runs = {e: _json(out / "probes" / e / "results.json") for e in compared}
    if any(r is None for r in runs.values()):
        return []
    names = [n for n in runs[compared[0]]["tasks"] if not n.endswith("/output")]
    lines = ["## Extraction: cross-validated R^2 per argument (same store, folds and seeds)", "",
             "| argument | " + " | ".join(f"{e}-pooled: honest (optimistic)" for e in compared)
             + " | published (gpt-oss-20b, optimistic) |", "|---|" + "---:|" * (len(compared) + 1)]
    for name in names:
        cells = []
        for e in compared:
            task = runs[e]["tasks"].get(name)
            cells.append("-" if task is None else
                         f"{task['honest']['mean']:.3f} ({task['optimistic']['mean']:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {domain.published_r2.get(name, '-')} |")
    honest = {e: [runs[e]["tasks"][n]["honest"]["mean"] for n in names if n in runs[e]["tasks"]] for e in compared}
    for label, reduce in (("mean over arguments", lambda v: sum(v) / len(v)), ("lowest argument", min)):
        lines.append(f"| **{label}** | " + " | ".join(f"**{reduce(honest[e]):.3f}**" if honest[e] else "-"
                                                    for e in compared) + " | |")
    return lines + [""]
