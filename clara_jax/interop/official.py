"""Official CLaRa (apple/ml-clara) checkpoints -> a clara-jax model directory.

An official checkpoint (docs/official_code.md §1.2, `save_pretrained` L1184-1220) holds only what differs
from the base LLM:

    config.json                    CLaRaConfig (checked field by field: official_config.py)
    adapters.pth                   {adapter_name: PEFT state dict}; PEFT also puts copies of the
                                   resized `model.embed_tokens.weight` / `lm_head.weight` in each
    decoder_first_last_layers.pth  the FULL extended `model.embed_tokens.weight` / `lm_head.weight`
    tokenizer files                only in the released checkpoints; the official trainer's
                                   `save_pretrained` writes none

Without tokenizer files the tokenizer is rebuilt as the official `from_pretrained` builds it: the
base's tokenizer plus <MEM0..n-1>, <AE>, <ENC>, <SEP>, in that order. The `.pth` files are read
with `torch.load(weights_only=True)` only: a pickle that needs anything beyond tensors and
containers is refused, never executed. As the official inference loader (`pure_inference=True`),
every adapter in the file is loaded as saved (none of the stage-dependent re-initialisation of
training, docs/official_code.md §1.3), and compr_rate / doc_max_length come from the checkpoint
(§8.1 item 4).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from clara_jax.data.tokenizer import TOKENIZER_FILE, clara_special_tokens, load_tokenizer
from clara_jax.interop.hf import load_decoder
from clara_jax.interop.model_dir import save_clara_model
from clara_jax.interop.official_config import generation_top_k, lora_rank, read_official_config
from clara_jax.interop.peft import parse_lora_key, set_adapter_from_tensors
from clara_jax.model.clara import COMPRESSOR, GENERATOR, QUERY_REASONER
from clara_jax.model.clara_settings import ClaraSettings
from clara_jax.model.field_checks import SettingsError
from clara_jax.model.lora import ALL_LINEAR, LoRAConfig

ADAPTER_ROLES = {
    "encoder_adapter": COMPRESSOR,
    "decoder_adapter": GENERATOR,
    "query_reasoner_adapter": QUERY_REASONER,
}
REQUIRED_ADAPTERS = ("encoder_adapter", "decoder_adapter")
OFFICIAL_LORA_DROPOUT = 0.1  # `_get_peft_config`: LoraConfig(r=lora_r, lora_alpha=2*lora_r, dropout 0.1)
SOURCE_FILE = "official_source.json"
EMBEDDING_SUFFIXES = {"embed": "embed_tokens.weight", "lm_head": "lm_head.weight"}


def load_torch_weights(path: str):
    """`torch.load` restricted to tensors and plain containers (no code from the pickle runs)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; expected an official CLaRa checkpoint file")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refused: not a plain tensor checkpoint (torch.load(weights_only=True) failed: {first}). "
            "Only tensors in dicts are accepted; nothing from the file was executed."
        ) from e


def _numpy(tensor) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(tensor).__name__}")
    return tensor.detach().to(torch.float32).numpy()


def _embedding_kind(key: str) -> str | None:
    """The kind ("embed" or "lm_head") of a full-vocabulary matrix, whatever the key prefix; else None."""
    return next((kind for kind, suffix in EMBEDDING_SUFFIXES.items() if key.endswith(suffix)), None)


