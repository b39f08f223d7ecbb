"""End-to-end training of the hybrid layer's projection MLPs, output scales and router rows.

The reference never trained its integrated layer (spec: "a jitted, integrated hybrid layer that
really runs, trained end to end, is new ground"). Here the gpt-oss weights and the extraction probes
stay frozen; what learns is exactly what the probes cannot give: *when* to call a deterministic
expert (the new router rows, `RouterRowParam`) and *how its exact result enters the residual stream*
(the projection MLPs and their output scales, `ProjectionParam`).

Objective, per scenario (`prompt` -> its numeric answers):

    answer text   the domain's answer line of each metric the record's markers ask for (CRE:
                  "DSCR: 1.894\\nLTV: 55.48%\\nCap rate: 7.75%\\nDebt yield: 13.96%"), in the structured
                  baseline's format (so `Domain.parse_answer` reads a generated answer back)
    sequence      tokens(prompt) + tokens("\\n" + answer), left-padded, positions from the mask
    answer loss   teacher-forced next-token cross-entropy on the answer tokens only (mean per token),
                  back-propagated through every frozen block after the hybrid layer and lm_head
    router term   (optional, weight `router_weight`) binary cross-entropy on the margin
                  z_d = det_logit_d - (k-th largest neural logit) at the prompt's last token, the
                  token whose formula results are the hybrid's predictions: z_d > 0 means expert d
                  enters the top-k there. Label 1 for the experts the scenario's markers name, 0 for
                  the others and for every expert on the domain's router-negative prompts;
                  the term is the mean of the positive-prompt and negative-prompt BCEs.

Why the router term matters: at the paper's init (new rows ~ N(0, 0.01^2), bias -2) a deterministic
expert almost never beats the k-th neural logit, the top-k is discrete, so the answer loss alone
gives the router rows and the projections a zero gradient. The router term moves the rows until the
experts are selected; from then on the answer loss trains the projections through the formulas.

Training is one jitted step (functional `nnx.split` / `nnx.merge`, `jax.value_and_grad` w.r.t. the
trainable state only) with optax AdamW (global-norm clipping, cosine decay), batches bucketed by
length, a deterministic schedule (seed, epoch) and orbax checkpoints of params + optimizer state, so
a killed run resumed from its last checkpoint ends with the same parameters as an uninterrupted one.
A non-finite loss or gradient stops the run naming the step; nothing past the last good checkpoint
is written.

Run directory (`train_run`): run.json (what it trains on, refused if another run is asked into it),
checkpoints/, before.json (the untrained hybrid's evaluation), hybrid_params/ + hybrid_params.json
(`hybrid.artifacts`), loss_curve.json, loss_curve.png, summary.json, report.md.
`hybrid.artifacts.load_hybrid_params(model, run_dir)` (or `hybrid.inference.build_hybrid_model(...,
hybrid_params=run_dir)`, `python -m eval hybrid --hybrid-params`) puts the trained values into a hybrid
model.

This module holds the settings, the trainer, the run directory and `run_from_files` (what `train
hybrid` runs); `training.batches` the examples, their batches and `HybridTrainingError`,
`training.checkpoints` the checkpoints, `training.hybrid_evaluation` the before / after evaluation,
and `training.hybrid_report` loss_curve.png and report.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ..checkpoint.location import checkpoint_fingerprint, resolve_checkpoint
from ..checkpoint.tokenizer import load_tokenizer
from ..data.prompts import bucket_length, pad_token_id, prompt_batches
from ..domains import EVAL_FILE, Domain, domain_origin, load_records, resolve_domain
from ..hybrid.artifacts import TRAINABLE, hybrid_layer_of, probe_run_identity, save_hybrid_params
from ..hybrid.inference import build_hybrid_model
from ..runtime.files import claim_run_dir, user_path, write_json_atomically, write_text_atomically
from .batches import (
    Examples,
    HybridTrainingError,
    _encode,
    encode_scenarios,
    epoch_batches,
    make_batch,
    negatives_batch,
    split_negatives,
)
from .checkpoints import TrainerCheckpoints
from .hybrid_evaluation import evaluate_params
from .hybrid_report import plot_curve, report_markdown
from .objective import Objective, differentiable_backend

RUN_FILE = "run.json"
BEFORE_FILE = "before.json"
CURVE_FILE = "loss_curve.json"
CURVE_PLOT = "loss_curve.png"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class Settings:
    epochs: int = 1
    learning_rate: float = 1e-2
    weight_decay: float = 0.01
    batch_size: int = 8
    router_weight: float = 1.0
    bucket: int = 32
    seed: int = 0
    clip_norm: float = 1.0
    checkpoint_every: int = 50  # steps; every epoch end is checkpointed too

    def __post_init__(self):
        ints = ("epochs", "batch_size", "bucket", "checkpoint_every")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HybridTrainingError(f"{name} must be a positive integer, got {value!r}")
        for name in ("learning_rate", "clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise HybridTrainingError(f"{name} must be finite and > 0, got {value!r}")
        for name in ("weight_decay", "router_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise HybridTrainingError(f"{name} must be finite and >= 0, got {value!r}")


# ------------------------------------------------------------------ the trainer


def optimizer(settings: Settings) -> optax.GradientTransformation:
    """AdamW whose learning rate and weight decay live in its state (`inject_hyperparams`): the step
    sets each step's learning rate, so one compiled update (`objective.UPDATE`) serves every schedule
    and setting."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=settings.learning_rate,
                                                  weight_decay=settings.weight_decay)


