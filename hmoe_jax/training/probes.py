"""The paper's probe protocol, trained as one jitted program over the whole ensemble.

Protocol (the paper's): for each task (an argument of an expert, or an expert's output read
directly), take only the scenarios whose markers contain the expert; split them into K folds by a
permutation seeded 42 (the last fold takes the remainder); for every fold and seed train the probe
MLP on scaled targets (sign-log unless the domain scales an argument otherwise:
`domains.scaling`) with Huber(1), AdamW(1e-3, weight decay 0.01) and a cosine schedule stepped
per epoch, in shuffled minibatches of 64 with dropout.

Every (task, fold, seed) is one member of an ensemble. Members are stacked on a leading axis and the
training step is `vmap`ped over it, so the whole protocol is one program: `lax.fori_loop` over
epochs, `lax.scan` over minibatches. Members of unequal size run the same number of steps; a member
whose data ran out in an epoch skips the step (params and optimizer state unchanged), so each member
sees exactly the minibatches a `DataLoader(shuffle=True, batch_size=64)` would give it. The ensemble
axis is sharded over the mesh's `data` axis and each member's minibatch over its `tensor` axis
(`sharding.LOGICAL_AXIS_RULES`).

Selection is honest: a slice of each fold's training scenarios is held out as validation, the seed
is chosen there and R^2 is reported on the held-out fold. The reference's rule (keep the seed that
scores best on the very fold it reports) is reported beside it, labelled optimistic.

Two extractors read a layer of the store: "mean", the paper's probe MLP on a pooled vector (the
prompt's mean, or its last token), and "attention" (`hybrid.attention`), the same MLP on each
argument's learned-query attention pooling of the store's token states (`TokenStates`). Both run the
same protocol on the same tasks, folds and seeds, so their scores compare directly; `compare_extractors`
trains both and writes one table of them. `train_probes` runs whichever `StoreChoice.extractor` names
("mean", "attention" or "both"), as `python -m train probes --extractor` does.

Over several processes (`runtime.distributed`) the ensemble axis spans every host's devices; every
process holds the features in full, gathers scores and the selected probes back, and takes part in
every orbax save and restore (orbax writes each array shard once, JSON on process 0); process 0
alone writes `run.json`, `probes.json` and `results.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..checkpoint.location import checkpoint_fingerprint
from ..data.features import TOKENS, FeatureStore, StoreError
from ..domains import Domain, Scaling, domain_origin, resolve_domain
from ..hybrid import attention
from ..hybrid.artifacts import DIRECT, extractor_record, save_probes
from ..hybrid.probe import PROBE_DROPOUT, PROBE_HIDDEN, probe_apply, probe_init
from ..runtime import distributed
from ..runtime.files import claim_run_dir, user_path, write_json_atomically, write_text_atomically
from ..runtime.sharding import make_mesh, partition_spec
from . import probe_report

# The reference's router classifier: Linear(d,128) SiLU Dropout(0.1) Linear(128,32) SiLU Linear(32,1).
ROUTER_HIDDEN = (128, 32)
ROUTER_DROPOUT = (0.1, 0.0)
ROUTER_TASK = ("router", "asks_for_a_metric")

EXTRACTORS = ("mean", "attention")
COMPARISON_FILE = "extractors.md"
SCORES_FILE = "r2.md"  # a probe run's score table
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
# Rows per chunk when predicting: bounds the gathered [members, rows, d] block to ~100 MB at d=2880.
_PREDICT_CHUNK = 64


class ProbeTrainingError(ValueError):
    """Inputs the protocol cannot train on (non-finite features, an empty fold, a mismatched run);
    raised before anything is written."""


@dataclass(frozen=True)
class Protocol:
    """Training settings. The defaults are the paper's; `validation_fraction` is ours (the share of
    each fold's training scenarios held out to choose the seed)."""

    folds: int = 5
    seeds: int = 3
    epochs: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    huber_delta: float = 1.0
    fold_seed: int = 42
    validation_fraction: float = 0.1
    loss: str = "huber"
    hidden: tuple[int, int] = PROBE_HIDDEN
    dropout: tuple[float, float] = PROBE_DROPOUT
    # Ours (False: the reference's loop): each member trains on standardized inputs and targets (its own
    # training rows' mean and std), folded into its saved weights (`standardized`). Sign-log targets sit
    # near 15 with a spread near 1, and a Huber-loss MLP started at 0 spends its epochs walking its bias
    # there: on the demo LM's features, 20 epochs gave R^2 0.85 raw and 0.96 standardized.
    standardize: bool = True

    def __post_init__(self):
        if self.loss not in ("huber", "bce"):
            raise ProbeTrainingError(f"loss must be 'huber' or 'bce', got {self.loss!r}")
        if self.folds < 2 or self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ProbeTrainingError(f"need folds >= 2 and seeds, epochs, batch size >= 1: {self}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ProbeTrainingError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")


def router_protocol(**overrides: Any) -> Protocol:
    """The router classifier's protocol: the probe protocol with its smaller MLP and a logistic loss."""
    return Protocol(**{"loss": "bce", "hidden": ROUTER_HIDDEN, "dropout": ROUTER_DROPOUT, **overrides})


@dataclass(frozen=True)
class Task:
    """One probe to train: `rows` of the feature matrix it learns from and their `targets`, already
    in training space (`scaling`'s values for regression, 0/1 labels for classification, whose
    scaling is None)."""

    key: tuple[str, str]
    rows: np.ndarray
    targets: np.ndarray
    scaling: Scaling | None = None

    @property
    def name(self) -> str:
        return "/".join(self.key)


# ----------------------------------------------------------------------------------------------------
# Tasks and splits