def _read_first_last(state, path: str) -> dict[str, np.ndarray]:
    """{"embed": …, "lm_head": … (if saved)} from decoder_first_last_layers.pth."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    kinds = {k: _embedding_kind(k) for k in state}
    other = sorted(k for k, kind in kinds.items() if kind is None)
    counts = {kind: sum(1 for v in kinds.values() if v == kind) for kind in EMBEDDING_SUFFIXES}
    if other or counts["embed"] != 1 or counts["lm_head"] > 1:
        raise ValueError(
            f"{path}: expected one '…embed_tokens.weight' and at most one '…lm_head.weight', got {sorted(state)}"
        )
    return {kinds[k]: _numpy(v) for k, v in state.items()}


def _split_embedding_copies(state: dict, source: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(LoRA tensors, embedding copies) of one adapter's state dict.

    PEFT saves the input embedding and lm_head inside every adapter when the vocabulary was
    resized (its `save_embedding_layers="auto"`), and CLaRa always resizes it: those two
    tensors are copies of the full matrices, not LoRA factors.
    """
    lora, copies = {}, {}
    for key, value in state.items():
        kind = _embedding_kind(key)
        if kind is None:
            lora[key] = _numpy(value)
        elif kind in copies:
            raise ValueError(f"{source}: more than one '…{EMBEDDING_SUFFIXES[kind]}' tensor")
        else:
            copies[kind] = _numpy(value)
    return lora, copies


def _choose_embeddings(
    first_last: dict[str, np.ndarray],
    copies: list[tuple[str, dict[str, np.ndarray]]],
    first_last_path: str,
    adapters_path: str,
    notes: list[str],
) -> dict[str, np.ndarray]:
    """The embed / lm_head matrices the official inference loader ends up computing with.

    `from_pretrained` loads decoder_first_last_layers.pth first, then every adapter in file
    order through PEFT, which also writes that adapter's embedding copies into the model: so
    the last copy in adapters.pth wins. Checkpoints the official code writes have identical
    copies (all are taken from the live model in one `save_pretrained`); a note says when not.
    """
    chosen = dict(first_last)
    origin = {kind: first_last_path for kind in chosen}
    holders = []
    for name, found in copies:
        if not found:
            continue
        holders.append(name)
        for kind, value in found.items():
            expected = first_last.get(kind, first_last["embed"])
            if value.shape != expected.shape:
                raise ValueError(
                    f"{adapters_path}[{name!r}]: the copy of {EMBEDDING_SUFFIXES[kind]} has shape "
                    f"{value.shape}; {first_last_path} has {expected.shape}"
                )
            chosen[kind] = value
            origin[kind] = f"{adapters_path}[{name!r}]"
    if not holders:
        return chosen
    differing = []
    for name, found in copies:
        for kind, value in found.items():
            if kind in first_last and not np.array_equal(value, first_last[kind]):
                gap = float(np.abs(value - first_last[kind]).max())
                differing.append(f"{name}'s {EMBEDDING_SUFFIXES[kind]} (max |diff| {gap:.3g})")
    if not differing:
        notes.append(
            f"embeddings: {', '.join(holders)} in adapters.pth carry PEFT's copies of embed_tokens/lm_head; "
            f"they equal {os.path.basename(first_last_path)}"
        )
        return chosen
    used = ", ".join(f"{EMBEDDING_SUFFIXES[k]} from {v}" for k, v in sorted(origin.items()))
    notes.append(
        f"embeddings: copies in adapters.pth differ from {os.path.basename(first_last_path)}: "
        f"{'; '.join(differing)}. Using {used}: the official loader loads "
        f"{os.path.basename(first_last_path)} first, then each adapter in file order through PEFT, "
        "which writes that adapter's copies over the model's, so the last copy is what it computes with"
    )
    return chosen


def _adapter_lora(tensors: dict[str, np.ndarray], cfg: dict, source: str, num_layers: int) -> LoRAConfig:
    """LoRAConfig of one official adapter: rank from config.json (checked against the tensors),
    alpha = 2·r and dropout 0.1 as `_get_peft_config` hard-codes them, targets from the keys."""
    rank = lora_rank(cfg)
    targets: dict[str, set[int]] = {}
    for key, value in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise ValueError(f"{source}: tensor {key!r} is not a LoRA factor of a decoder projection")
        layer, target, which = parsed
        if target not in ALL_LINEAR:
            raise ValueError(f"{source}: tensor {key!r} targets unknown projection {target!r}")
        r = value.shape[0] if which == "a" else value.shape[1]
        if r != rank:
            raise ValueError(f"{source}: {key} has rank {r}, config.json says lora_r={rank}")
        targets.setdefault(target, set()).add(layer)
    if not targets:
        raise ValueError(f"{source}: no LoRA tensors")
    partial = {t: sorted(ls) for t, ls in targets.items() if ls != set(range(num_layers))}
    if partial:
        raise ValueError(f"{source}: projections not adapted in every layer: {partial}")
    spec = "all-linear" if set(targets) == set(ALL_LINEAR) else tuple(sorted(targets))
    return LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=OFFICIAL_LORA_DROPOUT, target_modules=spec)


