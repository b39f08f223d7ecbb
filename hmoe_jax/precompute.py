"""Hidden-state features of the frozen model, computed once and stored for probe training.

A feature store is a directory:

    metadata.json   what the rows are (scenario ids, targets, token counts), which model and layers
                    produced them, and how they were batched
    mean.zarr       float32 [prompts, layers, hidden]: hidden_states[layer] averaged over real tokens
    last.zarr       float32 [prompts, layers, hidden]: hidden_states[layer] at the last real token
    done.zarr       uint8 [prompts]: 1 once a prompt's features are written

Prompts are tokenized raw (no chat template), sorted by length and cut into batches, each left-padded
to a bucketed length so only a handful of shapes is ever compiled. The jitted forward stops at the
deepest requested layer and pools inside the program, so only [batch, layers, hidden] leaves the
devices. The batch plan depends only on the prompts and the settings, so a killed run resumes batch
for batch and ends with the very bytes an uninterrupted run writes.

Several processes (`hmoe_jax.distributed`, one per host) run the same batches as one program, each
batch split over the mesh's `data` axis across hosts; every process gets the batch's features back.
Process 0 alone writes `metadata.json`; the arrays' row chunks are dealt round-robin to the processes
(chunk c to process c mod N), each writing only its own chunks' features and done flags, so no two
processes ever write one file. A resumed run, on any number of processes, redoes the batches with a
row not flagged done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh

from . import data, distributed
from .config import load_config
from .loading import from_pretrained
from .model import default_position_ids
from .router_negatives import NEGATIVE_PROMPTS
from .sharding import batch_sharding

FORMAT = "hmoe-jax-features"
FORMAT_VERSION = 1
POOLINGS = ("mean", "last")
METADATA_FILE = "metadata.json"
DONE_ARRAY = "done.zarr"
# Rows per stored chunk: one chunk is ~0.7 MB of gpt-oss-20b features per layer.
ROWS_PER_CHUNK = 64
# Bytes read from each end of every safetensors file for the model fingerprint.
_FINGERPRINT_BYTES = 1 << 20
# Metadata fields that identify what a store holds; a resumed run must agree on all of them.
_IDENTITY_FIELDS = ("format", "version", "kind", "source_sha256", "model_fingerprint", "layers", "poolings",
                    "hidden_size", "dtype", "batch_size", "bucket", "scenario_ids", "token_counts")


class StoreError(ValueError):
    """A feature store that cannot be used as asked; nothing has been written when it is raised."""


@dataclass(frozen=True)
class PromptSet:
    """What a store's rows are: ids, raw prompts, regression targets (None for router negatives) and
    where they came from (`kind` "scenarios" or "router_negatives")."""

    kind: str
    ids: list[str]
    prompts: list[str]
    targets: dict[str, dict[str, list[float | None]]] | None
    source: str
    source_sha256: str


def scenario_targets(scenarios: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """{expert: {argument or "output": one value per scenario}} read from the computation markers;
    None where a scenario has no marker for the expert (its probes never see that scenario)."""
    targets: dict[str, dict[str, list[float | None]]] = {
        expert: {name: [] for name in (*args, "output")} for expert, args in data.EXPERT_ARGS.items()
    }
    for scenario in scenarios:
        markers = {m["expert"]: m for m in scenario["computation_markers"]}
        for expert, columns in targets.items():
            marker = markers.get(expert)
            for name, column in columns.items():
                if marker is None:
                    column.append(None)
                else:
                    column.append(marker["output"] if name == "output" else marker["inputs"][name])
    return targets


def scenario_prompts(path: str | Path) -> PromptSet:
    """The prompts of a data set file (checked against the schema by `data.load_scenarios`)."""
    path = Path(path)
    scenarios = data.load_scenarios(path)
    if not scenarios:
        raise StoreError(f"{path}: the data set holds no scenarios")
    ids = [s["id"] for s in scenarios]
    if len(set(ids)) != len(ids):
        raise StoreError(f"{path}: scenario ids are not unique")
    return PromptSet(
        kind="scenarios",
        ids=ids,
        prompts=[s["input_prompt"] for s in scenarios],
        targets=scenario_targets(scenarios),
        source=str(path),
        source_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def router_negative_prompts() -> PromptSet:
    """The router classifier's negatives: the library's fixed list of non-computational questions."""
    text = "\n".join(NEGATIVE_PROMPTS)
    return PromptSet(
        kind="router_negatives",
        ids=[f"neg_{i:04d}" for i in range(len(NEGATIVE_PROMPTS))],
        prompts=list(NEGATIVE_PROMPTS),
        targets=None,
        source="hmoe_jax.router_negatives",
        source_sha256=hashlib.sha256(text.encode()).hexdigest(),
    )


def checkpoint_fingerprint(path: str | Path) -> str:
    """A short hash naming a checkpoint's content: config.json, tokenizer.json, and for every
    safetensors file its header (tensor names, shapes, offsets) and first and last MiB. Cheap on a
    13 GB checkpoint, and it changes when the weights, the architecture or the tokenizer do."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(shard.name.encode())
            digest.update(f.read(header_len))
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(size - _FINGERPRINT_BYTES, 0))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def load_tokenizer(path: str | Path):
    """The checkpoint's own `tokenizer.json`, read offline with `tokenizers`."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise StoreError(f"{path}: no tokenizer.json beside the checkpoint")
    return Tokenizer.from_file(str(file))


def tokenize(tokenizer, prompts: Sequence[str], vocab_size: int, *, what: str = "prompt",
             error: type[Exception] = None) -> list[np.ndarray]:
    """Token ids of each raw text, exactly as `tokenizer(text)` gives them (no chat template); an empty
    encoding or an id past the model's vocabulary raises `error` (StoreError) naming `what` #i."""
    error = error or StoreError
    encoded = [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(list(prompts))]
    for i, ids in enumerate(encoded):
        if ids.size == 0:
            raise error(f"{what} #{i} tokenizes to nothing")
        if ids.max() >= vocab_size:
            raise error(f"{what} #{i} has token id {ids.max()} >= the model's vocab_size {vocab_size}: "
                        "the tokenizer does not belong to this checkpoint")
    return encoded