def probe_tasks(store: FeatureStore, domain: Domain, experts: Sequence[str] | None = None,
                direct: bool = True) -> list[Task]:
    """Argument probes of `experts` (default: the domain's; arguments in registry order), then their
    direct-output probes, each on its target's scaling (`Metric.scaling_of`). Each task keeps only the
    records whose markers contain its expert."""
    if store.metadata["kind"] != "scenarios":
        raise ProbeTrainingError(f"{store.path}: holds {store.metadata['kind']}, not scenarios with targets")
    experts = domain.experts if experts is None else tuple(experts)
    targets = store.metadata["targets"]
    unknown = [e for e in experts if e not in targets]
    if unknown:
        raise ProbeTrainingError(f"{store.path}: no targets for expert(s) {unknown}; its experts: {list(targets)}")
    keys = ([(e, a) for e in experts for a in domain.metric(e).spec.arg_names]
            + ([(e, DIRECT) for e in experts] if direct else []))
    tasks = []
    for expert, name in keys:
        column = targets[expert][name]
        rows = np.asarray([i for i, v in enumerate(column) if v is not None], np.int64)
        if rows.size == 0:
            raise ProbeTrainingError(f"{store.path}: no record has a computation marker for {expert!r}: "
                                     f"nothing to train its probes on")
        values = np.asarray([column[i] for i in rows], np.float64)
        if not np.isfinite(values).all():
            bad = [store.scenario_ids[r] for r in rows[~np.isfinite(values)]][:5]
            raise ProbeTrainingError(f"non-finite {expert}/{name} targets for {bad}")
        scaling = domain.metric(expert).scaling_of(name)
        tasks.append(Task((expert, name), rows, np.asarray(scaling.encode(values), np.float32), scaling))
    return tasks


def router_task(positives: FeatureStore, negatives: FeatureStore, layer: int,
                pooling: str = "mean") -> tuple[np.ndarray, list[str], Task]:
    """The router classifier's data: (features, ids, task) with the domain's prompts labelled 1 and its
    negatives 0. Both stores must hold features of the same model."""
    if positives.metadata["kind"] != "scenarios" or negatives.metadata["kind"] != "router_negatives":
        raise ProbeTrainingError(f"router training needs a scenario store and a router-negatives store, got "
                                 f"{positives.metadata['kind']} and {negatives.metadata['kind']}")
    if positives.metadata["model_fingerprint"] != negatives.metadata["model_fingerprint"]:
        raise ProbeTrainingError(
            f"{positives.path} and {negatives.path} hold features of different models "
            f"({positives.metadata['model_fingerprint']} vs {negatives.metadata['model_fingerprint']})")
    features = np.concatenate([positives.features(layer, pooling), negatives.features(layer, pooling)])
    ids = positives.scenario_ids + negatives.scenario_ids
    labels = np.concatenate([np.ones(len(positives.scenario_ids)), np.zeros(len(negatives.scenario_ids))])
    return features, ids, Task(ROUTER_TASK, np.arange(len(ids)), labels.astype(np.float32))


def fold_test_positions(n: int, folds: int, fold_seed: int) -> list[np.ndarray]:
    """Positions (into a task's rows) of each fold's held-out scenarios: a permutation seeded
    `fold_seed` (as `np.random.seed(42); np.random.permutation(n)`), cut into `folds` equal parts,
    the last taking the remainder."""
    permutation = np.random.RandomState(fold_seed).permutation(n)
    size = n // folds
    return [permutation[k * size:(k + 1) * size if k < folds - 1 else n] for k in range(folds)]


def split_task(task: Task, protocol: Protocol) -> list[dict[str, np.ndarray]]:
    """For each fold, positions of its inner-train, validation and test scenarios (disjoint, covering
    the task). Validation is a seeded slice of the fold's training part."""
    n = len(task.rows)
    if n // protocol.folds == 0:
        raise ProbeTrainingError(f"task {task.name}: {n} scenarios cannot fill {protocol.folds} folds (an empty fold)")
    splits = []
    for k, test in enumerate(fold_test_positions(n, protocol.folds, protocol.fold_seed)):
        rest = np.setdiff1d(np.arange(n), test)
        shuffled = np.random.RandomState(protocol.fold_seed + 1 + k).permutation(rest)
        n_val = max(1, round(protocol.validation_fraction * len(rest)))
        if n_val >= len(rest):
            raise ProbeTrainingError(f"task {task.name}, fold {k}: {len(rest)} training scenarios leave none "
                                     "after the validation split")
        splits.append({"train": np.sort(shuffled[n_val:]), "validation": np.sort(shuffled[:n_val]),
                       "test": np.sort(test)})
    return splits


@dataclass(frozen=True)
class TokenStates:
    """The attention extractor's input: one layer's token states of a store (`FeatureStore.token_states`),
    float32 [prompts, max_tokens, hidden], left-aligned and zero past each prompt's `counts`."""

    states: np.ndarray
    counts: np.ndarray


def extractor_of(features: np.ndarray | TokenStates) -> str:
    """Which extractor a run's inputs feed: token states the attention extractor, pooled vectors the mean one."""
    return "attention" if isinstance(features, TokenStates) else "mean"


def check_features(features: np.ndarray | TokenStates, ids: Sequence[str], rows: np.ndarray) -> None:
    """Refuse NaN or infinite features in the rows a run uses, naming the scenarios."""
    if isinstance(features, TokenStates):
        finite = np.asarray([np.isfinite(features.states[r]).all() for r in rows])
    else:
        finite = np.isfinite(features[rows]).all(axis=1)
    if not finite.all():
        bad = [ids[r] for r in rows[~finite]]
        raise ProbeTrainingError(f"non-finite features for {len(bad)} scenarios, e.g. {bad[:5]}; recompute the store")


