"""Generation baselines: the same frozen model answering each scenario by greedy generation.

Each eval prompt is wrapped in one of the reference's three styles (zero-shot, chain of thought,
structured), generated from with the KV-cache generator (`model.generate`), decoded, parsed with the
reference's regexes and sanity ranges (`data.scoring.parse_metrics`) and scored under both protocols.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..data import scoring
from ..data.prompts import pad_token_id, prompt_batches, tokenize
from ..model.generate import generate
from ..runtime import distributed
from ..runtime.files import user_path, write_json_atomically, write_text_atomically
from ..runtime.sharding import batch_sharding

PROMPT_STYLES: Mapping[str, str] = {
    "zeroshot": "{prompt}\n",
    "cot": "{prompt}\nLet's think step by step, showing each calculation, then state the final values.\n",
    "structured": (
        "{prompt}\nAnswer in exactly this format:\nDSCR: <number>\nLTV: <number>%\n"
        "Cap rate: <number>%\nDebt yield: <number>%\n"
    ),
}


def format_prompt(prompt: str, style: str) -> str:
    try:
        return PROMPT_STYLES[style].format(prompt=prompt)
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; choose from {sorted(PROMPT_STYLES)}") from None


def generate_answers(model, tokenizer, prompts: Sequence[str], new_tokens: int, batch_size: int, *,
                     progress: Callable[[int], None] | None = None, mesh=None) -> list[str]:
    """Greedy answers, decoded; with `mesh` (the model's), each batch is split over its data axis."""
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {batch_size} is not a multiple of the mesh's {mesh.shape['data']} data devices")
    put = (lambda x: x) if mesh is None else (lambda x: distributed.global_array(x, batch_sharding(mesh)))  # noqa: E731
    c = model.config
    pad = pad_token_id(c)
    texts = []
    for batch in prompt_batches(tokenize(tokenizer, prompts, c.vocab_size), batch_size, 32, pad):
        out = distributed.to_host(generate(model, put(batch.input_ids), put(batch.attention_mask),
                                           max_new_tokens=new_tokens,
                                           eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) else None,
                                           pad_token_id=pad))
        texts += [tokenizer.decode(row.tolist()) for row in out[:len(batch.rows)]]
        if progress is not None:
            progress(len(batch.rows))
    return texts


def score_style(scenarios: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> dict[str, Any]:
    """One style's generated answers, parsed and scored under both protocols."""
    parsed = [scoring.parse_metrics(t) for t in texts]
    preds = {m: np.array([x[m] for x in parsed]) for m in scoring.METRICS}
    return {protocol: scoring.score(scenarios, preds, protocol) for protocol in scoring.PROTOCOLS}


def run_baselines(model, tokenizer, scenarios: Sequence[Mapping[str, Any]], styles: Sequence[str], *,
                  new_tokens: int, batch_size: int, mesh=None,
                  progress: Callable[[str], Callable[[int], None] | None] | None = None) -> tuple[dict, dict]:
    """(results, generations) per style: the scores (`score_style`) with the seconds the style took,
    and every scenario's generated text. `progress(style)` gives the per-batch callback of a style."""
    results, generations = {}, {}
    for style in styles:
        prompts = [format_prompt(s["input_prompt"], style) for s in scenarios]
        start = time.perf_counter()
        texts = generate_answers(model, tokenizer, prompts, new_tokens, batch_size, mesh=mesh,
                                 progress=progress(style) if progress else None)
        results[style] = {**score_style(scenarios, texts), "seconds": time.perf_counter() - start}
        generations[style] = [{"id": s["id"], "text": t} for s, t in zip(scenarios, texts)]
    return results, generations


def report_markdown(results: Mapping[str, Any], styles: Sequence[str], n_scenarios: int, new_tokens: int) -> str:
    lines = [f"# Generation baselines ({n_scenarios} scenarios, {new_tokens} greedy tokens)", ""]
    for protocol in scoring.PROTOCOLS:
        lines += [f"## {protocol} protocol", "", "| style | metric | N | within 10% | within 20% | median % error |",
                  "|---|---|---:|---:|---:|---:|"]
        for style in styles:
            for m, s in results[style][protocol].items():
                lines.append(f"| {style} | {m} | {s['n']} | {s['within_10']:.1f} | {s['within_20']:.1f} | "
                             f"{s['median_pct_error']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: str | Path, results: Mapping[str, Any], generations: Mapping[str, Any], styles: Sequence[str],
                  n_scenarios: int, new_tokens: int) -> str:
    """baselines.json, generations.json and baselines.md in `out`; returns the markdown."""
    out = user_path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "baselines.json", results)
    write_json_atomically(out / "generations.json", generations)
    text = report_markdown(results, styles, n_scenarios, new_tokens)
    write_text_atomically(out / "baselines.md", text)
    return text
