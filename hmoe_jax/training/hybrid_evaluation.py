"""What the hybrid model achieves with given trainable params on held-out data, before and after
end-to-end training (`evaluate_params`): answer-token loss, routing, exact-formula and generated answers.

`trainer` is a `training.hybrid.HybridTrainer`; it is left unannotated so that `training.hybrid` can
import this module without an import cycle.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..data import scoring
from ..domains import Domain
from ..hybrid.inference import hybrid_predictions
from .batches import Examples


def evaluate_params(trainer, params, tokenizer, examples: Examples, domain: Domain,
                    scenarios: Sequence[Mapping[str, Any]], negative_prompts: Sequence[str], *,
                    n_generate: int = 0, new_tokens: int = 64, full: bool = True) -> dict[str, Any]:
    """What the hybrid model with `params` achieves on held-out data (`full=False`: the answer loss only).

    - answer_loss / answer_token_accuracy: teacher-forced, on the answer tokens;
    - routing at each prompt's last token (`hybrid.inference.hybrid_predictions`): per expert, the share
      of the domain's prompts that ask for it routed to it, of those that do not, and of held-out negatives;
    - formula: the exact-formula predictions scored within 20% (they read the frozen probes, so
      training cannot change them: reported to show it does not);
    - generated: greedy answers of the first `n_generate` scenarios, parsed as the generation
      baselines are (`Domain.parse_answer`), scored within 20% (honest protocol) and parse rate.
    """
    by_id = {s["id"]: s for s in scenarios}
    kept = [by_id[i] for i in examples.ids]
    out: dict[str, Any] = trainer.answer_loss(params, examples)
    if not full:
        return out
    model = trainer.model(params)
    predict = functools.partial(hybrid_predictions, model, trainer.layer, tokenizer,
                                batch_size=trainer.settings.batch_size)
    pred = predict([s["input_prompt"] for s in kept])
    routing = {}
    for d, expert in enumerate(trainer.experts):
        sel, lab = np.asarray(pred["selected"][expert], bool), examples.labels[:, d] > 0.5
        routing[expert] = {"asked": float(sel[lab].mean()) if lab.any() else math.nan,
                           "not_asked": float(sel[~lab].mean()) if (~lab).any() else math.nan}
    if negative_prompts:
        neg = predict(list(negative_prompts))["selected"]
        for expert in trainer.experts:
            routing[expert]["negatives"] = float(np.asarray(neg[expert]).mean())
    out["routing"] = routing
    formula = {m: pred["results"][m] for m in domain.experts if m in pred["results"]}
    out["formula_within_20"] = {p: {m: v["within_20"] for m, v in scoring.score(domain, kept, formula, p).items()}
                                for p in scoring.PROTOCOLS}
    out["_formula_results"] = {m: np.asarray(v).tolist() for m, v in formula.items()}
    if n_generate > 0:
        out["generated"] = _generated_answers(trainer, params, tokenizer, examples, domain, kept, n_generate,
                                              new_tokens)
    return out


def _generated_answers(trainer, params, tokenizer, examples: Examples, domain: Domain, kept, n_generate: int,
                       new_tokens: int) -> dict[str, Any]:
    n = min(n_generate, len(examples))
    sub = Examples(examples.ids[:n], examples.prompts[:n], examples.answers[:n], examples.labels[:n])
    texts = trainer.generate_answers(params, sub, tokenizer, new_tokens)
    parsed = [domain.parse_answer(t) for t in texts]
    preds = {m: np.asarray([p[m] for p in parsed]) for m in domain.experts}
    scores = scoring.score(domain, kept[:n], preds, "honest")
    asked = {m: [m in domain.asked(s) for s in kept[:n]] for m in domain.experts}
    truth = {m: scoring.truths(domain, kept[:n], m) for m in domain.experts}
    within_1 = {}
    for m in domain.experts:
        rows = [i for i, a in enumerate(asked[m]) if a]
        # A parse failure counts as a miss: the share is of every record that asks for m.
        errors = scoring.percent_errors(preds[m][rows], truth[m][rows])
        within_1[m] = float(100 * np.mean(errors <= 1.0)) if rows else math.nan
    return {
        "n": n,
        "within_20_honest": {m: v["within_20"] for m, v in scores.items()},
        "within_1_parsed": within_1,
        "parsed_rate": {m: float(np.mean([not math.isnan(p[m]) for p, a in zip(parsed, asked[m]) if a]))
                        if any(asked[m]) else math.nan for m in domain.experts},
        "examples": [{"id": examples.ids[i], "target": domain.answer_text(kept[i]), "generated": texts[i]}
                     for i in range(min(3, n))],
    }
