"""Generation baselines: the same frozen model answering each scenario by greedy generation.

Each eval prompt is wrapped in one of the reference's three styles (zero-shot, chain of thought,
structured) and reaches the model in one or both prompt formats:
- `raw`: the text as it is, what the reference fed the model and the paper's table compares against;
- `chat`: the text as a user message in the checkpoint's own chat template (gpt-oss is a chat model
  trained on harmony), generation stopping at the end of the assistant's turn, and only the final
  channel's text scored (`checkpoint.chat`).
Answers come from the KV-cache generator (`model.generate`), are read back by the domain (each metric's
label pattern and sanity range, `Domain.parse_answer`, the reference's way) and scored under both
protocols. The structured style asks for the domain's own answer lines.

`run_and_write_baselines` is `eval baselines` from files: the output directory checked, the prompt
formats the checkpoint allows settled (`prompt_formats_for`), the model loaded, `run_baselines`, and
`write_results`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..checkpoint.chat import ChatFormat, final_answer
from ..checkpoint.loading import from_pretrained
from ..checkpoint.location import CheckpointError, resolve_checkpoint
from ..checkpoint.tokenizer import load_tokenizer
from ..data import scoring
from ..data.prompts import pad_token_id, prompt_batches, tokenize
from ..domains import Domain, load_records
from ..model.generate import generate
from ..runtime import distributed
from ..runtime.files import user_path, write_json_atomically, write_text_atomically
from ..runtime.options import RunOptions
from ..runtime.sharding import batch_sharding

PROMPT_FORMATS = ("raw", "chat")
# The reference's styles; "structured" appends the domain's answer lines (`Domain.structured_instruction`;
# for CRE "Answer in exactly this format:\nDSCR: <number>\nLTV: <number>%\n...").
PROMPT_STYLES: Mapping[str, str] = {
    "zeroshot": "{prompt}\n",
    "cot": "{prompt}\nLet's think step by step, showing each calculation, then state the final values.\n",
    "structured": "{prompt}\n{instruction}",
}


def format_prompt(prompt: str, style: str, domain: Domain) -> str:
    try:
        template = PROMPT_STYLES[style]
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; choose from {sorted(PROMPT_STYLES)}") from None
    return template.format(prompt=prompt, instruction=domain.structured_instruction())


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str  # what is scored: the decoded generation (raw), or its final channel's message (chat)
    completion: str | None = None  # chat: the whole generation, special tokens kept
    final_channel: bool | None = None  # chat: whether the model reached its final channel
    terminated: bool | None = None  # chat: whether that message ended before the token budget

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def generate_answers(model, tokenizer, prompts: Sequence[str], new_tokens: int, batch_size: int, *,
                     chat: ChatFormat | None = None, progress: Callable[[int], None] | None = None,
                     mesh=None) -> list[Answer]:
    """Greedy answers to raw prompts, or with `chat` to prompts in its chat format (stopping at its
    end-of-turn tokens, the final channel read out); with `mesh` (the model's), each batch is split over
    its data axis."""
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {batch_size} is not a multiple of the mesh's {mesh.shape['data']} data devices")
    put = (lambda x: x) if mesh is None else (lambda x: distributed.global_array(x, batch_sharding(mesh)))  # noqa: E731
    c = model.config
    pad = pad_token_id(c)
    stop = chat.stop_ids(tokenizer, c.eos_token_id) if chat is not None else c.eos_token_id
    answers = []
    for batch in prompt_batches(tokenize(tokenizer, prompts, c.vocab_size, chat=chat), batch_size, 32, pad):
        out = distributed.to_host(generate(model, put(batch.input_ids), put(batch.attention_mask),
                                           max_new_tokens=new_tokens, eos_token_id=stop, pad_token_id=pad))
        for row in out[:len(batch.rows)]:
            answers.append(read_answer(row.tolist(), tokenizer, chat, stop))
        if progress is not None:
            progress(len(batch.rows))
    return answers


def read_answer(ids: list[int], tokenizer, chat: ChatFormat | None, stop) -> Answer:
    """One generated row as an `Answer`: decoded (raw), or cut after its first stop token and its final
    channel read out (chat)."""
    if chat is None:
        return Answer(tokenizer.decode(ids))
    # What follows the end of the turn is padding.
    end = next((i + 1 for i, token in enumerate(ids) if token in stop), len(ids))
    final = final_answer(ids[:end], tokenizer)
    return Answer(final.text, tokenizer.decode(ids[:end], skip_special_tokens=False), final.has_final_channel,
                  final.terminated)


def score_style(domain: Domain, scenarios: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> dict[str, Any]:
    """One style's generated answers, parsed and scored under both protocols."""
    parsed = [domain.parse_answer(t) for t in texts]
    preds = {m: np.array([x[m] for x in parsed]) for m in domain.experts}
    return {protocol: scoring.score(domain, scenarios, preds, protocol) for protocol in scoring.PROTOCOLS}


def _check_formats(formats: Sequence[str]) -> list[str]:
    """`formats` without repeats, each one of PROMPT_FORMATS (ValueError otherwise)."""
    formats = list(dict.fromkeys(formats))
    unknown = set(formats) - set(PROMPT_FORMATS)
    if unknown:
        raise ValueError(f"unknown prompt format(s) {sorted(unknown)}; choose from {PROMPT_FORMATS}")
    return formats


def prompt_formats_for(checkpoint: str | Path, tokenizer, requested: Sequence[str] | None = None, *,
                       reasoning_effort: str = "low", note: Callable[[str], None] | None = None
                       ) -> tuple[list[str], ChatFormat | None]:
    """(formats, chat): the prompt formats a baselines run on `checkpoint` uses, and the chat format the
    chat one needs (None without it), its template variable `reasoning_effort` set.

    `requested` as asked for; None, the default: both where the checkpoint has a chat template this
    project can read (found, its end-of-turn tokens in `tokenizer`, a prompt rendered), else raw only,
    `note("raw prompts only: <why>")` told. A chat format asked for that the checkpoint cannot give raises
    its `CheckpointError` (a ValueError), which names the files it looked for."""
    formats = _check_formats(requested or PROMPT_FORMATS)
    if "chat" not in formats:
        return formats, None
    try:
        chat = ChatFormat.of(checkpoint).with_variables(reasoning_effort=reasoning_effort)
        chat.stop_ids(tokenizer)
        chat.render(["a prompt"])
    except CheckpointError as e:
        if requested is not None:  # asked for: an error
            raise
        if note is not None:
            note(f"raw prompts only: {e}")
        return ["raw"], None
    return formats, chat


def run_baselines(model, tokenizer, domain: Domain, scenarios: Sequence[Mapping[str, Any]], styles: Sequence[str], *,
                  new_tokens: int, batch_size: int, formats: Sequence[str] = ("raw",), chat: ChatFormat | None = None,
                  mesh=None, progress: Callable[[str], Callable[[int], None] | None] | None = None
                  ) -> tuple[dict, dict]:
    """(results, generations)[format][style]: the scores (`score_style`) with the seconds the style took
    (and in chat format the share of answers that reached the final channel), and every scenario's
    answer. `progress("FORMAT/STYLE")` gives the per-batch callback of one style in one format."""
    formats = _check_formats(formats)
    if not scenarios:
        raise ValueError("no scenarios to generate answers for")
    if "chat" in formats:
        if chat is None:
            raise ValueError("the chat prompt format needs the checkpoint's ChatFormat (checkpoint.chat.ChatFormat.of)")
        chat.stop_ids(tokenizer)  # a template this project cannot read fails now, not after the raw runs
        chat.render([scenarios[0]["input_prompt"]])
    results: dict[str, dict] = {f: {} for f in formats}
    generations: dict[str, dict] = {f: {} for f in formats}
    for prompt_format in formats:
        for style in styles:
            prompts = [format_prompt(s["input_prompt"], style, domain) for s in scenarios]
            start = time.perf_counter()
            answers = generate_answers(model, tokenizer, prompts, new_tokens, batch_size, mesh=mesh,
                                       chat=chat if prompt_format == "chat" else None,
                                       progress=progress(f"{prompt_format}/{style}") if progress else None)
            result = {**score_style(domain, scenarios, [a.text for a in answers]),
                      "seconds": time.perf_counter() - start}
            if prompt_format == "chat":
                result["final_channel_share"] = float(np.mean([a.final_channel for a in answers]))
            results[prompt_format][style] = result
            generations[prompt_format][style] = [{"id": s["id"], **a.to_dict()} for s, a in zip(scenarios, answers)]
    return results, generations


def report_markdown(results: Mapping[str, Any], styles: Sequence[str], n_scenarios: int, new_tokens: int) -> str:
    """The formats side by side: one column group per prompt format."""
    formats = list(results)
    lines = [f"# Generation baselines ({n_scenarios} scenarios, {new_tokens} greedy tokens; prompt formats: "
             f"{', '.join(formats)})", ""]
    if "chat" in results:
        lines += ["Chat format: each prompt a user message in the checkpoint's chat template; only the final "
                  "channel is scored. Answers that reached the final channel: "
                  + ", ".join(f"{style} {100 * results['chat'][style]['final_channel_share']:.0f}%"
                              for style in styles) + ".", ""]
    columns = [(what, f) for what in ("within 10%", "within 20%", "median % error") for f in formats]
    keys = {"within 10%": "within_10", "within 20%": "within_20", "median % error": "median_pct_error"}
    for protocol in scoring.PROTOCOLS:
        lines += [f"## {protocol} protocol", "",
                  "| style | metric | N | " + " | ".join(f"{what} ({f})" for what, f in columns) + " |",
                  "|---|---|---:|" + "---:|" * len(columns)]
        for style in styles:
            for m, s in results[formats[0]][style][protocol].items():
                cells = [f"{results[f][style][protocol][m][keys[what]]:.1f}" for what, f in columns]
                lines.append(f"| {style} | {m} | {s['n']} | " + " | ".join(cells) + " |")
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


@dataclasses.dataclass(frozen=True)
class BaselinesRun:
    """What `run_and_write_baselines` ran and wrote."""
    results: dict  # [format][style]: as `run_baselines` gives them
    generations: dict  # [format][style]: every scenario's answer
    formats: list[str]  # the prompt formats run (`prompt_formats_for`)
    n_scenarios: int
    report: str  # baselines.md's markdown


def run_and_write_baselines(checkpoint: str | Path, data: str | Path, out: str | Path, *,
                            revision: str | None = None, styles: Sequence[str] = tuple(PROMPT_STYLES),
                            formats: Sequence[str] | None = None, reasoning_effort: str = "low",
                            n: int | None = None, new_tokens: int = 256, batch_size: int = 8, mesh=None,
                            options: RunOptions | None = None, domain: str | Domain | None = None,
                            overwrite: bool = False,
                            progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
                            note: Callable[[str], None] | None = None) -> BaselinesRun:
    """`eval baselines`: the first `n` records of `data` (all with None) answered in each of `styles` and
    prompt `formats` (`prompt_formats_for`: None, both where the checkpoint allows chat, `note` told
    otherwise) by `checkpoint` (a path, or a hub id at `revision`), scored (`run_baselines`) and written
    to `out` (`write_results`, by process 0; every process computes the same results).
    `progress("FORMAT/STYLE", prompts)` gives the per-batch callback of one style in one format.

    Before anything loads: a non-empty `out` is refused (FileExistsError) unless `overwrite`, and a chat
    format asked for that the checkpoint cannot give raises its `CheckpointError`; nothing is written
    then."""
    out = user_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    checkpoint = resolve_checkpoint(checkpoint, revision)
    tokenizer = load_tokenizer(checkpoint)
    formats, chat = prompt_formats_for(checkpoint, tokenizer, formats, reasoning_effort=reasoning_effort, note=note)
    scenarios, domain = load_records(data, domain)
    scenarios = scenarios[:n]
    model = from_pretrained(checkpoint, options, mesh=mesh)
    results, generations = run_baselines(model, tokenizer, domain, scenarios, styles, new_tokens=new_tokens,
                                         batch_size=batch_size, formats=formats, chat=chat, mesh=mesh,
                                         progress=None if progress is None else
                                         lambda label: progress(label, len(scenarios)))
    if distributed.is_coordinator():
        report = write_results(out, results, generations, styles, len(scenarios), new_tokens)
    else:
        report = report_markdown(results, styles, len(scenarios), new_tokens)
    return BaselinesRun(results, generations, formats, len(scenarios), report)