# ----------------------------------------------------------------------------------------------------
# The ensemble


@dataclass(frozen=True)
class Member:
    task: int
    fold: int
    seed: int


@dataclass
class Ensemble:
    """Per-member index arrays (numpy, members first), padded to the longest member.

    `members` lists the real members; the arrays may hold extra copies of member 0 at the end, so
    the member count divides the devices it is sharded over. Rows index the feature matrix."""

    members: list[Member]
    train_rows: np.ndarray
    train_targets: np.ndarray
    train_count: np.ndarray
    eval_rows: dict[str, np.ndarray]
    eval_targets: dict[str, np.ndarray]
    eval_count: dict[str, np.ndarray]
    seeds: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train_count)


def _pad_rows(lists: list[np.ndarray], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(x) for x in lists)
    width = multiple * math.ceil(width / multiple)
    out = np.zeros((len(lists), width), lists[0].dtype)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out, np.asarray([len(x) for x in lists], np.int32)


def build_ensemble(tasks: Sequence[Task], protocol: Protocol, member_multiple: int = 1,
                   folds: Sequence[int] | None = None) -> Ensemble:
    """Members ordered task-major, then fold, then seed; `folds` restricts training to some folds
    (the benchmark's reduced protocol), the splits staying those of the full K-fold protocol."""
    members, train, train_y, evals, eval_y = [], [], [], {"validation": [], "test": []}, {"validation": [], "test": []}
    folds = range(protocol.folds) if folds is None else folds
    for t, task in enumerate(tasks):
        splits = split_task(task, protocol)
        for k in folds:
            split = splits[k]
            for seed in range(protocol.seeds):
                members.append(Member(t, k, seed))
                train.append(task.rows[split["train"]])
                train_y.append(task.targets[split["train"]])
                for part in ("validation", "test"):
                    evals[part].append(task.rows[split[part]])
                    eval_y[part].append(task.targets[split[part]])
    padding = (-len(members)) % member_multiple
    for lists in (train, train_y, *evals.values(), *eval_y.values()):
        lists.extend([lists[0]] * padding)
    train_rows, train_count = _pad_rows(train)
    eval_rows, eval_count, eval_targets = {}, {}, {}
    for part in evals:
        eval_rows[part], eval_count[part] = _pad_rows(evals[part], _PREDICT_CHUNK)
        eval_targets[part] = _pad_rows(eval_y[part], _PREDICT_CHUNK)[0]
    seeds = np.asarray([m.seed for m in members] + [members[0].seed] * padding, np.uint32)
    return Ensemble(members, train_rows.astype(np.int32), _pad_rows(train_y)[0], train_count,
                    {p: r.astype(np.int32) for p, r in eval_rows.items()}, eval_targets, eval_count, seeds)


