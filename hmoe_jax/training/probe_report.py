"""What a probe run reports: the score table (markdown) and the training curves (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..runtime.files import save_figure

_METRIC_LABELS = {"r2": "R^2 (in each target's training space: its scaling column)",
                  "balanced_accuracy": "balanced accuracy"}


def _mean_std(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.3f} +- {entry['std']:.3f}"


def score_table(results: dict[str, Any], published: Mapping[str, str] | None = None) -> str:
    """Markdown: one row per task, honest and optimistic scores as mean +- std over folds, and the
    domain's `published` scores per task (the paper's, for CRE) where it has them."""
    metric = _METRIC_LABELS[results["metric"]]
    protocol = results["protocol"]
    tasks = results["tasks"]
    folds = len(next(iter(tasks.values()))["folds"])
    lines = [
        f"{metric} on held-out folds, mean +- std over {folds} folds; {protocol['seeds']} seeds, "
        f"{protocol['epochs']} epochs.",
        "",
        "- honest: the seed is chosen on a validation split of each fold's training scenarios;",
        "- optimistic (the reference's protocol): the seed that scores best on the reported fold itself.",
        "",
    ]
    regression = results["metric"] == "r2"
    with_paper = regression and bool(published)
    header = ("| task | scenarios |" + (" scaling |" if regression else "") + " honest | optimistic |"
              + (" paper (optimistic) |" if with_paper else ""))
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, entry in tasks.items():
        row = (f"| {name} | {entry['scenarios']} |" + (f" {entry.get('scaling') or 'sign-log'} |" if regression else "")
               + f" {_mean_std(entry['honest'])} | {_mean_std(entry['optimistic'])} |")
        if with_paper:
            row += f" {published.get(name, '')} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def extractor_table(results: Mapping[str, dict[str, Any]], seconds: Mapping[str, float]) -> str:
    """Markdown comparing extractors' runs ({"mean": results, "attention": results}) trained on the same
    tasks, folds and seeds: per task each one's honest score (mean +- std over folds) and the
    per-fold mean of the difference to the first; then each run's training time."""
    names = list(results)
    first = results[names[0]]
    metric = _METRIC_LABELS[first["metric"]]
    protocol = first["protocol"]
    folds = len(next(iter(first["tasks"].values()))["folds"])
    lines = [
        f"Extractors compared: honest {metric} on held-out folds, mean +- std over {folds} folds; "
        f"{protocol['seeds']} seeds, {protocol['epochs']} epochs; the same folds and seeds for each.",
        "",
        "| task | scenarios | " + " | ".join(names) + " | " + " | ".join(f"{n} - {names[0]}" for n in names[1:]) + " |",
        "|---|---:|" + "---|" * len(names) + "---:|" * (len(names) - 1),
    ]
    for task, entry in first["tasks"].items():
        cells = [_mean_std(results[n]["tasks"][task]["honest"]) for n in names]
        base = np.asarray(entry["honest"]["per_fold"], np.float64)
        deltas = [f"{np.mean(np.asarray(results[n]['tasks'][task]['honest']['per_fold']) - base):+.3f}"
                  for n in names[1:]]
        lines.append(f"| {task} | {entry['scenarios']} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    lines += ["", "Training time (this invocation; a resumed run counts only what it trained): "
              + ", ".join(f"{n} {seconds[n]:.1f} s" for n in names) + "."]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, Any], path: str | Path) -> None:
    """Two panels: training loss per epoch and validation score at each checkpoint, averaged over
    each task's folds and seeds."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend is chosen

    names = list(results["tasks"])
    members = results["members"]
    train_loss = np.asarray(results["train_loss"], np.float64)
    curve = results["validation_curve"]
    epochs = [point["epoch"] for point in curve]
    validation = np.asarray([point["validation"] for point in curve], np.float64)  # [checkpoints, members]

    regression = results["metric"] == "r2"
    if regression:
        # An untrained probe's R^2 is hugely negative; clipping keeps the useful range readable.
        validation = np.maximum(validation, -1.0)

    fig = Figure(figsize=(13, 5))
    ax_loss, ax_val = fig.subplots(1, 2)
    colors = matplotlib.colormaps["tab20"]
    for t, name in enumerate(names):
        idx = [i for i, m in enumerate(members) if m["task"] == t]
        color = colors(t % 20)
        ax_loss.plot(np.arange(1, train_loss.shape[1] + 1), np.nanmean(train_loss[idx], axis=0), color=color)
        ax_val.plot(epochs, np.mean(validation[:, idx], axis=1), marker="o", color=color, label=name)
    loss_name = "Huber loss" if results["protocol"]["loss"] == "huber" else "binary cross-entropy"
    ax_loss.set(xlabel="epoch", ylabel=f"training {loss_name}", yscale="log", title="training loss")
    metric = _METRIC_LABELS[results["metric"]]
    ax_val.set(xlabel="epoch", ylabel=f"validation {metric}" + (" (clipped at -1)" if regression else ""),
               title=f"validation {metric}")
    if regression:
        ax_val.set_ylim(-1.05, 1.0)
    ax_val.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
