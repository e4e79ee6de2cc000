"""Checkpoints that survive any fault: orbax, async, keep-N, newest *readable* one wins.

A checkpoint holds the train state (trainable parameters, optimizer state, step, PRNG key),
the data iterator's position and the run's config. Orbax only lists steps whose write was
committed, so a save interrupted by `kill -9` is invisible; a committed one that cannot be
read (a corrupted file) is skipped with a warning and the next older one is used.

A checkpoint that reads fine but does not fit this run (e.g. `lora.rank` changed) is another
matter: falling back to an older one, or to step 0, would silently restart the run and let keep-N
rotation delete the old run's checkpoints. So every checkpoint records the shape and dtype of each
array of its state (`state_structure` in its meta); before restoring, that is compared with the
state this run expects, and a difference raises `CheckpointMismatch` naming the settings that
changed. Nothing is loaded or deleted.

What the meta holds, and where it sits in a step's directory, is `clara_jax.formats.checkpoint_meta`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from clara_jax.formats import checkpoint_meta
from clara_jax.training.config import ConfigError

log = logging.getLogger(__name__)
# At most this many differing arrays / settings are listed in a mismatch error.
_SHOWN = 8


class CheckpointMismatch(ConfigError):
    """A readable checkpoint whose arrays do not fit this run's state (its settings differ)."""


def state_structure(tree) -> dict[str, list]:
    """{leaf path: [shape, dtype]} of a state (arrays or ShapeDtypeStructs), JSON-serialisable."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)] for path, x in leaves}


def _flat_config(d, prefix="") -> dict:
    out = {}
    for key, value in (d or {}).items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shape_settings_first(key: str) -> tuple[bool, str]:
    """Sort key: settings that shape the state (model, LoRA, stage, optimizer) are listed first."""
    return (not key.startswith(("model.", "lora.", "stage", "optim.")), key)


def _mismatch_message(where: str, saved: dict, expected: dict, saved_config, config) -> str:
    """Which settings differ (by config) and which arrays differ (by structure)."""
    lines = [f"{where} does not fit this run's state; it was saved with other settings."]
    if saved_config is not None and config is not None:
        theirs, mine = _flat_config(saved_config), _flat_config(config)
        changed = [
            k
            for k in sorted(set(theirs) | set(mine), key=_shape_settings_first)
            if theirs.get(k) != mine.get(k)
        ]
        if changed:
            lines.append(
                "Settings that differ (checkpoint -> this run): "
                + ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed[:_SHOWN])
                + (f" (+{len(changed) - _SHOWN} more)" if len(changed) > _SHOWN else "")
            )
    missing = sorted(set(saved) - set(expected))
    extra = sorted(set(expected) - set(saved))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    arrays = [f"{k}: {saved[k][1]}{saved[k][0]} -> {expected[k][1]}{expected[k][0]}" for k in reshaped]
    arrays += [f"{k}: only in the checkpoint" for k in missing] + [f"{k}: only in this run" for k in extra]
    lines.append(
        f"Arrays that differ ({len(arrays)}): "
        + "; ".join(arrays[:_SHOWN])
        + (" …" if len(arrays) > _SHOWN else "")
    )
    lines.append(
        "Nothing was loaded or deleted. Resume with the checkpoint's settings, or train in a new --workdir."
    )
    return "\n  ".join(lines)


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
            self.directory, options=options, item_names=checkpoint_meta.ITEMS
        )

    def save(self, step: int, state, data_state: dict, meta: dict, *, wait: bool = False) -> None:
        meta = checkpoint_meta.with_state_structure(meta, state_structure(state))
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

    def _check_fits(self, step: int, expected: dict, config: dict | None) -> bool:
        """Raise `CheckpointMismatch` if checkpoint `step` holds other arrays than `expected`;
        False if its meta cannot be read (corruption: the caller skips it)."""
        try:
            meta = self.restore_meta(step)
        except Exception as err:  # noqa: BLE001 - unreadable meta is corruption, handled by the caller
            self._warn_unreadable(step, err)
            return False
        saved = checkpoint_meta.saved_structure(meta)
        if saved is not None and saved != expected:
            where = f"checkpoint {self.directory}/{step}"
            saved_config = meta.get(checkpoint_meta.CONFIG)
            raise CheckpointMismatch(_mismatch_message(where, saved, expected, saved_config, config))
        return True  # (a checkpoint from before state_structure existed: the restore decides)

    def _warn_unreadable(self, step: int, err: BaseException) -> None:
        log.warning(
            "checkpoint %s/%d is unreadable (%s: %s); falling back to an older one",
            self.directory,
            step,
            type(err).__name__,
            (str(err).splitlines() or [""])[0][:200],
        )

    def restore_latest(
        self, abstract_state, *, config: dict | None = None
    ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable checkpoint, or None.

        A checkpoint whose arrays differ from `abstract_state` raises `CheckpointMismatch` (naming
        the settings that differ from `config`, this run's config as a dict) instead of being skipped.
        """
        expected = state_structure(abstract_state)
        for step in reversed(self.steps()):
            if not self._check_fits(step, expected, config):
                continue
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
                self._warn_unreadable(step, err)
                continue
            return step, restored.state, dict(restored.data), dict(restored.meta)
        return None

    def restore_meta(self, step: int | None = None) -> dict:
        """The meta saved with a checkpoint (`clara_jax.formats.checkpoint_meta`: its config, for
        chaining stages), without loading arrays."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint found")
        step = steps[-1] if step is None else step
        path = checkpoint_meta.meta_path(self.directory, step)
        if os.path.exists(path):
            return checkpoint_meta.read_meta(path)
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
