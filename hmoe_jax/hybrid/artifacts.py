"""Trained artifacts of the hybrid method, read and written in one place: the probes of a probe run (and
the router classifier, a probe run too), the router rows and projections of `train hybrid`, and the
reference's own probe `.pt` files.

Arrays are restored into shardings this process can address: a run directory written by several
processes (`runtime.distributed`) reads back on any process count, and a model's hybrid parameters are
restored into the placement (device or mesh sharding) its own variables already have.

    probe run     probes.json (what they read: identity, extractor, widths, folds, which probes) + probes/
                  (orbax, {expert: {argument or "output": params stacked over folds}}; an attention
                  extractor's params add its `query` [folds, H], `hybrid.attention`)
    hybrid run    hybrid_params.json (layer, experts, shapes) + hybrid_params/ (orbax, the trained
                  `RouterRowParam` and `ProjectionParam` values keyed by their model path)
    probe .pt     the reference's `nn.Sequential` state dict -> a converted Flax checkpoint (`load_probe`)

`convert_any` is `python -m convert`: a probe `.pt` or a gpt-oss checkpoint to Flax, or back to HF.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ..checkpoint.convert import DTYPES, ConversionSummary, convert_checkpoint, export_hf, resolve_dtype
from ..checkpoint.flax_format import open_converted, write_flax_checkpoint
from ..checkpoint.location import CheckpointError, locate_checkpoint, resolve_checkpoint
from ..domains import OUTPUT, SIGN_LOG, Scaling
from ..runtime import distributed
from ..runtime.files import atomic_directory, user_path, write_json_atomically
from . import attention
from .layer import HybridMoE, ProjectionParam, RouterRowParam
from .probe import PARAM_NAMES

PROBES_DIR = "probes"
PROBES_FILE = "probes.json"
PARAMS_DIR = "hybrid_params"
PARAMS_FILE = "hybrid_params.json"
# Target name of a probe that reads an expert's result directly from the hidden state.
DIRECT = OUTPUT
# What `train hybrid` trains: router rows and projections. Extraction probes and gpt-oss stay frozen.
TRAINABLE = nnx.Any(RouterRowParam, ProjectionParam)


class ArtifactError(ValueError):
    """A run directory without the artifact asked for, or one that does not fit the model."""


def _local_device():
    # This process's own first device (jax.devices()[0] belongs to process 0 in a multi-process run).
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore(directory: Path, abstract):
    return ocp.StandardCheckpointer().restore(user_path(directory).resolve(), abstract)


def _save(directory: Path, tree) -> None:
    """Every process takes part (orbax writes each shard once); a rerun rewrites the same values."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(user_path(directory).resolve(), tree, force=True)
    checkpointer.wait_until_finished()


# ------------------------------------------------------------------ probe runs


def extractor_record(kind: str) -> dict[str, Any]:
    """probes.json's `extractor`: "mean" (the probe MLP on the pooled vector named by identity
    `pooling`) or "attention" (`hybrid.attention`: a query per probe over RMS-normed token states)."""
    if kind == "mean":
        return {"kind": "mean"}
    if kind == "attention":
        return {"kind": "attention", "query": attention.QUERY, "key_norm": "rms",
                "key_norm_eps": attention.KEY_NORM_EPS, "score_scale": "1/sqrt(hidden)", "values": "token states",
                "query_init": "zeros"}
    raise ValueError(f"unknown extractor {kind!r}")


def save_probes(run_dir: str | Path, probes: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
                record: Mapping[str, Any]) -> None:
    """The selected probes of a run, {(expert, argument or "output"): params with a leading fold axis},
    and `probes.json` (`record`: identity, input_dim, hidden, folds, loss, ... ; the probe list is
    added). Process 0 writes the JSON."""
    run_dir = user_path(run_dir)
    tree: dict[str, dict[str, Mapping[str, np.ndarray]]] = {}
    for (group, name), params in probes.items():
        tree.setdefault(group, {})[name] = params
    _save(run_dir / PROBES_DIR, tree)
    if distributed.is_coordinator():
        write_json_atomically(run_dir / PROBES_FILE, {**record, "probes": [list(key) for key in probes]})


