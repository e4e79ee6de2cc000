"""A trained CLaRa model as a directory: what inference, export and serving load.

The directory's format (file names, clara.json and its checks) is `clara_jax.formats.model_dir`;
this module writes and reads its arrays, which needs jax and the decoder.

The base weights are referenced, not copied, when the run read them from a local directory
(a 7B base is 14 GB); `load_clara_model` checks the base still matches the saved shapes.

In a multi-process run the trained arrays are spread over several hosts: every process calls
`save_clara_model` (each array is gathered with all processes taking part) and only the one
with `write=True` (process 0 by default) touches the directory.

Saving never tears a model: the new copy is built complete in a hidden sibling, fsynced and
swapped in (`clara_jax.file_io.replace_dir`), so a crash while re-saving leaves the old model
or the new one, and readers (`model_dir_path`) follow the swap.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.file_io import replace_dir, staging_dir, write_json_atomic
from clara_jax.formats.model_dir import (
    ADAPTERS_FILE,
    BASE_DIR,
    META_FILE,
    ROWS_FILE,
    base_weights,
    model_dir_path,
    model_meta,
    read_clara_section,
    read_model_meta,
)
from clara_jax.formats.safetensors_io import SafetensorsFile, weights_digest
from clara_jax.interop.hf import load_decoder, save_decoder
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.clara_settings import ClaraSettings
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.field_checks import SettingsError
from clara_jax.model.lora import LoRAConfig

log = logging.getLogger(__name__)


def _host(x, dtype=np.float32) -> np.ndarray:
    """A numpy copy of a (possibly multi-host) array; collective when it spans processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype)


def _gather_model(model: Decoder) -> None:
    """Replace every array of `model` that spans processes by a local copy (for `save_decoder`)."""

    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(local(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jnp.asarray(_host(x, x.dtype))

    state = nnx.state(model)
    if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(state)):
        nnx.update(model, jax.tree.map(local, state))


def save_clara_model(
    model: Decoder,
    tokenizer,
    clara: ClaraConfig,
    out_dir: str,
    *,
    base_path: str = "",
    run_config: dict | None = None,
    write: bool | None = None,
) -> str:
    """Write the model directory; `write` (default: this is process 0) is False on the other
    processes of a multi-process run, which only take part in gathering the arrays."""
    from safetensors.numpy import save_file

    write = jax.process_index() == 0 if write is None else write
    if write:
        os.makedirs(out_dir, exist_ok=True)
    factors, lora_configs = {}, {}
    for role, adapter in model.adapters.items():
        lora_configs[role] = {
            "rank": adapter.lora_config.rank,
            "alpha": adapter.lora_config.alpha,
            "dropout": adapter.lora_config.dropout,
            "target_modules": adapter.lora_config.target_modules,
        }
        for target, f in adapter.factors.items():
            factors[f"{role}/{target}/a"] = _host(f["a"][...])
            factors[f"{role}/{target}/b"] = _host(f["b"][...])
    first_new = tokenizer.base_vocab_size  # rows the vocabulary extension added (never in a base checkpoint)
    rows = {
        "rows": _host(model.embed_rows[...]),
        "token_ids": np.asarray(model.trainable_token_ids, np.int64),
        "added_embed": _host(model.merged_embedding()[first_new:]),
    }
    if model.lm_head is not None:
        rows["added_lm_head"] = _host(model.lm_head[...][first_new:])
    if not base_path:
        _gather_model(model)  # a random-init base is copied: every process helps gather it
    if not write:
        return out_dir
    staging = staging_dir(out_dir)  # built complete beside out_dir, then swapped in
    save_file(factors, os.path.join(staging, ADAPTERS_FILE))
    save_file(rows, os.path.join(staging, ROWS_FILE))
    if not base_path:
        base_path = BASE_DIR
        save_decoder(model, os.path.join(staging, BASE_DIR))
    tokenizer.hf.save_pretrained(staging)
    meta = model_meta(
        base=base_path,
        base_digest=weights_digest(os.path.join(staging, base_path)),
        vocab_size=model.config.vocab_size,
        base_vocab_size=tokenizer.base_vocab_size,
        dtype=str(model.policy.compute),
        clara=clara,
        adapters=lora_configs,
        run_config=run_config,
    )
    write_json_atomic(os.path.join(staging, META_FILE), meta)
    replace_dir(staging, out_dir)
    return out_dir


def load_clara_model(model_dir: str, *, dtype: str | None = None):
    """(tokenizer, Decoder with all adapters and rows, ClaraConfig) from a saved model directory."""
    model_dir = model_dir_path(model_dir)
    meta = read_model_meta(model_dir)
    c = read_clara_section(model_dir, meta)
    try:
        settings = ClaraSettings.from_section(c)
    except SettingsError as err:
        raise ValueError(f"{os.path.join(model_dir, META_FILE)}: {err}") from None
    n_mem = settings.n_mem
    tok = load_tokenizer(model_dir, n_mem=n_mem)
    if list(tok.mem_token_ids) != c["mem_token_ids"]:
        raise ValueError(
            f"{model_dir}: tokenizer memory-token ids {tok.mem_token_ids} differ from the saved "
            f"{c['mem_token_ids']}"
        )
    base, _ = base_weights(model_dir, meta)
    model = load_decoder(base, dtype=dtype or meta.get("dtype", "float32"))
    rows = SafetensorsFile(os.path.join(model_dir, ROWS_FILE))
    first_new, vocab_size = meta["base_vocab_size"], meta["vocab_size"]
    if model.config.vocab_size > vocab_size:
        raise ValueError(
            f"{base}: vocabulary of {model.config.vocab_size} rows, the model was trained with {vocab_size}"
        )
    loras = {
        role: LoRAConfig(
            rank=cfg["rank"],
            alpha=cfg["alpha"],
            dropout=cfg["dropout"],
            target_modules=cfg["target_modules"]
            if isinstance(cfg["target_modules"], str)
            else tuple(cfg["target_modules"]),
        )
        for role, cfg in meta["adapters"].items()
    }
    # the factory's vocabulary and adapters (a referenced base lacks the CLaRa rows: they are
    # added), then everything the run trained is read over them
    add_clara_parts(
        model,
        vocab_size=vocab_size,
        mem_token_ids=[int(t) for t in rows.get("token_ids")],
        lora=loras,
        seed=0,
        first_new=first_new if model.config.vocab_size < vocab_size else None,
        adapter_seeds=[0] * len(loras),
    )
    # the rows the run added (or re-initialised) past the tokenizer's base vocabulary, exactly as trained
    model.embed.set_value(
        model.embed[...].at[first_new:].set(jnp.asarray(np.asarray(rows.get("added_embed"))))
    )
    if model.lm_head is not None:
        model.lm_head.set_value(
            model.lm_head[...].at[first_new:].set(jnp.asarray(np.asarray(rows.get("added_lm_head"))))
        )
    model.embed_rows.set_value(jnp.asarray(np.asarray(rows.get("rows"))))
    factors = SafetensorsFile(os.path.join(model_dir, ADAPTERS_FILE))
    for role in loras:
        for target, f in model.adapters[role].factors.items():
            f["a"].set_value(jnp.asarray(np.asarray(factors.get(f"{role}/{target}/a"))))
            f["b"].set_value(jnp.asarray(np.asarray(factors.get(f"{role}/{target}/b"))))
    clara = settings.model_config(c["mem_token_ids"])
    return tok, model, clara
