"""The prompts a parity check runs (`evaluation.parity.prompt_inputs` turns them into ids): a user's
file, or by default the CRE eval set's first prompts. Any text will do for parity: the check compares
two implementations on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

from ..domains import load_domain
from ..runtime.files import user_path

# The CRE eval set's generator seed (`train data`'s defaults: train 42, eval 43).
EVAL_SEED = 43


def parity_prompts(path: str | Path | None = None, n: int = 4) -> list[str]:
    """The prompts in `path` (a JSON list of strings, or a text file with one prompt per line; ValueError
    for anything else or for none), or without it the first `n` prompts of the CRE eval set."""
    if path is None:
        return [r["input_prompt"] for r in load_domain("cre").generate(n, EVAL_SEED)]
    text = user_path(path).read_text()
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"{path}: expected a JSON list of strings or one prompt per line")
    return prompts
