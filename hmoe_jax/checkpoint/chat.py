"""The checkpoint's chat format: gpt-oss is a chat model trained on OpenAI's harmony format.

- `ChatFormat.of(checkpoint)` reads the checkpoint's own chat template, offline, where `transformers`
  reads it: `chat_template.jinja`, `chat_template.json`, or `tokenizer_config.json`'s `chat_template`.
- `render` turns a user prompt into the conversation the model was trained on, with the assistant's turn
  opened; it renders the template with the Jinja settings and globals of `transformers`'
  `apply_chat_template` (a sandboxed environment with `trim_blocks` and `lstrip_blocks`, loop controls,
  `tojson`, `raise_exception`, `strftime_now`). The ids equal `apply_chat_template`'s on the same
  tokenizer (tested on a harmony-style template of our own; gpt-oss's own template was not available
  offline to test against).
- `stop_ids`: the template's end-of-turn tokens (`<|return|>`, `<|call|>` for gpt-oss) and the model's
  end-of-sequence ids.
- `final_answer` reads what harmony shows a user: the final channel (`<|channel|>final<|message|>...`) of
  the generated ids; the analysis channel is the model's reasoning, not its answer.

No `openai-harmony` and no network: the template ships with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .location import CheckpointError, locate_checkpoint, resolve_checkpoint
from .tokenizer import tokenizer_file

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON = "chat_template.json"  # the older place: {"chat_template": "..."}
TOKENIZER_CONFIG = "tokenizer_config.json"
# harmony's end-of-turn tokens: <|return|> ends the final answer, <|call|> a tool call.
END_OF_TURN = ("<|return|>", "<|call|>")
# What ends a channel's message: the end of a message, of the turn, or a tool call.
MESSAGE_ENDS = ("<|end|>", *END_OF_TURN)
CHANNEL, MESSAGE, START = "<|channel|>", "<|message|>", "<|start|>"
FINAL = "final"  # the channel harmony shows a user; `analysis` is the model's reasoning


@dataclasses.dataclass(frozen=True)
class FinalAnswer:
    text: str  # the final channel's message ("" when there is none)
    has_final_channel: bool
    terminated: bool  # the message ended with an end token, not with the generation


def final_answer(ids: Sequence[int], tokenizer) -> FinalAnswer:
    """The final channel's message in generated token ids (the last final channel, if the model opened
    several). Read on ids, not on decoded text: a channel header is `<|channel|>NAME<|message|>` whatever
    NAME tokenizes to and however the tokenizer's decoder spaces it (`NAME` may carry a recipient or
    `<|constrain|>` after a space: its first word is the channel). A header is cut short by any other
    structure token, and a message ends at `<|end|>`, `<|return|>` or `<|call|>` (terminated) or at a
    malformed `<|start|>` / `<|channel|>` (not terminated), so no other message leaks into the answer."""
    ids = [int(i) for i in ids]
    special = {name: tokenizer.token_to_id(name) for name in (CHANNEL, MESSAGE, START, *MESSAGE_ENDS)}
    ends = {special[name] for name in MESSAGE_ENDS} - {None}
    breaks = ends | {special[START], special[CHANNEL]} - {None}
    answer = FinalAnswer("", False, False)
    if special[CHANNEL] is None or special[MESSAGE] is None:
        return answer
    for i, token in enumerate(ids):
        if token != special[CHANNEL]:
            continue
        header_end = next((j for j in range(i + 1, len(ids)) if ids[j] == special[MESSAGE] or ids[j] in breaks),
                          None)
        if header_end is None or ids[header_end] != special[MESSAGE]:
            continue
        name = tokenizer.decode(ids[i + 1:header_end], skip_special_tokens=False).split()
        if name[:1] != [FINAL]:
            continue
        body = header_end + 1
        end = next((j for j in range(body, len(ids)) if ids[j] in breaks), None)
        message = ids[body:end]
        answer = FinalAnswer(tokenizer.decode(message, skip_special_tokens=False).strip(), True,
                             end is not None and ids[end] in ends)
    return answer


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    template: str
    source: Path  # where the template was read
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the tokenizer config names them
    # The template's keyword arguments, as `apply_chat_template`'s (gpt-oss's reads `reasoning_effort`:
    # low, medium or high).
    variables: dict[str, object] = dataclasses.field(default_factory=dict)

    def with_variables(self, **variables) -> ChatFormat:
        return dataclasses.replace(self, variables={**self.variables, **variables})

    @classmethod
    def of(cls, checkpoint: str | Path) -> ChatFormat:
        """The checkpoint's chat template, looked for where `transformers` looks (`chat_template.jinja`,
        then `chat_template.json`, then `tokenizer_config.json`'s "chat_template"), beside the checkpoint
        and beside its tokenizer; CheckpointError naming the files looked in when it has none."""
        checkpoint = resolve_checkpoint(checkpoint)
        location = locate_checkpoint(checkpoint)
        folders = list(dict.fromkeys([checkpoint, location.path, tokenizer_file(checkpoint).parent]))
        configs = {f: _json(f / TOKENIZER_CONFIG) for f in folders}
        specials = {}
        for config in configs.values():
            if config:
                specials = {k: _token(v) for k, v in config.items() if k.endswith("_token") and _token(v)}
                break
        for folder in folders:
            if (folder / TEMPLATE_FILE).is_file():
                return cls((folder / TEMPLATE_FILE).read_text(), folder / TEMPLATE_FILE, specials)
            template = (_json(folder / TEMPLATE_JSON) or {}).get("chat_template")
            if isinstance(template, str):
                return cls(template, folder / TEMPLATE_JSON, specials)
            template = (configs[folder] or {}).get("chat_template")
            if isinstance(template, str):
                return cls(template, folder / TOKENIZER_CONFIG, specials)
        looked = ", ".join(str(f / name) for f in folders for name in (TEMPLATE_FILE, TEMPLATE_JSON, TOKENIZER_CONFIG))
        raise CheckpointError(f"{checkpoint}: no chat template (looked for {TEMPLATE_FILE}, {TEMPLATE_JSON} and a "
                              f"'chat_template' in {TOKENIZER_CONFIG}: {looked}); use --prompt-format raw")

    def render(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as the conversation of one user message, the assistant's turn opened
        (`add_generation_prompt`)."""
        template = self._compiled()
        try:
            return [template.render(messages=[{"role": "user", "content": p}], tools=None, documents=None,
                                    add_generation_prompt=True, **{**self.special_tokens, **self.variables})
                    for p in prompts]
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception, or a Jinja error in it
            raise CheckpointError(f"{self.source}: the chat template failed to render: {type(e).__name__}: {e}") \
                from None

    def encode(self, tokenizer, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each rendered prompt: special tokens as the template writes them, none added."""
        return [e.ids for e in tokenizer.encode_batch(self.render(prompts), add_special_tokens=False)]

    def stop_ids(self, tokenizer, eos_token_id=None) -> tuple[int, ...]:
        """The end-of-turn tokens' ids in this tokenizer, with the model's `eos_token_id` (one id or
        several; gpt-oss's generation config also ends on <|endoftext|>); CheckpointError when the
        tokenizer has none of harmony's."""
        ids = [i for i in (tokenizer.token_to_id(t) for t in END_OF_TURN) if i is not None]
        if not ids:
            raise CheckpointError(f"{self.source}: the tokenizer has none of harmony's end-of-turn tokens "
                                  f"{END_OF_TURN}: a chat format this project does not read")
        extra = [] if eos_token_id is None else [int(i) for i in np.atleast_1d(eos_token_id)]
        return tuple(dict.fromkeys(ids + extra))

    def _compiled(self):
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def strftime_now(format):
            return datetime.datetime.now().strftime(format)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: \
            json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        return env.from_string(self.template)


def _json(path: Path) -> dict | None:
    """A JSON object file's content; None when missing; CheckpointError when unreadable."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else None


def _token(value) -> str | None:
    """A special token as the tokenizer config writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
