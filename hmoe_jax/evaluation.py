"""Hybrid evaluation: predictions from the integrated, jitted hybrid forward, scored two ways.

For each scenario the prompt runs through the model up to and including the hybrid layer; at the
prompt's last token the layer's extraction (trained probes, median over folds) feeds the exact
formulas, and those formula results are the predictions. No Python loop over probes: the whole path
is the model's own forward (`stop_after_layer=L+1`).

On a mesh, each batch is split over its `data` axis, across hosts in a multi-process run
(`hmoe_jax.distributed`); every process gets the whole batch's predictions back.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import data, distributed, metrics, probe
from .config import load_config
from .hybrid import HybridConfig, make_hybrid
from .loading import from_pretrained
from .model import default_position_ids
from .precompute import bucket_length, left_padded_batch, load_tokenizer, tokenize
from .probe_training import extraction_probes, probe_run_identity
from .sharding import batch_sharding, shard_model

# The argument each metric's formula reads from the scenario, for R^2 of extracted arguments.
ARGUMENT_SOURCES: Mapping[str, Mapping[str, str]] = {
    "dscr": {"noi": "noi", "ads": "annual_debt_service"},
    "ltv": {"loan": "loan_amount", "value": "purchase_price"},
    "cap_rate": {"noi": "noi", "price": "purchase_price"},
    "debt_yield": {"noi": "noi", "loan": "loan_amount"},
}


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together (probes of another model, unknown experts...)."""


def build_hybrid_model(checkpoint: str | Path, run_dir: str | Path, *, dtype=jnp.float32, mesh=None,
                       hybrid_params: str | Path | None = None, keep_mxfp4: bool | None = None,
                       param_dtype=None, through_hybrid_layer: bool = False):
    """The checkpoint's model with its probe layer made hybrid and the run's probes loaded; with
    `hybrid_params` (a `python -m train hybrid` run directory), its trained router rows and projections
    replace the initial ones. Returns (model, layer).
    `keep_mxfp4`, `param_dtype`: as `from_pretrained`. `through_hybrid_layer`: load only the blocks up
    to the hybrid layer (no head): all that reading the hybrid layer's predictions needs."""
    identity = probe_run_identity(run_dir)
    layer = int(identity["layer"])
    pooling = identity.get("pooling", "mean")
    probes = extraction_probes(run_dir)
    config = load_config(checkpoint)
    if not 0 <= layer < config.num_hidden_layers:
        raise EvaluationError(f"{run_dir}: probes read layer {layer}, outside the model's 0..{config.num_hidden_layers - 1}")
    model = from_pretrained(checkpoint, dtype=dtype, mesh=mesh, keep_mxfp4=keep_mxfp4, param_dtype=param_dtype,
                            num_layers=layer + 1 if through_hybrid_layer else None)
    hidden = model.config.hidden_size
    some = next(iter(next(iter(probes.values())).values()))
    if some["w1"].shape[-2] != hidden:
        raise EvaluationError(
            f"{run_dir}: probes read {some['w1'].shape[-2]}-dim features but {checkpoint} has hidden size {hidden}"
        )
    config = HybridConfig(
        layers=(layer,),
        experts=tuple(e for e in metrics.METRICS if e in probes),
        extraction_input="causal_mean" if pooling == "mean" else "token",
        ensemble_size=int(some["w1"].shape[0]),
    )
    model = make_hybrid(model, config, probes={layer: probes})
    if hybrid_params is not None:
        from .hybrid_training import load_hybrid_params

        load_hybrid_params(model, hybrid_params)
    if mesh is not None:
        # The hybrid layer's new parameters (router rows, probes) join the model on the mesh.
        shard_model(model, mesh)
    return model, layer


@functools.partial(jax.jit, static_argnums=(0, 4))
def _hybrid_last_token(graphdef, state, ids, mask, layer):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids, mask, default_position_ids(mask), output_layer_info=True, stop_after_layer=layer + 1)
    return _last_token(out.layer_info[layer])


def _layerwise_hybrid_last_token(model, ids, mask, layer):
    for _, _, info in model.layerwise_blocks(ids, mask, default_position_ids(jnp.asarray(mask)), layer + 1):
        pass  # only the last block's (the hybrid layer's) info is wanted
    return _jitted_last_token(info)


def _last_token(info):
    # Left padding: every prompt's last real token is at the last position.
    return (
        {k: v[:, -1] for k, v in info["results"].items()},
        {k: v[:, -1] for k, v in info["arguments"].items()},
        {k: v[:, -1] for k, v in info["selected"].items()},
    )


_jitted_last_token = jax.jit(_last_token)


