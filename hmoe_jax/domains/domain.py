"""A domain: a researcher's formulas, how their answers read, and the data that exercises them.

Every stage of the pipeline that needs to know *what* is computed reads it from one `Domain` object:
the data writer (its generator), precompute (its markers' targets, its router negatives), probe training
(each argument's target scaling), the hybrid layer (its experts, in router order), end-to-end training
(its answer lines), the generation baselines (its structured prompt and answer parser) and the reports
(its sanity ranges, how its arguments are written in a prompt, its grouping columns).

A record, whatever the domain, is a JSON object with

    id                    a unique string
    input_prompt          the prompt text
    computation_markers   [{"expert": NAME, "inputs": {ARGUMENT: number}, "output": number}, ...]
    answer                (optional) the answer text
    groups                (optional) {COLUMN: label} for the report's breakdowns

and any other keys a domain's generator likes to keep (CRE keeps `property`, `financials`,
`ground_truth` and `complexity`). A metric's truth is its marker's output. A marker may also carry the
expert's router id (`expert_id`), `order` and `depends_on`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Any, Callable, Mapping, Sequence

from ..formulas import DeterministicExpert, check_router_ids, get_expert
from .scaling import SIGN_LOG, Scaling

Record = Mapping[str, Any]
OUTPUT = "output"  # a metric's own value, as a scaling key (the direct-output probe's target)

# A number as generated text writes it: "1,234.5", "-0.25", "3."
_NUMBER = r"(-?\d[\d,]*\.?\d*)"


class DomainError(ValueError):
    """A domain that cannot be used, or records that do not fit one; raised before anything runs."""


def _replacement_fields(fmt: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(fmt) if field is not None]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One expert's answer: its exact value, written, read back and scored.

    expert:        a registered deterministic expert (`formulas.deterministic_expert`)
    answer:        the answer line, one `{}` field for the value: "DSCR: {:.3f}", "LTV: {:.2f}%".
                   End-to-end training's target text, and (with the field as `<number>`) the
                   structured baseline's instruction.
    sanity_range:  (low, high), open: a value parsed from generated text outside it counts as missing
    arguments:     {argument: how it is written in a prompt}, a format string ("${:,.0f}") or a
                   function of the value; the honest protocol scores a metric only where every
                   argument appears, so written, in the prompt
    label_pattern: regex naming the metric in generated text; default: the answer line's text before
                   its field ("DSCR"), case-insensitive
    scaling:       {argument or "output": `Scaling`} for the probes' targets; sign-log where absent
    """

    expert: str
    answer: str
    sanity_range: tuple[float, float]
    arguments: Mapping[str, str | Callable[[float], str]]
    label_pattern: str | None = None
    scaling: Mapping[str, Scaling] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = f"metric {self.expert!r}"
        spec = get_expert(self.expert)  # unknown expert: ValueError naming the registered ones
        fields = _replacement_fields(self.answer) if isinstance(self.answer, str) else None
        if fields is None or len(fields) != 1 or fields[0] not in ("", "0"):
            raise DomainError(f"{where}: answer must be a string with exactly one '{{}}' field for the value, "
                              f"got {self.answer!r}")
        if not self.label.strip():
            raise DomainError(f"{where}: answer {self.answer!r} names no label before its value")
        try:
            low, high = (float(v) for v in self.sanity_range)
        except (TypeError, ValueError):
            raise DomainError(f"{where}: sanity_range must be (low, high), got {self.sanity_range!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise DomainError(f"{where}: sanity_range must be finite with low < high, got {self.sanity_range!r}")
        object.__setattr__(self, "sanity_range", (low, high))
        if not isinstance(self.arguments, Mapping) or set(self.arguments) != set(spec.arg_names):
            got = list(self.arguments) if isinstance(self.arguments, Mapping) else self.arguments
            raise DomainError(f"{where}: expert {spec.name!r} takes {spec.num_args} argument(s) "
                              f"{list(spec.arg_names)}; `arguments` says how these are written in a prompt, "
                              f"got {got!r}")
        for name, fmt in self.arguments.items():
            if not (callable(fmt) or (isinstance(fmt, str) and len(_replacement_fields(fmt)) == 1)):
                raise DomainError(f"{where}: argument {name!r} must be written by a format string with one "
                                  f"field or a function, got {fmt!r}")
        unknown = set(self.scaling) - {*spec.arg_names, OUTPUT}
        if unknown:
            raise DomainError(f"{where}: scaling given for {sorted(unknown)}, not arguments of {spec.name!r} "
                              f"{list(spec.arg_names)} or {OUTPUT!r}")
        for name, scaling in self.scaling.items():
            if not isinstance(scaling, Scaling):
                raise DomainError(f"{where}: scaling[{name!r}] must be a Scaling (sign_log() or linear()), "
                                  f"got {scaling!r}")
        try:
            self.pattern
        except re.error as err:
            raise DomainError(f"{where}: label_pattern {self.label_pattern!r} is not a regex ({err})") from None

    @property
    def spec(self) -> DeterministicExpert:
        return get_expert(self.expert)

    @property
    def label(self) -> str:
        return self.answer.split("{", 1)[0].rstrip(" :=")

    @property
    def pattern(self) -> re.Pattern:
        """The label, then up to 40 characters that are neither a digit nor a new sentence, then the
        number: the reference's way of reading a value out of free text."""
        label = self.label_pattern if self.label_pattern is not None else re.escape(self.label)
        return re.compile(f"(?:{label})" + r"[^\d\n.]{0,40}?" + _NUMBER, re.IGNORECASE)

    @property
    def template(self) -> str:
        """The answer line with `<number>` for the value: the structured baseline's instruction."""
        head, _, tail = self.answer.partition("{")
        return head + "<number>" + tail.split("}", 1)[1]

    def format_answer(self, value: float) -> str:
        return self.answer.format(value)

    def written(self, argument: str, value: float) -> str:
        """How `argument` with `value` reads in a prompt."""
        fmt = self.arguments[argument]
        return fmt(value) if callable(fmt) else fmt.format(value)

    def scaling_of(self, name: str) -> Scaling:
        """The training space of the probe for `name` (an argument, or "output")."""
        return self.scaling.get(name, SIGN_LOG)

    def parse(self, text: str) -> float:
        """The LAST in-range value written after the metric's label (a chain of thought ends with its
        answer); NaN where there is none."""
        low, high = self.sanity_range
        value = math.nan
        for match in self.pattern.finditer(text):
            try:
                v = float(match.group(1).replace(",", ""))
            except ValueError:
                continue
            if low < v < high:
                value = v
        return value


@dataclasses.dataclass(frozen=True)
class Domain:
    """Everything the pipeline needs to know about one family of formulas.

    name:      short identifier, recorded with every artifact
    metrics:   one `Metric` per expert, in router-slot order; the domain's experts are these, whatever
               an expert's `default_active` flag says
    generate:  (n, seed) -> n records (see the module docstring); `train data` writes the train split
               with `seed` and the eval split with `seed + 1`, and the demo trains its tokenizer on them
    negatives: prompts that must NOT route to any expert (the router classifier's negatives and
               end-to-end training's router term)
    groups:    {column: record -> label} for the report's breakdowns (e.g. CRE's complexity); a record's
               own `groups` object is read too
    implied_marker: (record, expert) -> marker or None: a marker for a metric the record holds no
               marker for (CRE's reference protocol scores all four metrics on every scenario, from
               its `financials`); the default is none
    write_data: (out_dir, seed, n_train, n_eval) -> (train path, eval path): a writer of the domain's
               own (CRE: the reference's byte-identical files); default: `generate` twice
    published_r2, published_within_20, published_source: published results to print beside ours
               (CRE: the PyTorch reference's probe R^2 per task and within-20% per metric)
    """

    name: str
    metrics: tuple[Metric, ...]
    generate: Callable[[int, int], list[dict[str, Any]]]
    negatives: tuple[str, ...]
    groups: Mapping[str, Callable[[Record], Any]] = dataclasses.field(default_factory=dict)
    implied_marker: Callable[[Record, str], Mapping[str, Any] | None] | None = None
    write_data: Callable[..., Any] | None = None
    description: str = ""
    published_r2: Mapping[str, str] = dataclasses.field(default_factory=dict)
    published_within_20: Mapping[str, float] = dataclasses.field(default_factory=dict)
    published_source: str = ""
    # How the domain was found (`domains.loading`): recorded in data files, stores and runs.
    origin: Mapping[str, str] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", self.name):
            raise DomainError(f"a domain name is a letter then letters, digits, '_', '.', '-', got {self.name!r}")
        where = f"domain {self.name!r}"
        if isinstance(self.metrics, (str, bytes)) or not isinstance(self.metrics, Sequence) or not self.metrics:
            raise DomainError(f"{where}: metrics must be a non-empty list of Metric, got {self.metrics!r}")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        bad = [m for m in self.metrics if not isinstance(m, Metric)]
        if bad:
            raise DomainError(f"{where}: metrics must be Metric objects, got {bad!r}")
        names = [m.expert for m in self.metrics]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DomainError(f"{where}: expert(s) {repeated} have more than one metric")
        if not callable(self.generate):
            raise DomainError(f"{where}: generate must be a function (n, seed) -> records, got {self.generate!r}")
        if (isinstance(self.negatives, (str, bytes)) or not isinstance(self.negatives, Sequence)
                or not self.negatives or not all(isinstance(p, str) and p.strip() for p in self.negatives)):
            raise DomainError(f"{where}: negatives must be a non-empty list of prompts (strings)")
        object.__setattr__(self, "negatives", tuple(self.negatives))
        if not isinstance(self.groups, Mapping) or not all(
                isinstance(k, str) and callable(f) for k, f in self.groups.items()):
            raise DomainError(f"{where}: groups must map column names to functions of a record")
        for name in ("implied_marker", "write_data"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise DomainError(f"{where}: {name} must be a function, got {value!r}")

    # ---------------------------------------------------------------- experts and metrics

    @property
    def experts(self) -> tuple[str, ...]:
        """The domain's expert names, in router-slot order."""
        return tuple(m.expert for m in self.metrics)

    def metric(self, expert: str) -> Metric:
        for m in self.metrics:
            if m.expert == expert:
                return m
        raise DomainError(f"domain {self.name!r} has no metric {expert!r}; its metrics: {list(self.experts)}")

    def check_router_ids(self, num_neural_experts: int) -> None:
        """The experts' router ids must not name one of the model's neural experts (0..E-1)."""
        try:
            check_router_ids(self.experts, num_neural_experts)
        except ValueError as err:
            raise DomainError(f"domain {self.name!r}: {err}") from None

    # ---------------------------------------------------------------- records

    def marker(self, record: Record, expert: str) -> Mapping[str, Any] | None:
        """The record's computation marker for `expert`, else the domain's implied one, else None."""
        for m in record["computation_markers"]:
            if m["expert"] == expert:
                return m
        return self.implied_marker(record, expert) if self.implied_marker is not None else None

    def truth(self, record: Record, expert: str) -> float | None:
        marker = self.marker(record, expert)
        return None if marker is None else float(marker["output"])

    def asked(self, record: Record) -> list[str]:
        """The domain's metrics a record's own markers name (what its prompt asks for), in domain order."""
        named = {m["expert"] for m in record["computation_markers"]}
        return [e for e in self.experts if e in named]

    def inputs_in_prompt(self, record: Record, expert: str) -> bool:
        """Whether every argument of the metric appears in the prompt as the domain writes it."""
        marker = self.marker(record, expert)
        if marker is None:
            return False
        metric = self.metric(expert)
        prompt = record["input_prompt"]
        return all(metric.written(a, marker["inputs"][a]) in prompt for a in metric.spec.arg_names)

    def group_labels(self, record: Record) -> dict[str, Any]:
        """The record's label in each grouping column (the domain's, then the record's own)."""
        labels = {name: fn(record) for name, fn in self.groups.items()}
        own = record.get("groups") or {}
        labels.update({k: v for k, v in own.items() if k not in labels})
        return {k: v for k, v in labels.items() if v is not None}

    def answer_text(self, record: Record) -> str:
        """The answer to a record's prompt: one answer line per metric it asks for."""
        return "\n".join(self.metric(e).format_answer(self.truth(record, e)) for e in self.asked(record))

    def structured_instruction(self) -> str:
        """What the structured baseline appends to a prompt: every metric's answer line to fill in."""
        return "Answer in exactly this format:\n" + "".join(m.template + "\n" for m in self.metrics)

    def parse_answer(self, text: str) -> dict[str, float]:
        """Each metric's value read from generated text (NaN where absent or outside its sanity range)."""
        return {m.expert: m.parse(text) for m in self.metrics}

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(self.experts)})"