def _loss_fn(kind: str, delta: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if kind == "huber":
        return lambda pred, y: optax.huber_loss(pred, y, delta=delta)
    return optax.sigmoid_binary_cross_entropy


def standardized(params: dict[str, jax.Array], stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The probe in raw units that computes what `params` computes on standardized units: with
    x' = (x - x_mean) / x_std and y = y_mean + y_std * f(x'), the first layer takes w1 / x_std and
    b1 - (x_mean / x_std) @ w1, the last w3 * y_std and b3 * y_std + y_mean. Exact (both ends are
    linear), so the saved probes are plain probes on raw hidden states. An attention extractor's query
    reads normed keys and is left as it is: its pooled state is what the first layer standardizes."""
    w1 = params["w1"] / stats["x_std"][:, None]
    b1 = params["b1"] - jnp.dot(stats["x_mean"] / stats["x_std"], params["w1"], precision=jax.lax.Precision.HIGHEST)
    return {**params, "w1": w1, "b1": b1, "w3": params["w3"] * stats["y_std"],
            "b3": params["b3"] * stats["y_std"] + stats["y_mean"]}


def member_statistics(pooled: np.ndarray, ensemble: Ensemble, regression: bool) -> dict[str, np.ndarray]:
    """Per member, the mean and std of its own training rows' pooled features [M, H] and targets [M]
    (classification: targets untouched, mean 0 and std 1). A feature (or target) that does not vary
    keeps std 1 rather than dividing by ~0."""
    stats = {k: [] for k in ("x_mean", "x_std", "y_mean", "y_std")}
    for rows, targets, count in zip(ensemble.train_rows, ensemble.train_targets, ensemble.train_count):
        x = np.asarray(pooled[rows[:count]], np.float64)
        y = np.asarray(targets[:count], np.float64)
        x_std, y_std = x.std(0), y.std() if regression else 1.0
        stats["x_mean"].append(x.mean(0))
        stats["x_std"].append(np.where(x_std > 1e-6 * max(float(np.max(x_std)), 1e-30), x_std, 1.0))
        stats["y_mean"].append(y.mean() if regression else 0.0)
        stats["y_std"].append(y_std if y_std > 0 else 1.0)
    return {k: np.asarray(v, np.float32) for k, v in stats.items()}


class EnsembleTrainer:
    """Compiles and runs the ensemble's training and prediction programs on `mesh`; `features` [prompts,
    hidden] train the mean extractor, `TokenStates` the attention extractor."""

    def __init__(self, features: np.ndarray | TokenStates, ensemble: Ensemble, protocol: Protocol, mesh: Mesh):
        self.protocol = protocol
        self.ensemble = ensemble
        self.mesh = mesh
        self.extractor = extractor_of(features)
        if self.extractor == "attention":
            self.input_dim = features.states.shape[2]
            inputs = {"states": np.asarray(features.states, np.float32),
                      "counts": np.asarray(features.counts, np.int32)}
            # What a zero query pools (states are zero past each count): the scale the first layer sees.
            pooled = inputs["states"].sum(1) / np.maximum(inputs["counts"], 1)[:, None]
        else:
            self.input_dim = features.shape[1]
            inputs = {"x": np.asarray(features, np.float32)}
            pooled = inputs["x"]
        self.steps_per_epoch = math.ceil(ensemble.train_rows.shape[1] / protocol.batch_size)
        # Minibatches that every member has in every epoch.
        self.common_steps = int(np.min(np.ceil(ensemble.train_count / protocol.batch_size)))
        self.optimizer = optax.inject_hyperparams(optax.adamw)(
            learning_rate=protocol.learning_rate, weight_decay=protocol.weight_decay)
        members = self.sharding(("ensemble",))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.features = {name: distributed.global_array(a, replicated) for name, a in inputs.items()}

        def put(a):
            return distributed.global_array(a, self.sharding(("ensemble",) + (None,) * (a.ndim - 1), a.shape))

        self.train_rows, self.train_targets, self.train_count = map(
            put, (ensemble.train_rows, ensemble.train_targets, ensemble.train_count))
        self.statistics = ({k: put(v) for k, v in member_statistics(pooled, ensemble, protocol.loss == "huber").items()}
                           if protocol.standardize else None)
        # Keys are made on the devices (a key array cannot be placed across processes from the host).
        self.keys = jax.jit(jax.vmap(jax.random.key), out_shardings=members)(put(ensemble.seeds))
        self._train = jax.jit(self._train_epochs, donate_argnums=(0,))
        self._predict = jax.jit(self._predict_rows)

    @staticmethod
    def raw_params(params, stats):
        """One member's trained parameters as a probe on raw features (`standardized`; as they are
        without standardization)."""
        return params if stats is None else standardized(params, stats)

    def saved_params(self, params):
        """Every member's parameters as probes on raw features: what is saved and what the hybrid layer runs."""
        return params if self.statistics is None else jax.jit(jax.vmap(standardized))(params, self.statistics)

    def apply(self, params, inputs: dict[str, jax.Array], dropout_key=None) -> jax.Array:
        """One member's outputs [rows] on its gathered inputs ({"x"} or {"states", "counts"})."""
        dropout = self.protocol.dropout
        if self.extractor == "attention":
            states = inputs["states"]
            mask = attention.token_mask(inputs["counts"], states.shape[-2])
            return attention.attention_probe_apply(params, states, mask, dropout_key, dropout)[..., 0]
        return probe_apply(params, inputs["x"], dropout_key, dropout)[..., 0]

    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> NamedSharding:
        shape = shape if shape is not None else (self.ensemble.size,) + (1,) * (len(axes) - 1)
        return NamedSharding(self.mesh, partition_spec(axes, shape, self.mesh))

    def state_shardings(self, state):
        """Every leaf with a leading member axis is split over the ensemble axis; scalars replicate."""
        return jax.tree.map(lambda x: self.sharding(("ensemble",) + (None,) * (x.ndim - 1)) if x.ndim else
                            NamedSharding(self.mesh, PartitionSpec()), state)

    def init_state(self) -> dict[str, Any]:
        """Params drawn from each member's seed alone (the reference seeds torch before building each
        probe, so a seed gives the same initial probe in every fold), AdamW state, an empty loss curve."""
        p = self.protocol

        def init(key):
            params = probe_init(jax.random.fold_in(key, 0), self.input_dim, p.hidden)
            if self.extractor == "attention":
                # The same MLP as the mean extractor's member of this seed, and a zero query: at step 0
                # the two extractors compute the same function (`hybrid.attention`).
                params[attention.QUERY] = attention.query_init(self.input_dim)
            return params, self.optimizer.init(params)

        def init_all(keys):
            params, opt_state = jax.vmap(init)(keys)
            return {"params": params, "opt_state": opt_state,
                    "train_loss": jnp.full((self.ensemble.size, p.epochs), jnp.nan, jnp.float32)}

        # Made in place on the devices: also over several processes, where no host holds the whole state.
        shardings = self.state_shardings(jax.eval_shape(init_all, self.keys))
        return jax.jit(init_all, out_shardings=shardings)(self.keys)

    def abstract_state(self) -> Any:
        """Shapes, dtypes and shardings of `init_state()`, for restoring a checkpoint in place."""
        shapes = jax.eval_shape(self.init_state)
        shardings = self.state_shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def train(self, state: dict[str, Any], start_epoch: int, stop_epoch: int) -> dict[str, Any]:
        """Epochs [start, stop) of every member; one compiled program serves every range."""
        inputs = {"features": self.features, "train_rows": self.train_rows, "train_targets": self.train_targets,
                  "train_count": self.train_count, "keys": self.keys, "statistics": self.statistics}
        return self._train(state, jnp.int32(start_epoch), jnp.int32(stop_epoch), inputs)

    def _train_epochs(self, state, start_epoch, stop_epoch, inputs):
        # Inputs are arguments, not closed-over constants: a jitted function may not close over arrays
        # that span several processes.
        features, train_rows, train_targets, train_count, keys = (
            inputs[k] for k in ("features", "train_rows", "train_targets", "train_count", "keys"))
        p = self.protocol
        batch, steps = p.batch_size, self.steps_per_epoch
        loss_fn = _loss_fn(p.loss, p.huber_delta)
        width = train_rows.shape[1]
        def constrain(a):
            # Each member's minibatch split over the tensor axis; token counts follow their states.
            axes = ("ensemble", "ensemble_batch") + (None,) * (a.ndim - 2)
            return jax.lax.with_sharding_constraint(a, self.sharding(axes, a.shape))

        def member_loss(params, x, y, valid, key, stats):
            pred = self.apply(self.raw_params(params, stats), x, key)
            # Mean over the real rows only: the last minibatch of an epoch is smaller, as in a DataLoader.
            return jnp.sum(jnp.where(valid, loss_fn(pred, y), 0.0)) / jnp.maximum(jnp.sum(valid), 1)

        grad_fn = jax.vmap(jax.value_and_grad(member_loss))
        statistics = inputs["statistics"]

        def epoch(e, carry):
            params, opt_state, curve = carry
            # CosineAnnealingLR(T_max=epochs) stepped once per epoch.
            lr = p.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * e / p.epochs))
            hyper = dict(opt_state.hyperparams, learning_rate=jnp.full_like(opt_state.hyperparams["learning_rate"], lr))
            opt_state = opt_state._replace(hyperparams=hyper)
            epoch_keys = jax.vmap(lambda k: jax.random.fold_in(k, e + 1))(keys)

            def shuffle(key, count):
                # A uniform permutation of the member's rows, its padding sorted to the end.
                u = jnp.where(jnp.arange(width) < count, jax.random.uniform(key, (width,)), 2.0)
                return jnp.argsort(u)

            order = jax.vmap(shuffle)(jax.vmap(lambda k: jax.random.fold_in(k, 0))(epoch_keys), train_count)
            order = jnp.pad(order, ((0, 0), (0, steps * batch - width)))

            def step(carry, s, skip_finished):
                params, opt_state, loss_sum = carry
                positions = jax.lax.dynamic_slice_in_dim(order, s * batch, batch, axis=1)
                valid = (s * batch + jnp.arange(batch))[None, :] < train_count[:, None]
                rows = jnp.take_along_axis(train_rows, positions, axis=1)
                y = jnp.take_along_axis(train_targets, positions, axis=1)
                x = {name: constrain(a[rows]) for name, a in features.items()}
                step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s + 1))(epoch_keys)
                loss, grads = grad_fn(params, x, y, valid, step_keys, statistics)
                updates, new_opt_state = jax.vmap(self.optimizer.update)(grads, opt_state, params)
                new_params = optax.apply_updates(params, updates)
                if skip_finished:
                    # A member whose epoch is over skips the step entirely (its AdamW count included).
                    active = valid.any(axis=1)

                    def keep(new, old):
                        return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

                    new_params = jax.tree.map(keep, new_params, params)
                    new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
                return (new_params, new_opt_state, loss_sum + loss * jnp.sum(valid, axis=1)), None

            # Steps every member takes run without the skip: its selects re-read and re-write every
            # parameter and moment (a quarter of a step's time on CPU); only the tail needs them.
            carry = (params, opt_state, jnp.zeros(self.ensemble.size, jnp.float32))
            common, tail = jnp.arange(self.common_steps), jnp.arange(self.common_steps, steps)
            carry, _ = jax.lax.scan(functools.partial(step, skip_finished=False), carry, common)
            carry, _ = jax.lax.scan(functools.partial(step, skip_finished=True), carry, tail)
            params, opt_state, loss_sum = carry
            curve = curve.at[:, e].set(loss_sum / train_count)
            return params, opt_state, curve

        params, opt_state, curve = jax.lax.fori_loop(
            start_epoch, stop_epoch, epoch, (state["params"], state["opt_state"], state["train_loss"]))
        return {"params": params, "opt_state": opt_state, "train_loss": curve}

    def _predict_rows(self, params, rows, features, statistics):
        """rows [M, R] (R a multiple of the chunk) -> raw outputs [M, R], no dropout."""
        m, r = rows.shape
        chunks = rows.reshape(m, r // _PREDICT_CHUNK, _PREDICT_CHUNK).swapaxes(0, 1)
        apply = jax.vmap(lambda p, x, stats: self.apply(self.raw_params(p, stats), x))
        out = jax.lax.map(lambda c: apply(params, {name: a[c] for name, a in features.items()}, statistics), chunks)
        return out.swapaxes(0, 1).reshape(m, r)

    def predict(self, params, part: str) -> np.ndarray:
        """Raw outputs of every member on its own `part` ("validation" or "test") scenarios."""
        rows = self.ensemble.eval_rows[part]
        rows = distributed.global_array(rows, self.sharding(("ensemble", None), rows.shape))
        return distributed.to_host(self._predict(params, rows, self.features, self.statistics))

    def scores(self, params, parts: Sequence[str] = ("validation", "test")) -> dict[str, np.ndarray]:
        """Per member and part: R^2 (regression, in the trained sign-log space) or balanced accuracy."""
        out = {}
        for part in parts:
            pred = self.predict(params, part)
            out[part] = np.asarray([
                member_score(self.protocol.loss, self.ensemble.eval_targets[part][i, :n], pred[i, :n])
                for i, n in enumerate(self.ensemble.eval_count[part])])
        return out


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    total = np.sum((y - y.mean()) ** 2)
    return float(1.0 - np.sum((y - pred) ** 2) / total) if total > 0 else float("nan")


def balanced_accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    labels = np.asarray(labels) > 0.5
    predicted = np.asarray(logits) > 0.0
    rates = [np.mean(predicted[labels == c] == c) for c in (True, False) if np.any(labels == c)]
    return float(np.mean(rates))


def member_score(loss: str, targets: np.ndarray, outputs: np.ndarray) -> float:
    return r2_score(targets, outputs) if loss == "huber" else balanced_accuracy(targets, outputs)


# ----------------------------------------------------------------------------------------------------
# Selection and summaries


def select_and_summarize(tasks: Sequence[Task], ensemble: Ensemble, protocol: Protocol,
                         scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per task and trained fold: the honest pick (best validation score, reported on test) and the
    reference's optimistic pick (best test score); mean and std over folds of each."""
    folds = sorted({m.fold for m in ensemble.members})
    by_task: dict[str, Any] = {}
    for t, task in enumerate(tasks):
        table = np.full((len(folds), protocol.seeds, 2), np.nan)
        for i, m in enumerate(ensemble.members):
            if m.task == t:
                table[folds.index(m.fold), m.seed] = scores["validation"][i], scores["test"][i]
        val, test = table[..., 0], table[..., 1]
        honest_seed = np.argmax(np.nan_to_num(val, nan=-np.inf), axis=1)
        honest = test[np.arange(len(folds)), honest_seed]
        optimistic = np.max(np.nan_to_num(test, nan=-np.inf), axis=1)
        by_task[task.name] = {
            "scenarios": int(len(task.rows)),
            "scaling": None if task.scaling is None else str(task.scaling),
            "folds": folds,
            "selected_seed": honest_seed.tolist(),
            "validation": val.tolist(),
            "test": test.tolist(),
            "honest": {"per_fold": honest.tolist(), "mean": float(np.mean(honest)), "std": float(np.std(honest))},
            "optimistic": {"per_fold": optimistic.tolist(), "mean": float(np.mean(optimistic)),
                           "std": float(np.std(optimistic))},
        }
    return by_task


# ----------------------------------------------------------------------------------------------------
# A run on disk: resumable training, final probes, results


def _checkpoint_manager(run_dir: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager((run_dir / CHECKPOINT_DIR).resolve(), options=options)


@dataclass
class RunResult:
    results: dict[str, Any]
    train_loss: np.ndarray
    validation_curve: list[dict[str, Any]]


def train_run(
    run_dir: str | Path,
    features: np.ndarray | TokenStates,
    scenario_ids: Sequence[str],
    tasks: Sequence[Task],
    protocol: Protocol,
    identity: dict[str, Any],
    mesh: Mesh,
    *,
    checkpoint_every: int = 10,
    on_epochs: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train every task's ensemble, checkpointing every `checkpoint_every` epochs under
    `run_dir/checkpoints`, and write the selected probes and `results.json`.

    `features`: pooled vectors [prompts, hidden] (the mean extractor) or `TokenStates` (the attention
    extractor). `identity` (store fingerprint, layer, pooling, task list...) is recorded in `run.json`; a rerun
    into the same directory resumes from the latest checkpoint if its identity and protocol agree,
    and is refused otherwise, before anything is written. `on_epochs(done, total)` reports progress:
    once before training (done > 0 when resuming) and after every checkpoint.
    """
    run_dir = user_path(run_dir)
    used_rows = np.unique(np.concatenate([t.rows for t in tasks]))
    check_features(features, scenario_ids, used_rows)
    ensemble = build_ensemble(tasks, protocol, member_multiple=mesh.shape["data"])
    extractor = extractor_of(features)
    record = {"identity": identity, "protocol": dataclasses.asdict(protocol), "tasks": [t.name for t in tasks],
              "checkpoint_every": checkpoint_every}
    if extractor != "mean":
        # Recorded only when not the original extractor, so runs begun before extractors existed resume.
        record["extractor"] = extractor_record(extractor)
    record = json.loads(json.dumps(record))
    distributed.on_coordinator(lambda: claim_run_dir(run_dir, record, run_file=RUN_FILE, error=ProbeTrainingError,
                                                     kind="probe run"), ProbeTrainingError)
    trainer = EnsembleTrainer(features, ensemble, protocol, mesh)
    state, curve_points = _train_with_checkpoints(trainer, run_dir, protocol, checkpoint_every, on_epochs)
    scores = {part: s[:len(ensemble.members)] for part, s in trainer.scores(state["params"]).items()}
    summary = select_and_summarize(tasks, ensemble, protocol, scores)
    _save_selected_probes(run_dir, trainer.saved_params(state["params"]), tasks, ensemble, protocol, summary, identity,
                          trainer.input_dim, extractor)
    train_loss = distributed.to_host(state["train_loss"])[:len(ensemble.members)]
    results = {"identity": identity, "protocol": record["protocol"], "metric": _metric_name(protocol),
               "extractor": extractor_record(extractor),
               "tasks": summary, "members": [dataclasses.asdict(m) for m in ensemble.members],
               "train_loss": train_loss.tolist(), "validation_curve": curve_points}
    if distributed.is_coordinator():
        write_json_atomically(run_dir / RESULTS_FILE, results)
    return RunResult(results, train_loss, curve_points)


def _train_with_checkpoints(trainer: EnsembleTrainer, run_dir: Path, protocol: Protocol, checkpoint_every: int,
                            on_epochs) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train from the latest checkpoint (or from scratch) to the last epoch, checkpointing as it goes;
    returns the final state and the validation curve."""
    manager = _checkpoint_manager(run_dir)
    latest = manager.latest_step()
    if latest is None:
        state, epoch, curve_points = trainer.init_state(), 0, []
    else:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state()), progress=ocp.args.JsonRestore()))
        state = restored["state"]
        epoch, curve_points = int(restored["progress"]["epoch"]), restored["progress"]["curve"]
    if on_epochs is not None:
        on_epochs(epoch, protocol.epochs)
    members = len(trainer.ensemble.members)
    while epoch < protocol.epochs:
        stop = min(epoch + checkpoint_every, protocol.epochs)
        state = trainer.train(state, epoch, stop)
        epoch = stop
        validation = trainer.scores(state["params"], ("validation",))["validation"][:members]
        curve_points.append({"epoch": epoch, "validation": validation.tolist()})
        manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave({"epoch": epoch, "curve": curve_points})))
        if on_epochs is not None:
            on_epochs(epoch, protocol.epochs)
    manager.wait_until_finished()
    return state, curve_points