def hybrid_predictions(model, layer: int, tokenizer, prompts: Sequence[str], *, batch_size: int = 8,
                       bucket: int = 32, progress: Callable[[int], None] | None = None,
                       mesh=None, layerwise: bool = False) -> dict[str, Any]:
    """Formula results, extracted arguments and routing decisions at each prompt's last token.
    With `mesh` (the model's), batches are split over its data axis. `layerwise`: run blocks
    0..layer as separately jitted programs (`GptOssForCausalLM(..., layerwise=True)`)."""
    c = model.config
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise EvaluationError(f"batch size {batch_size} is not a multiple of the mesh's "
                              f"{mesh.shape['data']} data devices")
    put = (lambda x: x) if mesh is None else (lambda x: distributed.global_array(x, batch_sharding(mesh)))  # noqa: E731
    tokens = tokenize(tokenizer, prompts, c.vocab_size)
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    graphdef, state = nnx.split(model)
    results: dict[str, list] = {}
    arguments: dict[str, list] = {}
    selected: dict[str, list] = {}
    seconds = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        ids, mask = left_padded_batch(batch, bucket_length(max(t.size for t in batch), bucket), batch_size, pad)
        t0 = time.perf_counter()
        if layerwise:
            last = _layerwise_hybrid_last_token(model, put(ids), put(mask), layer)
        else:
            last = _hybrid_last_token(graphdef, state, put(ids), put(mask), layer)
        r, a, s = distributed.to_host(jax.block_until_ready(last))
        seconds.append(time.perf_counter() - t0)
        for store, part in ((results, r), (arguments, a), (selected, s)):
            for k, v in part.items():
                store.setdefault(k, []).append(np.asarray(v)[: len(batch)])
        if progress:
            progress(len(batch))
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    return {"results": cat(results), "arguments": cat(arguments), "selected": cat(selected), "batch_seconds": seconds}


