"""`.safetensors` files read and written one tensor at a time, with numpy and ml_dtypes only.

The format: 8 bytes little-endian header length N, N bytes of JSON header
`{key: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`
(offsets relative to the end of the header), then the tensors' raw little-endian bytes, back to back.

Why not the `safetensors` package: its numpy backend has no bfloat16, and its flax backend puts every
tensor on a JAX device first, doubling host memory for the largest tensors. Reading into a fresh
numpy buffer straight from the file costs exactly one copy of one tensor; writing needs only the
keys, shapes and dtypes up front, so a checkpoint of any size streams through one tensor of memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a checkpoint header (the real gpt-oss-20b shard headers are ~30 KB).
_MAX_HEADER_BYTES = 100 << 20
_LENGTH = struct.Struct("<Q")


class SafetensorsFormatError(ValueError):
    """A file that is not a complete, well-formed safetensors file; the message names file and key."""


class TensorInfo(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors by key, `__metadata__`, byte offset of the data section), after checking that every
    tensor's bytes lie inside the file and match its shape and dtype."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_length = f.read(_LENGTH.size)
        if len(raw_length) < _LENGTH.size:
            raise SafetensorsFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = _LENGTH.unpack(raw_length)
        if n > min(_MAX_HEADER_BYTES, size - _LENGTH.size):
            raise SafetensorsFormatError(
                f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = _LENGTH.size + n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{path}: tensor {key!r} has a malformed header entry ({e!r})") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SafetensorsFormatError(
                f"{path}: tensor {key!r}: data_offsets {[begin, end]} do not hold shape {list(shape)} of "
                f"{entry['dtype']}"
            )
        if data_start + end > size:
            raise SafetensorsFormatError(
                f"{path}: truncated safetensors file: tensor {key!r} ends at byte {data_start + end}, "
                f"the file has {size}"
            )
        tensors[key] = TensorInfo(dtype, shape, begin, end)
    return tensors, metadata, data_start


def read_tensor(path: Path, info: TensorInfo, data_start: int) -> np.ndarray:
    """One tensor as a fresh numpy array (bfloat16 via ml_dtypes)."""
    count = math.prod(info.shape)
    arr = np.fromfile(path, dtype=info.dtype.newbyteorder("<"), count=count, offset=data_start + info.begin)
    return arr.astype(info.dtype, copy=False).reshape(info.shape)


class SafetensorsWriter:
    """Writes one `.safetensors` file from a declared list of tensors, each passed in as it is made.

    The header (all keys, shapes, dtypes, offsets) is written first; `write` then appends the tensors
    in the declared order and checks each against its declaration; `close` checks that every declared
    tensor arrived. Use as a context manager: on an exception the partial file is removed.
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._specs = [(k, tuple(s), np.dtype(d)) for k, s, d in specs]
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        for key, shape, dtype in self._specs:
            if dtype not in DTYPE_NAMES:
                raise TypeError(f"{self.path}: tensor {key!r}: dtype {dtype} has no safetensors name")
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        # Pad the header with spaces so the data section starts 8-byte aligned, as the reference writer does.
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")
        self._file.write(_LENGTH.pack(len(encoded)) + encoded)
        self._next = 0

    def write(self, key: str, array: np.ndarray) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {key!r} was not declared")
        want_key, want_shape, want_dtype = self._specs[self._next]
        array = np.asarray(array)
        if key != want_key or array.shape != want_shape or array.dtype != want_dtype:
            raise ValueError(
                f"{self.path}: expected tensor {want_key!r} {want_shape} {want_dtype} next, "
                f"got {key!r} {array.shape} {array.dtype}"
            )
        np.ascontiguousarray(array).astype(want_dtype.newbyteorder("<"), copy=False).tofile(self._file)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            missing = self._specs[self._next][0]
            raise ValueError(f"{self.path}: closed before tensor {missing!r} was written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            os.unlink(self.path)
