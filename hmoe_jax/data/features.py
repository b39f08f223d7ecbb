"""The feature store: hidden-state features of the frozen model, computed once, kept for probe training.

A feature store is a directory:

    metadata.json   what the rows are (scenario ids, targets, token counts), which model and layers
                    produced them, and how they were batched
    mean.zarr       float32 [prompts, layers, hidden]: hidden_states[layer] averaged over real tokens
    last.zarr       float32 [prompts, layers, hidden]: hidden_states[layer] at the last real token
    tokens.zarr     optional (`precompute --token-states`; "tokens" in metadata `poolings`): float32
                    [prompts, layers, max_tokens, hidden], hidden_states[layer] at every real token,
                    left-aligned (a prompt's token i at position i) and zero past its `token_counts`
                    entry; max_tokens = max(token_counts). What the attention extractor
                    (`hybrid.attention`) trains on.
    done.zarr       uint8 [prompts]: 1 once a prompt's features are written

`training.precompute` fills it; probe training reads it. Row chunks (`ROWS_PER_CHUNK`) are the unit of
writing: in a multi-process run, chunk c belongs to process c mod N (`FeatureStore.owned_rows`), so no
two processes ever write one file; token states are chunked by the same rows (and one layer), so they
follow the same ownership. Stores written before token states existed simply lack them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from ..checkpoint.location import checkpoint_fingerprint
from ..domains import OUTPUT, Domain, domain_origin, load_domain, load_records
from ..runtime.files import user_path, write_json_atomically

FORMAT = "hmoe-jax-features"
FORMAT_VERSION = 1
POOLINGS = ("mean", "last")
# The optional per-token array, listed in metadata `poolings` when a store holds it.
TOKENS = "tokens"
TOKEN_STATES_FLAG = "--token-states"
METADATA_FILE = "metadata.json"
DONE_ARRAY = "done.zarr"
# Rows per stored chunk: one chunk is ~0.7 MB of gpt-oss-20b features per layer.
ROWS_PER_CHUNK = 64
# Metadata fields that identify what a store holds; a resumed run must agree on all of them.
IDENTITY_FIELDS = ("format", "version", "kind", "domain", "source_sha256", "model_fingerprint", "layers", "poolings",
                   "hidden_size", "dtype", "batch_size", "bucket", "scenario_ids", "token_counts")


class StoreError(ValueError):
    """A feature store that cannot be used as asked; nothing has been written when it is raised."""


@dataclass(frozen=True)
class PromptSet:
    """What a store's rows are: ids, raw prompts, regression targets (None for router negatives), where
    they came from (`kind` "scenarios" or "router_negatives") and their domain."""

    kind: str
    ids: list[str]
    prompts: list[str]
    targets: dict[str, dict[str, list[float | None]]] | None
    source: str
    source_sha256: str
    domain: dict[str, str]  # the domain's origin (`domains.domain_origin`)


def record_targets(domain: Domain, records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """{expert: {argument or "output": one value per record}} of the domain's experts, read from the
    records' own computation markers; None where a record has no marker for the expert (its probes
    never see that record)."""
    targets: dict[str, dict[str, list[float | None]]] = {
        m.expert: {name: [] for name in (*m.spec.arg_names, OUTPUT)} for m in domain.metrics
    }
    for record in records:
        markers = {m["expert"]: m for m in record["computation_markers"]}
        for expert, columns in targets.items():
            marker = markers.get(expert)
            for name, column in columns.items():
                if marker is None:
                    column.append(None)
                else:
                    column.append(marker["output"] if name == OUTPUT else marker["inputs"][name])
    return targets


def scenario_prompts(path: str | Path, domain: str | Domain | None = None) -> PromptSet:
    """The prompts of a data file and its domain's targets (records checked by `domains.read_records`)."""
    path = user_path(path)
    records, domain = load_records(path, domain)
    if not records:
        raise StoreError(f"{path}: the data set holds no records")
    return PromptSet(
        kind="scenarios",
        ids=[r["id"] for r in records],
        prompts=[r["input_prompt"] for r in records],
        targets=record_targets(domain, records),
        source=str(path),
        source_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        domain=domain_origin(domain),
    )


def router_negative_prompts(domain: str | Domain | None = None) -> PromptSet:
    """The router classifier's negatives: the domain's non-computational questions."""
    domain = load_domain(domain)
    text = "\n".join(domain.negatives)
    return PromptSet(
        kind="router_negatives",
        ids=[f"neg_{i:04d}" for i in range(len(domain.negatives))],
        prompts=list(domain.negatives),
        targets=None,
        source=f"domain {domain.name}: negatives",
        source_sha256=hashlib.sha256(text.encode()).hexdigest(),
        domain=domain_origin(domain),
    )


