"""Hybrid evaluation: predictions from the integrated, jitted hybrid forward, scored two ways.

For each scenario the prompt runs through the model up to and including the hybrid layer; at the
prompt's last token the layer's extraction (trained probes, median over folds) feeds the exact
formulas, and those formula results are the predictions (`hybrid.inference.hybrid_predictions`). They
are scored under both protocols (`data.scoring`) next to the constant predictor, with the R^2 of the
extracted arguments and the routing rates; `write_results` writes summary.json, report.md and plots.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import formulas
from ..checkpoint.tokenizer import load_tokenizer
from ..data import scoring
from ..domains import Domain, load_records, resolve_domain
from ..hybrid import probe
from ..hybrid.artifacts import extraction_probes, probe_run_identity, probe_run_scalings
from ..hybrid.inference import build_hybrid_model, hybrid_predictions
from ..runtime import distributed
from ..runtime.files import save_figure, user_path, write_json_atomically
from ..runtime.options import RunOptions

# The constant baseline's training records when no train file is given: the domain's generator, at the
# reference's training seed (for CRE, the reference's train.json).
DEFAULT_TRAIN_SEED, DEFAULT_TRAIN_SIZE = 42, 3000


def probe_route_predictions(run_dir: str | Path, features: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's route: each argument's fold probes on mean-pooled features, median of the
    decoded outputs, then the formula. Used to check the integrated forward computes the same."""
    scalings = probe_run_scalings(run_dir)
    out = {}
    for expert, arg_probes in extraction_probes(run_dir).items():
        spec = formulas.get_expert(expert)
        args = []
        for name in spec.arg_names:
            params = arg_probes[name]
            v = jax.vmap(probe.probe_apply, in_axes=(0, None))(params, jnp.asarray(features))[..., 0]
            args.append(jnp.median(scalings[(expert, name)].decode(v), axis=0))
        out[expert] = np.asarray(formulas.evaluate(spec, jnp.stack(args, -1)))
    return out


def argument_r2(domain: Domain, records: Sequence[Mapping], arguments: Mapping[str, np.ndarray]
                ) -> dict[str, dict[str, float]]:
    """R^2 of each extracted argument, in its probe's training space (sign-log, as the paper reports,
    unless the domain scales the argument otherwise), over the records whose own markers name the metric:
    the rows its probes train on (`data.features.record_targets`). A marker the domain only implies (CRE:
    from a record's financials, for a prompt that does not state them) gives a truth to score the formula
    against, not an argument the prompt holds."""
    out = {}
    for metric in domain.metrics:
        if metric.expert not in arguments:
            continue
        markers = [next((m for m in r["computation_markers"] if m["expert"] == metric.expert), None) for r in records]
        rows = [i for i, m in enumerate(markers) if m is not None]
        out[metric.expert] = {}
        for i, arg in enumerate(metric.spec.arg_names):
            scaling = metric.scaling_of(arg)
            truth = np.array([markers[r]["inputs"][arg] for r in rows], np.float64)
            pred = np.asarray(arguments[metric.expert][rows, i], np.float64)
            out[metric.expert][arg] = (scoring.r2(np.asarray(scaling.encode(pred)), np.asarray(scaling.encode(truth)))
                                       if rows else math.nan)
    return out


def evaluation_domain(eval_path, run_dir, domain: str | Domain | None) -> tuple[list[dict[str, Any]], Domain]:
    """(eval records, domain): the domain named (or recorded by the data), which must be the one the
    probe run was trained for."""
    records, domain = load_records(eval_path, domain)
    resolve_domain(domain, probe_run_identity(run_dir).get("domain"), f"probe run {run_dir}")
    return records, domain