def probe_route_predictions(run_dir: str | Path, features: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's route: each argument's fold probes on mean-pooled features, median of the
    decoded outputs, then the formula. Used to check the integrated forward computes the same."""
    from . import formulas

    out = {}
    for expert, arg_probes in extraction_probes(run_dir).items():
        spec = formulas.get_expert(expert)
        args = []
        for name in spec.arg_names:
            params = arg_probes[name]
            v = jax.vmap(probe.probe_apply, in_axes=(0, None))(params, jnp.asarray(features))[..., 0]
            args.append(jnp.median(probe.decode(v), axis=0))
        out[expert] = np.asarray(formulas.evaluate(spec, jnp.stack(args, -1)))
    return out


def argument_r2(scenarios: Sequence[Mapping], arguments: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """R^2 in sign-log space (as the paper reports) of each extracted argument, over all scenarios."""
    out = {}
    for expert, sources in ARGUMENT_SOURCES.items():
        if expert not in arguments:
            continue
        out[expert] = {}
        for i, (arg, key) in enumerate(sources.items()):
            truth = np.array([s["ground_truth"][key] if key == "annual_debt_service" else s["financials"][key]
                              for s in scenarios], np.float64)
            pred = np.asarray(arguments[expert][:, i], np.float64)
            out[expert][arg] = metrics.r2(np.asarray(probe.encode(pred)), np.asarray(probe.encode(truth)))
    return out


def evaluate_hybrid(checkpoint, run_dir, eval_path, *, train_path=None, batch_size: int = 8,
                    progress: Callable[[int], None] | None = None, hybrid_params=None,
                    mesh=None, keep_mxfp4: bool | None = None, param_dtype=None,
                    layerwise: bool = False) -> dict[str, Any]:
    """Everything `summary.json` holds: per protocol the hybrid's and the constant predictor's scores,
    argument R^2, routing rates and timing. With `mesh`, the model is sharded on it and batches
    split over its data axis (across hosts in a multi-process run). Only blocks 0..layer are loaded
    (nothing after the hybrid layer changes its predictions); `keep_mxfp4`, `param_dtype` as
    `from_pretrained`, `layerwise` as `hybrid_predictions`: with all three, the 20b's first 13
    blocks evaluate in 8 GiB peak RSS (`bench/bench_20b.py`, part eval-hybrid)."""
    scenarios = data.load_scenarios(eval_path)
    model, layer = build_hybrid_model(checkpoint, run_dir, hybrid_params=hybrid_params, mesh=mesh,
                                      keep_mxfp4=keep_mxfp4, param_dtype=param_dtype, through_hybrid_layer=True)
    predictions = hybrid_predictions(model, layer, load_tokenizer(checkpoint), [s["input_prompt"] for s in scenarios],
                                     batch_size=batch_size, progress=progress, mesh=mesh, layerwise=layerwise)
    train = data.load_scenarios(train_path) if train_path else data.generate_scenarios(3000, data.TRAIN_SEED, 0)
    medians = metrics.training_medians(train)
    constant = metrics.constant_predictions(medians, len(scenarios))
    hybrid = {m: predictions["results"][m] for m in metrics.METRICS if m in predictions["results"]}
    scores = {
        protocol: {"hybrid": metrics.score(scenarios, hybrid, protocol),
                   "constant_median": metrics.score(scenarios, constant, protocol)}
        for protocol in metrics.PROTOCOLS
    }
    batch_s = predictions["batch_seconds"][1:] or predictions["batch_seconds"]  # first batch compiles
    return {
        "model": str(checkpoint), "probes": str(run_dir), "eval": str(eval_path), "layer": layer,
        "hybrid_params": None if hybrid_params is None else str(hybrid_params),
        "loaded_layers": layer + 1, "keep_mxfp4": bool(keep_mxfp4),
        "param_dtype": None if param_dtype is None else str(jnp.dtype(param_dtype)), "layerwise": layerwise,
        "n_scenarios": len(scenarios),
        "scores": scores,
        "training_medians": medians,
        "argument_r2_signlog": argument_r2(scenarios, predictions["arguments"]),
        "routed_to_expert_rate": {k: float(v.mean()) for k, v in predictions["selected"].items()},
        "median_batch_ms": float(np.median(batch_s) * 1000), "batch_size": batch_size,
        "_errors": {m: metrics.percent_errors(hybrid[m], [s["ground_truth"][m] for s in scenarios]).tolist() for m in hybrid},
        "_complexity": [s["complexity"] for s in scenarios],
    }


# ------------------------------------------------------------------ report

def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def report_markdown(summary: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> str:
    lines = [f"# Hybrid MoE evaluation", "",
             f"Model `{summary['model']}`, probes `{summary['probes']}`, hybrid layer {summary['layer']}, "
             f"{summary['n_scenarios']} scenarios. Predictions are the exact formula results of the integrated "
             "hybrid forward at each prompt's last token.", ""]
    for protocol in metrics.PROTOCOLS:
        title = {"reference": "Reference protocol (every metric scored for every scenario, as the PyTorch reference)",
                 "honest": "Honest protocol (a metric is scored only where its inputs appear in the prompt)"}[protocol]
        lines += [f"## {title}", "", "| metric | method | N | within 10% | within 20% | median % error |",
                  "|---|---|---:|---:|---:|---:|"]
        for metric in metrics.METRICS:
            for method in ("hybrid", "constant_median"):
                s = summary["scores"][protocol][method].get(metric)
                if s is None:
                    continue
                lines.append(f"| {metric} | {method.replace('_', ' ')} | {s['n']} | {_fmt(s['within_10'])} | "
                             f"{_fmt(s['within_20'])} | {_fmt(s['median_pct_error'])} |")
        lines.append("")
        lines += ["Within 20% by complexity (hybrid):", "", "| metric | " + " | ".join(f"c{c}" for c in (1, 2, 3, 4)) + " |",
                  "|---|---:|---:|---:|---:|"]
        for metric in metrics.METRICS:
            s = summary["scores"][protocol]["hybrid"].get(metric)
            if s is None:
                continue
            cells = [_fmt(s["by_complexity"].get(c, s["by_complexity"].get(str(c), {})).get("within_20")) for c in (1, 2, 3, 4)]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Extracted arguments: R^2 (sign-log space, all scenarios)", "", "| expert | argument | R^2 |", "|---|---|---:|"]
    for expert, args in summary["argument_r2_signlog"].items():
        for arg, value in args.items():
            lines.append(f"| {expert} | {arg} | {value:.3f} |")
    lines += ["", "Share of prompts whose last token the extended router sent to each deterministic expert: "
              + ", ".join(f"{k} {v:.1%}" for k, v in summary["routed_to_expert_rate"].items())
              + (" (the new router rows are untrained unless end-to-end training ran)." if not summary.get("hybrid_params")
                 else f" (router rows and projections trained end to end: `{summary['hybrid_params']}`)."), "",
              f"Median forward time per batch of {summary['batch_size']} (to the hybrid layer, formulas included): "
              f"{summary['median_batch_ms']:.1f} ms."]
    if reference is not None:
        lines += ["", "## The PyTorch reference's headline (its protocol, first 200 eval scenarios)", "",
                  "| metric | within 20% (reference ensemble_input) |", "|---|---:|"]
        w20 = reference.get("summary", {}).get("ensemble_input", {}).get("w20", {})
        for metric in metrics.METRICS:
            if metric in w20:
                lines.append(f"| {metric} | {w20[metric]:.1f} |")
    return "\n".join(lines) + "\n"


def plot_errors(summary: Mapping[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    errors = summary["_errors"]
    fig, axes = plt.subplots(1, len(errors), figsize=(4 * len(errors), 3.2), squeeze=False)
    for ax, (metric, errs) in zip(axes[0], errors.items()):
        e = np.asarray(errs, np.float64)
        e = np.clip(e[np.isfinite(e)], 1e-3, 1e4)
        ax.hist(np.log10(e), bins=30, color="tab:blue")
        ax.axvline(np.log10(20), color="red", lw=1)
        ax.set_title(metric)
        ax.set_xlabel("log10 % error (red: 20%)")
    fig.tight_layout()
    paths.append(out_dir / "error_distributions.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.2
    for j, metric in enumerate(metrics.METRICS):
        s = summary["scores"]["reference"]["hybrid"].get(metric)
        if s is None:
            continue
        vals = [s["by_complexity"].get(c, s["by_complexity"].get(str(c), {})).get("within_20", np.nan) for c in (1, 2, 3, 4)]
        ax.bar(np.arange(4) + j * width, vals, width, label=metric)
    ax.set_xticks(np.arange(4) + 1.5 * width, [f"complexity {c}" for c in (1, 2, 3, 4)])
    ax.set_ylabel("% within 20% (reference protocol)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "accuracy_by_complexity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
