"""The on-disk format of a trained CLaRa model directory: its file names, clara.json, its checks.

    WORKDIR/model/
      clara.json              method settings + where the base weights are + run config
      adapters.safetensors    every adapter's LoRA factors ("{role}/{projection}/{a|b}", stacked over layers)
      embed_rows.safetensors  the trained <MEM*> embedding rows
      base/                   the base decoder, only when it is not a directory the run read from
      tokenizer.json …        the tokenizer with the CLaRa tokens

clara.json (format_version 1):
    format_version, base (a path inside the directory, or an absolute local directory the run
    referenced), base_digest (`weights_digest` of the base), vocab_size, base_vocab_size, dtype,
    clara {CLARA_FIELDS}, adapters {role: {rank, alpha, dropout, target_modules}}, run_config.

Writing and loading the arrays (`clara_jax.interop.model_dir`) needs jax and the decoder; this
module needs neither, so every layer that reads or writes the directory (interop saves and loads
it, inference fingerprints it for an export) imports it downward. A model directory may be
downloaded, so clara.json's `base` is checked: a relative one must stay inside the directory, and
an absolute one (a local base the run referenced) must still match the `base_digest` saved with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from clara_jax.file_io import live_dir, sha256_file
from clara_jax.formats.safetensors_io import weights_digest
from clara_jax.safe_paths import contained_path

FORMAT_VERSION = 1
META_FILE = "clara.json"
ADAPTERS_FILE = "adapters.safetensors"
ROWS_FILE = "embed_rows.safetensors"
BASE_DIR = "base"  # where the base is copied when it is not referenced
# The trained parts of a model directory (hashed whole by `model_fingerprint`).
TRAINED_FILES = (META_FILE, ADAPTERS_FILE, ROWS_FILE)
# clara.json's "clara" section: ClaraConfig's fields.
CLARA_FIELDS = (
    "doc_max_length",
    "compression_rate",
    "mem_token_ids",
    "mse_weight",
    "top_k",
    "temperature",
    "topk_mask_mode",
    "retrieval_score",
    "retrieval_loss",
    "infonce_weight",
)
# Fields added to the section after directories were first written: absent from those, where
# they mean the then only behaviour.
CLARA_ADDED = {"retrieval_score": "cosine", "retrieval_loss": "lm", "infonce_weight": 1.0}

log = logging.getLogger(__name__)


def model_dir_path(model_dir: str | os.PathLike) -> str:
    """The directory that holds `model_dir`'s complete copy (its hidden twin if a crash fell
    between the two renames of a re-save); raises if there is no saved model there."""
    path = live_dir(model_dir)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{os.path.join(model_dir, META_FILE)}: not a clara-jax model directory "
            "(no clara.json; was the run finished?)"
        )
    if path != os.fspath(model_dir):
        log.warning("%s: using %s (a re-save of the model was interrupted)", model_dir, path)
    return path


def read_model_meta(model_dir: str) -> dict:
    """clara.json of a (resolved) model directory, with its format version checked."""
    meta_path = os.path.join(model_dir, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: format_version {version} is not {FORMAT_VERSION}")
    return meta


def read_clara_section(model_dir: str, meta: dict) -> dict:
    """clara.json's "clara" section with every field of CLARA_FIELDS (the later-added ones filled
    in with what an older directory means); a missing one raises naming the file and field.
    The values are checked where they become settings (`ClaraSettings.from_section`)."""
    meta_path = os.path.join(model_dir, META_FILE)
    section = meta.get("clara")
    if not isinstance(section, dict):
        raise ValueError(f"{meta_path}: field 'clara' must be an object, got {type(section).__name__}")
    missing = [k for k in CLARA_FIELDS if k not in section and k not in CLARA_ADDED]
    if missing:
        raise ValueError(f"{meta_path}: field 'clara' lacks {', '.join(repr(k) for k in missing)}")
    return {k: section.get(k, CLARA_ADDED.get(k)) for k in CLARA_FIELDS}


def clara_section(clara) -> dict:
    """The "clara" section written for a ClaraConfig (or any object with CLARA_FIELDS)."""
    return {k: list(clara.mem_token_ids) if k == "mem_token_ids" else getattr(clara, k) for k in CLARA_FIELDS}


def model_meta(
    *,
    base: str,
    base_digest: str,
    vocab_size: int,
    base_vocab_size: int,
    dtype: str,
    clara,
    adapters: dict,
    run_config: dict | None = None,
) -> dict:
    """clara.json's content (`clara` is a ClaraConfig, `adapters` {role: LoRA settings})."""
    return {
        "format_version": FORMAT_VERSION,
        "base": base,
        "base_digest": base_digest,
        "vocab_size": vocab_size,
        "base_vocab_size": base_vocab_size,
        "dtype": dtype,
        "clara": clara_section(clara),
        "adapters": adapters,
        "run_config": run_config or {},
    }


def base_weights(model_dir: str, meta: dict) -> tuple[str, str]:
    """(path, `weights_digest`) of the base weights of a (resolved) model directory, checked.

    A relative `base` must be a path inside the model directory (no `..`). An absolute one is a
    local directory the training run read and referenced rather than copied (a 7B base is 14 GB),
    so it cannot be refused; instead the weights found there must match the `base_digest` saved
    in clara.json, which stops a model directory from quietly pointing at other local weights
    (and catches a base that was replaced since training).
    """
    meta_path = os.path.join(model_dir, META_FILE)
    base = meta.get("base")
    if isinstance(base, str) and os.path.isabs(base):
        if ".." in base.replace("\\", "/").split("/"):
            raise ValueError(f"{meta_path}: field 'base' ({base!r}) must not contain '..'")
        path = base
    else:
        path = contained_path(model_dir, base, source=meta_path, field="'base'")
    digest = weights_digest(path)
    expected = meta.get("base_digest")
    if expected is None and path == base:
        log.warning(
            "%s: the referenced base %s is unchecked (no 'base_digest': an older save)", meta_path, base
        )
    elif expected is not None and digest != expected:
        raise ValueError(
            f"{meta_path}: the base weights at {path} (field 'base') are not the ones this model was "
            "trained with (their digest differs from the saved 'base_digest')"
        )
    return path, digest


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the model directory's trained files and its base weights' digest: equal
    fingerprints = comparable vectors. The base weights (which can be 14 GB, and are often
    referenced rather than copied) enter through their `weights_digest`."""
    model_dir = model_dir_path(model_dir)
    h = hashlib.sha256()
    for name in TRAINED_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not a clara-jax model directory (missing {name})")
        h.update(name.encode() + b"\0" + sha256_file(path).encode() + b"\0")
    _, base_digest = base_weights(model_dir, read_model_meta(model_dir))
    h.update(b"base\0" + base_digest.encode() + b"\0")
    return h.hexdigest()
