"""Precompute: the frozen model's pooled hidden states, stored once for probe training (`data.features`).

Prompts are tokenised raw, sorted by length and cut into batches, each left-padded to a bucketed length
(`data.prompts`). The forward stops at the deepest requested layer and pools there, so only
[batch, layers, hidden] leaves the devices; with `token_states` the requested layers' states of every
token leave too, left-aligned on the devices (a prompt's token i at position i), for the attention
extractor (`hybrid.attention`). The batch plan depends only on the prompts and the settings,
so a killed run resumes batch for batch and ends with the very bytes an uninterrupted run writes.

Several processes (`runtime.distributed`, one per host) run the same batches as one program, each batch
split over the mesh's `data` axis across hosts; every process gets the batch's features back. Process 0
alone writes `metadata.json`; each process writes only its own row chunks' features and done flags. A
resumed run, on any number of processes, redoes the batches with a row not flagged done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..checkpoint.loading import from_pretrained, planned_options
from ..checkpoint.location import resolve_checkpoint
from ..checkpoint.tokenizer import load_tokenizer
from ..data.features import FeatureStore, PromptSet, StoreError, open_for_writing, store_metadata
from ..data.prompts import length_sorted_batches, pad_token_id, prompt_batches, tokenize
from ..model.config import load_config
from ..model.transformer import GptOssForCausalLM, default_position_ids, run
from ..runtime import distributed
from ..runtime.files import user_path
from ..runtime.options import RunOptions
from ..runtime.sharding import batch_sharding


def _pool(hidden_states, attention_mask, token_states: bool):
    hidden = jnp.stack(hidden_states, axis=1).astype(jnp.float32)  # [B, L, T, H]
    mask = attention_mask.astype(jnp.float32)[:, None, :, None]
    # Padded positions contribute exact zeros to the sum, so the mean is that of the real tokens alone.
    mean = jnp.sum(hidden * mask, axis=2) / jnp.sum(mask, axis=2)
    # Left padding puts every prompt's last real token at the last position.
    if not token_states:
        return mean, hidden[:, :, -1]
    # Left-align: position j takes the prompt's j-th real token (left padding: position T - count + j),
    # zero past its count, so the stored rows do not depend on the batch's padded length.
    length = hidden.shape[2]
    counts = jnp.sum(attention_mask, axis=1).astype(jnp.int32)
    source = length - counts[:, None] + jnp.arange(length)[None, :]  # [B, T]
    real = source < length
    aligned = jnp.take_along_axis(hidden, jnp.where(real, source, 0)[:, None, :, None], axis=2)
    return mean, hidden[:, :, -1], jnp.where(real[:, None, :, None], aligned, 0.0)


_jitted_pool = jax.jit(_pool, static_argnums=2)


def _pooled(model: GptOssForCausalLM, input_ids, attention_mask, layers: tuple[int, ...], token_states: bool):
    stream = model.residual_stream(input_ids, attention_mask, default_position_ids(attention_mask), max(layers))
    kept = {i: x for i, x, _ in stream if i in layers}  # only the requested residuals are held
    return _jitted_pool([kept[layer] for layer in layers], attention_mask, token_states)


def pooled_features(model: GptOssForCausalLM, input_ids, attention_mask,
                    layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, last) float32 [batch, len(layers), hidden] of a left-padded batch: `hidden_states[layer]`
    pooled over the real tokens and at the last one. Runs blocks 0..max(layers)-1 only."""
    mean, last = run(model, _pooled, input_ids, attention_mask, static=(tuple(layers), False))
    return distributed.to_host(mean), distributed.to_host(last)