def find_tokenizer(official_dir: str, base_dir: str, cfg: dict, tokenizer_dir=None) -> tuple[str, str]:
    """(directory, why) of the tokenizer to use, in this order: --tokenizer; the checkpoint's own
    (released checkpoints ship one, with the CLaRa tokens); the base's, as the official
    `from_pretrained` rebuilds it (from --base, else from config.json's decoder_model_name when
    that is a local directory). A base tokenizer gets the CLaRa tokens added in the official order."""
    if tokenizer_dir:
        return str(tokenizer_dir), "given with --tokenizer"
    if os.path.isfile(os.path.join(official_dir, TOKENIZER_FILE)):
        return official_dir, "the checkpoint's own tokenizer"
    rebuilt = (
        "plus the CLaRa tokens, rebuilt as the official from_pretrained does (the checkpoint has no "
        "tokenizer: the official trainer saves none)"
    )
    if os.path.isfile(os.path.join(base_dir, TOKENIZER_FILE)):
        return base_dir, f"the base tokenizer from --base {rebuilt}"
    named = cfg.get("decoder_model_name")
    if isinstance(named, str) and os.path.isfile(os.path.join(named, TOKENIZER_FILE)):
        return named, f"the base tokenizer from config.json's decoder_model_name {rebuilt}"
    raise FileNotFoundError(
        f"no tokenizer: {official_dir} has no {TOKENIZER_FILE} (the official trainer saves none), nor has "
        f"--base {base_dir}, nor config.json's decoder_model_name {named!r} as a local directory; "
        "pass --tokenizer DIR (the base model's fast tokenizer)"
    )