def evaluate_hybrid(checkpoint, run_dir, eval_path, *, train_path=None, domain: str | Domain | None = None,
                    batch_size: int = 8, progress: Callable[[int], None] | None = None, hybrid_params=None,
                    mesh=None, options: RunOptions | None = None) -> dict[str, Any]:
    """Everything `summary.json` holds: per protocol the hybrid's and the constant predictor's scores,
    argument R^2, routing rates and timing. With `mesh`, the model is sharded on it and batches
    split over its data axis (across hosts in a multi-process run). Only blocks 0..layer are loaded
    (nothing after the hybrid layer changes its predictions), with the checkpoint's defaults
    (`options` overrides them). Every input is checked before the model is loaded."""
    records, domain = evaluation_domain(eval_path, run_dir, domain)
    train = (load_records(train_path, domain)[0] if train_path
             else domain.generate(DEFAULT_TRAIN_SIZE, DEFAULT_TRAIN_SEED))
    medians = scoring.training_medians(domain, train)
    model, layer = build_hybrid_model(checkpoint, run_dir, options=options, hybrid_params=hybrid_params, mesh=mesh,
                                      through_hybrid_layer=True)
    predictions = hybrid_predictions(model, layer, load_tokenizer(checkpoint), [r["input_prompt"] for r in records],
                                     batch_size=batch_size, progress=progress, mesh=mesh)
    constant = scoring.constant_predictions(medians, len(records))
    hybrid = {m: predictions["results"][m] for m in domain.experts if m in predictions["results"]}
    scores = {
        protocol: {"hybrid": scoring.score(domain, records, hybrid, protocol),
                   "constant_median": scoring.score(domain, records, constant, protocol)}
        for protocol in scoring.PROTOCOLS
    }
    batch_s = predictions["batch_seconds"][1:] or predictions["batch_seconds"]  # first batch compiles
    return {
        "model": str(checkpoint), "probes": str(run_dir), "eval": str(eval_path), "layer": layer,
        "domain": domain.name, "metrics": list(domain.experts),
        "hybrid_params": None if hybrid_params is None else str(hybrid_params),
        "loaded_layers": layer + 1, "options": model.options.to_dict(),
        "n_scenarios": len(records),
        "published_within_20": dict(domain.published_within_20), "published_source": domain.published_source,
        "scores": scores,
        "training_medians": medians,
        "argument_r2": argument_r2(domain, records, predictions["arguments"]),
        "routed_to_expert_rate": {k: float(v.mean()) for k, v in predictions["selected"].items()},
        "median_batch_ms": float(np.median(batch_s) * 1000), "batch_size": batch_size,
        "_errors": {m: scoring.percent_errors(hybrid[m], scoring.truths(domain, records, m)).tolist() for m in hybrid},
    }


# ------------------------------------------------------------------ report