def learning_rate(settings: Settings, step: int, total_steps: int) -> float:
    """Cosine decay from `learning_rate` to a tenth of it over the run, by step number alone."""
    return float(optax.cosine_decay_schedule(settings.learning_rate, max(total_steps, 1), alpha=0.1)(step))


class HybridTrainer:
    """The jitted step and evaluation programs for one hybrid model. `params` (the trainable state)
    and `opt_state` are explicit; the model's frozen state is split off once and never written."""

    def __init__(self, model, settings: Settings, total_steps: int):
        self.settings = settings
        self.layer = hybrid_layer_of(model)
        hybrid = model.layers[self.layer].mlp
        self.experts = hybrid.expert_names
        self.pad_id = pad_token_id(model.config)
        # The graph the gradient runs through takes a differentiable MoE backend; the caller's model
        # keeps its own options.
        own = model.options
        with model.using(moe_backend=differentiable_backend()):
            self.graphdef, self.initial_params, self.frozen = nnx.split(model, TRAINABLE, ...)
        self.objective = Objective(self.graphdef, self.layer, hybrid.num_neural, hybrid.top_k,
                                   settings.router_weight > 0, own.moe_backend, own.execution == "layerwise")
        self.total_steps = total_steps
        self.tx = optimizer(settings)

    def loss_and_grad(self, params, batch, negatives):
        """((loss, aux), grads w.r.t. the trainable params): the training objective."""
        return self.objective.loss_and_grad(params, self.frozen, batch, negatives, self.settings.router_weight)

    def init_state(self) -> dict[str, Any]:
        params = jax.tree.map(jnp.array, self.initial_params)  # a copy: the model's own arrays stay as they are
        # Strongly typed and committed to the device, as a step returns them and a checkpoint restores
        # them: jit's cache key includes both, so every step runs the first step's compilation.
        strong = lambda a: jnp.array(a, dtype=jnp.asarray(a).dtype)  # noqa: E731
        state = {"params": params, "opt_state": jax.tree.map(strong, self.tx.init(params))}
        # This process's own device (jax.devices()[0] is process 0's in a multi-process run).
        return jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))

    def step(self, state, batch, negatives, step: int):
        """Update number `step` (0-based); returns (new state, aux dict, finite flag)."""
        s = self.settings
        params, opt_state, aux, finite = self.objective.step(
            state["params"], state["opt_state"], self.frozen, batch, negatives, s.router_weight, s.clip_norm,
            learning_rate(s, step, self.total_steps))
        return {"params": params, "opt_state": opt_state}, aux, bool(finite)

    def model(self, params):
        """A model object holding `params` (for evaluation code that takes a model)."""
        return self.objective.forward_model(params, self.frozen)

    def answer_loss(self, params, examples: Examples) -> dict[str, float]:
        """Held-out answer-token cross-entropy (mean per token) and teacher-forced top-1 accuracy."""
        nll = correct = count = 0.0
        s = self.settings
        order = np.argsort(examples.lengths, kind="stable")
        for i in range(0, len(order), s.batch_size):
            batch = make_batch(examples, order[i:i + s.batch_size], s.batch_size, s.bucket, self.pad_id)
            aux = self.objective.answer_aux(params, self.frozen, batch)
            nll += float(aux["answer_nll_sum"])
            correct += float(aux["answer_correct"])
            count += float(aux["answer_tokens"])
        return {"answer_loss": nll / max(count, 1.0), "answer_token_accuracy": correct / max(count, 1.0),
                "answer_tokens": int(count)}

    def generate_answers(self, params, examples: Examples, tokenizer, new_tokens: int) -> list[str]:
        """Greedy continuations of each prompt, with full forwards (causal-mean extraction over the
        whole prefix, as in training; no KV cache)."""
        s = self.settings
        texts = []
        for batch in prompt_batches(examples.prompts, s.batch_size, s.bucket, self.pad_id):
            p_len = batch.input_ids.shape[1]
            room = np.zeros((s.batch_size, new_tokens), np.int32)  # where the new tokens are written
            ids = np.concatenate([batch.input_ids, room + self.pad_id], axis=1)
            mask = np.concatenate([batch.attention_mask, room], axis=1)
            out = np.asarray(self.objective.greedy(params, self.frozen, ids, mask, p_len, new_tokens))
            texts += [tokenizer.decode(out[b].tolist()) for b in range(len(batch.rows))]
        return texts