def bucket_length(n_tokens: int, bucket: int) -> int:
    """Padded length of a batch whose longest prompt has `n_tokens`: the next multiple of `bucket`."""
    return bucket * math.ceil(n_tokens / bucket)


def plan_batches(token_counts: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices of each batch: rows sorted by length (ties by row), so a batch's prompts have
    similar lengths and little padding. Deterministic: a resumed run sees the same batches."""
    order = np.lexsort((np.arange(len(token_counts)), np.asarray(token_counts)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded_batch(tokens: Sequence[np.ndarray], length: int, batch_size: int, pad_id: int):
    """(input_ids, attention_mask), both int32 [batch_size, length], real tokens at the right end.
    Short batches are filled with copies of their first prompt (dropped after the forward): a row of
    padding alone would pool over zero tokens."""
    rows = list(tokens) + [tokens[0]] * (batch_size - len(tokens))
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for r, t in enumerate(rows):
        ids[r, length - len(t):] = t
        mask[r, length - len(t):] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnums=(0, 4))
def _pooled_features(graphdef, state, input_ids, attention_mask, layers):
    model = nnx.merge(graphdef, state)
    out = model.forward(input_ids, attention_mask, default_position_ids(attention_mask), stop_after_layer=max(layers))
    return _pool([out.hidden_states[layer] for layer in layers], attention_mask)


def _pool(hidden_states, attention_mask):
    hidden = jnp.stack(hidden_states, axis=1).astype(jnp.float32)  # [B, L, T, H]
    mask = attention_mask.astype(jnp.float32)[:, None, :, None]
    # Padded positions contribute exact zeros to the sum, so the mean is that of the real tokens alone.
    mean = jnp.sum(hidden * mask, axis=2) / jnp.sum(mask, axis=2)
    # Left padding puts every prompt's last real token at the last position.
    return mean, hidden[:, :, -1]


_jitted_pool = jax.jit(_pool)


def pooled_features(model, input_ids, attention_mask, layers: Sequence[int], *,
                    layerwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mean, last) float32 [batch, len(layers), hidden] of a left-padded batch. `layerwise`: run the
    blocks as separately jitted programs (`GptOssForCausalLM(..., layerwise=True)`), keeping only the
    requested residuals: the same features, compiled in seconds instead of minutes on a deep model."""
    if not layerwise:
        graphdef, state = nnx.split(model)
        mean, last = _pooled_features(graphdef, state, input_ids, attention_mask, tuple(layers))
    else:
        wanted, kept = set(layers), {}
        positions = default_position_ids(jnp.asarray(attention_mask))
        for i, x, _ in model.layerwise_blocks(input_ids, attention_mask, positions, max(layers)):
            if i in wanted:
                kept[i] = x
        mean, last = _jitted_pool([kept[layer] for layer in layers], attention_mask)
    return distributed.to_host(mean), distributed.to_host(last)


class FeatureStore:
    """A feature store on disk: its metadata and its arrays, opened with tensorstore."""

    def __init__(self, path: str | Path, metadata: dict[str, Any]):
        self.path = Path(path)
        self.metadata = metadata

    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        """Open an existing store, checking its metadata against this format."""
        path = Path(path)
        meta_path = path / METADATA_FILE
        if not meta_path.is_file():
            raise StoreError(f"{path}: not a feature store (no {METADATA_FILE})")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{meta_path}: not valid JSON ({err})") from None
        _check_metadata(metadata, meta_path)
        return cls(path, metadata)

    @property
    def layers(self) -> list[int]:
        return list(self.metadata["layers"])

    @property
    def scenario_ids(self) -> list[str]:
        return list(self.metadata["scenario_ids"])

    @property
    def complete(self) -> bool:
        return bool(self.metadata["complete"])

    def _array(self, name: str, create_shape: tuple[int, ...] | None = None, dtype: str = "float32"):
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}
        if create_shape is None:
            return ts.open(spec, open=True).result()
        chunk = [min(ROWS_PER_CHUNK, create_shape[0]), *([1] if len(create_shape) == 3 else []), *create_shape[2:]]
        spec["metadata"] = {
            "shape": list(create_shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "data_type": dtype,
        }
        return ts.open(spec, open=True, create=True).result()

    def features(self, layer: int, pooling: str = "mean") -> np.ndarray:
        """float32 [prompts, hidden] of one layer and pooling; the store must be complete."""
        if not self.complete:
            raise StoreError(f"{self.path}: the store is incomplete; rerun `train precompute` to finish it")
        if layer not in self.layers:
            raise StoreError(f"{self.path}: holds layers {self.layers}, not layer {layer}")
        if pooling not in self.metadata["poolings"]:
            raise StoreError(f"{self.path}: pooling {pooling!r} not in {self.metadata['poolings']}")
        array = self._array(f"{pooling}.zarr")
        return np.asarray(array[:, self.layers.index(layer), :].read().result(), np.float32)

    def done_rows(self) -> np.ndarray:
        return np.asarray(self._array(DONE_ARRAY).read().result(), bool)

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk, as the arrays on disk are chunked (the same for every array)."""
        if not hasattr(self, "_chunk_rows"):
            self._chunk_rows = int(self._array(DONE_ARRAY).chunk_layout.read_chunk.shape[0])
        return self._chunk_rows

    def owned_rows(self, rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
        """Which of `rows` a process writes: those of the chunks c with c mod process_count == process_index."""
        return (np.asarray(rows) // self.chunk_rows) % process_count == process_index

    def write_batch(self, rows: np.ndarray, mean: np.ndarray, last: np.ndarray) -> None:
        """Features first, then the done flags: a kill in between leaves the rows to be redone."""
        if len(rows) == 0:
            return
        writes = [self._array("mean.zarr")[rows].write(mean), self._array("last.zarr")[rows].write(last)]
        for w in writes:
            w.result()
        self._array(DONE_ARRAY)[rows].write(np.ones(len(rows), np.uint8)).result()

    def create_arrays(self) -> None:
        meta = self.metadata
        n, n_layers, hidden = len(meta["scenario_ids"]), len(meta["layers"]), meta["hidden_size"]
        for pooling in self.metadata["poolings"]:
            self._array(f"{pooling}.zarr", (n, n_layers, hidden))
        self._array(DONE_ARRAY, (n,), dtype="uint8")

    def write_metadata(self) -> None:
        data.write_json_atomically(self.path / METADATA_FILE, self.metadata)

    def mark_complete(self) -> None:
        self.metadata["complete"] = True
        self.write_metadata()


def _check_metadata(metadata: Any, where: Path) -> None:
    required = {"format": str, "version": int, "kind": str, "model_fingerprint": str, "model_path": str,
                "layers": list, "poolings": list, "hidden_size": int, "scenario_ids": list, "token_counts": list,
                "complete": bool}
    if not isinstance(metadata, dict):
        raise StoreError(f"{where}: expected a JSON object")
    if metadata.get("format") != FORMAT:
        raise StoreError(f"{where}: format {metadata.get('format')!r} is not {FORMAT!r}")
    if metadata.get("version") != FORMAT_VERSION:
        raise StoreError(f"{where}: format version {metadata.get('version')!r}, this code reads {FORMAT_VERSION}")
    for key, kind in required.items():
        if not isinstance(metadata.get(key), kind):
            raise StoreError(f"{where}: key {key!r} missing or not a {kind.__name__}")
    if len(metadata["token_counts"]) != len(metadata["scenario_ids"]):
        raise StoreError(f"{where}: {len(metadata['token_counts'])} token counts for "
                         f"{len(metadata['scenario_ids'])} prompts")
    targets = metadata.get("targets")
    if metadata["kind"] == "scenarios":
        if not isinstance(targets, dict):
            raise StoreError(f"{where}: a scenario store needs 'targets'")
        for expert, columns in targets.items():
            for name, column in columns.items():
                if not isinstance(column, list) or len(column) != len(metadata["scenario_ids"]):
                    raise StoreError(f"{where}: targets[{expert!r}][{name!r}] must hold one value per prompt")


class Progress(Protocol):
    """What a run reports: totals and what an earlier run already did, then each finished batch."""

    def start(self, total_prompts: int, total_tokens: int, done_prompts: int, done_tokens: int) -> None: ...

    def advance(self, prompts: int, tokens: int) -> None: ...


def precompute_features(
    checkpoint: str | Path,
    prompt_set: PromptSet,
    layers: Sequence[int],
    out: str | Path,
    *,
    mesh: Mesh,
    batch_size: int = 8,
    bucket: int = 32,
    dtype: str = "float32",
    progress: Progress | None = None,
    keep_mxfp4: bool | None = None,
    param_dtype: str | None = None,
    layerwise: bool = False,
) -> FeatureStore:
    """Write (or finish) the feature store `out` for `prompt_set` at `layers` of `checkpoint`.

    Only the layers up to the deepest requested one are loaded (no lm_head unless the last hidden
    state is asked for). `keep_mxfp4` keeps MXFP4 experts packed (decoded inside the forward, bit-exact)
    and `param_dtype="bfloat16"` stores float32-computed weights in bfloat16 (lossless for gpt-oss's
    bf16 checkpoints): together they let a 20b's first 12 layers run in about 10 GiB. `layerwise` jits
    the blocks one by one (`pooled_features`): the same features, compiled in seconds on a deep model.

    Everything is checked before anything is written: an existing `out` must be an unfinished or
    finished run of exactly this job (same model, layers, prompts and batching), else StoreError.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    config = load_config(checkpoint)
    layers = sorted(set(int(layer) for layer in layers))
    if not layers or layers[0] < 0 or layers[-1] > config.num_hidden_layers:
        raise StoreError(f"layers {layers} must lie in [0, {config.num_hidden_layers}] for this checkpoint")
    data_devices = mesh.shape["data"]
    if batch_size % data_devices:
        raise StoreError(f"batch size {batch_size} is not a multiple of the mesh's {data_devices} data devices")
    if dtype not in ("float32", "bfloat16"):
        raise StoreError(f"dtype must be float32 or bfloat16, got {dtype!r}")

    tokens = tokenize(load_tokenizer(checkpoint), prompt_set.prompts, config.vocab_size)
    metadata = store_metadata(prompt_set, checkpoint, layers, config.hidden_size, [int(t.size) for t in tokens],
                              dtype=dtype, batch_size=batch_size, bucket=bucket)
    # Process 0 checks and creates (or reopens) the store; the others open it once it exists.
    store = distributed.on_coordinator(lambda: _open_for_writing(out, metadata), StoreError)
    if store is None:
        store = FeatureStore.open(out)
    if store.complete:
        return store

    # Every process must run the same batches: process 0's reading of the done flags decides.
    done = distributed.broadcast(store.done_rows().astype(np.uint8)).astype(bool)
    batches = plan_batches(metadata["token_counts"], batch_size)
    counts = np.asarray(metadata["token_counts"])
    if progress is not None:
        progress.start(len(tokens), int(counts.sum()), int(done.sum()), int(counts[done].sum()))
    deepest = layers[-1]
    model = from_pretrained(
        checkpoint, dtype=jnp.dtype(dtype), mesh=mesh, keep_mxfp4=keep_mxfp4,
        param_dtype=param_dtype,
        num_layers=None if deepest == config.num_hidden_layers else max(deepest, 1))
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    sharding = batch_sharding(mesh)
    me, processes = jax.process_index(), jax.process_count()
    for rows in batches:
        if done[rows].all():
            continue
        batch_tokens = [tokens[r] for r in rows]
        length = bucket_length(max(t.size for t in batch_tokens), bucket)
        ids, mask = left_padded_batch(batch_tokens, length, batch_size, pad_id)
        mean, last = pooled_features(model, distributed.global_array(ids, sharding),
                                     distributed.global_array(mask, sharding), layers, layerwise=layerwise)
        mean, last = mean[:len(rows)], last[:len(rows)]
        bad = ~(np.isfinite(mean).all(axis=(1, 2)) & np.isfinite(last).all(axis=(1, 2)))
        if bad.any():
            names = [prompt_set.ids[r] for r in rows[bad]]
            raise StoreError(f"non-finite hidden states for {names}: the checkpoint or dtype is broken; "
                             "nothing was written for this batch")
        # Already-done rows of a partly done batch are rewritten with the same values. Each process
        # writes the rows of its own chunks only.
        mine = store.owned_rows(rows, me, processes)
        store.write_batch(rows[mine], mean[mine], last[mine])
        if progress is not None:
            progress.advance(int((~done[rows]).sum()), int(counts[rows][~done[rows]].sum()))
    # Complete only once every process has written its chunks.
    distributed.sync("hmoe_jax.precompute.written")
    distributed.on_coordinator(store.mark_complete, StoreError)
    store.metadata["complete"] = True
    return store


def store_metadata(prompt_set: PromptSet, checkpoint: Path, layers: Sequence[int], hidden_size: int,
                   token_counts: Sequence[int], *, dtype: str, batch_size: int, bucket: int,
                   fingerprint: str | None = None) -> dict[str, Any]:
    """The metadata of a new, still empty store (`fingerprint` defaults to the checkpoint's)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": prompt_set.kind,
        "source": prompt_set.source,
        "source_sha256": prompt_set.source_sha256,
        "model_path": str(Path(checkpoint).resolve()),
        "model_fingerprint": fingerprint if fingerprint is not None else checkpoint_fingerprint(checkpoint),
        "layers": list(layers),
        "poolings": list(POOLINGS),
        "hidden_size": hidden_size,
        "dtype": dtype,
        "batch_size": batch_size,
        "bucket": bucket,
        "scenario_ids": prompt_set.ids,
        "token_counts": list(token_counts),
        "targets": prompt_set.targets,
        "complete": False,
    }


def create_store(out: str | Path, metadata: dict[str, Any]) -> FeatureStore:
    """A new store at `out` (which must not hold anything yet), metadata first, then empty arrays."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists, is not empty and is not a feature store; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(out, metadata)
    # Metadata first: a directory holding arrays but no metadata would be refused on rerun.
    store.write_metadata()
    store.create_arrays()
    return store


def _open_for_writing(out: Path, metadata: dict[str, Any]) -> FeatureStore:
    if (out / METADATA_FILE).is_file():
        store = FeatureStore.open(out)
        mismatched = [key for key in _IDENTITY_FIELDS if store.metadata.get(key) != metadata.get(key)]
        if mismatched:
            details = "; ".join(f"{key}: store has {_short(store.metadata.get(key))}, asked {_short(metadata.get(key))}"
                                for key in mismatched)
            raise StoreError(f"{out} holds features of another job ({details}); choose another --out")
        # A run killed between writing the metadata and creating the arrays left none behind.
        store.create_arrays()
        return store
    return create_store(out, metadata)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