def _metric_name(protocol: Protocol) -> str:
    return "r2" if protocol.loss == "huber" else "balanced_accuracy"


def _save_selected_probes(run_dir: Path, params, tasks, ensemble, protocol, summary, identity, input_dim,
                          extractor: str = "mean") -> None:
    """For every task, the honest pick of each fold, stacked on a leading fold axis (an attention
    extractor's queries with its MLP: `hybrid.attention`'s parameter dict)."""
    host = distributed.to_host(params)
    index = {(m.task, m.fold, m.seed): i for i, m in enumerate(ensemble.members)}
    probes = {}
    for t, task in enumerate(tasks):
        entry = summary[task.name]
        picks = [index[(t, k, seed)] for k, seed in zip(entry["folds"], entry["selected_seed"])]
        probes[task.key] = {leaf: value[picks] for leaf, value in host.items()}
    save_probes(run_dir, probes, {
        "identity": identity, "extractor": extractor_record(extractor), "input_dim": input_dim,
        "hidden": list(protocol.hidden),
        "folds": len(summary[tasks[0].name]["folds"]), "loss": protocol.loss,
        "scalings": {t.name: t.scaling.to_dict() for t in tasks if t.scaling is not None},
        "selected_seed": {t.name: summary[t.name]["selected_seed"] for t in tasks}})


