"""The hybrid model as the pipeline builds and runs it.

`build_hybrid_model`: a checkpoint with its probe layer made hybrid, the probe run's fold probes loaded
(and, from a `train hybrid` run, the trained router rows and projections). `hybrid_predictions`: at each
prompt's last token, the layer's extracted arguments, exact formula results and routing decisions, from
the model's own forward up to and including the hybrid layer (`stop_after_layer=L+1`): no Python loop
over probes. On a mesh each batch is split over its `data` axis, across hosts in a multi-process run;
every process gets the whole batch's outputs back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ..checkpoint.loading import from_pretrained
from ..checkpoint.location import locate_checkpoint, resolve_checkpoint
from ..data.prompts import pad_token_id, prompt_batches, tokenize
from ..formulas import check_router_ids, get_expert, registered_experts
from ..model.config import load_config
from ..model.transformer import GptOssForCausalLM, default_position_ids, run
from ..runtime import distributed
from ..runtime.options import RunOptions
from ..runtime.sharding import batch_sharding, shard_model
from .artifacts import (
    ArtifactError,
    extraction_probes,
    load_hybrid_params,
    probe_run_experts,
    probe_run_extractor,
    probe_run_identity,
    probe_run_scalings,
)
from .layer import HybridConfig, make_hybrid


def build_hybrid_model(checkpoint: str | Path, run_dir: str | Path, *, options: RunOptions | None = None, mesh=None,
                       hybrid_params: str | Path | None = None,
                       through_hybrid_layer: bool = False) -> tuple[GptOssForCausalLM, int]:
    """The checkpoint's model with its probe layer made hybrid from the probe run `run_dir`
    (`make_hybrid_from_run`). Returns (model, layer). `through_hybrid_layer`: load only the blocks up
    to the hybrid layer (no head): all that reading the hybrid layer's outputs needs."""
    checkpoint = resolve_checkpoint(checkpoint)
    layer = int(probe_run_identity(run_dir)["layer"])
    config = load_config(locate_checkpoint(checkpoint).path)
    n_layers = config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ArtifactError(f"{run_dir}: probes read layer {layer}, outside the model's 0..{n_layers - 1}")
    # Before any weight is read: the run's experts must be loaded and clear of the neural experts' ids.
    try:
        check_router_ids(_registered_run_experts(run_dir), config.num_local_experts)
    except ValueError as err:
        raise ArtifactError(f"{run_dir}: {err}") from None
    model = from_pretrained(checkpoint, options, mesh=mesh, num_layers=layer + 1 if through_hybrid_layer else None)
    return make_hybrid_from_run(model, run_dir, hybrid_params=hybrid_params, mesh=mesh), layer


def make_hybrid_from_run(model: GptOssForCausalLM, run_dir: str | Path, *, hybrid_params: str | Path | None = None,
                         mesh=None) -> GptOssForCausalLM:
    """`model` (in place) with the layer a probe run read made hybrid: the run's experts (registered:
    its domain is loaded), their fold probes loaded, each argument decoded by its probe's scaling,
    extraction by the run's extractor (attention) or pooling (causal mean, or the token's own state);
    the fold probes are the ensemble (median of decoded outputs), each fold with its own query for
    attention; with `hybrid_params` (a `train hybrid` run
    directory), its trained router rows and projections replace the initial ones."""
    identity = probe_run_identity(run_dir)
    layer = int(identity["layer"])
    probes = extraction_probes(run_dir)
    some = next(iter(next(iter(probes.values())).values()))
    if some["w1"].shape[-2] != model.config.hidden_size:
        raise ArtifactError(f"{run_dir}: probes read {some['w1'].shape[-2]}-dim features but the model has "
                            f"hidden size {model.config.hidden_size}")
    experts = _registered_run_experts(run_dir)
    scalings = probe_run_scalings(run_dir)
    config = HybridConfig(
        layers=(layer,),
        experts=experts,
        extraction_input=_extraction_input(run_dir, identity),
        ensemble_size=int(some["w1"].shape[0]),
        argument_scalings=tuple(scalings[(e, a)] for e in experts for a in get_expert(e).arg_names),
    )
    make_hybrid(model, config, probes={layer: probes})
    if hybrid_params is not None:
        load_hybrid_params(model, hybrid_params)
    if mesh is not None:
        # The hybrid layer's new parameters (router rows, probes) join the model on the mesh.
        shard_model(model, mesh)
    return model


def _extraction_input(run_dir, identity) -> str:
    if probe_run_extractor(run_dir) == "attention":
        return "attention"
    return "causal_mean" if identity.get("pooling", "mean") == "mean" else "token"


def _registered_run_experts(run_dir) -> tuple[str, ...]:
    """The experts a probe run has probes for, every one registered (its domain loaded)."""
    experts = probe_run_experts(run_dir)
    known = {e.name for e in registered_experts()}
    missing = [e for e in experts if e not in known]
    if missing:
        domain = probe_run_identity(run_dir).get("domain", {}).get("name", "cre")
        raise ArtifactError(f"{run_dir}: its probes are for expert(s) {missing} of domain {domain!r}, which are not "
                            "registered in this process: load the domain first (--domain)")
    return experts


def _last_token_outputs(info):
    # Left padding: every prompt's last real token is at the last position.
    return tuple({k: v[:, -1] for k, v in info[part].items()} for part in ("results", "arguments", "selected"))


_jitted_last_token_outputs = jax.jit(_last_token_outputs)


def _hybrid_layer_outputs(model: GptOssForCausalLM, ids, mask, layer: int):
    for _, _, info in model.residual_stream(ids, mask, default_position_ids(mask), layer + 1):
        pass  # only the last block's (the hybrid layer's) info is wanted
    return _jitted_last_token_outputs(info)


def hybrid_predictions(model: GptOssForCausalLM, layer: int, tokenizer, prompts: Sequence[str], *,
                       batch_size: int = 8, bucket: int = 32, progress: Callable[[int], None] | None = None,
                       mesh=None) -> dict[str, Any]:
    """Formula results, extracted arguments and routing decisions at each prompt's last token, keyed by
    expert, and the seconds each batch took. With `mesh` (the model's), batches are split over its data
    axis."""
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {batch_size} is not a multiple of the mesh's {mesh.shape['data']} data devices")
    put = (lambda x: x) if mesh is None else (lambda x: distributed.global_array(x, batch_sharding(mesh)))  # noqa: E731
    tokens = tokenize(tokenizer, prompts, model.config.vocab_size)
    outputs: dict[str, dict[str, list]] = {"results": {}, "arguments": {}, "selected": {}}
    seconds = []
    for batch in prompt_batches(tokens, batch_size, bucket, pad_token_id(model.config)):
        start = time.perf_counter()
        parts = run(model, _hybrid_layer_outputs, put(batch.input_ids), put(batch.attention_mask), static=(layer,))
        parts = distributed.to_host(jax.block_until_ready(parts))
        seconds.append(time.perf_counter() - start)
        for name, part in zip(outputs, parts):
            for expert, values in part.items():
                outputs[name].setdefault(expert, []).append(np.asarray(values)[:len(batch.rows)])
        if progress:
            progress(len(batch.rows))
    joined = {name: {k: np.concatenate(v) for k, v in part.items()} for name, part in outputs.items()}
    return {**joined, "batch_seconds": seconds}