def load_probes(run_dir: str | Path) -> dict[tuple[str, str], dict[str, jax.Array]]:
    """The trained probes of a run: {(expert, argument or "output"): probe params stacked over folds}.

    Each value is a `hybrid.probe` parameter dict whose leaves have a leading fold axis, so
    `jax.vmap(probe_apply, (0, None))(params, x)` gives every fold's prediction; the paper takes their
    median after `decode`. `probe_run_identity(run_dir)` says which model, layer and pooling they read.
    """
    run_dir = user_path(run_dir)
    meta = _probe_record(run_dir)
    dims = (meta["input_dim"], *meta["hidden"], 1)
    leaves = {}
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        leaves[f"w{i + 1}"] = (meta["folds"], fan_in, fan_out)
        leaves[f"b{i + 1}"] = (meta["folds"], fan_out)
    if probe_run_extractor(run_dir) == "attention":
        leaves[attention.QUERY] = (meta["folds"], meta["input_dim"])
    abstract: dict[str, dict[str, dict[str, jax.ShapeDtypeStruct]]] = {}
    for group, name in meta["probes"]:
        abstract.setdefault(group, {})[name] = {
            leaf: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=_local_device()) for leaf, shape in leaves.items()}
    tree = _restore(run_dir / PROBES_DIR, abstract)
    return {(group, name): tree[group][name] for group, name in meta["probes"]}


def _probe_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PROBES_FILE
    if not path.is_file():
        raise ArtifactError(f"{run_dir}: no trained probes ({PROBES_FILE} missing; did `train probes` finish?)")
    return json.loads(path.read_text())


def probe_run_identity(run_dir: str | Path) -> dict[str, Any]:
    """What the probes of a run read: model fingerprint and path, layer, pooling, store."""
    return _probe_record(user_path(run_dir))["identity"]


def probe_run_extractor(run_dir: str | Path) -> str:
    """"mean" or "attention": which extractor a run trained ("mean" for runs from before extractors)."""
    return _probe_record(user_path(run_dir)).get("extractor", {"kind": "mean"})["kind"]


def probe_run_scalings(run_dir: str | Path) -> dict[tuple[str, str], Scaling]:
    """Each probe's target space, {(expert, argument or "output"): Scaling}; sign-log for a run that
    recorded none (every run before domains could scale a target otherwise)."""
    record = _probe_record(user_path(run_dir))
    recorded = record.get("scalings", {})
    return {(group, name): Scaling.from_dict(recorded[f"{group}/{name}"]) if f"{group}/{name}" in recorded
            else SIGN_LOG for group, name in record["probes"]}


def probe_run_experts(run_dir: str | Path) -> tuple[str, ...]:
    """The experts a run has argument probes for, in the run's (its domain's) order."""
    names = [group for group, name in _probe_record(user_path(run_dir))["probes"] if name != DIRECT]
    return tuple(dict.fromkeys(names))


def extraction_probes(run_dir: str | Path) -> dict[str, dict[str, dict[str, jax.Array]]]:
    """The argument probes of a run as the hybrid layer takes them: {expert: {argument: params}},
    fold-stacked, for `make_hybrid(..., probes={layer: extraction_probes(run)})` with
    `HybridConfig(ensemble_size=<folds>)` (and extraction_input "attention" for an attention
    extractor's run, `probe_run_extractor`). Direct-output probes are left out."""
    grouped: dict[str, dict[str, dict[str, jax.Array]]] = {}
    for (expert, name), params in load_probes(run_dir).items():
        if name != DIRECT:
            grouped.setdefault(expert, {})[name] = params
    return grouped


# ------------------------------------------------------------------ hybrid runs


def hybrid_layer_of(model) -> int:
    """The index of a model's one hybrid layer."""
    layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, HybridMoE)]
    if len(layers) != 1:
        raise ArtifactError(f"the model needs exactly one hybrid layer, it has {layers}")
    return layers[0]


def _nested(state) -> dict[str, Any]:
    """An NNX state -> {"layers": {"2": {"mlp": {...}}}} of arrays (string keys, for orbax)."""
    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = var[...]
    return out


def _shapes(state) -> dict[str, list[int]]:
    return {"/".join(map(str, p)): list(v.shape) for p, v in nnx.to_flat_state(state)}


