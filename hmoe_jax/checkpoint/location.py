"""Finding a checkpoint and naming it: a local path or a Hugging Face hub id, which layout it holds, and a
fingerprint of its content.

A checkpoint is named by a path (relative, `~`, through a symlink) or, as in `transformers`, by a hub id
("openai/gpt-oss-20b", or "openai/gpt-oss-20b/original" for OpenAI's own layout). A hub id resolves
through `huggingface_hub`'s cache (`snapshot_download`), honouring `HF_HOME`, `HF_HUB_CACHE`,
`HF_HUB_OFFLINE=1` and a revision; a repository of which only `original/*` was downloaded is read from
`original/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

# `config.json` key and value that mark a checkpoint written by `python -m convert` (`flax_format`).
FLAX_FORMAT_KEY = "format"
FLAX_FORMAT = "hmoe-jax-flax"
# Bytes read from each end of every safetensors file for the fingerprint.
_FINGERPRINT_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that does not hold the model its config describes; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    """`layout`: "hf", "original" (OpenAI), "flax" (written by `python -m convert`) or "probe" (a `.pt`
    state dict); `path`: the directory holding `config.json` and the tensors, or the `.pt` file."""

    layout: str
    path: Path


# A hub id: ORG/NAME, optionally followed by a subfolder (ORG/NAME/original).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")
# What a download of a gpt-oss repository takes by default: the HF layout, not `original/` or `metal/`.
_SUBFOLDERS = ["original/*", "metal/*"]


def hub_cache_dir() -> Path:
    """The cache `huggingface_hub` uses, read from the environment now (it reads it once, on import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name: str | os.PathLike, revision: str | None = None) -> Path:
    """The local path of a checkpoint named by a path or a hub id (see the module doc), absolute. A path
    that exists is used as it is; a hub id comes from the cache, downloaded first unless `HF_HUB_OFFLINE=1`."""
    path = Path(name).expanduser()
    if path.exists() or not _HUB_ID.match(str(name)) or str(name).startswith(("./", "../", "~")):
        if revision is not None:
            raise FileNotFoundError(f"{path}: a revision ({revision}) applies to hub ids, not to local paths"
                                    if path.exists() else f"checkpoint path does not exist: {path}")
        return path.absolute()  # unaffected by a later change of working directory
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    org, repo, *sub = str(name).split("/")
    repo_id, subfolder = f"{org}/{repo}", "/".join(sub)
    patterns = dict(allow_patterns=[f"{subfolder}/*"]) if subfolder else dict(ignore_patterns=_SUBFOLDERS)
    cache = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=_offline(),
                                          **patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        mode = "HF_HUB_OFFLINE=1" if _offline() else "the hub could not be reached or refused it"
        raise CheckpointError(
            f"{name}: no local path {path.absolute()}, and the hub repository {repo_id} is not in the cache "
            f"{cache} ({mode}; revision {revision or 'main'}): {type(e).__name__}: {e}") from None
    return snapshot / subfolder if subfolder else snapshot


def _is_metal(path: Path) -> bool:
    return path.name == "metal" or (path / "model.bin").is_file()


def locate_checkpoint(path: str | Path) -> CheckpointLocation:
    """Which checkpoint `path` holds. A directory with its own `config.json` is read as it is (its
    `config.json` tells HF, OpenAI `original/` and our Flax format apart). A directory without one but
    with an `original/` subdirectory (a download of only `original/*`) is read from `original/`: point
    at `original/` itself to pick it over the HF files of a full gpt-oss repository. `metal/`
    checkpoints are refused: their MXFP4 scales carry an extra offset."""
    path = resolve_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return CheckpointLocation("probe", path)
        raise CheckpointError(
            f"{path}: not a checkpoint: expected a checkpoint directory or a probe state dict (.pt)"
        )
    if _is_metal(path):
        raise CheckpointError(
            f"{path}: a metal/ checkpoint is not supported (its MXFP4 scales carry an extra offset); "
            "use the HF files or original/ of the same repository"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "original" / "config.json").is_file():
            return locate_checkpoint(path / "original")
        hint = " (only a metal/ checkpoint is here, which is not supported)" if (path / "metal").is_dir() else ""
        raise FileNotFoundError(
            f"no config.json in {path}: not a checkpoint directory (expected an HF checkpoint, an OpenAI "
            f"original/ folder or a converted Flax checkpoint){hint}"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if isinstance(config, dict) and config.get(FLAX_FORMAT_KEY) == FLAX_FORMAT:
        return CheckpointLocation("flax", path)
    is_original = isinstance(config, dict) and "model_type" not in config and (
        "experts_per_token" in config or "num_experts" in config
    )
    return CheckpointLocation("original" if is_original else "hf", path)


def checkpoint_fingerprint(path: str | Path) -> str:
    """A short hash naming a checkpoint's content: config.json, tokenizer.json, and for every
    safetensors file its header (tensor names, shapes, offsets) and first and last MiB. Cheap on a
    13 GB checkpoint, and it changes when the weights, the architecture or the tokenizer do."""
    path = resolve_checkpoint(path)
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
