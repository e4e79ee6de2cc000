"""Official CLaRa (apple/ml-clara) checkpoints -> a clara-jax model directory.

An official checkpoint (CLARA_SPEC §1.2, `save_pretrained` L1184-1220) holds only what differs
from the base LLM:

    config.json                    CLaRaConfig: doc_max_length, compr_rate, lora_r, …
    adapters.pth                   {adapter_name: PEFT state dict}
    decoder_first_last_layers.pth  the FULL extended `model.embed_tokens.weight` / `lm_head.weight`
    tokenizer files                with <MEM0..n-1>, <AE>, <ENC>, <SEP> appended

The `.pth` files are read with `torch.load(weights_only=True)` only: a pickle that needs
anything beyond tensors and containers is refused, never executed. Unlike the official
`from_pretrained`, every adapter in the file is loaded as saved (no stage-dependent
re-initialisation, §8.1.1), and compr_rate / doc_max_length come from the checkpoint (§8.1.4).
"""

from __future__ import annotations

import json
import os
import pickle

import jax.numpy as jnp
import numpy as np

from clara_jax.data.tokenizer import clara_special_tokens, load_tokenizer
from clara_jax.inference.model_dir import save_clara_model
from clara_jax.interop.hf import load_decoder
from clara_jax.interop.peft import parse_lora_key, set_adapter_from_tensors
from clara_jax.model.clara import COMPRESSOR, GENERATOR, QUERY_REASONER, ClaraConfig
from clara_jax.model.lora import ALL_LINEAR, LoRAConfig

ADAPTER_ROLES = {
    "encoder_adapter": COMPRESSOR,
    "decoder_adapter": GENERATOR,
    "query_reasoner_adapter": QUERY_REASONER,
}
REQUIRED_ADAPTERS = ("encoder_adapter", "decoder_adapter")
OFFICIAL_LORA_DROPOUT = 0.1  # `_get_peft_config`: LoraConfig(r=lora_r, lora_alpha=2*lora_r, dropout 0.1)
SOURCE_FILE = "official_source.json"


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


