"""A model's parameters read piece by piece: one sub-module, or one vocabulary slice, at a time.

`WeightSource` opens an HF checkpoint directory or one converted to our Flax format and yields the
parameters of any part of the model (one decoder layer, the final norm) under a path prefix, one
tensor in memory at a time, plus rows or chunks of the vocabulary-sized embedding and lm_head without
the whole matrix (from an HF directory only those rows' bytes are read). `loading.from_pretrained`
builds a whole model (or its first layers); this is for a caller that holds one piece at a time, such
as the layer-by-layer parity check (`evaluation.parity`), so a full-size model checks in little memory.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ..model.config import GptOssConfig
from .flax_format import open_flax_checkpoint
from .layout_reading import SafetensorsReader, read_params, safetensors_files
from .layouts import hf_rules
from .loading import path_key
from .location import CheckpointError, locate_checkpoint


class WeightSource:
    """Our parameters, layer by layer, from an HF directory or a converted (Flax) checkpoint."""

    def __init__(self, path: Path, config: GptOssConfig, dtype):
        self.location = locate_checkpoint(path)
        self.config = config
        self.dtype = dtype
        if self.location.layout == "flax":
            self.flax = open_flax_checkpoint(self.location.path)
            self.packed = self.flax.packed_experts
        elif self.location.layout == "hf":
            self.reader = SafetensorsReader(safetensors_files(self.location.path))
            self.rules = hf_rules(config, set(self.reader.keys()))
            self.packed = False
        else:
            raise CheckpointError(f"{self.location.path}: parity reads HF or converted checkpoints, not "
                                  f"{self.location.layout!r}")

    def params(self, prefix: str, abstract: nnx.Module) -> dict[str, np.ndarray]:
        """Every parameter whose path starts with `prefix` (e.g. 'layers/3/'), keyed without it."""
        return dict(self.stream(prefix, abstract))

    def stream(self, prefix: str, abstract: nnx.Module):
        """(path without `prefix`, array) pairs, one tensor in memory at a time."""
        _, state = nnx.split(abstract)
        wanted = {prefix + path_key(p): v for p, v in nnx.to_flat_state(state)}
        if self.location.layout == "flax":
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract_arrays = {t: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for t, v in wanted.items()}
            for t, a in self.flax.read(abstract_arrays):
                yield t[len(prefix):], np.asarray(a)
            return
        rules = [r for r in self.rules if r.target in wanted]
        expected = {t: (tuple(v.shape), np.dtype(v.dtype)) for t, v in wanted.items()}
        for target, value in read_params(self.reader, rules, self.config, expected, check=False, widen_later=True):
            yield target[len(prefix):], value


    def _vocab_param(self, target: str, abstract: nnx.Module):
        _, state = nnx.split(abstract)
        variable = dict((path_key(p), v) for p, v in nnx.to_flat_state(state))[target]
        axes = tuple(getattr(variable, "axes", None) or ())
        if "vocab" not in axes:
            raise ValueError(f"parameter {target!r} has no 'vocab' axis (axes {axes})")
        return variable, axes.index("vocab")

    def _whole(self, target: str, abstract: nnx.Module) -> np.ndarray:
        return dict(self.stream("", abstract))[target]

    def vocab_rows(self, target: str, rows: np.ndarray, abstract: nnx.Module) -> np.ndarray:
        """`target` (e.g. 'embed_tokens') at the vocabulary entries `rows`, in our layout; from an HF
        directory only those entries' bytes are read."""
        variable, axis = self._vocab_param(target, abstract)
        if self.location.layout == "flax":
            return np.take(self._whole(target, abstract), rows, axis=axis)
        return np.concatenate([self._hf_vocab_slice(target, int(r), int(r) + 1, variable, axis) for r in rows], axis)

    def vocab_chunks(self, target: str, abstract: nnx.Module, chunk: int):
        """(start, stop, slice) over `target`'s vocabulary axis in chunks of `chunk` entries, our
        layout. From an HF directory one chunk is in memory at a time; a converted checkpoint is read
        whole once (orbax restores whole arrays)."""
        variable, axis = self._vocab_param(target, abstract)
        size = variable.shape[axis]
        whole = self._whole(target, abstract) if self.location.layout == "flax" else None
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            if whole is not None:
                yield start, stop, np.take(whole, np.arange(start, stop), axis=axis)
            else:
                yield start, stop, self._hf_vocab_slice(target, start, stop, variable, axis)

    def _hf_vocab_slice(self, target, start, stop, variable, axis) -> np.ndarray:
        """Our rule's transform applied to rows [start, stop) of its (single) source tensor, whose
        first axis is the vocabulary (true of gpt-oss's embedding and lm_head in both layouts)."""
        rule = next((r for r in self.rules if r.target == target), None)
        if rule is None or len(rule.sources) != 1:
            raise CheckpointError(f"{self.location.path}: no single-tensor rule reads {target!r}")
        source = self.reader.get_rows(rule.sources[0], start, stop)
        value = np.asarray(rule.transform([source], self.config))
        shape = list(variable.shape)
        shape[axis] = stop - start
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.reader.file_of(rule.sources[0])}: tensor {rule.sources[0]!r} rows {start}:{stop} give shape "
                f"{value.shape} for {target!r}, expected {tuple(shape)}"
            )
        return value.astype(variable.dtype)