class FeatureStore:
    """A feature store on disk: its metadata and its arrays, opened with tensorstore."""

    def __init__(self, path: str | Path, metadata: dict[str, Any]):
        self.path = user_path(path)
        self.metadata = metadata

    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        """Open an existing store, checking its metadata against this format."""
        path = user_path(path)
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
        kvstore = {"driver": "file", "path": str((self.path / name).resolve())}
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": kvstore}
        if create_shape is None:
            return ts.open(spec, open=True).result()
        # Rows, then one layer per chunk (pooled [n, layers, hidden] and token states [n, layers, tokens, hidden]).
        chunk = [min(ROWS_PER_CHUNK, create_shape[0]), *([1] if len(create_shape) >= 3 else []), *create_shape[2:]]
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
        if pooling not in POOLINGS or pooling not in self.metadata["poolings"]:
            pooled = [p for p in self.metadata["poolings"] if p in POOLINGS]
            raise StoreError(f"{self.path}: pooling {pooling!r} not in the store's pooled features {pooled}")
        array = self._array(f"{pooling}.zarr")
        return np.asarray(array[:, self.layers.index(layer), :].read().result(), np.float32)

    @property
    def has_token_states(self) -> bool:
        return TOKENS in self.metadata["poolings"]

    @property
    def max_tokens(self) -> int:
        return max(self.metadata["token_counts"], default=0)

    def token_states(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(states float32 [prompts, max_tokens, hidden], counts int32 [prompts]) of one layer: every
        real token's hidden state, left-aligned, zero past each prompt's count. StoreError, naming the
        flag to rerun precompute with, for a store without them."""
        if not self.has_token_states:
            raise StoreError(f"{self.path}: holds no per-token hidden states (only {self.metadata['poolings']}), "
                             f"which the attention extractor reads; rerun `python -m train precompute` with "
                             f"{TOKEN_STATES_FLAG} into a new --out")
        if not self.complete:
            raise StoreError(f"{self.path}: the store is incomplete; rerun `train precompute` to finish it")
        if layer not in self.layers:
            raise StoreError(f"{self.path}: holds layers {self.layers}, not layer {layer}")
        states = self._array(f"{TOKENS}.zarr")[:, self.layers.index(layer)].read().result()
        return np.asarray(states, np.float32), np.asarray(self.metadata["token_counts"], np.int32)

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

    def write_batch(self, rows: np.ndarray, mean: np.ndarray, last: np.ndarray,
                    tokens: np.ndarray | None = None) -> None:
        """Features first, then the done flags: a kill in between leaves the rows to be redone.
        `tokens` [rows, layers, max_tokens, hidden]: required exactly when the store holds token states."""
        if len(rows) == 0:
            return
        if (tokens is not None) != self.has_token_states:
            raise StoreError(f"{self.path}: token states {'given' if tokens is not None else 'missing'} for a store "
                             f"{'with' if self.has_token_states else 'without'} them")
        writes = [self._array("mean.zarr")[rows].write(mean), self._array("last.zarr")[rows].write(last)]
        if tokens is not None:
            writes.append(self._array(f"{TOKENS}.zarr")[rows].write(tokens))
        for w in writes:
            w.result()
        self._array(DONE_ARRAY)[rows].write(np.ones(len(rows), np.uint8)).result()

    def create_arrays(self) -> None:
        meta = self.metadata
        n, n_layers, hidden = len(meta["scenario_ids"]), len(meta["layers"]), meta["hidden_size"]
        for pooling in self.metadata["poolings"]:
            shape = (n, n_layers, max(self.max_tokens, 1), hidden) if pooling == TOKENS else (n, n_layers, hidden)
            self._array(f"{pooling}.zarr", shape)
        self._array(DONE_ARRAY, (n,), dtype="uint8")

    def write_metadata(self) -> None:
        write_json_atomically(self.path / METADATA_FILE, self.metadata)

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


def store_metadata(prompt_set: PromptSet, checkpoint: Path, layers: Sequence[int], hidden_size: int,
                   token_counts: Sequence[int], *, dtype: str, batch_size: int, bucket: int,
                   fingerprint: str | None = None, token_states: bool = False) -> dict[str, Any]:
    """The metadata of a new, still empty store (`fingerprint` defaults to the checkpoint's;
    `token_states`: the store also keeps every token's hidden state, `tokens.zarr`)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": prompt_set.kind,
        "domain": prompt_set.domain,
        "source": prompt_set.source,
        "source_sha256": prompt_set.source_sha256,
        "model_path": str(user_path(checkpoint).resolve()),
        "model_fingerprint": fingerprint if fingerprint is not None else checkpoint_fingerprint(checkpoint),
        "layers": list(layers),
        "poolings": list(POOLINGS) + ([TOKENS] if token_states else []),
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
    out = user_path(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists, is not empty and is not a feature store; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(out, metadata)
    # Metadata first: a directory holding arrays but no metadata would be refused on rerun.
    store.write_metadata()
    store.create_arrays()
    return store


def open_for_writing(out: Path, metadata: dict[str, Any]) -> FeatureStore:
    """The store at `out` for a job with `metadata`: created, or reopened when it holds this very job
    (finished or not); StoreError for a store of another job."""
    if (out / METADATA_FILE).is_file():
        store = FeatureStore.open(out)
        mismatched = [key for key in IDENTITY_FIELDS if store.metadata.get(key) != metadata.get(key)]
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
