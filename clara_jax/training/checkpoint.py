"""Checkpoints that survive any fault: orbax, async, keep-N, newest *readable* one wins.

A checkpoint holds the train state (trainable parameters, optimizer state, step, PRNG key),
the data iterator's position and the run's config. Orbax only lists steps whose write was
committed, so a save interrupted by `kill -9` is invisible; a committed one that cannot be
read (a corrupted file) is skipped with a warning and the next older one is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with the target shardings) for orbax to restore into."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def save(self, step: int, state, data_state: dict, meta: dict, *, wait: bool = False) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable checkpoint, or None."""
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # noqa: BLE001 - any failure to read means "try an older one"
                log.warning(
                    "checkpoint %s/%d is unreadable (%s: %s); falling back to an older one",
                    self.directory,
                    step,
                    type(err).__name__,
                    str(err).splitlines()[0][:200],
                )
                continue
            return step, restored.state, dict(restored.data), dict(restored.meta)
        return None

    def restore_meta(self, step: int | None = None) -> dict:
        """The config saved with a checkpoint (for chaining stages), without loading arrays."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint found")
        step = steps[-1] if step is None else step
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