# ------------------------------------------------------------------ the run directory


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(user_path(path).read_bytes()).hexdigest()


@dataclass
class RunOutput:
    summary: dict[str, Any]
    params: Any


@dataclass
class _Data:
    """A run's tokenised inputs."""

    train: Examples
    held_out: Examples
    negatives: list[np.ndarray]  # training negatives, tokenised
    held_out_negatives: list[str]
    negatives_length: int


def _prepare_data(model, tokenizer, domain: Domain, train_scenarios, eval_scenarios, negative_prompts,
                  settings: Settings) -> _Data:
    experts, vocab = model.layers[hybrid_layer_of(model)].mlp.expert_names, model.config.vocab_size
    train = encode_scenarios(domain, tokenizer, train_scenarios, experts, vocab, "training data")
    held_out = encode_scenarios(domain, tokenizer, eval_scenarios, experts, vocab, "held-out data")
    neg_train, neg_eval = split_negatives(list(negative_prompts))
    use_router = settings.router_weight > 0
    if use_router and not neg_train:
        raise HybridTrainingError("the router term needs negative prompts; pass some or set router_weight 0")
    neg_tokens = _encode(tokenizer, neg_train, vocab, "negative prompt") if use_router else []
    neg_length = bucket_length(max(len(t) for t in neg_tokens), settings.bucket) if neg_tokens else 0
    return _Data(train, held_out, neg_tokens, neg_eval, neg_length)



