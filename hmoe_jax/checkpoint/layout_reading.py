"""Reading a safetensors checkpoint through a layout's key table, one tensor at a time.

`SafetensorsReader` gives lazy access by key to the tensors of a checkpoint's shard files
(`safetensors_files` finds them); `check_sources` validates a layout's `TensorRule`s against the keys
and dtypes present before any data is read, and `read_params` streams (parameter, array) pairs through
the rules' transforms, checking each result's shape. This is the I/O side of `layouts`, kept apart so
that `layouts` holds only the key tables and the pure functions over them, and so that every reader of
PyTorch-side checkpoints (`loading`, `convert`, `weight_source`) shares this one code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from ..model.config import GptOssConfig
from .layouts import TensorRule
from .location import CheckpointError
from .safetensors_file import SafetensorsFormatError, read_header, read_tensor


class SafetensorsReader:
    """Lazy access to the tensors of one or more `.safetensors` files, by key, one tensor at a time."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self._where: dict[str, Path] = {}
        self._info = {}
        self._data_start: dict[Path, int] = {}
        for f in self.files:
            try:
                tensors, _, data_start = read_header(f)
            except SafetensorsFormatError as e:
                raise CheckpointError(str(e)) from None
            self._data_start[f] = data_start
            for key, info in tensors.items():
                if key in self._where:
                    raise CheckpointError(f"{f}: tensor {key!r} also appears in {self._where[key]}")
                self._where[key] = f
                self._info[key] = info

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        info = self._info[key]
        return info.shape, info.dtype

    def nbytes(self, key: str) -> int:
        info = self._info[key]
        return info.end - info.begin

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor's first axis, reading only their bytes (a vocabulary chunk
        of a 200k x 2880 embedding, say, without the other 2 GB)."""
        f = self._where.get(key)
        if f is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint ({', '.join(map(str, self.files))})")
        info = self._info[key]
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"{f}: rows {start}:{stop} outside tensor {key!r} of shape {info.shape}")
        row_bytes = (info.end - info.begin) // max(info.shape[0], 1)
        sliced = info._replace(shape=(stop - start, *info.shape[1:]), begin=info.begin + start * row_bytes,
                               end=info.begin + stop * row_bytes)
        try:
            return read_tensor(f, sliced, self._data_start[f])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: tensor {key!r} rows {start}:{stop} could not be read ({e})") from None

    def get(self, key: str) -> np.ndarray:
        f = self._where.get(key)
        if f is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint ({', '.join(map(str, self.files))})")
        try:
            return read_tensor(f, self._info[key], self._data_start[f])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: tensor {key!r} could not be read ({e})") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files: from `model.safetensors.index.json` when present, else all
    `*.safetensors` (HF names them `model*.safetensors`, OpenAI's `original/` has `model.safetensors`)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {[str(m) for m in missing]}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files (config.json without weights)")
    return files


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def check_sources(reader: SafetensorsReader, rules: Sequence[TensorRule]) -> None:
    """Before reading any data: every key the rules need is present, every key present is used, and
    each has the right kind of dtype (uint8 MXFP4 bytes or floating point)."""
    used = {s for r in rules for s in r.sources}
    keys = set(reader.keys())
    missing = [s for r in rules for s in r.sources if s not in keys]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing from the checkpoint ({', '.join(map(str, reader.files))})"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(keys - used)
    if unexpected:
        raise CheckpointError(
            f"{reader.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for rule in rules:
        for key in rule.sources:
            _, dtype = reader.shape_dtype(key)
            ok = dtype == np.uint8 if rule.packed else _is_float(dtype)
            if not ok:
                want = "uint8 (MXFP4 bytes)" if rule.packed else "a floating-point dtype"
                raise CheckpointError(f"{reader.file_of(key)}: tensor {key!r} has dtype {dtype}, expected {want}")


def _lossless_widening(src: np.dtype, dst: np.dtype) -> bool:
    src, dst = np.dtype(src), np.dtype(dst)
    floating = lambda d: d.kind == "f" or d == np.dtype(ml_dtypes.bfloat16)  # noqa: E731
    return floating(src) and floating(dst) and dst.itemsize > src.itemsize


def read_params(
    reader: SafetensorsReader,
    rules: Sequence[TensorRule],
    config: GptOssConfig,
    expected: dict[str, tuple[tuple[int, ...], np.dtype]],
    progress: Callable[[str, int], None] | None = None,
    check: bool = True,
    widen_later: bool = False,
    keep_stored: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (target, array) for every rule, checking the result's shape against `expected` (target ->
    (shape, dtype)); `check_sources` runs first, before any tensor is read (`check=False`: the caller
    ran it on a superset of `rules`, e.g. when loading only the first layers).
    `widen_later`: a float tensor narrower than its target dtype (bfloat16 for a float32 model) is
    yielded as it is, for a consumer that widens it after placing it (`loading.fill_model`, on the
    device): the host never holds a float32 copy of it. `keep_stored`: every tensor is yielded in the
    dtype its transform gives (the checkpoint's; bfloat16 for decoded MXFP4 experts), uncast."""
    if check:
        check_sources(reader, rules)
    produced = {r.target for r in rules}
    missing_targets = sorted(set(expected) - produced)
    if missing_targets:
        raise CheckpointError(f"no checkpoint tensor provides parameter {missing_targets[0]!r}")
    for rule in rules:
        if rule.target not in expected:
            raise CheckpointError(f"rule target {rule.target!r} is not a parameter of the model")
        sources = [reader.get(k) for k in rule.sources]
        try:
            value = rule.transform(sources, config)
        except CheckpointError as e:
            raise CheckpointError(f"{reader.file_of(rule.sources[0])}: tensor {rule.sources[0]!r}: {e}") from None
        except ValueError as e:  # reshape failures: the stored shape cannot be this parameter
            shapes = {k: a.shape for k, a in zip(rule.sources, sources)}
            raise CheckpointError(
                f"{reader.file_of(rule.sources[0])}: tensor(s) {shapes} cannot form parameter {rule.target!r}: "
                f"the config implies shape {expected[rule.target][0]} ({e})"
            ) from None
        # The sources go before the cast: a transform that made a new array (a transpose) then holds
        # only that array and the cast's output at once, as an identity rule does.
        shapes = {k: a.shape for k, a in zip(rule.sources, sources)}
        nbytes = sum(a.nbytes for a in sources)
        del sources
        want_shape, want_dtype = expected[rule.target]
        if tuple(value.shape) != tuple(want_shape):
            raise CheckpointError(
                f"{reader.file_of(rule.sources[0])}: tensor(s) {shapes} give shape {tuple(value.shape)} for "
                f"parameter {rule.target!r}, but the config implies {tuple(want_shape)}"
            )
        if progress is not None:
            progress(rule.target, nbytes)
        if not (keep_stored or widen_later and _lossless_widening(value.dtype, want_dtype)):
            value = value.astype(want_dtype, copy=False)
        yield rule.target, value
        del value  # before the next tensor is read: the consumer has placed this one
