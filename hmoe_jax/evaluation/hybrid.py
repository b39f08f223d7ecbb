"""Hybrid evaluation: predictions from the integrated, jitted hybrid forward, scored two ways.

For each scenario the prompt runs through the model up to and including the hybrid layer; at the
prompt's last token the layer's extraction (trained probes, median over folds) feeds the exact
formulas, and those formula results are the predictions (`hybrid.inference.hybrid_predictions`). They
are scored under both protocols (`data.scoring`) next to the constant predictor, with the R^2 of the
extracted arguments and the routing rates; `write_results` writes summary.json, report.md and plots.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import formulas
from ..checkpoint.tokenizer import load_tokenizer
from ..data import scenarios as data
from ..data import scoring
from ..hybrid import probe
from ..hybrid.artifacts import extraction_probes
from ..hybrid.inference import build_hybrid_model, hybrid_predictions
from ..runtime import distributed
from ..runtime.files import user_path, write_json_atomically
from ..runtime.options import RunOptions

# The argument each metric's formula reads from the scenario, for R^2 of extracted arguments.
ARGUMENT_SOURCES: Mapping[str, Mapping[str, str]] = {
    "dscr": {"noi": "noi", "ads": "annual_debt_service"},
    "ltv": {"loan": "loan_amount", "value": "purchase_price"},
    "cap_rate": {"noi": "noi", "price": "purchase_price"},
    "debt_yield": {"noi": "noi", "loan": "loan_amount"},
}


def probe_route_predictions(run_dir: str | Path, features: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's route: each argument's fold probes on mean-pooled features, median of the
    decoded outputs, then the formula. Used to check the integrated forward computes the same."""
    out = {}
    for expert, arg_probes in extraction_probes(run_dir).items():
        spec = formulas.get_expert(expert)
        args = []
        for name in spec.arg_names:
            params = arg_probes[name]
            v = jax.vmap(probe.probe_apply, in_axes=(0, None))(params, jnp.asarray(features))[..., 0]
            args.append(jnp.median(probe.decode(v), axis=0))
        out[expert] = np.asarray(formulas.evaluate(spec, jnp.stack(args, -1)))
    return out


