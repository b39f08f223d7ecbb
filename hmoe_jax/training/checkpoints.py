"""Orbax checkpoints of a trainer's state together with its progress record (`TrainerCheckpoints`),
shared by end-to-end hybrid training and `training.lm`.

The state is saved as a flat dict of its leaves; a restore takes the tree structure, shapes, dtypes
and shardings from a freshly initialised state, so the restored arrays sit where the fresh ones would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def _leaves(tree) -> dict[str, Any]:
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _from_leaves(template, flat: Mapping[str, Any]):
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [flat[f"leaf_{i:05d}"] for i in range(treedef.num_leaves)])


def _placed_like(tree):
    """Shapes, dtypes and shardings of `tree`'s arrays: a checkpoint restores into the same placement."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class TrainerCheckpoints:
    """The trainer state and the progress record, saved together; a killed run resumes from the last.
    Shared by end-to-end hybrid training and `training.lm`."""

    def __init__(self, run_dir: Path):
        self.manager = ocp.CheckpointManager((run_dir / CHECKPOINT_DIR).resolve(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    def restore(self, state, fresh_progress) -> tuple[int, Any, dict[str, Any]]:
        latest = self.manager.latest_step()
        if latest is None:
            return 0, state, fresh_progress
        restored = self.manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_placed_like(_leaves(state))), progress=ocp.args.JsonRestore()))
        return latest, _from_leaves(state, restored["state"]), restored["progress"]

    def save(self, step: int, state, progress) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_leaves(state)),
                                                        progress=ocp.args.JsonSave(progress)))

    def last_saved(self) -> int | None:
        self.manager.wait_until_finished()
        return self.manager.latest_step()