# ----------------------------------------------------------------------------------------------------
# From a feature store to a reported run (what `train probes` and `train router` do)


def store_layer(store: FeatureStore, layer: int | None) -> int:
    """The store's layer to train on: `layer`, or the store's only one."""
    if layer is None:
        if len(store.layers) != 1:
            raise StoreError(f"{store.path} holds layers {store.layers}: choose one with --layer")
        return store.layers[0]
    if layer not in store.layers:
        raise StoreError(f"{store.path} holds layers {store.layers}, not layer {layer}")
    return layer


def check_expected_model(store: FeatureStore, checkpoint: str | Path | None) -> None:
    """Refuse a store of another model than `checkpoint` (when given)."""
    if checkpoint is not None and checkpoint_fingerprint(checkpoint) != store.metadata["model_fingerprint"]:
        raise StoreError(f"{store.path} holds features of model {store.metadata['model_path']} "
                         f"({store.metadata['model_fingerprint']}), not of {checkpoint}")


def store_domain(store: FeatureStore, domain: str | Domain | None) -> Domain:
    """The domain of a store's records: `domain` as named on the command line (it must be the one the
    store records), else the recorded one."""
    return resolve_domain(domain, store.metadata.get("domain"), f"feature store {store.path}")


def store_identity(store: FeatureStore, layer: int, pooling: str, domain: Domain) -> dict[str, Any]:
    """What a run's probes read, recorded with them (`hybrid.artifacts.probe_run_identity`)."""
    return {"store": str(store.path.resolve()), "model_path": store.metadata["model_path"],
            "model_fingerprint": store.metadata["model_fingerprint"], "source_sha256": store.metadata["source_sha256"],
            "layer": layer, "pooling": pooling, "domain": domain_origin(domain)}