def argument_r2(scenarios: Sequence[Mapping], arguments: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """R^2 in sign-log space (as the paper reports) of each extracted argument, over all scenarios."""
    out = {}
    for expert, sources in ARGUMENT_SOURCES.items():
        if expert not in arguments:
            continue
        out[expert] = {}
        for i, (arg, key) in enumerate(sources.items()):
            truth = np.array([s["ground_truth"][key] if key == "annual_debt_service" else s["financials"][key]
                              for s in scenarios], np.float64)
            pred = np.asarray(arguments[expert][:, i], np.float64)
            out[expert][arg] = scoring.r2(np.asarray(probe.encode(pred)), np.asarray(probe.encode(truth)))
    return out


def evaluate_hybrid(checkpoint, run_dir, eval_path, *, train_path=None, batch_size: int = 8,
                    progress: Callable[[int], None] | None = None, hybrid_params=None,
                    mesh=None, options: RunOptions | None = None) -> dict[str, Any]:
    """Everything `summary.json` holds: per protocol the hybrid's and the constant predictor's scores,
    argument R^2, routing rates and timing. With `mesh`, the model is sharded on it and batches
    split over its data axis (across hosts in a multi-process run). Only blocks 0..layer are loaded
    (nothing after the hybrid layer changes its predictions), with the checkpoint's defaults
    (`options` overrides them)."""
    scenarios = data.load_scenarios(eval_path)
    model, layer = build_hybrid_model(checkpoint, run_dir, options=options, hybrid_params=hybrid_params, mesh=mesh,
                                      through_hybrid_layer=True)
    predictions = hybrid_predictions(model, layer, load_tokenizer(checkpoint), [s["input_prompt"] for s in scenarios],
                                     batch_size=batch_size, progress=progress, mesh=mesh)
    train = data.load_scenarios(train_path) if train_path else data.generate_scenarios(3000, data.TRAIN_SEED, 0)
    medians = scoring.training_medians(train)
    constant = scoring.constant_predictions(medians, len(scenarios))
    hybrid = {m: predictions["results"][m] for m in scoring.METRICS if m in predictions["results"]}
    scores = {
        protocol: {"hybrid": scoring.score(scenarios, hybrid, protocol),
                   "constant_median": scoring.score(scenarios, constant, protocol)}
        for protocol in scoring.PROTOCOLS
    }
    batch_s = predictions["batch_seconds"][1:] or predictions["batch_seconds"]  # first batch compiles
    return {
        "model": str(checkpoint), "probes": str(run_dir), "eval": str(eval_path), "layer": layer,
        "hybrid_params": None if hybrid_params is None else str(hybrid_params),
        "loaded_layers": layer + 1, "options": model.options.to_dict(),
        "n_scenarios": len(scenarios),
        "scores": scores,
        "training_medians": medians,
        "argument_r2_signlog": argument_r2(scenarios, predictions["arguments"]),
        "routed_to_expert_rate": {k: float(v.mean()) for k, v in predictions["selected"].items()},
        "median_batch_ms": float(np.median(batch_s) * 1000), "batch_size": batch_size,
        "_errors": {m: scoring.percent_errors(hybrid[m], [s["ground_truth"][m] for s in scenarios]).tolist()
                    for m in hybrid},
        "_complexity": [s["complexity"] for s in scenarios],
    }


# ------------------------------------------------------------------ report

def _by_complexity(score: Mapping[str, Any], complexity: int) -> Mapping[str, Any]:
    """A score's entry for one complexity (its keys are strings once read back from JSON)."""
    return score["by_complexity"].get(complexity, score["by_complexity"].get(str(complexity), {}))


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def report_markdown(summary: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> str:
    lines = ["# Hybrid MoE evaluation", "",
             f"Model `{summary['model']}`, probes `{summary['probes']}`, hybrid layer {summary['layer']}, "
             f"{summary['n_scenarios']} scenarios. Predictions are the exact formula results of the integrated "
             "hybrid forward at each prompt's last token.", ""]
    for protocol in scoring.PROTOCOLS:
        title = {"reference": "Reference protocol (every metric scored for every scenario, as the PyTorch reference)",
                 "honest": "Honest protocol (a metric is scored only where its inputs appear in the prompt)"}[protocol]
        lines += [f"## {title}", "", "| metric | method | N | within 10% | within 20% | median % error |",
                  "|---|---|---:|---:|---:|---:|"]
        for metric in scoring.METRICS:
            for method in ("hybrid", "constant_median"):
                s = summary["scores"][protocol][method].get(metric)
                if s is None:
                    continue
                lines.append(f"| {metric} | {method.replace('_', ' ')} | {s['n']} | {_fmt(s['within_10'])} | "
                             f"{_fmt(s['within_20'])} | {_fmt(s['median_pct_error'])} |")
        lines.append("")
        lines += ["Within 20% by complexity (hybrid):", "",
                  "| metric | " + " | ".join(f"c{c}" for c in (1, 2, 3, 4)) + " |",
                  "|---|---:|---:|---:|---:|"]
        for metric in scoring.METRICS:
            s = summary["scores"][protocol]["hybrid"].get(metric)
            if s is None:
                continue
            cells = [_fmt(_by_complexity(s, c).get("within_20")) for c in (1, 2, 3, 4)]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Extracted arguments: R^2 (sign-log space, all scenarios)", "", "| expert | argument | R^2 |",
              "|---|---|---:|"]
    for expert, args in summary["argument_r2_signlog"].items():
        for arg, value in args.items():
            lines.append(f"| {expert} | {arg} | {value:.3f} |")
    lines += ["", "Share of prompts whose last token the extended router sent to each deterministic expert: "
              + ", ".join(f"{k} {v:.1%}" for k, v in summary["routed_to_expert_rate"].items())
              + (" (the new router rows are untrained unless end-to-end training ran)."
                 if not summary.get("hybrid_params")
                 else f" (router rows and projections trained end to end: `{summary['hybrid_params']}`)."), "",
              f"Median forward time per batch of {summary['batch_size']} (to the hybrid layer, formulas included): "
              f"{summary['median_batch_ms']:.1f} ms."]
    if reference is not None:
        lines += ["", "## The PyTorch reference's headline (its protocol, first 200 eval scenarios)", "",
                  "| metric | within 20% (reference ensemble_input) |", "|---|---:|"]
        w20 = reference.get("summary", {}).get("ensemble_input", {}).get("w20", {})
        for metric in scoring.METRICS:
            if metric in w20:
                lines.append(f"| {metric} | {w20[metric]:.1f} |")
    return "\n".join(lines) + "\n"


def plot_errors(summary: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend is chosen

    paths = []
    errors = summary["_errors"]
    fig = Figure(figsize=(4 * len(errors), 3.2))
    axes = fig.subplots(1, len(errors), squeeze=False)
    for ax, (metric, errs) in zip(axes[0], errors.items()):
        e = np.asarray(errs, np.float64)
        e = np.clip(e[np.isfinite(e)], 1e-3, 1e4)
        ax.hist(np.log10(e), bins=30, color="tab:blue")
        ax.axvline(np.log10(20), color="red", lw=1)
        ax.set_title(metric)
        ax.set_xlabel("log10 % error (red: 20%)")
    fig.tight_layout()
    paths.append(out_dir / "error_distributions.png")
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    width = 0.2
    for j, metric in enumerate(scoring.METRICS):
        s = summary["scores"]["reference"]["hybrid"].get(metric)
        if s is None:
            continue
        vals = [_by_complexity(s, c).get("within_20", np.nan) for c in (1, 2, 3, 4)]
        ax.bar(np.arange(4) + j * width, vals, width, label=metric)
    ax.set_xticks(np.arange(4) + 1.5 * width, [f"complexity {c}" for c in (1, 2, 3, 4)])
    ax.set_ylabel("% within 20% (reference protocol)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "accuracy_by_complexity.png")
    fig.savefig(paths[-1], dpi=110)
    return paths


def write_results(summary: Mapping[str, Any], out: str | Path, *, reference: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> Path:
    """summary.json, report.md and the plots in `out`, built in a sibling directory and renamed into
    place only once complete (an existing `out` is replaced only with `overwrite`)."""
    out = user_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "report.md").write_text(report_markdown(summary, reference))
    plot_errors(summary, tmp)
    write_json_atomically(tmp / "summary.json", {k: v for k, v in summary.items() if not k.startswith("_")})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# The PyTorch reference's published results (`shared/reference/`, beside a development checkout of this
# repository); an installed package has none, and the report then leaves the comparison out.
REFERENCE_RESULTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "final_results.json"


def evaluate_and_write(checkpoint, run_dir, eval_path, out, *, train_path=None, batch_size: int = 8,
                       hybrid_params=None, mesh=None, options: RunOptions | None = None,
                       overwrite: bool = False) -> dict[str, Any]:
    """`eval hybrid`: `evaluate_hybrid` with a progress bar over prompts, then `write_results` (by
    process 0; every process computes the same summary)."""
    from tqdm import tqdm

    out = user_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before the model is loaded
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    n = len(data.load_scenarios(eval_path))
    with tqdm(total=n, unit="prompt", desc="hybrid forward", disable=not distributed.is_coordinator()) as bar:
        summary = evaluate_hybrid(checkpoint, run_dir, eval_path, train_path=train_path, batch_size=batch_size,
                                  progress=bar.update, hybrid_params=hybrid_params, mesh=mesh, options=options)
    if distributed.is_coordinator():
        reference = json.loads(REFERENCE_RESULTS.read_text()) if REFERENCE_RESULTS.is_file() else None
        write_results(summary, out, reference=reference, overwrite=True)
    return summary
