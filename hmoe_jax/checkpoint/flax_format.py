"""The converted checkpoint format: what `python -m convert` writes and `from_pretrained` reads.

    DST/
      config.json   GptOssConfig.to_dict() plus {"format": "hmoe-jax-flax", "format_version": 2,
                    "kind": "gpt_oss", "experts": "dense" | "mxfp4", "param_dtype": "bfloat16", ...};
                    for a probe {"format", "format_version", "kind": "probe", "dims": [2880, 512, 128, 1]}
      params/       ONE orbax PyTree checkpoint (OCDBT) of the nested parameter dict, keyed by the NNX
                    paths of the model: {"layers": {"0": {"self_attn": {"q_proj": array}}}, ...}

`config.json` stays loadable by `load_config`, so tools that only want the config need no orbax.

Parameters are stored in the model's own layout, so a change of layout is a new `FORMAT_VERSION`:
- 1: dense experts [E, in, out] (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]);
- 2: dense experts [E, out, in] (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), as `model.layers.Experts`
  holds them now. Nothing else changed: a version-1 probe or packed-MXFP4 checkpoint holds exactly the
  bytes version 2 would and is still read; a version-1 checkpoint with dense experts is refused, with
  the advice to re-convert it.

Streaming: orbax's (experimental v1) `partial.save` adds a disjoint subtree to a checkpoint that is
not yet finalized, each call as its own OCDBT database; `partial.finalize` merges them under one
manifest, giving an ordinary PyTree checkpoint that any orbax `load` reads. We call it once per group
of tensors of at most `GROUP_BYTES` (a larger tensor is a group of its own), so writing holds one group
in host memory, whatever the model size. Reading loads the same kind of groups with `partial_load`,
each leaf restored straight into its sharding on the mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

from ..model.config import GptOssConfig
from .location import FLAX_FORMAT, FLAX_FORMAT_KEY, CheckpointError, locate_checkpoint

FORMAT_VERSION = 2
# Older versions still read, by what they hold: (format_version, kind, experts) -> same bytes as today.
_COMPATIBLE = {(1, "probe", None), (1, "gpt_oss", "mxfp4")}
PARAMS_DIR = "params"
GROUP_BYTES = 512 << 20

ShapeDtype = tuple[tuple[int, ...], np.dtype]


def _orbax():
    # Imported on first use: orbax pulls in a large dependency tree that plain HF loading never needs.
    from orbax.checkpoint.experimental import v1 as ocp

    return ocp


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _groups(items: Iterable[tuple[str, int]], group_bytes: int) -> Iterator[list[str]]:
    """Consecutive names whose sizes add up to at most `group_bytes` (a larger item alone)."""
    group, size = [], 0
    for name, nbytes in items:
        if group and size + nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def write_flax_checkpoint(
    directory: Path,
    meta: Mapping[str, Any],
    params: Iterable[tuple[str, np.ndarray]],
    group_bytes: int = GROUP_BYTES,
) -> None:
    """Write `config.json` (`meta` plus the format marker) and `params/` into the existing `directory`,
    consuming `params` (target path, host array) one group of at most `group_bytes` at a time."""
    ocp = _orbax()
    directory = Path(directory).expanduser().resolve()  # orbax takes absolute paths only
    params_path = directory / PARAMS_DIR
    ctx = ocp.Context()
    # The arrays are ours and never mutated while being written: skip orbax's defensive host copy.
    ctx.memory.deepcopy_host_arrays = False
    # Uncompressed: MXFP4 bytes and bf16 weights barely compress (decoded MXFP4 experts do, ~2x), and
    # zstd cut write throughput ~3x on a 2-core host while holding the compressed copy in memory.
    ctx.array.saving.use_compression = False
    written = 0
    with ctx:
        group: dict[str, np.ndarray] = {}
        size = 0
        for target, array in params:
            array = np.asarray(array)
            if group and size + array.nbytes > group_bytes:
                ocp.partial.save(params_path, _nest(group))
                written, group, size = written + len(group), {}, 0
            group[target] = array
            size += array.nbytes
            # A full group goes to disk before the next tensor is made: peak memory is one group plus
            # what making one tensor takes.
            if size >= group_bytes:
                ocp.partial.save(params_path, _nest(group))
                written, group, size = written + len(group), {}, 0
        if group:
            ocp.partial.save(params_path, _nest(group))
            written += len(group)
        if not written:
            raise CheckpointError(f"{directory}: no parameters to write")
        ocp.partial.finalize(params_path)
    config = {**meta, FLAX_FORMAT_KEY: FLAX_FORMAT, "format_version": FORMAT_VERSION}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class FlaxCheckpoint:
    """An opened converted checkpoint: its `config.json` (`meta`) and the shapes of its parameters."""

    path: Path
    meta: dict[str, Any]
    shapes: dict[str, ShapeDtype]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def config(self) -> GptOssConfig:
        return GptOssConfig.from_dict(self.meta, source=str(self.path / "config.json"))

    @property
    def packed_experts(self) -> bool:
        return self.meta.get("experts") == "mxfp4"

    @property
    def param_dtype(self) -> np.dtype:
        return np.dtype(jax.numpy.dtype(self.meta["param_dtype"]))

    def check_params(self, expected: Mapping[str, ShapeDtype]) -> None:
        """Same parameter paths and shapes as `expected` (dtypes may differ: loading casts)."""
        where = self.path / PARAMS_DIR
        missing = sorted(set(expected) - set(self.shapes))
        if missing:
            raise CheckpointError(f"{where}: parameter {missing[0]!r} is missing" + _more(missing))
        unexpected = sorted(set(self.shapes) - set(expected))
        if unexpected:
            raise CheckpointError(f"{where}: unexpected parameter {unexpected[0]!r}" + _more(unexpected))
        for target, (shape, _) in expected.items():
            if tuple(self.shapes[target][0]) != tuple(shape):
                raise CheckpointError(
                    f"{where}: parameter {target!r} has shape {self.shapes[target][0]}, the config implies "
                    f"{tuple(shape)}"
                )

    def read(
        self,
        abstract: Mapping[str, jax.ShapeDtypeStruct],
        group_bytes: int = GROUP_BYTES,
    ) -> Iterator[tuple[str, jax.Array]]:
        """Yield (target, jax.Array) for every entry of `abstract` (shape, dtype to cast to, sharding),
        loading groups of at most `group_bytes` of stored data at a time."""
        ocp = _orbax()
        ctx = ocp.Context()
        ctx.pytree.loading.partial_load = True
        sizes = ((t, math.prod(a.shape) * self.shapes[t][1].itemsize) for t, a in abstract.items())
        for group in _groups(sizes, group_bytes):
            with ctx:
                try:
                    loaded = ocp.load(self.path / PARAMS_DIR, _nest({t: abstract[t] for t in group}))
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{self.path / PARAMS_DIR}: could not read {group[0]!r}... ({e})") from None
            flat = _flatten(loaded)
            for target in group:
                yield target, flat[target]


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _check_version(meta: Mapping[str, Any], config_file: Path) -> None:
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        return
    if (version, meta.get("kind"), meta.get("experts")) in _COMPATIBLE:
        return
    source = (meta.get("converted_from") or {}).get("path")
    redo = f"`python -m convert {source} {config_file.parent} --overwrite`" if source else "`python -m convert SRC DST`"
    if version == 1 and meta.get("kind") == "gpt_oss":
        raise CheckpointError(
            f"{config_file}: written by an older hmoe_jax.convert (format_version 1), which stored the dense experts "
            f"[E, in, out]; this code stores and reads them [E, out, in] (format_version {FORMAT_VERSION}). "
            f"Re-convert the checkpoint from its source: {redo}"
        )
    raise CheckpointError(
        f"{config_file}: format_version {version!r}, this code reads {FORMAT_VERSION}: re-convert the checkpoint "
        f"with this version of hmoe_jax ({redo})"
    )


def open_flax_checkpoint(path: str | Path) -> FlaxCheckpoint:
    path = Path(path).expanduser().resolve()  # orbax takes absolute paths only
    config_file = path / "config.json"
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: cannot read the checkpoint's config ({e})") from None
    if meta.get(FLAX_FORMAT_KEY) != FLAX_FORMAT:
        raise CheckpointError(f"{config_file}: not a checkpoint written by hmoe_jax.convert")
    _check_version(meta, config_file)
    params = path / PARAMS_DIR
    if not params.is_dir():
        raise CheckpointError(f"{params}: missing (the checkpoint's parameters)")
    try:
        tree = _orbax().metadata(params).metadata
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{params}: not a readable orbax checkpoint ({e})") from None
    shapes = {t: (tuple(m.shape), np.dtype(m.dtype)) for t, m in _flatten(tree).items()}
    return FlaxCheckpoint(path, meta, shapes)


def open_converted(path: str | Path, kind: str, purpose: str) -> FlaxCheckpoint:
    """The converted checkpoint of `kind` ("gpt_oss" or "probe") at `path`, else CheckpointError saying
    what `purpose` needs."""
    location = locate_checkpoint(path)
    if location.layout != "flax":
        raise CheckpointError(f"{location.path}: not a converted Flax checkpoint ({purpose})")
    checkpoint = open_flax_checkpoint(location.path)
    if checkpoint.kind != kind:
        raise CheckpointError(f"{location.path}: a converted {checkpoint.kind} checkpoint, not a {kind} one "
                              f"({purpose})")
    return checkpoint