def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _group_table(summary: Mapping[str, Any], protocol: str) -> list[str]:
    """Within 20% of the hybrid per grouping column and label (e.g. CRE's complexity)."""
    scores = summary["scores"][protocol]["hybrid"]
    lines = []
    columns = sorted({c for s in scores.values() for c in s.get("by_group", {})})
    for column in columns:
        labels = sorted({g for s in scores.values() for g in s["by_group"].get(column, {})},
                        key=lambda g: (not g.lstrip("-").isdigit(), int(g) if g.lstrip("-").isdigit() else 0, g))
        lines += [f"Within 20% by {column} (hybrid):", "", "| metric | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for metric in summary["metrics"]:
            s = scores.get(metric)
            if s is not None:
                cells = [_fmt(s["by_group"].get(column, {}).get(g, {}).get("within_20")) for g in labels]
                lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def report_markdown(summary: Mapping[str, Any]) -> str:
    lines = ["# Hybrid MoE evaluation", "",
             f"Domain `{summary['domain']}`, model `{summary['model']}`, probes `{summary['probes']}`, hybrid layer "
             f"{summary['layer']}, {summary['n_scenarios']} records. Predictions are the exact formula results of "
             "the integrated hybrid forward at each prompt's last token.", ""]
    for protocol in scoring.PROTOCOLS:
        title = {"reference": "Reference protocol (every metric scored wherever it has a truth, as the PyTorch "
                              "reference)",
                 "honest": "Honest protocol (a metric is scored only where its inputs appear in the prompt)"}[protocol]
        lines += [f"## {title}", "", "| metric | method | N | within 10% | within 20% | median % error |",
                  "|---|---|---:|---:|---:|---:|"]
        for metric in summary["metrics"]:
            for method in ("hybrid", "constant_median"):
                s = summary["scores"][protocol][method].get(metric)
                if s is None:
                    continue
                lines.append(f"| {metric} | {method.replace('_', ' ')} | {s['n']} | {_fmt(s['within_10'])} | "
                             f"{_fmt(s['within_20'])} | {_fmt(s['median_pct_error'])} |")
        lines.append("")
        lines += _group_table(summary, protocol)
    lines += ["## Extracted arguments: R^2 (each probe's training space: sign-log unless the domain scales the "
              "argument otherwise)", "", "| expert | argument | R^2 |", "|---|---|---:|"]
    for expert, args in summary["argument_r2"].items():
        for arg, value in args.items():
            lines.append(f"| {expert} | {arg} | {value:.3f} |")
    lines += ["", "Share of prompts whose last token the extended router sent to each deterministic expert: "
              + ", ".join(f"{k} {v:.1%}" for k, v in summary["routed_to_expert_rate"].items())
              + (" (the new router rows are untrained unless end-to-end training ran)."
                 if not summary.get("hybrid_params")
                 else f" (router rows and projections trained end to end: `{summary['hybrid_params']}`)."), "",
              f"Median forward time per batch of {summary['batch_size']} (to the hybrid layer, formulas included): "
              f"{summary['median_batch_ms']:.1f} ms."]
    published = summary.get("published_within_20") or {}
    if published:
        lines += ["", f"## Published: {summary.get('published_source') or 'the domain'}", "",
                  "| metric | within 20% |", "|---|---:|"]
        lines += [f"| {metric} | {published[metric]:.1f} |" for metric in summary["metrics"] if metric in published]
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
    save_figure(fig, paths[-1], dpi=110)

    scores = summary["scores"]["reference"]["hybrid"]
    for column in sorted({c for s in scores.values() for c in s.get("by_group", {})}):
        labels = sorted({g for s in scores.values() for g in s["by_group"].get(column, {})})
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        width = 0.8 / max(1, len(scores))
        for j, metric in enumerate(m for m in summary["metrics"] if m in scores):
            vals = [scores[metric]["by_group"].get(column, {}).get(g, {}).get("within_20", np.nan) for g in labels]
            ax.bar(np.arange(len(labels)) + j * width, vals, width, label=metric)
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, [f"{column} {g}" for g in labels])
        ax.set_ylabel("% within 20% (reference protocol)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"accuracy_by_{column}.png")
        save_figure(fig, paths[-1], dpi=110)
    return paths


def write_results(summary: Mapping[str, Any], out: str | Path, *, overwrite: bool = False) -> Path:
    """summary.json, report.md and the plots in `out`, built in a sibling directory and renamed into
    place only once complete (an existing `out` is replaced only with `overwrite`)."""
    out = user_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "report.md").write_text(report_markdown(summary))
    plot_errors(summary, tmp)
    write_json_atomically(tmp / "summary.json", {k: v for k, v in summary.items() if not k.startswith("_")})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def evaluate_and_write(checkpoint, run_dir, eval_path, out, *, train_path=None, domain: str | Domain | None = None,
                       batch_size: int = 8, hybrid_params=None, mesh=None, options: RunOptions | None = None,
                       overwrite: bool = False) -> dict[str, Any]:
    """`eval hybrid`: `evaluate_hybrid` with a progress bar over prompts, then `write_results` (by
    process 0; every process computes the same summary)."""
    from tqdm import tqdm

    out = user_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before the model is loaded
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    records, domain = evaluation_domain(eval_path, run_dir, domain)
    coordinator = distributed.is_coordinator()
    with tqdm(total=len(records), unit="prompt", desc="hybrid forward", disable=not coordinator) as bar:
        summary = evaluate_hybrid(checkpoint, run_dir, eval_path, train_path=train_path, domain=domain,
                                  batch_size=batch_size, progress=bar.update, hybrid_params=hybrid_params, mesh=mesh,
                                  options=options)
    if distributed.is_coordinator():
        write_results(summary, out, overwrite=True)
    return summary
