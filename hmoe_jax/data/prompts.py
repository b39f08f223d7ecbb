"""Prompts as model inputs: tokenised (raw, or in the checkpoint's chat format), batched, bucketed and
left-padded.

Every stage that runs prompts through the model (precompute, evaluation, the generation baselines, the
latency benchmark, end-to-end training) batches them here:

- `tokenize`: each text's ids exactly as `tokenizer.encode(text)` gives them (the paper's raw prompts;
  precompute and training use these), or as the checkpoint's chat template renders it
  (`checkpoint.chat`); an empty encoding or an id past the model's vocabulary is refused, naming the prompt.
- `prompt_batches`: fixed-size batches, each left-padded to the next multiple of `bucket` of its longest
  prompt, so only a handful of shapes is ever compiled, and every prompt's last real token sits at the
  last position. A short final batch is filled with copies of its first prompt (a row of padding alone
  would pool over zero tokens); `PromptBatch.rows` names the real rows.
- `pad_token_id`: the one rule for the id padded positions hold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np

from ..checkpoint.chat import ChatFormat


def pad_token_id(config) -> int:
    """The config's `pad_token_id`, else 0: padded positions are masked out, so any id in the
    vocabulary gives the same results."""
    return config.pad_token_id if config.pad_token_id is not None else 0


def tokenize(tokenizer, texts: Sequence[str], vocab_size: int, *, chat: ChatFormat | None = None,
             what: str = "prompt", error: type[Exception] = ValueError) -> list[np.ndarray]:
    """Token ids of each text: raw, exactly as `tokenizer.encode(text)` gives them, or with `chat`, the
    text as one user message in the checkpoint's chat template, the assistant's turn opened. An empty
    encoding or an id past the model's vocabulary raises `error` naming `what` #i."""
    ids = chat.encode(tokenizer, texts) if chat is not None else [e.ids for e in tokenizer.encode_batch(list(texts))]
    encoded = [np.asarray(i, np.int32) for i in ids]
    for i, ids in enumerate(encoded):
        if ids.size == 0:
            raise error(f"{what} #{i} tokenizes to nothing")
        if ids.max() >= vocab_size:
            raise error(f"{what} #{i} has token id {ids.max()} >= the model's vocab_size {vocab_size}: "
                        "the tokenizer does not belong to this checkpoint")
    return encoded


def bucket_length(n_tokens: int, bucket: int) -> int:
    """Padded length of a batch whose longest prompt has `n_tokens`: the next multiple of `bucket`."""
    return bucket * math.ceil(n_tokens / bucket)


def left_pad(sequences: Sequence[np.ndarray], length: int, batch_size: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int32 [batch_size, length], each sequence's tokens at the right
    end; rows past the sequences repeat the first one."""
    rows = list(sequences) + [sequences[0]] * (batch_size - len(sequences))
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for r, t in enumerate(rows):
        ids[r, length - len(t):] = t
        mask[r, length - len(t):] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    rows: np.ndarray  # indices of the batch's real prompts (the first len(rows) rows of ids)
    input_ids: np.ndarray  # int32 [batch_size, T]
    attention_mask: np.ndarray  # int32 [batch_size, T]


def prompt_batches(tokens: Sequence[np.ndarray], batch_size: int, bucket: int, pad_id: int,
                   order: Sequence[np.ndarray] | None = None) -> Iterator[PromptBatch]:
    """The prompts `tokens` in batches of `batch_size`, each left-padded to its bucketed length. `order`:
    the row indices of each batch (`length_sorted_batches`), by default the prompts as given."""
    if order is None:
        order = [np.arange(i, min(i + batch_size, len(tokens))) for i in range(0, len(tokens), batch_size)]
    for rows in order:
        batch = [tokens[r] for r in rows]
        ids, mask = left_pad(batch, bucket_length(max(t.size for t in batch), bucket), batch_size, pad_id)
        yield PromptBatch(np.asarray(rows), ids, mask)


def length_sorted_batches(token_counts: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices of each batch: rows sorted by length (ties by row), so a batch's prompts have
    similar lengths and little padding. Deterministic: a resumed run sees the same batches."""
    order = np.lexsort((np.arange(len(token_counts)), np.asarray(token_counts)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
