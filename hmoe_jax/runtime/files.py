"""Writing files so that nothing is ever half-written: atomic JSON and text files, directories built
under a temporary name and renamed into place, and run directories a rerun resumes or refuses.

Every path a user gives may be relative, start with `~` or pass through a symlink: each helper expands
and resolves it before use.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator


def user_path(path: str | os.PathLike) -> Path:
    """A path as a user typed it, `~` expanded (relative paths stay relative to the working directory)."""
    return Path(path).expanduser()


@contextlib.contextmanager
def _replacing(path: Path, suffix: str) -> Iterator[str]:
    """Yield a temporary file's name beside `path`; once the body returns it replaces `path` (a rename,
    so an interrupted run never leaves a truncated file behind); on any exception it is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`text` to `path`, all or nothing (`_replacing`)."""
    path = user_path(path)
    with _replacing(path, ".tmp") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomically(path: str | os.PathLike, obj: Any) -> None:
    """`json.dump(obj, indent=2)` to `path`, all or nothing."""
    write_text_atomically(path, json.dumps(obj, indent=2))


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure to `path` as PNG, all or nothing, as every report file is written."""
    path = user_path(path)
    with _replacing(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def _owned_name(dst: Path, kind: str) -> Path:
    """A hidden sibling of `dst` that names its owner (host and process), so a later run can tell an
    orphan, whose process was killed before it could clean up, from a live run's work in progress."""
    return dst.parent / f".{dst.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphans(dst: Path) -> list[Path]:
    """Delete the temporary siblings (`.DST.partial-*`, `.DST.replaced-*`) that runs on this host left
    when killed (SIGKILL, OOM, power) before they could remove them; a live process's are kept, and so
    are other hosts' (their processes cannot be checked from here). Returns what was removed."""
    host = socket.gethostname()
    removed = []
    for kind in ("partial", "replaced"):
        prefix = f".{dst.name}.{kind}-{host}-"
        for path in dst.parent.glob(f".{glob.escape(dst.name)}.{kind}-*"):
            pid = path.name[len(prefix):].split("-", 1)[0] if path.name.startswith(prefix) else ""
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(dst: Path, overwrite: bool, src: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `dst`; on success it replaces `dst`, on any
    exception (Ctrl-C included) it is removed and `dst` is left as it was. What a killed earlier run
    left beside `dst` is removed first (`remove_orphans`), so interruptions do not leak disk."""
    dst, src = user_path(dst), user_path(src)
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ValueError(f"{dst}: the destination must neither be nor contain the source {src}")
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"{dst}: exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise FileExistsError(f"{dst}: exists and is not empty; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dst)
    tmp = _owned_name(dst, "partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = _owned_name(dst, "replaced")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dst)


def claim_run_dir(run_dir: str | os.PathLike, record: dict[str, Any], *, run_file: str, error: type[Exception],
                  kind: str) -> None:
    """Make `run_dir` this run's output directory, or resume it: `run_dir/run_file` must then hold the
    same `record` (the run's identity). Refuses (raising `error`) another run's directory or a
    non-empty directory of anything else; writes the record atomically for a new run."""
    run_dir = user_path(run_dir)
    existing = run_dir / run_file
    if existing.is_file():
        previous = json.loads(existing.read_text())
        mismatched = [key for key in record if previous.get(key) != record[key]]
        if mismatched:
            details = "; ".join(f"{k}: run has {json.dumps(previous.get(k))[:120]}, asked {json.dumps(record[k])[:120]}"
                                for k in mismatched)
            raise error(f"{run_dir} holds another {kind} ({details}); choose another --out")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise error(f"{run_dir} exists, is not empty and holds no {kind}; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(existing, record)
