"""Directories built under a temporary name: a run killed mid-write leaks nothing past the next run."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap

from hmoe_jax.runtime.files import atomic_directory, remove_orphans

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from hmoe_jax.runtime.files import atomic_directory
    dst = Path(sys.argv[1])
    with atomic_directory(dst, False, dst.parent / "source") as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would
""")


def hidden_siblings(dst):
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def test_a_killed_writer_leaves_no_destination_and_the_next_run_removes_its_leftovers(tmp_path):
    dst = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dst)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    leftovers = hidden_siblings(dst)
    assert len(leftovers) == 1 and leftovers[0].startswith(".converted.partial-")  # what it leaked

    with atomic_directory(dst, False, tmp_path / "source") as tmp:
        (tmp / "done.txt").write_text("complete")
    assert (dst / "done.txt").read_text() == "complete"
    assert hidden_siblings(dst) == []


def test_a_live_runs_work_in_progress_is_kept(tmp_path):
    dst = tmp_path / "converted"
    with atomic_directory(dst, False, tmp_path / "source") as ours:
        # Another run into the same destination, while ours is writing: it must not delete our work.
        assert remove_orphans(dst) == [] and ours.is_dir()
        (ours / "part.bin").write_bytes(b"y")
    assert (dst / "part.bin").read_bytes() == b"y"


def test_leftovers_of_other_hosts_and_other_destinations_are_not_touched(tmp_path):
    dst = tmp_path / "converted"
    foreign = [tmp_path / ".converted.partial-another-host-1-abcd1234",  # its process cannot be checked
               tmp_path / ".converted2.partial-x-1-abcd1234",  # another destination
               tmp_path / ".converted.partial-abcd1234"]  # an older version's name, with no owner in it
    for path in foreign:
        path.mkdir()
    assert remove_orphans(dst) == []
    assert all(path.is_dir() for path in foreign)


def test_a_replaced_destination_orphan_is_removed(tmp_path):
    """A kill between the two renames of an overwrite leaves `.DST.replaced-*`: also removed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dst = tmp_path / "converted"
    orphan = tmp_path / f".converted.replaced-{socket.gethostname()}-{dead.pid}-abcd1234"
    orphan.mkdir()
    (orphan / "old.bin").write_bytes(b"z")
    assert remove_orphans(dst) == [orphan] and not orphan.exists()