def read_official_config(official_dir: str, *, compression_rate=None, doc_max_length=None) -> dict:
    """The checkpoint's config.json, checked for what this converter supports.

    Optional `compression_rate` / `doc_max_length` are assertions: the official loader silently
    ignored a mismatching `--compress_rate` (§8.1.4), here a mismatch is an error.
    """
    path = os.path.join(official_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {official_dir} an official CLaRa checkpoint?")
    with open(path) as f:
        cfg = json.load(f)
    for field in ("doc_max_length", "compr_rate"):
        if not isinstance(cfg.get(field), int) or cfg[field] < 1:
            raise ValueError(f"{path}: needs a positive integer {field!r}, got {cfg.get(field)!r}")
    for name, want, got in (
        ("compr_rate", compression_rate, cfg["compr_rate"]),
        ("doc_max_length", doc_max_length, cfg["doc_max_length"]),
    ):
        if want is not None and int(want) != got:
            raise ValueError(
                f"{path}: {name}={got}, but {want} was asserted; the checkpoint's value is binding"
            )
    if cfg["doc_max_length"] % cfg["compr_rate"]:
        raise ValueError(f"{path}: doc_max_length {cfg['doc_max_length']} is not a multiple of compr_rate")
    if cfg.get("lora") is False:
        raise ValueError(f"{path}: lora=false (a full fine-tune); only LoRA checkpoints are supported")
    if cfg.get("different_mem_tokens") is False:
        raise ValueError(
            f"{path}: different_mem_tokens=false (one shared <MEM> token); clara-jax uses distinct <MEM0..n-1>"
        )
    if cfg.get("compr_model_name") and not cfg.get("lora", True):
        raise ValueError(f"{path}: a separate compressor model ({cfg['compr_model_name']}) is not supported")
    return cfg


def _split_first_last(state: dict, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(embed, lm_head or None) from decoder_first_last_layers.pth, whatever the key prefix."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    embed = [k for k in state if k.endswith("embed_tokens.weight")]
    head = [k for k in state if k.endswith("lm_head.weight")]
    other = sorted(set(state) - set(embed) - set(head))
    if len(embed) != 1 or len(head) > 1 or other:
        raise ValueError(
            f"{path}: expected one '…embed_tokens.weight' and at most one '…lm_head.weight', got {sorted(state)}"
        )
    return _numpy(state[embed[0]]), (_numpy(state[head[0]]) if head else None)


def _adapter_lora(tensors: dict[str, np.ndarray], cfg: dict, name: str, source: str, num_layers: int):
    """LoRAConfig of one official adapter: rank from config.json (checked against the tensors),
    alpha = 2·r and dropout 0.1 as `_get_peft_config` builds them, targets from the keys present."""
    rank = int(cfg.get("lora_r", 16))
    targets: dict[str, set[int]] = {}
    for key, value in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise ValueError(
                f"{source}[{name!r}]: tensor {key!r} is not a LoRA factor of a decoder projection"
            )
        layer, target, which = parsed
        if target not in ALL_LINEAR:
            raise ValueError(f"{source}[{name!r}]: tensor {key!r} targets unknown projection {target!r}")
        r = value.shape[0] if which == "a" else value.shape[1]
        if r != rank:
            raise ValueError(f"{source}[{name!r}]: {key} has rank {r}, config.json says lora_r={rank}")
        targets.setdefault(target, set()).add(layer)
    if not targets:
        raise ValueError(f"{source}[{name!r}]: no LoRA tensors")
    partial = {t: sorted(ls) for t, ls in targets.items() if ls != set(range(num_layers))}
    if partial:
        raise ValueError(f"{source}[{name!r}]: projections not adapted in every layer: {partial}")
    spec = "all-linear" if set(targets) == set(ALL_LINEAR) else tuple(sorted(targets))
    alpha = float(cfg.get("lora_alpha", 2 * rank))
    return LoRAConfig(rank=rank, alpha=alpha, dropout=OFFICIAL_LORA_DROPOUT, target_modules=spec)


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
) -> str:
    """Write a clara-jax model directory (load with `load_clara_model`) from an official checkpoint.

    `base_dir` is the local transformers directory of the base LLM (`decoder_model_name`, e.g.
    Mistral-7B-Instruct-v0.2). It is referenced, not copied, when its rows agree exactly with
    the checkpoint's embed/lm_head; otherwise (or with `copy_base`) the base is written into
    OUT/base with the checkpoint's matrices.
    """
    official_dir, base_dir, out_dir = (os.path.abspath(str(p)) for p in (official_dir, base_dir, out_dir))
    cfg = read_official_config(official_dir, compression_rate=compression_rate, doc_max_length=doc_max_length)
    n_mem = cfg["doc_max_length"] // cfg["compr_rate"]

    tok_dir = str(tokenizer_dir or official_dir)
    try:
        tok = load_tokenizer(tok_dir, n_mem=n_mem)
    except ValueError as e:
        raise ValueError(
            f"{tok_dir}: the tokenizer does not hold the CLaRa tokens as clara-jax needs them "
            f"({', '.join(clara_special_tokens(n_mem)[:2])}…, <AE>, <ENC>, <SEP> with consecutive ids right "
            f"after the base vocabulary, n_mem = {cfg['doc_max_length']} // {cfg['compr_rate']}): {e}"
        ) from e

    first_last_path = os.path.join(official_dir, "decoder_first_last_layers.pth")
    embed, head = _split_first_last(load_torch_weights(first_last_path), first_last_path)
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
        tensors = {k: _numpy(v) for k, v in adapters[official_name].items()}
        source = f"{adapters_path}[{official_name!r}]"
        lora = _adapter_lora(tensors, cfg, official_name, adapters_path, base_cfg.num_layers)
        role = ADAPTER_ROLES[official_name]
        set_adapter_from_tensors(model, role, lora, tensors.items(), source, require_complete=True)
        loaded[official_name] = role

    clara = ClaraConfig(
        mem_token_ids=tok.mem_token_ids,
        doc_max_length=cfg["doc_max_length"],
        compression_rate=cfg["compr_rate"],
        top_k=int(cfg.get("generation_top_k") or 5),
    )
    reference = same_rows and not copy_base
    save_clara_model(model, tok, clara, out_dir, base_path=base_dir if reference else "")
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
        json.dump(
            {
                "official_dir": official_dir,
                "base_dir": base_dir,
                "base_referenced": reference,
                "adapters": loaded,
                "official_config": cfg,
            },
            f,
            indent=2,
            default=str,
        )
    return out_dir