def train_run(
    run_dir: str | Path,
    model,
    tokenizer,
    train_scenarios: Sequence[Mapping[str, Any]],
    eval_scenarios: Sequence[Mapping[str, Any]],
    negative_prompts: Sequence[str],
    settings: Settings,
    identity: Mapping[str, Any],
    *,
    domain: Domain,
    n_generate: int = 32,
    full_evaluation: bool = True,
    on_step: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> RunOutput:
    """Train `model`'s hybrid router rows and projections end to end (resuming from
    `run_dir/checkpoints`), evaluate before and after, write the run's outputs; see the module doc.
    `on_step(done, total, aux)` is called after every step (`done` = steps finished);
    `full_evaluation=False` evaluates the held-out answer loss only (no routing, formula or generation)."""
    run_dir = user_path(run_dir)
    layer = hybrid_layer_of(model)
    experts = model.layers[layer].mlp.expert_names
    inputs = _prepare_data(model, tokenizer, domain, train_scenarios, eval_scenarios, negative_prompts, settings)
    batches_per_epoch = len(epoch_batches(inputs.train.lengths, settings.batch_size, settings.bucket, settings.seed, 0))
    total = settings.epochs * batches_per_epoch
    record = json.loads(json.dumps({"identity": dict(identity), "settings": dataclasses.asdict(settings),
                                    "domain": domain_origin(domain), "layer": layer, "experts": list(experts),
                                    "n_train": len(inputs.train), "n_held_out": len(inputs.held_out),
                                    "n_generate": n_generate, "full_evaluation": full_evaluation}))
    claim_run_dir(run_dir, record, run_file=RUN_FILE, error=HybridTrainingError, kind="hybrid training run")

    trainer = HybridTrainer(model, settings, total)
    new_tokens = int(max(len(a) for a in inputs.held_out.answers)) + 4
    evaluate = functools.partial(evaluate_params, trainer, tokenizer=tokenizer, examples=inputs.held_out,
                                 domain=domain, scenarios=eval_scenarios, negative_prompts=inputs.held_out_negatives,
                                 n_generate=n_generate, new_tokens=new_tokens, full=full_evaluation)
    before = _evaluate_once(run_dir / BEFORE_FILE, lambda: evaluate(trainer.initial_params), log)
    state, progress = _train(trainer, inputs, settings, total, batches_per_epoch, run_dir, before, on_step, log)
    log("evaluating the trained hybrid model")
    after = evaluate(state["params"])
    save_hybrid_params(run_dir, state["params"], layer, experts, identity)
    summary = _write_outputs(run_dir, record, progress, before, after, state["params"], total, batches_per_epoch,
                             full_evaluation)
    return RunOutput(summary, state["params"])


def _evaluate_once(path: Path, evaluate: Callable[[], dict], log) -> dict[str, Any]:
    """The untrained model's evaluation, computed once per run directory (a resumed run reads it)."""
    if not path.is_file():
        log("evaluating the untrained hybrid model")
        write_json_atomically(path, evaluate())
    return json.loads(path.read_text())


def _train(trainer: HybridTrainer, inputs: _Data, settings: Settings, total: int, batches_per_epoch: int,
           run_dir: Path, before: Mapping[str, Any], on_step, log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every step from the last checkpoint on; returns the final trainer state and the progress record."""
    checkpoints = TrainerCheckpoints(run_dir)
    fresh = {"step": [], "loss": [], "answer_loss": [], "router_loss": [],
             "held_out": [{"epoch": 0, "step": 0, "answer_loss": before["answer_loss"]}]}
    step, state, progress = checkpoints.restore(trainer.init_state(), fresh)
    if step:
        log(f"resuming {run_dir} from its step-{step} checkpoint")
    if on_step is not None:
        on_step(step, total, {})
    plan: dict[int, list[np.ndarray]] = {}
    while step < total:
        epoch, index = divmod(step, batches_per_epoch)
        if epoch not in plan:
            plan = {epoch: epoch_batches(inputs.train.lengths, settings.batch_size, settings.bucket, settings.seed,
                                         epoch)}
        batch = make_batch(inputs.train, plan[epoch][index], settings.batch_size, settings.bucket, trainer.pad_id)
        negatives = (negatives_batch(inputs.negatives, step, settings.batch_size, inputs.negatives_length,
                                     settings.seed, trainer.pad_id) if settings.router_weight > 0 else None)
        new_state, aux, finite = trainer.step(state, batch, negatives, step)
        if not finite:
            kept = checkpoints.last_saved()
            raise HybridTrainingError(
                f"non-finite loss or gradient at step {step + 1} of {total} (epoch {epoch + 1}): loss "
                f"{float(aux['loss'])}; stopped without writing it (last good checkpoint: "
                f"{'none' if kept is None else f'step {kept}'}); try a lower --lr")
        state, step = new_state, step + 1
        progress["step"].append(step)
        for key in ("loss", "answer_loss", "router_loss"):
            progress[key].append(float(aux[key]) if key in aux else None)
        epoch_end = step % batches_per_epoch == 0
        if epoch_end:
            held = trainer.answer_loss(state["params"], inputs.held_out)
            progress["held_out"].append({"epoch": step // batches_per_epoch, "step": step, **held})
        if epoch_end or step % settings.checkpoint_every == 0:
            checkpoints.save(step, state, progress)
        if on_step is not None:
            on_step(step, total, aux)
    checkpoints.last_saved()
    return state, progress


def _write_outputs(run_dir: Path, record, progress, before, after, params, total: int, batches_per_epoch: int,
                   full_evaluation: bool) -> dict[str, Any]:
    """loss_curve.json and .png, summary.json and report.md."""
    curve = {k: progress[k] for k in ("step", "loss", "answer_loss", "router_loss", "held_out")}
    write_json_atomically(run_dir / CURVE_FILE, curve)
    plot_curve(curve, run_dir / CURVE_PLOT)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    summary = {**record, "steps": total, "batches_per_epoch": batches_per_epoch,
               "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(params))),
               "before": strip(before), "after": strip(after),
               "held_out_curve": progress["held_out"],
               "formula_predictions_unchanged": (_same_results(before["_formula_results"], after["_formula_results"])
                                                 if full_evaluation else None)}
    write_json_atomically(run_dir / SUMMARY_FILE, summary)
    write_text_atomically(run_dir / REPORT_FILE, report_markdown(summary))
    return summary


def _same_results(a: Mapping[str, list], b: Mapping[str, list]) -> bool:
    return set(a) == set(b) and all(
        np.array_equal(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64), equal_nan=True) for k in a)


# ------------------------------------------------------------------ from files (what `train hybrid` runs)


@dataclass(frozen=True)
class Inputs:
    """Where `train hybrid` reads from: the checkpoint, the probe run, the training and held-out
    records (`eval_path` None: eval.json beside the training data), how many of each it uses, and the
    domain as named on the command line (None: the one the data and the probe run record)."""

    model: str | Path
    probes: str | Path
    data: str | Path
    eval_path: str | Path | None = None
    n_train: int | None = None
    n_eval: int = 200
    n_generate: int = 32
    domain: str | Domain | None = None


def run_from_files(inputs: Inputs, out: str | Path, settings: Settings, *, options=None,
                   log: Callable[[str], None] = lambda msg: None) -> RunOutput:
    """Build the hybrid model from the probe run (`hybrid.inference.build_hybrid_model`), then
    `train_run` into `out` with a progress bar over steps; everything the run reads is checked first."""
    train, held_out, paths, domain = _read_inputs(inputs)
    tokenizer = load_tokenizer(paths["model"])
    model, _ = build_hybrid_model(paths["model"], paths["probes"], options=options)
    identity = {"model": str(paths["model"].resolve()), "model_fingerprint": checkpoint_fingerprint(paths["model"]),
                "probes": str(paths["probes"].resolve()), "data": str(paths["data"].resolve()),
                "data_sha256": file_sha256(paths["data"]), "n_train_limit": inputs.n_train,
                "eval": str(paths["eval"].resolve()), "eval_sha256": file_sha256(paths["eval"]),
                "n_eval": inputs.n_eval}
    bar = tqdm(unit="step", desc="hybrid training")

    def on_step(done, total, aux):
        bar.total = total
        if "loss" in aux:
            bar.set_postfix(loss=f"{float(aux['loss']):.4f}", answer=f"{float(aux['answer_loss']):.4f}")
        bar.update(done - bar.n)

    try:
        return train_run(out, model, tokenizer, train, held_out, domain.negatives, settings, identity, domain=domain,
                         n_generate=inputs.n_generate, on_step=on_step,
                         log=lambda msg: (bar.write(msg, file=sys.stderr), log(msg)))
    finally:
        bar.close()


def _read_inputs(inputs: Inputs) -> tuple[list, list, dict[str, Path], Domain]:
    for name in ("n_eval", "n_generate", "n_train"):
        value = getattr(inputs, name)
        if value is not None and value < (0 if name == "n_generate" else 1):
            raise HybridTrainingError(f"--{name.replace('_', '-')} must be positive, got {value}")
    paths = {"model": resolve_checkpoint(inputs.model), "probes": user_path(inputs.probes),
             "data": user_path(inputs.data)}
    if not paths["data"].is_file():
        raise FileNotFoundError(f"{paths['data']}: no such data file")
    paths["eval"] = (user_path(inputs.eval_path) if inputs.eval_path is not None
                     else paths["data"].parent / EVAL_FILE)
    if not paths["eval"].is_file():
        raise FileNotFoundError(f"{paths['eval']}: no held-out data file (pass --eval)")
    if not (paths["probes"] / "probes.json").is_file():
        raise FileNotFoundError(f"{paths['probes']}: no trained probes (probes.json missing; run "
                                "`python -m train probes`)")
    train, domain = load_records(paths["data"], inputs.domain)
    held_out, _ = load_records(paths["eval"], domain)
    resolve_domain(domain, probe_run_identity(paths["probes"]).get("domain"), f"probe run {paths['probes']}")
    train, held_out = train[:inputs.n_train], held_out[:inputs.n_eval]
    for records, path in ((train, paths["data"]), (held_out, paths["eval"])):
        if not records:
            raise HybridTrainingError(f"{path}: no records")
    return train, held_out, paths, domain
