"""What a better-trained or larger demo LM buys the method: probe R^2 and the hybrid's within-20%
against the LM's width and training steps (issue 23's frontier).

Each point is the demo (`python -m eval demo`, `hmoe_jax.evaluation.demo.run_demo`) with its LM widened
and/or trained longer, end-to-end training off (it reads the same frozen probes, so it cannot move the
exact-formula column). Every other stage is the demo's: its corpus of records of its own, 3,000 probe
records, 5 folds x 3 seeds x 20 epochs, 500 held-out records, the honest protocol.

    python bench/extraction_frontier.py --out frontier                 # the default grid
    python bench/extraction_frontier.py --out frontier --point 128:400 --point 256:400

A point is `hidden:steps` (`hmoe_jax.training.lm.widened`: hidden a multiple of 64). Points
resume (each is a demo directory under --out, skipped stage by stage when complete), so the grid can
be stopped and restarted. Writes --out/frontier.md, frontier.json and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors import safe_open  # noqa: E402

from hmoe_jax.domains import load_domain  # noqa: E402
from hmoe_jax.evaluation.demo import DemoSettings, run_demo  # noqa: E402
from hmoe_jax.runtime.files import save_figure, user_path, write_json_atomically, write_text_atomically  # noqa: E402
from hmoe_jax.training.lm import LMTrainingError, widened  # noqa: E402

DEFAULT_POINTS = ("64:400", "128:200", "128:400", "128:800", "256:400")
def parameter_count(checkpoint: Path) -> int:
    """The trained LM's parameters, counted in its exported HF checkpoint (float32 tensors)."""
    total = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "np") as tensors:
            total += sum(math.prod(tensors.get_slice(k).get_shape()) for k in tensors.keys())
    return total


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def measure(point_dir: Path, hidden: int, steps: int, domain) -> dict:
    curve = _json(point_dir / "lm" / "loss_curve.json")
    probes = _json(point_dir / "probes" / "mean" / "results.json")
    results = _json(point_dir / "results" / "summary.json")
    own = _json(point_dir / "lm_answers" / "baselines.json")
    r2 = {name: task["honest"]["mean"] for name, task in probes["tasks"].items() if not name.endswith("/output")}
    honest = results["scores"]["honest"]
    return {
        "hidden": hidden, "steps": steps, "parameters": parameter_count(point_dir / "lm" / "hf"),
        "lm_seconds": curve["seconds"], "lm_held_out_loss": curve["held_out"][-1]["loss"],
        "r2": r2, "r2_mean": sum(r2.values()) / len(r2), "r2_lowest": min(r2.values()),
        "within_20": {m: {"formula": honest["hybrid"].get(m, {}).get("within_20"),
                          "constant": honest["constant_median"].get(m, {}).get("within_20"),
                          "lm_own": own["raw"]["continuation"]["honest"].get(m, {}).get("within_20")}
                      for m in domain.experts},
    }


def _cell(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def report(points: list[dict], domain) -> str:
    metrics = list(domain.experts)
    lines = [f"# Extraction frontier: domain `{domain.name}`", "",
             "Probe R^2 (mean-pooled, standardized, 5 folds x 3 seeds x 20 epochs, honest seed choice) and "
             "within 20% on 500 held-out records (honest protocol), against the demo LM's width and steps.", "",
             "| LM hidden | steps | parameters | LM training (s) | held-out LM loss | R^2 mean | R^2 lowest | "
             + " | ".join(f"{m}: formula / constant / LM" for m in metrics) + " |",
             "|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(metrics)]
    for p in points:
        cells = [f"{_cell(p['within_20'][m]['formula'])} / {_cell(p['within_20'][m]['constant'])} / "
                 f"{_cell(p['within_20'][m]['lm_own'])}" for m in metrics]
        lines.append(f"| {p['hidden']} | {p['steps']} | {p['parameters']:,} | {p['lm_seconds']:.0f} | "
                     f"{p['lm_held_out_loss']:.3f} | {p['r2_mean']:.3f} | {p['r2_lowest']:.3f} | "
                     + " | ".join(cells) + " |")
    published = domain.published_within_20
    if published:
        lines += ["", "Published (gpt-oss-20b, the reference's protocol): "
                  + ", ".join(f"{m} {published[m]:.1f}" for m in metrics if m in published) + "."]
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for hidden in sorted({p["hidden"] for p in points}):
        row = sorted((p for p in points if p["hidden"] == hidden), key=lambda p: p["lm_seconds"])
        seconds = [p["lm_seconds"] for p in row]
        left.plot(seconds, [p["r2_mean"] for p in row], "o-", label=f"hidden {hidden}: mean")
        left.plot(seconds, [p["r2_lowest"] for p in row], "x--", label=f"hidden {hidden}: lowest")
        first = next(iter(row[0]["within_20"]))
        right.plot(seconds, [p["within_20"][first]["formula"] for p in row], "o-", label=f"hidden {hidden}")
    constant = points[0]["within_20"][first]["constant"]
    right.axhline(constant, color="grey", ls=":", label="constant median")
    left.axhline(0.98, color="grey", ls=":", label="target mean 0.98")
    left.set(xlabel="LM training time (s, this host)", ylabel="probe R^2 (sign-log)", title="extraction")
    right.set(xlabel="LM training time (s, this host)", ylabel=f"{first} within 20% (%)", title="exact formula")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory of the points' demo runs and the report")
    parser.add_argument("--point", action="append", metavar="HIDDEN:STEPS",
                        help=f"a grid point (repeatable; default {' '.join(DEFAULT_POINTS)})")
    parser.add_argument("--domain", default=None, help="the domain (default: CRE)")
    args = parser.parse_args(argv)
    out = user_path(args.out)
    domain = load_domain(args.domain)
    grid = []
    for text in args.point or DEFAULT_POINTS:
        try:
            hidden, steps = (int(x) for x in text.split(":"))
        except ValueError:
            parser.error(f"--point must be HIDDEN:STEPS, got {text!r}")
        try:
            widened(hidden)
        except LMTrainingError as e:
            parser.error(str(e))
        grid.append((hidden, steps))
    points = []
    for hidden, steps in grid:
        point_dir = out / f"hidden{hidden}_steps{steps}"
        print(f"== LM hidden {hidden}, {steps} steps -> {point_dir}", flush=True)
        start = time.perf_counter()
        run_demo(point_dir, DemoSettings(lm_config=widened(hidden), lm_steps=steps, hybrid_training=False,
                                         domain=args.domain))
        print(f"== done in {time.perf_counter() - start:.0f} s", flush=True)
        points.append(measure(point_dir, hidden, steps, domain))
        # Written after every point, so a stopped grid leaves the finished points' table.
        write_json_atomically(out / "frontier.json", points)
        write_text_atomically(out / "frontier.md", report(points, domain))
        plot(points, out / "frontier.png")
    print(report(points, domain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
