"""Token layouts for the compressor and the generator as fixed-shape, LEFT-padded NumPy arrays.

The layouts are the official ones (docs/official_code.md §1.4, §1.7, §2), so official checkpoints see the
token streams they were trained on; only the padded lengths differ (§8.3): lengths are rounded
up to a bucket instead of always padding to the maximum, which keeps the number of distinct jit
shapes small without paying for the padding. Left padding does not change a row's content, so a
row encodes the same tokens whatever its bucket.

Encoder contract: the `n_mem` memory tokens are always the LAST `n_mem` positions of every row,
so the compressor reads a document's memory states as `hidden[:, -n_mem:]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clara_jax.data.prompts import RenderedPrompt
from clara_jax.data.tokenizer import ClaraTokenizer

# <ENC>, <s> before the text and </s> after it (docs/official_code.md §1.4).
ENCODER_FRAME_TOKENS = 3


@dataclass(frozen=True)
class EncoderBatch:
    """ids int32 [n, L]; mask bool [n, L]; truncated bool [n]: the doc lost its tail and its `</s>`."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: np.ndarray

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())


@dataclass(frozen=True)
class GeneratorBatch:
    """ids int32 [B, L]; mask bool [B, L]; loss_mask bool [B, L] marks the target tokens only.

    truncated bool [B]: the row was cut on the right at `max_len` (its target may be lost).
    """

    ids: np.ndarray
    mask: np.ndarray
    loss_mask: np.ndarray
    truncated: np.ndarray

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None:
        return n
    if multiple < 1:
        raise ValueError(f"bucket must be >= 1 or None, got {multiple}")
    return -(-n // multiple) * multiple


def _clara_ids(tok: ClaraTokenizer) -> np.ndarray:
    if tok.n_mem < 1 or tok.enc_id is None or tok.sep_id is None:
        raise ValueError("the tokenizer has no CLaRa tokens; load it with n_mem >= 1")
    return np.asarray([*tok.mem_token_ids, tok.ae_id, tok.enc_id, tok.sep_id])


def _left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=bool)
    for r, row in enumerate(rows):
        if row:
            ids[r, length - len(row) :] = row
            mask[r, length - len(row) :] = True
    return ids, mask


