"""Training a small gpt-oss language model from scratch on a domain's corpus (`python -m train lm`).

The hybrid pipeline needs a base model that has *read* the domain: a random gpt-oss knows no words,
so its residual stream carries nothing a probe could extract. This trains one, with our own Flax
`GptOssForCausalLM` (sliding and full layers, sinks, GQA, top-k MoE, YaRN: whatever the config asks)
and writes it as an HF checkpoint that `transformers` and every stage of the pipeline load.

Corpus (`lm_corpus`, `encode_corpus`): every record is one sequence, exactly as end-to-end hybrid
training and the generation baselines see a scenario,

    tokens(prompt) + tokens("\\n" + answer text) + [eos]

(prompt and answer tokenized separately and concatenated, `training.batches.encode_scenarios`); a
record that asks for none of the domain's metrics has no answer text and is its prompt alone + eos.
The loss is the next-token cross-entropy over every real token, prompt and answer (mean per token);
padding is masked out, and so is the first token of each row (its input would be padding).

Training: the model's parameters split off once (`nnx.split`), one jitted step (`jax.value_and_grad`
over all parameters, optax AdamW with global-norm clipping and a linear warmup into a cosine decay to a
tenth of the peak), batches of fixed size bucketed by padded length (`training.batches.epoch_batches`,
so a handful of shapes compiles), and a data order that is a function of (seed, epoch) alone. A run is
a number of optimizer steps; orbax checkpoints hold parameters, optimizer state and the progress
record, so a killed run resumed in the same directory ends with bit-identical parameters. A
non-finite loss or gradient stops the run naming the step; nothing past the last good checkpoint is
written.

Initialisation: the model's own (`model.layers.param`): every weight, bias and sink N(0, 0.02^2),
norms 1, the `initializer_range` init of transformers' gpt-oss. With lm_head that small the initial
logits are ~0, so the first loss is ~ln(vocab_size) (checked by the tests), and sinks near 0 give each
head's "attend to nothing" the weight of one ordinary key: nothing to correct for training from scratch.

Run directory (`out`):

    run.json          settings, domain, config and the corpus's hash; another run asked into it is refused
    tokenizer/        byte-level BPE trained on the training records' texts (`synthetic.write_tokenizer`),
                      written once, before training
    checkpoints/      orbax: parameters + optimizer state + progress
    loss_curve.json   training loss per step, held-out loss/accuracy at every checkpoint
    loss_curve.png
    report.md         steps, time, tokens/s, final training loss, held-out loss and next-token accuracy
    flax/             the trained parameters as a converted checkpoint (`checkpoint.flax_format`)
    hf/               the same, exported for transformers (`checkpoint.convert.export_hf`: safetensors,
                      config.json, tokenizer files, chat template); written last

A directory whose run.json matches and which holds hf/config.json is a finished run: `train_lm`
returns at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer

from ..checkpoint import synthetic
from ..checkpoint.convert import TOKENIZER_FILES, export_hf
from ..checkpoint.flax_format import write_flax_checkpoint
from ..checkpoint.loading import path_key
from ..data.prompts import bucket_length, left_pad, pad_token_id, tokenize
from ..domains import Domain, check_records, domain_origin, generate_records, load_domain, load_records
from ..model.config import ConfigError, GptOssConfig
from ..model.transformer import GptOssForCausalLM, default_position_ids
from ..runtime.files import (
    atomic_directory,
    claim_run_dir,
    user_path,
    write_json_atomically,
    write_text_atomically,
)
from ..runtime.options import RunOptions
from .batches import epoch_batches
from .checkpoints import TrainerCheckpoints
from .loss_plot import plot_losses
from .objective import answer_terms, differentiable_backend

RUN_FILE = "run.json"
TOKENIZER_DIR = "tokenizer"
CURVE_FILE = "loss_curve.json"
CURVE_PLOT = "loss_curve.png"
REPORT_FILE = "report.md"
FLAX_DIR = "flax"
HF_DIR = "hf"

# `train lm`'s default shape (the demo's, `evaluation.demo.DEMO_MODEL`, is it at width 64): 640 ids
# leave the byte-level tokenizer ~370 merges; every width is a multiple of 32, so the trained experts
# export as MXFP4 too.
DEFAULT_CONFIG = synthetic.tiny_config(
    vocab_size=640, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
)

# Cosine decay ends at this fraction of the peak learning rate.
FINAL_LR_FRACTION = 0.1


class LMTrainingError(ValueError):
    """Settings, a config or records a language model cannot be trained with, a run directory holding
    something else, or a non-finite loss; raised before anything (more) is written."""


def widened(hidden: int, base: dict[str, Any] = DEFAULT_CONFIG) -> dict[str, Any]:
    """`base`'s shape at another width: heads of `base`'s head_dim, the same query heads per KV head,
    expert MLPs as wide as the residual stream (as the default's 128 are): the demo's model (width 64),
    `python -m eval demo --lm-hidden`, and bench/extraction_frontier.py's grid."""
    head_dim = base["head_dim"]
    group = base["num_attention_heads"] // base["num_key_value_heads"]
    if hidden <= 0 or hidden % (head_dim * group):
        raise LMTrainingError(f"hidden size must be a positive multiple of {head_dim * group} (heads of {head_dim}, "
                              f"{group} per KV head), got {hidden}")
    heads = hidden // head_dim
    return {**base, "hidden_size": hidden, "intermediate_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": heads // group}


def config_from(shape: Mapping[str, Any]) -> dict[str, Any]:
    """`DEFAULT_CONFIG` with the model-shape keys of `shape` (e.g. {"num_hidden_layers": 6}) replaced. Its
    `layer_types` is not carried over but derived again (`synthetic.tiny_config`: sliding and full layers
    alternate), so it always matches `num_hidden_layers`. LMTrainingError for a key the config lacks."""
    unknown = sorted(set(shape) - set(DEFAULT_CONFIG))
    if unknown:
        raise LMTrainingError(f"not keys of the model config: {unknown}")
    base = {k: v for k, v in DEFAULT_CONFIG.items() if k != "layer_types"}
    return synthetic.tiny_config(**{**base, **shape})


@dataclasses.dataclass(frozen=True)
class LMSettings:
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    clip_norm: float = 1.0
    bucket: int = 32
    seed: int = 0
    checkpoint_every: int = 100
    n_held_out: int = 200  # the corpus's last records held out for the held-out loss (at most a tenth of them)

    def __post_init__(self):
        for name in ("steps", "batch_size", "bucket", "checkpoint_every", "warmup_steps", "n_held_out", "seed"):
            value = getattr(self, name)
            low = 0 if name in ("warmup_steps", "n_held_out", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LMTrainingError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.warmup_steps >= self.steps:
            raise LMTrainingError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        for name in ("learning_rate", "clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise LMTrainingError(f"{name} must be finite and > 0, got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise LMTrainingError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")


def default_warmup(steps: int) -> int:
    """The warmup of a run of `steps` steps when none is asked for: `LMSettings.warmup_steps`, at most a
    fifth of the run (a short run still spends most of it past the warmup, and `LMSettings` refuses a
    warmup as long as the run)."""
    return min(LMSettings.warmup_steps, steps // 5)


# ------------------------------------------------------------------ the corpus


def training_records(data: str | Path | None, domain: str | Domain | None, n_train: int, seed: int
                     ) -> tuple[list[dict[str, Any]], Domain]:
    """(records, domain) to train on: the data file `data` (`domains.load_records`: `domain` must be the
    one it records, if any), or without one `n_train` records from `domain`'s generator at `seed`.
    LMTrainingError for an `n_train` below 1 (only when generating)."""
    if data is not None:
        return load_records(data, domain)
    if n_train < 1:
        raise LMTrainingError(f"--n-train must be positive, got {n_train}")
    domain = load_domain(domain)
    return generate_records(domain, n_train, seed), domain


def lm_corpus(domain: Domain, records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str | None]]:
    """(prompt, answer text) of each record; the answer None where the record asks for none of the
    domain's metrics."""
    return [(r["input_prompt"], domain.answer_text(r) if domain.asked(r) else None) for r in records]


def corpus_texts(corpus: Sequence[tuple[str, str | None]]) -> list[str]:
    """What the tokenizer learns its merges from: every prompt and every answer."""
    return [p for p, _ in corpus] + [a for _, a in corpus if a is not None]


def encode_corpus(tokenizer, corpus: Sequence[tuple[str, str | None]], vocab_size: int, eos_id: int,
                  where: str = "corpus") -> list[np.ndarray]:
    """Each (prompt, answer) as one training sequence: tokens(prompt) + tokens("\\n" + answer) + [eos]."""
    prompts = tokenize(tokenizer, [p for p, _ in corpus], vocab_size, what=f"{where}: prompt", error=LMTrainingError)
    answered = [i for i, (_, a) in enumerate(corpus) if a is not None]
    answers = dict(zip(answered, tokenize(tokenizer, ["\n" + corpus[i][1] for i in answered], vocab_size,
                                          what=f"{where}: answer", error=LMTrainingError)))
    eos = np.asarray([eos_id], np.int32)
    return [np.concatenate([prompts[i], answers.get(i, eos[:0]), eos]) for i in range(len(corpus))]


def lm_batch(sequences: Sequence[np.ndarray], rows: Sequence[int], batch_size: int, bucket: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded rows (padded length: the next multiple of `bucket`), positions from the mask. A
    short batch is filled with copies of its first row at weight 0 (static shapes). `answer` marks the
    tokens whose prediction counts (`objective.answer_terms` reads it): every real token whose input,
    the token before it, is real too."""
    rows = list(rows)
    weight = np.asarray([1.0] * len(rows) + [0.0] * (batch_size - len(rows)), np.float32)
    chosen = [sequences[r] for r in rows]
    ids, mask = left_pad(chosen, bucket_length(max(len(s) for s in chosen), bucket), batch_size, pad_id)
    predicted = np.zeros(mask.shape, np.float32)
    predicted[:, 1:] = mask[:, 1:] * mask[:, :-1]
    return {"ids": ids, "mask": mask, "answer": predicted, "weight": weight}


# ------------------------------------------------------------------ the model and its training step


def training_options() -> RunOptions:
    """float32 throughout, plain experts, XLA, one program, and a MoE backend reverse mode can
    differentiate (`objective.differentiable_backend`)."""
    return RunOptions(dtype="float32", param_dtype="float32", experts="dense", moe_backend=differentiable_backend(),
                      kernels="xla", execution="program")


def model_config(config: Mapping[str, Any]) -> GptOssConfig:
    """The HF-style config dict as a `GptOssConfig`, or LMTrainingError saying what is wrong."""
    if not isinstance(config, Mapping):
        raise LMTrainingError(f"config must be a dict (a gpt-oss config.json), got {type(config).__name__}")
    try:
        parsed = GptOssConfig.from_dict(dict(config), source="config")
    except ConfigError as err:
        raise LMTrainingError(str(err)) from None
    if parsed.eos_token_id is None:
        raise LMTrainingError("config: eos_token_id is missing: every training sequence ends with it")
    return parsed


def _eos_id(config: GptOssConfig) -> int:
    eos = config.eos_token_id
    return int(eos[0] if isinstance(eos, tuple) else eos)


def _decays(path, leaf) -> bool:
    """Weight decay for the weight matrices only: not for biases (the experts' are 2-D), sinks or norms."""
    name = [k.key for k in path if isinstance(getattr(k, "key", None), str)][-1]
    return leaf.ndim >= 2 and not name.endswith("bias")


def schedule(settings: LMSettings) -> optax.Schedule:
    """The learning rate by update number: a linear warmup from 0 into a cosine decay to
    `FINAL_LR_FRACTION` of the peak at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.learning_rate, warmup_steps=settings.warmup_steps,
        decay_steps=settings.steps, end_value=settings.learning_rate * FINAL_LR_FRACTION)


def optimizer(settings: LMSettings) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (beta2 0.95, as small language models train stably with) on
    `schedule`. The schedule reads the step count the optimizer state holds, so a resumed run continues
    it exactly."""
    return _optimizer(settings.steps, settings.learning_rate, settings.warmup_steps, settings.weight_decay,
                      settings.clip_norm)


# The jitted step is keyed on the transformation: one object per optimizer setting, whatever the seed.
@functools.lru_cache(maxsize=None)
def _optimizer(steps: int, peak: float, warmup: int, weight_decay: float, clip_norm: float):
    settings = LMSettings(steps=steps, learning_rate=peak, warmup_steps=warmup)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule(settings), b1=0.9, b2=0.95, weight_decay=weight_decay,
                    mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params)),
    )


def _loss(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    mask = batch["mask"]
    logits = model.forward(batch["ids"], mask, default_position_ids(mask)).logits
    loss, aux = answer_terms(logits, batch)
    return loss, {"loss": loss, "nll_sum": aux["answer_nll_sum"], "correct": aux["answer_correct"],
                  "tokens": aux["answer_tokens"]}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef, tx, params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(graphdef, params, batch)
    finite = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        finite &= jnp.all(jnp.isfinite(g))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {**aux, "grad_norm": optax.tree.norm(grads)}, finite


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(graphdef, params, batch):
    return _loss(graphdef, params, batch)[1]


class LMTrainer:
    """The model of one config, initialised from `settings.seed`, and its jitted step and evaluation.
    The parameters and optimizer state are explicit: `init_state`, `step`."""

    def __init__(self, config: GptOssConfig, settings: LMSettings):
        self.config, self.settings = config, settings
        self.pad_id = pad_token_id(config)
        model = GptOssForCausalLM(config, training_options(), rngs=nnx.Rngs(settings.seed))
        self.graphdef, self.initial_params = nnx.split(model, nnx.Param)
        self.tx = optimizer(settings)

    def init_state(self) -> dict[str, Any]:
        # Strongly typed and on this process's device, as a step returns them and a checkpoint restores
        # them: jit's cache key includes both, so every step reuses the first step's compilation.
        strong = lambda a: jnp.array(a, dtype=jnp.asarray(a).dtype)  # noqa: E731
        params = jax.tree.map(strong, self.initial_params)
        state = {"params": params, "opt_state": jax.tree.map(strong, self.tx.init(params))}
        return jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))

    def step(self, state, batch) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """One update: (new state, aux: loss, grad_norm, token count ..., all-finite flag)."""
        params, opt_state, aux, finite = _train_step(self.graphdef, self.tx, state["params"], state["opt_state"],
                                                     batch)
        return {"params": params, "opt_state": opt_state}, aux, bool(finite)

    def held_out(self, params, sequences: Sequence[np.ndarray]) -> dict[str, float]:
        """Next-token cross-entropy (mean per predicted token) and top-1 accuracy on `sequences`."""
        s = self.settings
        nll = correct = count = 0.0
        order = np.argsort([len(x) for x in sequences], kind="stable")
        for i in range(0, len(order), s.batch_size):
            aux = _evaluate(self.graphdef, params, lm_batch(sequences, order[i:i + s.batch_size], s.batch_size,
                                                            s.bucket, self.pad_id))
            nll += float(aux["nll_sum"])
            correct += float(aux["correct"])
            count += float(aux["tokens"])
        return {"loss": nll / max(count, 1.0), "accuracy": correct / max(count, 1.0), "tokens": int(count)}


# ------------------------------------------------------------------ the run


def _records_sha256(records: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()


def _claim_with_tokenizer(out: Path, record: Mapping[str, Any], texts: list[str], config: Mapping[str, Any]) -> Path:
    """Claim `out` for the run `record` describes (`files.claim_run_dir`), with its tokenizer in it:
    trained on `texts` once, for a new run first beside `out`, so that a config which cannot hold a
    byte-level BPE is refused before the run directory exists."""
    directory = out / TOKENIZER_DIR
    claim = functools.partial(claim_run_dir, out, record, run_file=RUN_FILE, error=LMTrainingError,
                              kind="language model training run")
    if (directory / "tokenizer.json").is_file():
        claim()
        return directory
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tokenizer-", dir=out.parent))
    try:
        try:
            synthetic.write_tokenizer(staged, texts, dict(config))
        except ValueError as err:  # the vocabulary or the special ids cannot hold a byte-level BPE
            raise LMTrainingError(f"config: {err}") from None
        claim()
        os.rename(staged, directory)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return directory


def train_lm(out: str | Path, config: Mapping[str, Any], records: Sequence[Mapping[str, Any]], domain: Domain,
             settings: LMSettings, *, progress: bool = True, log: Callable[[str], None] = print,
             on_step: Callable[[int, int, dict], None] | None = None) -> Path:
    """Train a gpt-oss of `config` (an HF-style config dict, e.g. `DEFAULT_CONFIG`) from scratch on
    `domain`'s `records` into the run directory `out` (resuming it, or returning at once when it is
    finished); returns `out/hf`, the trained HF checkpoint. See the module doc.

    The last `settings.n_held_out` records, at most a tenth of them, are held out. `on_step(done, total,
    aux)` is called after every step (`done` = steps finished; once with `aux` empty before the first);
    `progress`: a tqdm bar."""
    out = user_path(out)
    parsed = model_config(config)
    records = check_records(list(records), "records")
    n_held_out = min(settings.n_held_out, len(records) // 10)
    if not records:
        raise LMTrainingError("no records to train on")
    record = json.loads(json.dumps({"settings": dataclasses.asdict(settings), "domain": domain_origin(domain),
                                    "config": dict(config), "n_records": len(records),
                                    "records_sha256": _records_sha256(records)}))
    n_train = len(records) - n_held_out
    corpus = lm_corpus(domain, records)
    tokenizer_dir = _claim_with_tokenizer(out, record, corpus_texts(corpus[:n_train]), config)
    if (out / HF_DIR / "config.json").is_file():
        log(f"{out / HF_DIR}: already trained")
        return out / HF_DIR

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # no checkpoint around it yet
    sequences = encode_corpus(tokenizer, corpus, parsed.vocab_size, _eos_id(parsed))
    train, held_out = sequences[:n_train], sequences[n_train:]

    trainer = LMTrainer(parsed, settings)
    state, progress_record = _train(trainer, train, held_out, out, progress, on_step, log)
    params = state["params"]
    curve = {k: progress_record[k] for k in ("step", "loss", "learning_rate", "held_out", "seconds", "tokens")}
    write_json_atomically(out / CURVE_FILE, curve)
    plot_curve(curve, out / CURVE_PLOT)
    write_text_atomically(out / REPORT_FILE, report_markdown(record, progress_record, parsed, params, n_train,
                                                              len(held_out), domain))
    log(f"writing {out / FLAX_DIR} and {out / HF_DIR}")
    write_trained_checkpoint(out / FLAX_DIR, parsed, params, out / TOKENIZER_DIR, source=out)
    export_hf(out / FLAX_DIR, out / HF_DIR, overwrite=True)
    return out / HF_DIR


def _train(trainer: LMTrainer, train: list[np.ndarray], held_out: list[np.ndarray], out: Path, show: bool,
           on_step, log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every step from the last checkpoint on; returns the final state and the progress record."""
    from tqdm import tqdm

    s = trainer.settings
    lengths = np.asarray([len(x) for x in train])
    batches_per_epoch = len(epoch_batches(lengths, s.batch_size, s.bucket, s.seed, 0))
    checkpoints = TrainerCheckpoints(out)
    step, state, progress = checkpoints.restore(trainer.init_state(), None)
    if step:
        log(f"resuming {out} from its step-{step} checkpoint")
    else:
        held = trainer.held_out(state["params"], held_out) if held_out else None
        progress = {"step": [], "loss": [], "learning_rate": [], "tokens": 0, "seconds": 0.0,
                    "steady_tokens": 0, "steady_seconds": 0.0,
                    "held_out": [{"step": 0, **held}] if held else []}
    if on_step is not None:
        on_step(step, s.steps, {})
    bar = tqdm(total=s.steps, initial=step, unit="step", desc="lm training", disable=not show, file=sys.stderr)
    plan: dict[int, list[np.ndarray]] = {}
    compiled: set[tuple[int, ...]] = set()  # a step of a shape new to this session compiles: not throughput
    try:
        while step < s.steps:
            epoch, index = divmod(step, batches_per_epoch)
            if epoch not in plan:
                plan = {epoch: epoch_batches(lengths, s.batch_size, s.bucket, s.seed, epoch)}
            batch = lm_batch(train, plan[epoch][index], s.batch_size, s.bucket, trainer.pad_id)
            started = time.perf_counter()
            new_state, aux, finite = trainer.step(state, batch)
            if not finite:
                kept = checkpoints.last_saved()
                raise LMTrainingError(
                    f"non-finite loss or gradient at step {step + 1} of {s.steps} (epoch {epoch + 1}): loss "
                    f"{float(aux['loss'])}; stopped without writing it (last good checkpoint: "
                    f"{'none' if kept is None else f'step {kept}'}); try a lower learning rate")
            state = new_state
            tokens = int(aux["tokens"])
            elapsed = time.perf_counter() - started
            progress["step"].append(step + 1)
            progress["loss"].append(float(aux["loss"]))
            progress["learning_rate"].append(float(schedule(s)(step)))
            progress["tokens"] += tokens
            progress["seconds"] += elapsed
            if batch["ids"].shape not in compiled:
                compiled.add(batch["ids"].shape)
            else:
                progress["steady_tokens"] += tokens
                progress["steady_seconds"] += elapsed
            step += 1
            if step % s.checkpoint_every == 0 or step == s.steps:
                if held_out:
                    progress["held_out"].append({"step": step, **trainer.held_out(state["params"], held_out)})
                checkpoints.save(step, state, progress)
            bar.set_postfix(loss=f"{float(aux['loss']):.4f}", tok_s=f"{_throughput(progress):,.0f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, s.steps, aux)
    finally:
        bar.close()
        # Saves run in the background: let the last one land even when the run is stopped (Ctrl-C, an
        # on_step that raises), so a rerun resumes from it and not from the one before.
        checkpoints.last_saved()
    return state, progress


# ------------------------------------------------------------------ the trained checkpoint


def write_trained_checkpoint(dst: Path, config: GptOssConfig, params, tokenizer_dir: Path, source: Path) -> None:
    """`params` (the model's `nnx.Param` state, float32, plain experts) as a converted Flax checkpoint
    in `dst` (replaced, all or nothing), with the tokenizer files beside them, as `python -m convert`
    would have written it from an HF checkpoint of these values."""
    meta = {**config.to_dict(), "kind": "gpt_oss", "experts": "dense", "param_dtype": "float32",
            "trained_by": {"command": "python -m train lm", "run": str(user_path(source).resolve())}}
    with atomic_directory(dst, True, tokenizer_dir) as tmp:
        write_flax_checkpoint(tmp, meta, ((path_key(p), np.asarray(v[...], np.float32))
                                          for p, v in nnx.to_flat_state(params)))
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)


# ------------------------------------------------------------------ report


def plot_curve(curve: Mapping[str, Any], path: Path) -> None:
    held = curve["held_out"]
    plot_losses(path, curve["step"], {"next-token loss (train batch)": curve["loss"]},
                [h["step"] for h in held], [h["loss"] for h in held], "next-token loss (held out)",
                title="language model training from scratch", unit="nats/token")


def report_markdown(record: Mapping[str, Any], progress: Mapping[str, Any], config: GptOssConfig, params,
                    n_train: int, n_held_out: int, domain: Domain) -> str:
    s = record["settings"]
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    losses = progress["loss"]
    tail = losses[-min(len(losses), 20):]
    seconds = progress["seconds"]
    lines = [
        "# Language model trained from scratch", "",
        f"gpt-oss, {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_local_experts} "
        f"experts (top {config.num_experts_per_tok}), vocabulary {config.vocab_size}: {n_params:,} parameters. "
        f"Corpus: {n_train} {domain.name} records (prompt + answer + eos each); {n_held_out} held out.", "",
        f"{len(losses)} steps of batch {s['batch_size']}, AdamW lr {s['learning_rate']} (warmup "
        f"{s['warmup_steps']}, cosine to {FINAL_LR_FRACTION:g}x), weight decay {s['weight_decay']}, clip "
        f"{s['clip_norm']}, seed {s['seed']}.", "",
        "| measure | value |", "|---|---:|",
        f"| training time (the steps, compilation included) | {seconds:.0f} s |",
        f"| tokens trained on (real tokens, padding excluded) | {progress['tokens']:,} |",
        f"| throughput (compilation excluded) | {_throughput(progress):,.0f} tokens/s |",
        f"| training loss, first step | {losses[0]:.4f} |",
        f"| training loss, mean of the last {len(tail)} steps | {np.mean(tail):.4f} |",
    ]
    held = progress["held_out"]
    if held:
        first, last = held[0], held[-1]
        lines += [
            f"| held-out next-token loss, step {first['step']} / {last['step']} | {first['loss']:.4f} / "
            f"{last['loss']:.4f} |",
            f"| held-out next-token accuracy, step {first['step']} / {last['step']} | {100 * first['accuracy']:.1f}% / "
            f"{100 * last['accuracy']:.1f}% |",
        ]
    lines += ["", f"ln(vocab_size) = {math.log(config.vocab_size):.4f}: the loss of a uniform guess.", ""]
    return "\n".join(lines) + "\n"


def _throughput(progress: Mapping[str, Any]) -> float:
    """Real tokens per second of the steps that did not compile (the first of each batch shape in a session)."""
    return progress["steady_tokens"] / max(progress["steady_seconds"], 1e-9)