def train_and_report(out: str | Path, features: np.ndarray | TokenStates, scenario_ids: Sequence[str],
                     tasks: Sequence[Task], protocol: Protocol, identity: dict[str, Any], *, table_name: str,
                     mesh_tensor: int = 1, checkpoint_every: int = 10,
                     on_epochs: Callable[[int, int], None] | None = None,
                     published: Mapping[str, str] | None = None) -> RunResult:
    """Train (or resume) on a mesh over every device (`mesh_tensor` of them splitting each member's
    minibatch), then write the score table `out/table_name` and `out/curves.png` (process 0)."""
    out = user_path(out)
    run = train_run(out, features, scenario_ids, tasks, protocol, identity, make_mesh(data=-1, tensor=mesh_tensor),
                    checkpoint_every=checkpoint_every, on_epochs=on_epochs)
    if distributed.is_coordinator():
        (out / table_name).write_text(probe_report.score_table(run.results, published))
        probe_report.plot_curves(run.results, out / "curves.png")
    # Every file is written before any process returns.
    distributed.sync("hmoe_jax.training.probes.reported")
    return run


class EpochBar:
    """A tqdm bar over epochs for `train_run(on_epochs=)` (process 0 only); says when a run resumes."""

    def __init__(self, total: int, run_dir: str | Path, desc: str = "ensemble"):
        from tqdm import tqdm

        self.run_dir = run_dir
        self.bar = tqdm(total=total, unit="epoch", desc=desc, disable=not distributed.is_coordinator())
        self.calls = 0

    def __call__(self, done: int, total: int) -> None:
        # The first report comes before any training: epochs done then were done by an earlier run.
        if not self.calls and done > 0:
            self.bar.write(f"resuming {self.run_dir} from its epoch-{done} checkpoint", file=sys.stderr)
        self.calls += 1
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class StoreChoice:
    """Which features of a store a run trains on, and the settings both probe commands share."""

    layer: int | None = None
    pooling: str = "mean"
    expect_model: str | Path | None = None
    # "mean" (the MLP on the `pooling` vector), "attention" (on the store's token states) or, for
    # `train_probes` and `compare_extractors`, "both".
    extractor: str = "mean"
    mesh_tensor: int = 1
    checkpoint_every: int = 10