def save_hybrid_params(run_dir: str | Path, params, layer: int, experts: Sequence[str],
                       identity: Mapping[str, Any]) -> None:
    """The trained router rows and projections (`params`: the model's `TRAINABLE` state)."""
    run_dir = user_path(run_dir)
    _save(run_dir / PARAMS_DIR, _nested(params))
    write_json_atomically(run_dir / PARAMS_FILE, {"identity": dict(identity), "layer": layer,
                                                  "experts": list(experts), "params": _shapes(params)})


def load_hybrid_params(model, run_dir: str | Path) -> dict[str, Any]:
    """Put the trained router rows and projections of a `train hybrid` run into `model`'s hybrid
    layer (in place, each value where the model's own variable lives); returns the run's record.
    Another layer, other experts or other shapes: ArtifactError naming them."""
    run_dir = user_path(run_dir)
    meta_path = run_dir / PARAMS_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{run_dir}: no trained hybrid parameters ({PARAMS_FILE} missing; did training finish?)")
    meta = json.loads(meta_path.read_text())
    layer = hybrid_layer_of(model)
    experts = list(model.layers[layer].mlp.expert_names)
    if meta["layer"] != layer or meta["experts"] != experts:
        raise ArtifactError(f"{run_dir}: trained for layer {meta['layer']} experts {meta['experts']}, but the "
                            f"model's hybrid layer is {layer} with experts {experts}")
    state = nnx.state(model, TRAINABLE)
    shapes = _shapes(state)
    if shapes != meta["params"]:
        diff = sorted(k for k in set(shapes) | set(meta["params"]) if shapes.get(k) != meta["params"].get(k))
        raise ArtifactError(f"{run_dir}: parameter shapes do not fit the model: {diff[:4]}")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _nested(state))
    restored = _restore(run_dir / PARAMS_DIR, abstract)
    for path, var in nnx.to_flat_state(state):
        node = restored
        for p in path:
            node = node[str(p)]
        var[...] = jnp.asarray(node, var.dtype)
    nnx.update(model, state)
    return meta


# ------------------------------------------------------------------ the reference's probe files


# nn.Sequential(Linear, SiLU, Dropout, Linear, SiLU, Dropout, Linear): the Linears sit at 0, 3 and 6.
PROBE_LINEAR_INDICES = (0, 3, 6)
_PROBE_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<kind>weight|bias)$")


def probe_params_from_state_dict(state: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """The reference probe's state dict (any common key prefix, e.g. `net.0.weight` or `0.weight`)
    -> {w1, b1, w2, b2, w3, b3} in [in, out] layout, float32, with every shape checked."""
    import torch

    prefixes = set()
    linear: dict[tuple[int, str], np.ndarray] = {}
    for key, value in state.items():
        match = _PROBE_KEY.match(key) if isinstance(key, str) else None
        if match is None or int(match["index"]) not in PROBE_LINEAR_INDICES:
            raise CheckpointError(f"{source}: unexpected key {key!r} (a probe holds Linear layers at indices 0, 3, 6)")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} is not a floating-point tensor ({type(value).__name__})")
        prefixes.add(match["prefix"])
        linear[int(match["index"]), match["kind"]] = value.detach().to(torch.float32).cpu().numpy()
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: keys with different prefixes {sorted(prefixes)}: not one probe")
    prefix = prefixes.pop() if prefixes else ""
    for index in PROBE_LINEAR_INDICES:
        for kind in ("weight", "bias"):
            if (index, kind) not in linear:
                raise CheckpointError(f"{source}: probe tensor {prefix}{index}.{kind!s} is missing")
    params, fan_in = {}, linear[0, "weight"].shape[-1]
    for n, index in enumerate(PROBE_LINEAR_INDICES, start=1):
        w, b = linear[index, "weight"], linear[index, "bias"]
        if w.ndim != 2 or w.shape[1] != fan_in or b.shape != (w.shape[0],):
            raise CheckpointError(
                f"{source}: {prefix}{index}.weight {tuple(w.shape)} / {prefix}{index}.bias {tuple(b.shape)} "
                f"do not form a Linear({fan_in}, out)"
            )
        params[f"w{n}"], params[f"b{n}"] = np.ascontiguousarray(w.T), b
        fan_in = w.shape[0]
    return params


