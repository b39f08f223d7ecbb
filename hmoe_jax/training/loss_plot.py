"""The loss-curve PNG every training run writes (`train lm`, `train hybrid`): training losses per step as
lines, held-out losses as dots, on a log scale."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..runtime.files import save_figure


def plot_losses(path: Path, steps: Sequence[int], train: Mapping[str, Sequence[float | None]],
                held_out_steps: Sequence[int], held_out: Sequence[float], held_out_label: str, *, title: str,
                unit: str = "nats") -> None:
    """`train` {label: loss per step (None where not measured)} and the held-out losses to `path`; a
    series with no finite value is left out."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend is chosen

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    steps = np.asarray(steps)
    for label, losses in train.items():
        values = np.asarray([np.nan if v is None else v for v in losses], np.float64)
        if steps.size and np.isfinite(values).any():
            ax.plot(steps, values, lw=0.8, label=label)
    if len(held_out):
        ax.plot(held_out_steps, held_out, "o-", color="black", ms=3, label=held_out_label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({unit})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
