"""The `config.json` of an official CLaRa checkpoint: every field that changes the computation is
either honoured or refused by name.

The official `CLaRaConfig` (apple/ml-clara 857c3cf) writes all its fields into config.json; a field
that is absent takes the official class default, as the official `from_pretrained` would. The
official trainer (`create_clara_config` in train_sft.py) sets lora=True, different_mem_tokens=True,
sep=True, kbtc_training=False and quantization "no" (the default), which is what is accepted.

Fields read and honoured:
  doc_max_length, compr_rate  the document length and n_mem = doc_max_length // compr_rate
  lora_r                      LoRA rank; alpha is always 2·lora_r and dropout 0.1 (the official
                              `_get_peft_config` hard-codes both, whatever config.json says)
  generation_top_k            the default number of documents per question
  decoder_model_name          where the base tokenizer is found when neither the checkpoint nor
                              --base has one (only as a path on this machine; never the hub)
Fields refused unless they have the official trainer's value:
  lora (true), different_mem_tokens (true), sep (true), kbtc_training (false), quantization ("no")
Fields that do not change what a saved model computes (so not checked):
  training_stage, load_adapters, pure_inference (which adapters the official loader builds; we
  load every adapter in the file, as the official inference loader does), optimize_mem_tokens,
  stage2_retrieval_top_n, training_form (training only), attn_implementation (kernel choice),
  max_new_tokens (unused by the official generate calls), compr_* and lora_compressor (the
  official CLaRa never builds a separate compressor: `self.compr` is always None).
The official code always loads the base in bfloat16; the converter writes --dtype (float32 by
default), so its outputs equal the official model's run in float32.
"""

from __future__ import annotations

import json
import os

# Official class defaults of the fields checked below (CLaRaConfig.__init__).
OFFICIAL_DEFAULTS = {
    "lora": False,
    "different_mem_tokens": False,
    "sep": False,
    "kbtc_training": False,
    "quantization": "no",
    "lora_r": 16,
    "generation_top_k": 1,
}

# field -> (the value the converter supports, why any other value is refused)
REQUIRED_VALUES = {
    "lora": (
        True,
        "a full fine-tune is saved as a whole model, not as adapters.pth; only LoRA checkpoints convert",
    ),
    "different_mem_tokens": (
        True,
        "the model then uses one shared <MEM> token; clara-jax uses the distinct <MEM0..n-1>",
    ),
    "sep": (
        True,
        "with sep=false the official generator writes document j's vectors at <MEM0> + j·n_mem, one "
        "position off per document from the <MEM*> tokens its own prompt holds (the prompt always has "
        "<SEP> after each document); clara-jax places them on the <MEM*> tokens, as sep=true does, so "
        "answers from more than one document would differ",
    ),
    "kbtc_training": (
        False,
        "it appends a <KBTC> token after <SEP>, a vocabulary clara-jax does not build",
    ),
    "quantization": (
        "no",
        "its adapters were trained on a 4/8-bit base; a full-precision base would compute something else",
    ),
}


def _value(cfg: dict, field: str):
    return cfg.get(field, OFFICIAL_DEFAULTS.get(field))


def read_official_config(official_dir: str, *, compression_rate=None, doc_max_length=None) -> dict:
    """The checkpoint's config.json, checked for what the converter supports.

    Optional `compression_rate` / `doc_max_length` are assertions: the official loader silently
    ignored a mismatching `--compress_rate` (docs/official_code.md §8.1 item 4), here a mismatch is an error.
    """
    path = os.path.join(official_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {official_dir} an official CLaRa checkpoint?")
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
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
    for field, (required, why) in REQUIRED_VALUES.items():
        got = _value(cfg, field)
        if got != required:
            absent = "" if field in cfg else " (absent, so the official default applies)"
            raise ValueError(
                f"{path}: {field}={json.dumps(got)}{absent}; only {field}={json.dumps(required)} is "
                f"supported: {why}"
            )
    for field in ("lora_r", "generation_top_k"):
        got = _value(cfg, field)
        if not isinstance(got, int) or got < 1:
            raise ValueError(f"{path}: {field} must be a positive integer, got {got!r}")
    return cfg


def lora_rank(cfg: dict) -> int:
    return int(_value(cfg, "lora_r"))


def generation_top_k(cfg: dict) -> int:
    return int(_value(cfg, "generation_top_k"))
