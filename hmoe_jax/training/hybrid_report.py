"""What an end-to-end hybrid training run reports from its summary: report.md (markdown) and the loss
curves (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from .loss_plot import plot_losses


def plot_curve(curve: Mapping[str, Any], path: Path) -> None:
    held = curve["held_out"]
    plot_losses(path, curve["step"], {"total (train)": curve["loss"], "answer tokens (train)": curve["answer_loss"],
                                      "router BCE (train)": curve["router_loss"]},
                [h["step"] for h in held], [h["answer_loss"] for h in held], "answer tokens (held out)",
                title="end-to-end hybrid training")


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, fmt="{:.1f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def report_markdown(summary: Mapping[str, Any]) -> str:
    b, a, s = summary["before"], summary["after"], summary["settings"]
    lines = [
        "# End-to-end hybrid training", "",
        f"Model `{summary['identity'].get('model')}`, probes `{summary['identity'].get('probes')}`, hybrid layer "
        f"{summary['layer']}, experts {', '.join(summary['experts'])}. Trained: router rows and projection MLPs + "
        f"output scales ({summary['trainable_parameters']:,} parameters); frozen: gpt-oss and the extraction probes. "
        f"{summary['n_train']} training records, {s['epochs']} epoch(s), {summary['steps']} steps of batch "
        f"{s['batch_size']}, AdamW lr {s['learning_rate']} (cosine), router weight {s['router_weight']}. Held out: "
        f"{summary['n_held_out']} records.", "",
        "| held-out measure | before | after |", "|---|---:|---:|",
        f"| answer-token cross-entropy (nats/token) | {b['answer_loss']:.4f} | {a['answer_loss']:.4f} |",
        f"| answer-token top-1 accuracy (teacher forced) | {_pct(b['answer_token_accuracy'])} | "
        f"{_pct(a['answer_token_accuracy'])} |",
    ]
    for expert in summary["experts"] if "routing" in a else ():
        rb, ra = b["routing"][expert], a["routing"][expert]
        lines.append(f"| routed to {expert} at the last prompt token: prompts asking for it / not / negatives | "
                     f"{_pct(rb['asked'])} / {_pct(rb['not_asked'])} / {_pct(rb.get('negatives'))} | "
                     f"{_pct(ra['asked'])} / {_pct(ra['not_asked'])} / {_pct(ra.get('negatives'))} |")
    for m in summary["experts"] if "formula_within_20" in a else ():
        fb, fa = b["formula_within_20"]["honest"].get(m), a["formula_within_20"]["honest"].get(m)
        if fb is not None:
            lines.append(f"| {m}: exact-formula prediction within 20% (honest) | {_num(fb)} | {_num(fa)} |")
    if "generated" in a:
        gb, ga = b["generated"], a["generated"]
        for m in summary["experts"]:
            lines.append(f"| {m}: generated answer within 20% (honest, first {ga['n']}) / parsed | "
                         f"{_num(gb['within_20_honest'].get(m))} / {_pct(gb['parsed_rate'][m])} | "
                         f"{_num(ga['within_20_honest'].get(m))} / {_pct(ga['parsed_rate'][m])} |")
        for m in summary["experts"] if "within_1_parsed" in ga else ():
            lines.append(f"| {m}: generated answer parsed and within 1% of the exact value | "
                         f"{_num(gb.get('within_1_parsed', {}).get(m))} | {_num(ga['within_1_parsed'].get(m))} |")
    lines.append("")
    if summary["formula_predictions_unchanged"] is not None:
        lines += ["The exact-formula predictions read the frozen probes, so training leaves them "
                  + ("unchanged (checked: identical)." if summary["formula_predictions_unchanged"] else
                     "CHANGED, which should not happen: check the run."), ""]
    if "generated" in a:
        lines += ["Greedy answers (first held-out scenarios):", ""]
        for before_ex, after_ex in zip(b["generated"]["examples"], a["generated"]["examples"]):
            lines += [f"- `{after_ex['id']}` target `{after_ex['target']!r}`",
                      f"  - before: `{before_ex['generated'][:120]!r}`",
                      f"  - after: `{after_ex['generated'][:120]!r}`"]
        lines.append("")
    held = summary.get("held_out_curve")
    if held:
        lines.append("Held-out answer loss per epoch: " + ", ".join(f"{h['answer_loss']:.4f}" for h in held))
    return "\n".join(lines) + "\n"