def encoder_batch(
    tok: ClaraTokenizer,
    texts: Sequence[str],
    doc_max_length: int,
    *,
    bucket: int | None = 32,
    length: int | None = None,
) -> EncoderBatch:
    """Rows `[pad]* <ENC> <s> text </s> <MEM0> … <MEM{n_mem-1}>` for the compressor or query reasoner.

    As in the official code the `<ENC><s>text</s>` part is cut on the right to `doc_max_length + 3`
    tokens (a long text loses its tail and its `</s>`). Its padded length is the longest part of
    the batch rounded up to `bucket` and capped at `doc_max_length + 3`, or exactly `length`
    (`length=doc_max_length + 3` reproduces the official fixed padding); `n_mem` is added to it.
    Queries use this too, with their own short `doc_max_length` (docs/official_code.md §1.5, §8.3).

    Like the official code, the one string `<ENC>` + bos + text + eos is tokenized in one call: a
    SentencePiece tokenizer that marks only the string's first word as word-initial (Metaspace
    `prepend_scheme="first"`, e.g. Mistral's) then reads the text's first word as the official code
    does ("Hi", not "▁Hi"). The frame tokens are special, so no merge crosses them.
    """
    clara_ids = _clara_ids(tok)
    if not texts:
        raise ValueError("encoder_batch needs at least one text")
    if doc_max_length < 1:
        raise ValueError(f"doc_max_length must be >= 1, got {doc_max_length}")
    cap = doc_max_length + ENCODER_FRAME_TOKENS
    if length is not None and length < cap:
        raise ValueError(f"length={length} cannot hold doc_max_length + 3 = {cap} tokens")

    hf = tok.hf
    enc, bos, eos = hf.convert_ids_to_tokens([tok.enc_id, tok.bos_id, tok.eos_id])
    # verbose=False: no transformers "sequence length is longer than the maximum" warning; the cut
    # below is ours, counted in `truncated` and logged by the callers
    encoded = hf([enc + bos + text + eos for text in texts], add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    parts, truncated = [], np.zeros(len(texts), dtype=bool)
    for r, part in enumerate(encoded):
        if part[:2] != [tok.enc_id, tok.bos_id] or part[-1] != tok.eos_id:
            raise ValueError(
                f"the tokenizer did not keep {enc!r}, {bos!r} and {eos!r} as single special tokens "
                f"(got ids {part[:2]} … {part[-1:]}): the <ENC>/bos/eos frame cannot be built"
            )
        if np.isin(part[2:-1], clara_ids).any():
            raise ValueError(f"text {r} contains a CLaRa special token (<MEM*>, <AE>, <ENC> or <SEP>)")
        truncated[r] = len(part) > cap
        parts.append(part[:cap])

    width = length if length is not None else min(_round_up(max(map(len, parts)), bucket), cap)
    mem = list(tok.mem_token_ids)
    ids, mask = _left_pad([p + mem for p in parts], width + tok.n_mem, tok.pad_id)
    return EncoderBatch(ids=ids, mask=mask, truncated=truncated)


def _check_memory_slots(row: np.ndarray, r: int, tok: ClaraTokenizer, k: int) -> None:
    """The splice writes doc j at `first<MEM0> + j*(n_mem+1)`, so the k slots must be contiguous."""
    mem_ids = np.asarray(tok.mem_token_ids)
    n_mem_found = int(np.isin(row, mem_ids).sum())
    n_sep_found = int((row == tok.sep_id).sum())
    if n_mem_found != k * tok.n_mem or n_sep_found != k:
        raise ValueError(
            f"row {r}: expected {k} document slots ({k * tok.n_mem} memory tokens and {k} <SEP>), "
            f"found {n_mem_found} memory tokens and {n_sep_found} <SEP> (truncated prompt, or a "
            "CLaRa token inside the question?)"
        )
    first = int(np.argmax(row == mem_ids[0]))
    slot = np.append(mem_ids, tok.sep_id)
    if not np.array_equal(row[first : first + k * slot.size], np.tile(slot, k)):
        raise ValueError(f"row {r}: the {k} document slots are not contiguous <MEM0>…<SEP> blocks")


def generator_batch(
    tok: ClaraTokenizer,
    prompts: Sequence[RenderedPrompt],
    max_len: int,
    *,
    bucket: int | None = 32,
    length: int | None = None,
    expect_docs: int | None = None,
) -> GeneratorBatch:
    """Rows of rendered prompts (+ targets) with the label mask of docs/official_code.md §2.

    The rendered text already starts with `<s>`, so it is encoded with `add_special_tokens=False`.
    The target starts at `prompt_len` = the token count of the prompt alone; this is only valid if
    the prompt's tokens are a prefix of the full text's tokens, which is checked. Rows are cut on
    the right at `max_len` like the official code. The padded length is the longest row rounded
    up to `bucket` (capped at `max_len`), or exactly `length`. With `expect_docs=k` each row must
    hold k contiguous memory slots. A prompt whose `full` is None (inference) has no targets.
    """
    if not prompts:
        raise ValueError("generator_batch needs at least one prompt")
    if length is not None and length < max_len:
        raise ValueError(f"length={length} cannot hold max_len={max_len} tokens")
    hf = tok.hf
    prompt_ids = hf([p.prompt for p in prompts], add_special_tokens=False, verbose=False)["input_ids"]
    with_target = [i for i, p in enumerate(prompts) if p.full is not None]
    full_ids = {}
    if with_target:  # the HF tokenizer fails on an empty batch
        encoded = hf([prompts[i].full for i in with_target], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        full_ids = dict(zip(with_target, encoded))

    rows, targets, truncated = [], [], np.zeros(len(prompts), dtype=bool)
    for r, prompt in enumerate(prompt_ids):
        full = full_ids.get(r, prompt)
        if full[: len(prompt)] != prompt:
            raise ValueError(
                f"row {r}: the tokens of the prompt are not a prefix of the tokens of prompt + target, "
                "so the label boundary is undefined (a BPE merge across the end of the prompt?)"
            )
        truncated[r] = len(full) > max_len
        row = full[:max_len]
        rows.append(row)
        targets.append(max(len(row) - len(prompt), 0) if r in full_ids else 0)

    width = length if length is not None else min(_round_up(max(map(len, rows)), bucket), max_len)
    ids, mask = _left_pad(rows, width, tok.pad_id)
    loss_mask = np.zeros_like(mask)
    for r, n_target in enumerate(targets):
        if n_target:
            loss_mask[r, width - n_target :] = True
    if expect_docs is not None:
        _clara_ids(tok)  # a clear error when the tokenizer has no CLaRa tokens
        for r in range(len(rows)):
            _check_memory_slots(ids[r], r, tok, expect_docs)
    return GeneratorBatch(ids=ids, mask=mask, loss_mask=loss_mask, truncated=truncated)


def label_ids(ids: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token labels aligned with the logits: position t is scored on token t+1.

    Shapes stay [B, L] so they match the logits; the last column has no next token and is masked.
    """
    targets = np.zeros_like(ids)
    target_mask = np.zeros_like(loss_mask, dtype=bool)
    targets[:, :-1] = ids[:, 1:]
    target_mask[:, :-1] = loss_mask[:, 1:]
    return targets, target_mask