def _train_reported(out, features, ids, tasks, protocol, identity, choice: StoreChoice, table_name: str,
                    published: Mapping[str, str] | None = None) -> RunResult:
    bar = EpochBar(protocol.epochs, out)
    try:
        return train_and_report(out, features, ids, tasks, protocol, identity, table_name=table_name,
                                mesh_tensor=choice.mesh_tensor, checkpoint_every=choice.checkpoint_every, on_epochs=bar,
                                published=published)
    finally:
        bar.close()


def store_inputs(store: FeatureStore, layer: int, choice: StoreChoice, domain: Domain
                 ) -> tuple[np.ndarray | TokenStates, dict[str, Any]]:
    """(features, identity) of `choice.extractor` on one layer: the `pooling` vectors for "mean", the
    token states (identity pooling "tokens", extractor "attention") for "attention"; StoreError for a
    store without token states."""
    if choice.extractor == "attention":
        states, counts = store.token_states(layer)
        return TokenStates(states, counts), {**store_identity(store, layer, TOKENS, domain), "extractor": "attention"}
    if choice.extractor != "mean":
        raise ProbeTrainingError(f"extractor must be one of {EXTRACTORS}, got {choice.extractor!r}")
    return store.features(layer, choice.pooling), store_identity(store, layer, choice.pooling, domain)


def train_probes_on_store(store_path: str | Path, out: str | Path, protocol: Protocol, choice: StoreChoice, *,
                          experts: Sequence[str] | None = None, direct: bool = True,
                          domain: str | Domain | None = None) -> RunResult:
    """`train probes`: the argument (and direct-output) probes on one layer of a scenario store, with a
    progress bar; writes `out/r2.md`, `out/curves.png`, `out/results.json` and the probes. `domain`:
    as named on the command line (default: the store's). `choice.extractor`: "mean" or "attention"
    (`compare_extractors` trains both)."""
    store = FeatureStore.open(store_path)
    check_expected_model(store, choice.expect_model)
    domain = store_domain(store, domain)
    layer = store_layer(store, choice.layer)
    tasks = probe_tasks(store, domain, experts, direct=direct)
    features, identity = store_inputs(store, layer, choice, domain)
    return _train_reported(out, features, store.scenario_ids, tasks, protocol, identity, choice, SCORES_FILE,
                           domain.published_r2)


def compare_extractors(store_path: str | Path, out: str | Path, protocol: Protocol, choice: StoreChoice, *,
                       experts: Sequence[str] | None = None, direct: bool = True,
                       domain: str | Domain | None = None) -> dict[str, RunResult]:
    """`train probes --extractor both`: the mean extractor into `out/mean` and the attention extractor
    into `out/attention` (each a complete, resumable probe run), on the same tasks, folds and seeds,
    then `out/extractors.md`: per task the honest score of each, their difference, and each run's
    training time. The store's token states are checked before anything trains."""
    store = FeatureStore.open(store_path)
    if not store.has_token_states:
        store.token_states(store_layer(store, choice.layer))  # the StoreError naming the flag to rerun with
    runs, seconds = {}, {}
    for extractor in EXTRACTORS:
        start = time.perf_counter()
        runs[extractor] = train_probes_on_store(store_path, user_path(out) / extractor, protocol,
                                                dataclasses.replace(choice, extractor=extractor), experts=experts,
                                                direct=direct, domain=domain)
        seconds[extractor] = time.perf_counter() - start
    if distributed.is_coordinator():
        write_text_atomically(user_path(out) / COMPARISON_FILE,
                              probe_report.extractor_table({e: r.results for e, r in runs.items()}, seconds))
    distributed.sync("hmoe_jax.training.probes.compared")
    return runs


def train_probes(store_path: str | Path, out: str | Path, protocol: Protocol, choice: StoreChoice, *,
                 experts: Sequence[str] | None = None, direct: bool = True, domain: str | Domain | None = None
                 ) -> tuple[RunResult | dict[str, RunResult], Path]:
    """`train probes` for the extractor `choice.extractor` names: "mean" or "attention" is one run
    (`train_probes_on_store`, its table `out/r2.md`), "both" the two compared (`compare_extractors`,
    their table `out/extractors.md`). Returns (the run, or the runs by extractor; that table's path)."""
    if choice.extractor == "both":
        return (compare_extractors(store_path, out, protocol, choice, experts=experts, direct=direct, domain=domain),
                user_path(out) / COMPARISON_FILE)
    return (train_probes_on_store(store_path, out, protocol, choice, experts=experts, direct=direct, domain=domain),
            user_path(out) / SCORES_FILE)


def train_router_on_stores(store_path: str | Path, negatives_path: str | Path, out: str | Path, protocol: Protocol,
                           choice: StoreChoice, *, domain: str | Domain | None = None) -> RunResult:
    """`train router`: the reference's router classifier, the domain's prompts against its negatives'
    features; writes `out/accuracy.md`, `out/curves.png`, `out/results.json` and the classifier."""
    if choice.extractor != "mean":
        raise ProbeTrainingError(f"the router classifier reads pooled features; extractor {choice.extractor!r} "
                                 "is for `train probes`")
    positives, negatives = FeatureStore.open(store_path), FeatureStore.open(negatives_path)
    check_expected_model(positives, choice.expect_model)
    domain = store_domain(positives, domain)
    store_domain(negatives, domain)  # the negatives must be the same domain's
    layer = store_layer(positives, choice.layer)
    features, ids, task = router_task(positives, negatives, layer, choice.pooling)
    identity = {**store_identity(positives, layer, choice.pooling, domain), "negatives": str(negatives.path.resolve())}
    return _train_reported(out, features, ids, [task], protocol, identity, choice, "accuracy.md")
