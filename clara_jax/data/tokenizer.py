"""CLaRa tokenizer: a local Hugging Face fast tokenizer plus the CLaRa special tokens.

Mirrors the official set-up (docs/official_code.md §1.2): the distinct memory tokens `<MEM0>…<MEM{n-1}>`
and `<AE>`, `<ENC>`, `<SEP>` are appended, in that order, after the base vocabulary, so the
model's embedding matrix grows by exactly `n_mem + 3` rows in the same order; padding is on the
left; pad := bos when the tokenizer has none (Mistral). Prompts are rendered with the tokenizer's
chat template (§1.6).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

TOKENIZER_FILE = "tokenizer.json"


def clara_special_tokens(n_mem: int) -> list[str]:
    """`<MEM0>…<MEM{n_mem-1}>, <AE>, <ENC>, <SEP>`: the order is a contract with the embedding rows."""
    if n_mem < 1:
        raise ValueError(f"n_mem must be >= 1, got {n_mem}")
    return [f"<MEM{i}>" for i in range(n_mem)] + ["<AE>", "<ENC>", "<SEP>"]


@dataclass(frozen=True, eq=False)
class ClaraTokenizer:
    """The HF tokenizer (`hf`) and the ids the model and data pipeline need.

    `base_vocab_size` is the vocabulary size without the CLaRa tokens (= id of `<MEM0>`), and
    `vocab_size = base_vocab_size + n_mem + 3` is the number of embedding rows the model needs.
    Without CLaRa tokens (`n_mem == 0`) the CLaRa ids are `None`.
    """

    hf: Any
    path: str
    n_mem: int
    vocab_size: int
    base_vocab_size: int
    mem_token_ids: tuple[int, ...]
    ae_id: int | None
    enc_id: int | None
    sep_id: int | None
    bos_id: int
    eos_id: int
    pad_id: int

    def __len__(self) -> int:
        return self.vocab_size


def _count_mem_tokens(vocab: dict[str, int]) -> int:
    n = 0
    while f"<MEM{n}>" in vocab:
        n += 1
    return n


def _add_clara_tokens(hf, n_mem: int, path: str) -> int:
    """Add (or find, when a checkpoint saved them) the CLaRa tokens; return the base vocab size."""
    from tokenizers import AddedToken

    wanted = clara_special_tokens(n_mem)
    vocab = hf.get_vocab()
    present = [t for t in wanted if t in vocab]
    if not present:
        base = len(hf)
        # normalized=False: matched on the raw text, never split by the BPE.
        hf.add_special_tokens(
            {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in wanted]},
            replace_extra_special_tokens=False,
        )
        vocab = hf.get_vocab()
    elif len(present) != len(wanted):
        missing = [t for t in wanted if t not in vocab]
        raise ValueError(
            f"tokenizer at {path} has only some CLaRa tokens for n_mem={n_mem}; missing {missing}"
        )
    else:
        base = vocab[wanted[0]]
    ids = [vocab[t] for t in wanted]
    if ids != list(range(base, base + len(wanted))):
        got = ", ".join(f"{t}={i}" for t, i in zip(wanted, ids))
        raise ValueError(
            f"CLaRa tokens in tokenizer at {path} are not consecutive from id {base} in the order "
            f"<MEM0..{n_mem - 1}>, <AE>, <ENC>, <SEP> (got {got}); was it saved with another n_mem?"
        )
    for t in wanted:  # a reloaded tokenizer must also treat them as atomic
        if hf.encode(t, add_special_tokens=False) != [vocab[t]]:
            raise ValueError(f"tokenizer at {path} splits the CLaRa token {t!r}")
    return base


def load_tokenizer(
    path: str | os.PathLike, n_mem: int | None = None, *, chat_template: str | None = None
) -> ClaraTokenizer:
    """Load a fast tokenizer from a LOCAL directory and extend it with the CLaRa tokens.

    `n_mem=None` keeps the vocabulary as saved: a checkpoint tokenizer that already holds
    `<MEM*>` tokens is validated and its `n_mem` detected; a base tokenizer gets no CLaRa tokens.
    `chat_template` (jinja text) overrides the saved template, e.g. for an old Mistral template.

    `PreTrainedTokenizerFast` (not `AutoTokenizer`) so that `tokenizer.json` is used as saved: in
    transformers 5 a `tokenizer_class` such as `LlamaTokenizer` may rebuild the pipeline.
    """
    from transformers import PreTrainedTokenizerFast

    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        found = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} in {path} (only fast tokenizers are supported; found: {found})"
        )
    hf = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    if chat_template is not None:
        hf.chat_template = chat_template

    if n_mem is None:
        n_mem = _count_mem_tokens(hf.get_vocab())
    if n_mem:
        base = _add_clara_tokens(hf, n_mem, path)
        vocab = hf.get_vocab()
        ids = [vocab[t] for t in clara_special_tokens(n_mem)]
        mem_ids, (ae_id, enc_id, sep_id) = tuple(ids[:n_mem]), ids[n_mem:]
    else:
        base, mem_ids, ae_id, enc_id, sep_id = len(hf), (), None, None, None

    if hf.bos_token_id is None or hf.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} needs bos and eos tokens (CLaRa prompts use both)")
    if hf.pad_token is None:  # Mistral has none; the official code pads with bos (§1.2)
        hf.pad_token = hf.bos_token
    hf.padding_side = "left"

    return ClaraTokenizer(
        hf=hf,
        path=path,
        n_mem=n_mem,
        vocab_size=len(hf),
        base_vocab_size=base,
        mem_token_ids=mem_ids,
        ae_id=ae_id,
        enc_id=enc_id,
        sep_id=sep_id,
        bos_id=hf.bos_token_id,
        eos_id=hf.eos_token_id,
        pad_id=hf.pad_token_id,
    )


_NO_SYSTEM_ROLE = re.compile(r"system role not supported", re.IGNORECASE)


def render_chat(tok: ClaraTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render chat messages to text with the tokenizer's chat template (docs/official_code.md §1.6).

    As in the official code, `enable_thinking=False` is passed (a no-op for Mistral), and only a
    "System role not supported" template error makes us fold the system message into the first
    user turn as `system + "\\n" + user`; any other template error propagates.
    """
    from jinja2.exceptions import TemplateError

    hf = tok.hf if isinstance(tok, ClaraTokenizer) else tok
    if hf.chat_template is None:
        where = getattr(tok, "path", None) or getattr(hf, "name_or_path", "?")
        raise ValueError(
            f"tokenizer at {where} has no chat template (no chat_template.jinja and none in "
            "tokenizer_config.json); pass chat_template= to load_tokenizer"
        )

    def apply(msgs):
        return hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
        )

    try:
        return apply(messages)
    except TemplateError as err:
        if not (_NO_SYSTEM_ROLE.search(str(err)) and len(messages) > 1 and messages[0]["role"] == "system"):
            raise
        system, first, *rest = messages
        folded = {**first, "content": system["content"] + "\n" + first["content"]}
        return apply([folded, *rest])
