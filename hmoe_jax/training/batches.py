"""The training examples and their batches: records tokenised into prompt and answer ids with a router
label per expert (`Examples`, `encode_scenarios`), and batches bucketed by padded length in an order
fixed by (seed, epoch) alone, which end-to-end hybrid training and `training.lm` share.

`HybridTrainingError` is defined here, where encoding first raises it, so that `training.hybrid`
(which raises it everywhere else) can import this module without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.prompts import bucket_length, left_pad, tokenize
from ..domains import Domain
from ..hybrid.artifacts import ArtifactError


class HybridTrainingError(ArtifactError):
    """Inputs end-to-end training cannot use, a run directory holding something else, or a
    non-finite loss; raised before anything (more) is written."""


# ------------------------------------------------------------------ examples


@dataclass
class Examples:
    """Tokenised scenarios: prompt and answer ids, and per configured expert a 0/1 router label."""

    ids: list[str]
    prompts: list[np.ndarray]
    answers: list[np.ndarray]
    labels: np.ndarray  # [N, D]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(p) + len(a) for p, a in zip(self.prompts, self.answers)])


def _encode(tokenizer, texts: Sequence[str], vocab_size: int, what: str) -> list[np.ndarray]:
    return tokenize(tokenizer, texts, vocab_size, what=what, error=HybridTrainingError)


def encode_scenarios(domain: Domain, tokenizer, scenarios: Sequence[Mapping[str, Any]], experts: Sequence[str],
                     vocab_size: int, where: str = "data") -> Examples:
    """Records that ask for at least one of the domain's metrics, tokenised (prompt raw, as the probes
    read it; the domain's answer text after a newline)."""
    kept = [s for s in scenarios if domain.asked(s)]
    if not kept:
        raise HybridTrainingError(f"{where}: no record asks for any of {list(domain.experts)}: nothing to train on")
    prompts = _encode(tokenizer, [s["input_prompt"] for s in kept], vocab_size, f"{where}: prompt")
    answers = _encode(tokenizer, ["\n" + domain.answer_text(s) for s in kept], vocab_size, f"{where}: answer")
    labels = np.asarray([[float(e in domain.asked(s)) for e in experts] for s in kept], np.float32)
    return Examples([s["id"] for s in kept], prompts, answers, labels)


def split_negatives(prompts: Sequence[str], every: int = 5) -> tuple[list[str], list[str]]:
    """(train, held out): every `every`-th negative prompt is held out."""
    return ([p for i, p in enumerate(prompts) if i % every], [p for i, p in enumerate(prompts) if not i % every])


# ------------------------------------------------------------------ batches


def epoch_batches(lengths: np.ndarray, batch_size: int, bucket: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each batch of an epoch: rows grouped by padded length (so a batch pads to its
    bucket, one compiled program per bucket), shuffled within a bucket and across batches by
    (seed, epoch) alone. The batch count does not depend on the epoch."""
    rng = np.random.default_rng([seed, epoch])
    padded = np.asarray([bucket_length(int(n), bucket) for n in lengths])
    batches = []
    for length in np.unique(padded):
        rows = rng.permutation(np.flatnonzero(padded == length))
        batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(examples: Examples, rows: np.ndarray, batch_size: int, bucket: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded [prompt | answer] rows. A short batch is filled with copies of its first row at
    weight 0 (static shapes). `answer` marks the answer tokens, `prompt_last` each prompt's last index."""
    rows = list(rows)
    weight = np.asarray([1.0] * len(rows) + [0.0] * (batch_size - len(rows)), np.float32)
    rows += [rows[0]] * (batch_size - len(rows))
    length = bucket_length(int(max(examples.lengths[rows])), bucket)
    ids, mask = left_pad([np.concatenate([examples.prompts[r], examples.answers[r]]) for r in rows], length,
                         batch_size, pad_id)
    answer = np.zeros((batch_size, length), np.float32)
    prompt_last = np.zeros(batch_size, np.int32)
    for b, r in enumerate(rows):
        n_answer = len(examples.answers[r])
        answer[b, length - n_answer:] = 1.0
        prompt_last[b] = length - n_answer - 1
    return {"ids": ids, "mask": mask, "answer": answer, "prompt_last": prompt_last,
            "labels": examples.labels[rows], "weight": weight}


def negatives_batch(negatives: list[np.ndarray], step: int, batch_size: int, length: int, seed: int,
                    pad_id: int) -> dict[str, np.ndarray]:
    """The step's negative prompts (a seeded cycle through them), left-padded to `length`."""
    order = np.random.default_rng([seed, 1]).permutation(len(negatives))
    rows = [order[(step * batch_size + i) % len(negatives)] for i in range(batch_size)]
    ids, mask = left_pad([negatives[r] for r in rows], length, batch_size, pad_id)
    return {"ids": ids, "mask": mask}
