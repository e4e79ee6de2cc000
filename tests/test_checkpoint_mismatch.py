"""A checkpoint of other settings stops the resume with their names; a corrupted one is skipped."""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.training.checkpoint import Checkpointer, CheckpointMismatch, abstract_like
from clara_jax.training.config import ConfigError


def _state(rank: int, value: float = 1.0) -> dict:
    return {"params": {"lora_a": jnp.full((2, rank), value), "embed_rows": jnp.full((4, 8), value)}}


def _config(rank: int, steps: int = 10) -> dict:
    return {"lora": {"rank": rank, "alpha": 16}, "total_steps": steps, "seed": 0}


def _save(directory, steps, rank):
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    for step in steps:
        ckpt.save(step, _state(rank, float(step)), {"pos": step}, {"config": _config(rank)}, wait=True)
    ckpt.close()


def test_a_changed_rank_raises_naming_the_setting_and_deletes_nothing(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _save(directory, [1, 2], rank=8)
    before = sorted(os.listdir(directory))
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    with pytest.raises(CheckpointMismatch) as err:
        ckpt.restore_latest(abstract_like(_state(4)), config=_config(4, steps=20))
    ckpt.close()
    message = str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI reports ConfigErrors and exits 2
    assert f"{directory}/2 does not fit this run's state" in message
    assert "lora.rank: 8 -> 4" in message and "total_steps: 10 -> 20" in message
    assert "['params']['lora_a']: float32[2, 8] -> float32[2, 4]" in message
    assert "embed_rows" not in message  # only the arrays that differ are listed
    assert sorted(os.listdir(directory)) == before


def test_matching_settings_restore_the_newest(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _save(directory, [1, 2], rank=8)
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    step, state, data, meta = ckpt.restore_latest(abstract_like(_state(8)), config=_config(8, steps=30))
    ckpt.close()
    assert step == 2 and data == {"pos": 2} and "state_structure" in meta
    np.testing.assert_array_equal(np.asarray(state["params"]["lora_a"]), np.full((2, 8), 2.0))


def test_a_corrupted_checkpoint_is_still_skipped_with_a_warning(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    _save(directory, [1, 2], rank=8)
    with open(os.path.join(directory, "2", "meta", "metadata"), "w") as f:
        f.write("{garbage")
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    with caplog.at_level(logging.WARNING):
        step, state, _, _ = ckpt.restore_latest(abstract_like(_state(8)), config=_config(8))
    ckpt.close()
    assert step == 1 and "checkpoints/2 is unreadable" in caplog.text
    np.testing.assert_array_equal(np.asarray(state["params"]["lora_a"]), np.full((2, 8), 1.0))