def convert_official(
    official_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    compression_rate: int | None = None,
    doc_max_length: int | None = None,
    copy_base: bool = False,
    report: Callable[[str], None] | None = None,
) -> str:
    """Write a clara-jax model directory (load with `load_clara_model`) from an official checkpoint.

    `base_dir` is the local transformers directory of the base LLM (`decoder_model_name`, e.g.
    Mistral-7B-Instruct-v0.2). It is referenced, not copied, when its rows agree exactly with
    the checkpoint's embed/lm_head; otherwise (or with `copy_base`) the base is written into
    OUT/base with the checkpoint's matrices. `report` receives one line per decision taken (which
    tokenizer, which embedding copy); they are also kept in OUT/official_source.json.
    """
    official_dir, base_dir, out_dir = (os.path.abspath(str(p)) for p in (official_dir, base_dir, out_dir))
    cfg = read_official_config(official_dir, compression_rate=compression_rate, doc_max_length=doc_max_length)
    try:  # the one constructor of ClaraConfig's settings (a model directory is read with it too)
        settings = ClaraSettings(
            doc_max_length=cfg["doc_max_length"],
            compression_rate=cfg["compr_rate"],
            top_k=generation_top_k(cfg),
        )
    except SettingsError as err:
        raise ValueError(f"{os.path.join(official_dir, 'config.json')}: {err}") from None
    n_mem = settings.n_mem
    notes: list[str] = []

    tok_dir, why = find_tokenizer(official_dir, base_dir, cfg, tokenizer_dir)
    try:
        tok = load_tokenizer(tok_dir, n_mem=n_mem)
    except ValueError as e:
        raise ValueError(
            f"{tok_dir}: the tokenizer does not hold the CLaRa tokens as clara-jax needs them "
            f"({', '.join(clara_special_tokens(n_mem)[:2])}…, <AE>, <ENC>, <SEP> with consecutive ids right "
            f"after the base vocabulary, n_mem = {cfg['doc_max_length']} // {cfg['compr_rate']}): {e}"
        ) from e
    notes.append(f"tokenizer: {tok_dir}: {why}; {tok.vocab_size} tokens, <MEM0> = id {tok.mem_token_ids[0]}")

    first_last_path = os.path.join(official_dir, "decoder_first_last_layers.pth")
    first_last = _read_first_last(load_torch_weights(first_last_path), first_last_path)
    adapters_path = os.path.join(official_dir, "adapters.pth")
    adapters = load_torch_weights(adapters_path)
    if not isinstance(adapters, dict) or not all(isinstance(v, dict) for v in adapters.values()):
        raise ValueError(f"{adapters_path}: expected {{adapter_name: state dict}}")
    unknown = sorted(set(adapters) - set(ADAPTER_ROLES))
    missing = [a for a in REQUIRED_ADAPTERS if a not in adapters]
    if unknown or missing:
        raise ValueError(
            f"{adapters_path}: adapters {sorted(adapters)}; expected {list(ADAPTER_ROLES)} "
            f"(unknown: {unknown}, missing: {missing})"
        )
    split = {
        name: _split_embedding_copies(state, f"{adapters_path}[{name!r}]") for name, state in adapters.items()
    }
    matrices = _choose_embeddings(
        first_last,
        [(name, copies) for name, (_, copies) in split.items()],
        first_last_path,
        adapters_path,
        notes,
    )
    embed, head = matrices["embed"], matrices.get("lm_head")

    model = load_decoder(base_dir, dtype=dtype)
    base_cfg = model.config
    if embed.shape != (tok.vocab_size, base_cfg.hidden_size):
        raise ValueError(
            f"{first_last_path}: embed_tokens has shape {embed.shape}; the tokenizer ({tok.vocab_size} tokens) "
            f"and base (hidden {base_cfg.hidden_size}) imply {(tok.vocab_size, base_cfg.hidden_size)}"
        )
    if model.lm_head is not None and (head is None or head.shape != embed.shape):
        raise ValueError(
            f"{first_last_path}: lm_head.weight missing or shaped {getattr(head, 'shape', None)}"
        )
    if model.lm_head is None and head is not None and not np.array_equal(head, embed):
        raise ValueError(f"{first_last_path}: the base ties embeddings but lm_head.weight differs from them")

    nb = base_cfg.vocab_size
    same_rows = nb == tok.base_vocab_size and np.array_equal(
        np.asarray(model.embed[...], np.float32), embed[:nb]
    )
    if same_rows and model.lm_head is not None:
        same_rows = np.array_equal(np.asarray(model.lm_head[...], np.float32), head[:nb])
    model.config = base_cfg.replace(vocab_size=tok.vocab_size)
    model.embed.set_value(jnp.asarray(embed, model.embed[...].dtype))
    if model.lm_head is not None:
        model.lm_head.set_value(jnp.asarray(head, model.lm_head[...].dtype))
    model.set_trainable_rows(tok.mem_token_ids)  # the rows the official run trained (§1.2)

    loaded = {}
    for official_name in ADAPTER_ROLES:
        if official_name not in adapters:
            continue
        tensors = split[official_name][0]
        source = f"{adapters_path}[{official_name!r}]"
        lora = _adapter_lora(tensors, cfg, source, base_cfg.num_layers)
        role = ADAPTER_ROLES[official_name]
        set_adapter_from_tensors(model, role, lora, tensors.items(), source, require_complete=True)
        loaded[official_name] = role

    clara = settings.model_config(tok.mem_token_ids)
    reference = same_rows and not copy_base
    save_clara_model(model, tok, clara, out_dir, base_path=base_dir if reference else "")
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
        json.dump(
            {
                "official_dir": official_dir,
                "base_dir": base_dir,
                "base_referenced": reference,
                "tokenizer_dir": tok_dir,
                "adapters": loaded,
                "notes": notes,
                "official_config": cfg,
            },
            f,
            indent=2,
            default=str,
        )
    for line in notes:
        if report is not None:
            report(line)
    return out_dir
