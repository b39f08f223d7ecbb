"""Checkpoint conversion: PyTorch-side formats -> our Flax checkpoint (`flax_format`) and back.

- `convert_checkpoint(SRC, DST)`: an HF gpt-oss checkpoint (MXFP4 or bf16 experts) or OpenAI's
  `original/` layout -> a Flax checkpoint that `from_pretrained` reads. Streams tensor by tensor (see
  `flax_format` for the grouping). (A reference probe's `.pt` converts with
  `hmoe_jax.hybrid.artifacts.convert_probe`.)
- `export_hf(SRC, DST)`: a converted gpt-oss checkpoint -> an HF checkpoint that transformers loads,
  plain experts or MXFP4 (`mxfp4=True`), written shard by shard, tensor by tensor.
(`hmoe_jax.hybrid.artifacts.convert_any` chooses among these and `convert_probe`: `python -m convert`.)

Every output directory is built under a temporary name next to DST and renamed into place only when
complete, so an interrupted or failed conversion leaves no DST; the hidden `.DST.partial-*` that a killed
one leaves is removed by the next conversion into DST (`runtime.files.remove_orphans`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ..model.config import load_config
from ..runtime.files import atomic_directory
from ..runtime.options import RunOptions
from .flax_format import GROUP_BYTES, open_converted, write_flax_checkpoint
from .layout_reading import SafetensorsReader, check_sources, read_params, safetensors_files
from .layouts import (
    HF_BF16_EXPERTS,
    HF_GLOBAL,
    HF_LAYER,
    HF_MXFP4_EXPERTS,
    HF_PACKED_EXPERTS,
    MXFP4_MODULES_NOT_CONVERTED,
    TensorRule,
    expand_rules,
    hf_rules,
    hf_tensor_shapes,
    mxfp4_experts,
    original_rules,
)
from .loading import abstract_model, expected_params
from .location import CheckpointError, locate_checkpoint
from .safetensors_file import SafetensorsWriter

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
# The released gpt-oss-20b uses shards of about this size.
HF_SHARD_BYTES = 5 * 10**9


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    destination: Path
    source_layout: str
    tensors: int
    bytes: int  # source bytes read (convert) or bytes written (export)
    seconds: float

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


class _Progress:
    """tqdm over bytes, with the tensor count as postfix; silent unless enabled."""

    def __init__(self, enabled: bool, total_bytes: int, total_tensors: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        disable=not enabled, dynamic_ncols=True)
        self.done, self.total_tensors, self.bytes = 0, total_tensors, 0

    def __call__(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _storage_options(param_dtype: np.dtype, packed: bool) -> RunOptions:
    """How the converted model stores its parameters (all that converting needs of the options)."""
    return RunOptions(param_dtype=param_dtype, experts="packed" if packed else "dense", execution="program")


def _dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def resolve_dtype(dtype: str | np.dtype | None, lossless: np.dtype) -> np.dtype:
    if dtype is None:
        return lossless
    resolved = np.dtype(jnp.dtype(dtype))
    if resolved not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return resolved


# ---------------------------------------------------------------- PyTorch layouts -> Flax

def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    keep_mxfp4: bool = False,
    dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    group_bytes: int = GROUP_BYTES,
) -> ConversionSummary:
    """Convert the gpt-oss checkpoint at `src` (see `location.locate_checkpoint`) into a Flax
    checkpoint directory `dst`.

    `dtype` is the stored dtype of floating-point parameters (norms stay float32). None keeps it
    lossless: bfloat16 when every floating-point source tensor is bfloat16 (MXFP4 values are exact
    in bfloat16, so this is the released gpt-oss-20b), else float32.
    `keep_mxfp4` stores MXFP4 experts packed (uint8 blocks/scales, decoded in the forward).
    """
    src = Path(src).expanduser()
    location = locate_checkpoint(src)
    if location.layout == "probe":
        raise CheckpointError(f"{src}: a probe state dict, not a gpt-oss checkpoint: convert it with "
                              "hmoe_jax.hybrid.artifacts.convert_probe (`python -m convert` does)")
    if location.layout == "flax":
        raise CheckpointError(f"{location.path}: already a converted Flax checkpoint (export it with --to hf)")
    config = load_config(location.path)
    reader = SafetensorsReader(safetensors_files(location.path))
    if location.layout == "original":
        rules = original_rules(config, keep_mxfp4)
    else:
        rules = hf_rules(config, set(reader.keys()), keep_mxfp4)
    check_sources(reader, rules)

    float_sources = {reader.shape_dtype(s)[1] for r in rules if not r.packed for s in r.sources}
    lossless = DTYPES["bfloat16"] if float_sources == {DTYPES["bfloat16"]} else DTYPES["float32"]
    param_dtype = resolve_dtype(dtype, lossless)
    abstract = abstract_model(config, _storage_options(param_dtype, keep_mxfp4))
    meta: dict[str, Any] = {
        **config.to_dict(),
        "kind": "gpt_oss",
        "experts": "mxfp4" if keep_mxfp4 else "dense",
        "param_dtype": _dtype_name(param_dtype),
        "converted_from": {"layout": location.layout, "path": str(location.path.resolve())},
    }
    total = sum(reader.nbytes(s) for r in rules for s in r.sources)
    start = time.perf_counter()
    bar = _Progress(progress, total, len(rules), desc=f"convert {location.layout}")
    try:
        with atomic_directory(Path(dst), overwrite, location.path) as tmp:
            params = read_params(reader, rules, config, expected_params(abstract), bar)
            write_flax_checkpoint(tmp, meta, params, group_bytes)
            _copy_tokenizer(location.path, tmp, also_parent=location.layout == "original")
    finally:
        bar.close()
    return ConversionSummary(Path(dst), location.layout, bar.done, bar.bytes, time.perf_counter() - start)


# Files a converted checkpoint carries over unchanged, so the pipeline's stages (which tokenize with the
# checkpoint's own tokenizer and chat template) run on it as on the source. The parent of an `original/`
# folder holds them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


def _copy_tokenizer(src: Path, dst: Path, also_parent: bool) -> None:
    for name in TOKENIZER_FILES:
        for folder in (src, src.parent) if also_parent else (src,):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dst / name)
                break


# ---------------------------------------------------------------- Flax -> Hugging Face

def _export_rules(config, mxfp4: bool, packed_stored: bool) -> list[TensorRule]:
    experts = (HF_PACKED_EXPERTS if packed_stored else HF_MXFP4_EXPERTS) if mxfp4 else HF_BF16_EXPERTS
    globals_ = [r for r in HF_GLOBAL if not (config.tie_word_embeddings and r.target == "lm_head")]
    return expand_rules(globals_, HF_LAYER + experts, config.num_hidden_layers)


def _shards(keys: list[str], nbytes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key in keys:
        if current and size + nbytes[key] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes[key]
    return shards + [current]


def export_hf(
    src: str | Path,
    dst: str | Path,
    *,
    mxfp4: bool = False,
    dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    max_shard_bytes: int = HF_SHARD_BYTES,
) -> ConversionSummary:
    """Write the converted gpt-oss checkpoint `src` as an HF checkpoint `dst` (`model*.safetensors`,
    an index when sharded, `config.json`, and the tokenizer files and chat template `src` carries).

    Experts are written plain (`gate_up_proj`/`down_proj`, the layout of bf16 re-uploads) or, with
    `mxfp4`, as `*_blocks`/`*_scales` (packed experts are copied byte for byte; dense ones are
    re-packed, exactly when their values came from MXFP4). `dtype`: floating-point tensors' dtype,
    by default the one the checkpoint stores.
    """
    checkpoint = open_converted(src, "gpt_oss", "export reads what `python -m convert` wrote from a gpt-oss model")
    config = checkpoint.config
    float_dtype = resolve_dtype(dtype, checkpoint.param_dtype)
    expected = expected_params(abstract_model(config, _storage_options(checkpoint.param_dtype,
                                                                        checkpoint.packed_experts)))
    checkpoint.check_params(expected)

    rules = _export_rules(config, mxfp4, checkpoint.packed_experts)
    shapes = hf_tensor_shapes(config, "mxfp4" if mxfp4 else "bf16")
    keys = [s for r in rules for s in r.sources]
    if sorted(keys) != sorted(shapes):
        raise AssertionError("export rules and hf_tensor_shapes disagree")  # a bug here, not bad input
    dtypes = {s: np.dtype(np.uint8) if r.packed else float_dtype for r in rules for s in r.sources}
    nbytes = {k: int(np.prod(shapes[k])) * dtypes[k].itemsize for k in keys}
    shards = _shards(keys, nbytes, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))])

    start = time.perf_counter()
    bar = _Progress(progress, sum(nbytes.values()), len(keys), desc="export hf")
    try:
        with atomic_directory(Path(dst), overwrite, checkpoint.path) as tmp:
            tensors = _hf_tensors(checkpoint, rules, config, dtypes)
            for name, shard in zip(names, shards):
                specs = [(k, shapes[k], dtypes[k]) for k in shard]
                with SafetensorsWriter(tmp / name, specs, {"format": "pt"}) as writer:
                    for key in shard:
                        written_key, array = next(tensors)
                        writer.write(written_key, array)
                        bar(key, array.nbytes)
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(nbytes.values())},
                         "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(_hf_config(config, mxfp4, float_dtype), indent=2) + "\n")
            _copy_tokenizer(checkpoint.path, tmp, also_parent=False)
    finally:
        bar.close()
    return ConversionSummary(Path(dst), "flax", bar.done, bar.bytes, time.perf_counter() - start)


def _hf_config(config, mxfp4: bool, float_dtype: np.dtype) -> dict[str, Any]:
    hf = config.to_hf_dict()
    hf["dtype"] = _dtype_name(float_dtype)
    if mxfp4:
        hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED}
    return hf


def _hf_tensors(checkpoint, rules: list[TensorRule], config,
                dtypes: Mapping[str, np.dtype]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, array) in rule order: each rule's target read from the checkpoint (dense experts
    decoded from packed ones when that is what is stored), then its inverse transform."""
    stored = {}
    for rule in rules:
        stored[rule.target] = ((rule.target,) if rule.target in checkpoint.shapes
                               else (rule.target + "_blocks", rule.target + "_scales"))
    host = SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = {t: jax.ShapeDtypeStruct(checkpoint.shapes[t][0], checkpoint.shapes[t][1], sharding=host)
                for names in stored.values() for t in names}
    values = checkpoint.read(abstract)
    for rule in rules:
        arrays = [np.asarray(next(values)[1]) for _ in stored[rule.target]]
        value = arrays[0] if len(arrays) == 1 else mxfp4_experts(arrays, config)
        for key, array in zip(rule.sources, rule.transform.inverse(value, config)):
            yield key, array.astype(dtypes[key], copy=False)