def convert_probe(
    src: str | Path, dst: str | Path, *, dtype: str | np.dtype | None = None, overwrite: bool = False
) -> ConversionSummary:
    """A probe `.pt` state dict (read with `torch.load(weights_only=True)`: no code runs) -> a Flax
    checkpoint that `load_probe` reads."""
    try:
        import torch
    except ImportError:
        raise ImportError("reading a .pt probe needs torch: pip install 'hmoe-jax[torch]'") from None
    src = user_path(src)
    start = time.perf_counter()
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or non-weights pickle
        raise CheckpointError(f"{src}: not a readable weights-only torch state dict ({e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{src}: expected a state dict, got {type(state).__name__}")
    params = probe_params_from_state_dict(state, str(src))
    param_dtype = resolve_dtype(dtype, DTYPES["float32"])
    dims = [params["w1"].shape[0]] + [params[f"w{n}"].shape[1] for n in (1, 2, 3)]
    meta = {"kind": "probe", "dims": dims, "param_dtype": param_dtype.name,
            "converted_from": {"layout": "probe", "path": str(src.resolve())}}
    with atomic_directory(user_path(dst), overwrite, src) as tmp:
        write_flax_checkpoint(tmp, meta, ((name, params[name].astype(param_dtype)) for name in PARAM_NAMES))
    nbytes = sum(p.nbytes for p in params.values())
    return ConversionSummary(Path(dst), "probe", len(params), nbytes, time.perf_counter() - start)


def convert_any(
    src: str | Path,
    dst: str | Path,
    *,
    to: str = "flax",
    revision: str | None = None,
    keep_mxfp4: bool = False,
    mxfp4: bool = False,
    dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """`python -m convert`: whatever `src` is, the conversion it asks for. `src` is a path or a hub id
    (with `revision`, `checkpoint.location.resolve_checkpoint`). `to="hf"`: `export_hf` of a converted
    checkpoint (`mxfp4`: MXFP4 experts). `to="flax"`: by `src`'s layout, a probe `.pt` -> `convert_probe`,
    anything else -> `convert_checkpoint` (`keep_mxfp4`: experts kept packed). It lives here, not in
    `checkpoint.convert`, because a probe is a hybrid artifact: the checkpoint layer may not import this one.

    ValueError for an option that does not apply: `keep_mxfp4` with `to="hf"` or for a probe (a probe has
    no experts), `mxfp4` with `to="flax"`; CheckpointError / FileExistsError as the conversion raises them."""
    if to not in ("flax", "hf"):
        raise ValueError(f"to must be 'flax' or 'hf', got {to!r}")
    if to == "hf" and keep_mxfp4:
        raise ValueError("--keep-mxfp4 applies to --to flax; use --mxfp4 for MXFP4 experts in an HF export")
    if to == "flax" and mxfp4:
        raise ValueError("--mxfp4 applies to --to hf; use --keep-mxfp4 to keep experts packed in a Flax checkpoint")
    src = resolve_checkpoint(src, revision)
    if to == "hf":
        return export_hf(src, dst, mxfp4=mxfp4, dtype=dtype, overwrite=overwrite, progress=progress)
    if locate_checkpoint(src).layout == "probe":
        if keep_mxfp4:
            raise ValueError("--keep-mxfp4 applies to gpt-oss checkpoints, not to a probe")
        return convert_probe(src, dst, dtype=dtype, overwrite=overwrite)
    return convert_checkpoint(src, dst, keep_mxfp4=keep_mxfp4, dtype=dtype, overwrite=overwrite, progress=progress)


def load_probe(path: str | Path) -> dict[str, jax.Array]:
    """A probe converted by `python -m convert probe.pt DST`: {w1, b1, w2, b2, w3, b3} ([in, out] layout)."""
    checkpoint = open_converted(path, "probe", "convert the probe .pt first: `python -m convert probe.pt DST`")
    abstract = {t: jax.ShapeDtypeStruct(s, d, sharding=_local_device()) for t, (s, d) in checkpoint.shapes.items()}
    return dict(checkpoint.read(abstract))