def features_with_token_states(model: GptOssForCausalLM, input_ids, attention_mask,
                               layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, last, tokens) of a left-padded batch: `pooled_features` and float32 [batch, len(layers),
    T, hidden] token states, left-aligned (a prompt's j-th real token at position j), zero past each
    prompt's real tokens; T is the batch's padded length."""
    mean, last, tokens = run(model, _pooled, input_ids, attention_mask, static=(tuple(layers), True))
    return distributed.to_host(mean), distributed.to_host(last), distributed.to_host(tokens)


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
    options: RunOptions | None = None,
    progress: Progress | None = None,
    token_states: bool = False,
) -> FeatureStore:
    """Write (or finish) the feature store `out` for `prompt_set` at `layers` of `checkpoint`.

    `token_states`: also keep every real token's hidden state at `layers` (`tokens.zarr`, for the
    attention extractor); a store with and one without them are different jobs.

    Only the layers up to the deepest requested one are loaded (no lm_head unless the last hidden state
    is asked for), with the checkpoint's defaults (`RunOptions`; `options` overrides them). Everything
    is checked before anything is written: an existing `out` must be an unfinished or finished run of
    exactly this job (same model, layers, prompts and batching), else StoreError.
    """
    checkpoint, out = resolve_checkpoint(checkpoint), user_path(out)
    config = load_config(checkpoint)
    layers = _check_request(config, layers, mesh, batch_size)
    tokens = tokenize(load_tokenizer(checkpoint), prompt_set.prompts, config.vocab_size, error=StoreError)
    options = options or RunOptions()
    metadata = store_metadata(prompt_set, checkpoint, layers, config.hidden_size, [int(t.size) for t in tokens],
                              dtype=planned_options(checkpoint, options).dtype, batch_size=batch_size, bucket=bucket,
                              token_states=token_states)
    store = _claim_store(out, metadata)
    if store.complete:
        return store
    done = distributed.broadcast(store.done_rows().astype(np.uint8)).astype(bool)
    counts = np.asarray(metadata["token_counts"])
    if progress is not None:
        progress.start(len(tokens), int(counts.sum()), int(done.sum()), int(counts[done].sum()))
    deepest = layers[-1]
    model = from_pretrained(checkpoint, options, mesh=mesh,
                            num_layers=None if deepest == config.num_hidden_layers else max(deepest, 1))
    batches = prompt_batches(tokens, batch_size, bucket, pad_token_id(config),
                             order=length_sorted_batches(counts, batch_size))
    for batch in batches:
        if not done[batch.rows].all():
            _write_batch(store, model, batch, layers, prompt_set, mesh)
            if progress is not None:
                fresh = ~done[batch.rows]
                progress.advance(int(fresh.sum()), int(counts[batch.rows][fresh].sum()))
    return _mark_complete(store)


def _check_request(config, layers: Sequence[int], mesh: Mesh, batch_size: int) -> list[int]:
    layers = sorted(set(int(layer) for layer in layers))
    if not layers or layers[0] < 0 or layers[-1] > config.num_hidden_layers:
        raise StoreError(f"layers {layers} must lie in [0, {config.num_hidden_layers}] for this checkpoint")
    data_devices = mesh.shape["data"]
    if batch_size % data_devices:
        raise StoreError(f"batch size {batch_size} is not a multiple of the mesh's {data_devices} data devices")
    return layers


def _claim_store(out: Path, metadata: dict) -> FeatureStore:
    """Process 0 checks and creates (or reopens) the store; the others open it once it exists."""
    store = distributed.on_coordinator(lambda: open_for_writing(out, metadata), StoreError)
    return store if store is not None else FeatureStore.open(out)


def _write_batch(store: FeatureStore, model, batch, layers: list[int], prompt_set: PromptSet, mesh: Mesh) -> None:
    """One batch's features, checked finite, written by the processes owning its rows. Already-done
    rows of a partly done batch are rewritten with the same values."""
    sharding = batch_sharding(mesh)
    ids, mask = (distributed.global_array(a, sharding) for a in (batch.input_ids, batch.attention_mask))
    rows = batch.rows
    tokens = None
    if store.has_token_states:
        mean, last, tokens = features_with_token_states(model, ids, mask, layers)
        tokens = _to_store_width(tokens[:len(rows)], store.max_tokens)
    else:
        mean, last = pooled_features(model, ids, mask, layers)
    mean, last = mean[:len(rows)], last[:len(rows)]
    bad = ~(np.isfinite(mean).all(axis=(1, 2)) & np.isfinite(last).all(axis=(1, 2)))
    if tokens is not None:
        bad |= ~np.isfinite(tokens).all(axis=(1, 2, 3))
    if bad.any():
        names = [prompt_set.ids[r] for r in rows[bad]]
        raise StoreError(f"non-finite hidden states for {names}: the checkpoint or dtype is broken; "
                         "nothing was written for this batch")
    mine = store.owned_rows(rows, jax.process_index(), jax.process_count())
    store.write_batch(rows[mine], mean[mine], last[mine], None if tokens is None else tokens[mine])


def _to_store_width(tokens: np.ndarray, max_tokens: int) -> np.ndarray:
    """Left-aligned token states [B, L, T, H] of a batch -> [B, L, max_tokens, H]: the batch's padded
    length T is at least its own longest prompt, not the store's, and positions past a prompt's
    tokens are zero either way."""
    width = tokens.shape[2]
    if width >= max_tokens:
        return np.ascontiguousarray(tokens[:, :, :max_tokens])
    return np.pad(tokens, ((0, 0), (0, 0), (0, max_tokens - width), (0, 0)))


def _mark_complete(store: FeatureStore) -> FeatureStore:
    """Complete only once every process has written its chunks."""
    distributed.sync("hmoe_jax.training.precompute.written")
    distributed.on_coordinator(store.mark_complete, StoreError)
    store.metadata["complete"] = True
    return store


class ProgressBars:
    """`Progress` as two tqdm bars, prompts and real tokens, starting from what an earlier run stored."""

    def start(self, total_prompts, total_tokens, done_prompts, done_tokens):
        from tqdm import tqdm

        self.prompts = tqdm(total=total_prompts, initial=done_prompts, unit="prompt", desc="prompts", position=0)
        self.tokens = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="tokens",
                           position=1)

    def advance(self, prompts, tokens):
        self.prompts.update(prompts)
        self.tokens.update(tokens)

    def close(self):
        for bar in (getattr(self, "prompts", None), getattr(self, "tokens", None)):
            if bar is not None:
                bar.close()
