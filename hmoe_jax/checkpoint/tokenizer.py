"""The checkpoint's own tokenizer (`tokenizer.json`), read offline with `tokenizers`."""

from __future__ import annotations

from pathlib import Path

from .location import CheckpointError, locate_checkpoint, resolve_checkpoint


def tokenizer_file(path: str | Path) -> Path:
    """The `tokenizer.json` of a checkpoint: in its directory, or beside an `original/` folder (where a
    gpt-oss repository keeps it)."""
    path = resolve_checkpoint(path)
    location = locate_checkpoint(path)
    folders = [path, location.path]
    if location.layout == "original":
        folders.append(location.path.parent)
    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise CheckpointError(f"{path}: no tokenizer.json beside the checkpoint (looked in "
                          f"{', '.join(str(f) for f in dict.fromkeys(folders))})")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file(path)))
