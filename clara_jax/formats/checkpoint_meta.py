"""The metadata saved with every training checkpoint, beside orbax's arrays.

    WORKDIR/checkpoints/<step>/
      state/            the train state's arrays (orbax StandardSave)
      data/metadata     the data iterator's position (orbax JsonSave)
      meta/metadata     this JSON object (orbax JsonSave):
        config           the run's config as a dict (what the next stage checks and chains from)
        init_from        where the run's parameters came from (the previous stage), or null
        tokenizer        {vocab_size, n_mem}
        state_structure  {leaf path: [shape, dtype]} of every array of the state, written by
                         `Checkpointer.save`; compared before restoring, so a checkpoint of other
                         settings is refused by name (older checkpoints lack it)

Orbax writes and commits the step directory; the meta is also read straight from its file (without
touching the arrays) by `read_meta`, which is what chaining a stage onto the previous one and the
check before a restore need. This module has no orbax or jax: `clara_jax.training.checkpoint` does
the saving and restoring.
"""

from __future__ import annotations

import json
import os

STATE, DATA, META = ITEMS = ("state", "data", "meta")
# The file orbax's JsonSave writes inside an item's directory.
JSON_ITEM_FILE = "metadata"
CONFIG, INIT_FROM, TOKENIZER, STATE_STRUCTURE = "config", "init_from", "tokenizer", "state_structure"


def run_meta(config: dict, init_from, tokenizer: dict) -> dict:
    """The meta a training run saves with its checkpoints (`Checkpointer.save` adds the structure)."""
    return {CONFIG: config, INIT_FROM: init_from, TOKENIZER: tokenizer}


def with_state_structure(meta: dict, structure: dict) -> dict:
    return {**meta, STATE_STRUCTURE: structure}


def meta_path(directory: str | os.PathLike, step: int) -> str:
    """Where checkpoint `step`'s meta is, once orbax has committed the step."""
    return os.path.join(os.fspath(directory), str(step), META, JSON_ITEM_FILE)


def read_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's meta file; ValueError naming the file if it is not a JSON object (the caller
    treats that as an unreadable checkpoint)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def saved_structure(meta) -> dict | None:
    """The state structure a checkpoint recorded, or None (a checkpoint from before it existed)."""
    return meta.get(STATE_STRUCTURE) if isinstance(meta, dict) else None


def saved_config(meta, where: str) -> dict:
    """The run config a checkpoint was saved with; ValueError naming `where` if it has none."""
    config = meta.get(CONFIG) if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise ValueError(
            f"{where}: the checkpoint's meta has no '{CONFIG}' object (got {type(config).__name__})"
        )
    return config
