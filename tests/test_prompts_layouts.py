"""Prompt strings (docs/official_code.md §1.6) and token layouts (§1.4, §1.5, §1.7, §2) on the tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from clara_jax.data.layouts import encoder_batch, generator_batch, label_ids
from clara_jax.data.prompts import (
    PARAPHRASE_SYSTEM,
    PARAPHRASE_TEMPLATES,
    QA_SYSTEM,
    STANDARD_SYSTEM,
    RenderedPrompt,
    memory_block,
    paraphrase_prompt,
    paraphrase_template_index,
    qa_prompt,
    standard_prompt,
)
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer

N_MEM = 4
MEM = "<MEM0><MEM1><MEM2><MEM3><SEP>"

# Copied from docs/official_code.md §1.6, not from the code under test.
SPEC_QA_SYSTEM = (
    "You are a helpful assistant. Given a document, your task is to generate some single questions to "
    "cover all key information of the document and answer them sequentially."
)
SPEC_PARAPHRASE_SYSTEM = "You are a helpful assistant. Your task is follow the instructions to paraphrase the background information."
SPEC_STANDARD_SYSTEM = (
    "You are a helpful assistant. Your task is to extract relevant information from provided documents "
    "and to answer to questions as briefly as possible."
)
SPEC_PARAPHRASE_TEMPLATES = [
    "Background: {docs} means the same as",
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
    "The essence of background: {docs} is captured again in the following statement:",
]

DOCS = [
    "The river flows through the old city and into the sea.",
    "Marie Curie was the first person to win two Nobel Prizes.",
    "Paris",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)


def _ids(tok, text):
    return tok.hf.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------------------- prompts


def test_prompt_texts_match_spec():
    assert QA_SYSTEM == SPEC_QA_SYSTEM
    assert PARAPHRASE_SYSTEM == SPEC_PARAPHRASE_SYSTEM
    assert STANDARD_SYSTEM == SPEC_STANDARD_SYSTEM
    assert list(PARAPHRASE_TEMPLATES) == SPEC_PARAPHRASE_TEMPLATES


def test_memory_block(tok):
    assert memory_block(tok, 1) == MEM
    assert memory_block(tok, 3) == MEM * 3
    with pytest.raises(ValueError):
        memory_block(tok, 0)


def test_qa_prompt_exact(tok):
    got = qa_prompt(tok, ["Who won?", "When?"], ["Marie Curie", "In 1998."])
    prompt = f"<s> [INST] {SPEC_QA_SYSTEM}\n\nBackground:\n{MEM} [/INST]"
    assert got == RenderedPrompt(
        prompt, prompt + " Question: Who won?\nAnswer: Marie Curie\nQuestion: When?\nAnswer: In 1998.</s>"
    )
    assert "Who won" not in got.prompt
    with pytest.raises(ValueError):
        qa_prompt(tok, ["a", "b"], ["c"])


def test_paraphrase_prompt_exact(tok):
    index = paraphrase_template_index(7)
    got = paraphrase_prompt(tok, "A city has a river.", 7)
    user = SPEC_PARAPHRASE_TEMPLATES[index].format(docs=MEM)
    prompt = f"<s> [INST] {SPEC_PARAPHRASE_SYSTEM}\n\n{user} [/INST]"
    assert got == RenderedPrompt(prompt, prompt + " A city has a river.</s>")
    # The template with a newline, rendered by hand.
    fourth = (
        f"<s> [INST] {SPEC_PARAPHRASE_SYSTEM}\n\nThese two expressions are equivalent in essence:\n"
        f"(1) {MEM}\n(2) [/INST]"
    )
    seed = next(s for s in range(1000) if paraphrase_template_index(s) == 3)
    assert paraphrase_prompt(tok, "x", seed).prompt == fourth


def test_paraphrase_choice_seeded_varied_and_complete(tok):
    assert paraphrase_prompt(tok, "x", 11) == paraphrase_prompt(tok, "x", 11)
    by_seed = {paraphrase_template_index(s) for s in range(200)}
    assert by_seed == set(range(13))
    # A Generator advances, so a stream varies; the same seed gives the same stream.
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    stream_a = [paraphrase_prompt(tok, "x", a).prompt for _ in range(40)]
    stream_b = [paraphrase_prompt(tok, "x", b).prompt for _ in range(40)]
    assert stream_a == stream_b and len(set(stream_a)) > 5


def test_standard_prompt_exact(tok):
    prompt = f"<s> [INST] {SPEC_STANDARD_SYSTEM}\n\nBackground:\n{MEM * 2}\n\nQuestion:Who won? [/INST]"
    assert standard_prompt(tok, "Who won?", 2, "Marie Curie") == RenderedPrompt(
        prompt, prompt + " Marie Curie</s>"
    )
    assert standard_prompt(tok, "Who won?", 2) == RenderedPrompt(prompt, None)


# ----------------------------------------------------------------------------------------- encoder


def _content(ids, mask):
    return ids[mask].tolist()


def test_encoder_layout(tok):
    batch = encoder_batch(tok, DOCS, doc_max_length=64, bucket=8)
    n, width = batch.ids.shape
    assert batch.ids.dtype == np.int32 and batch.mask.dtype == bool
    assert n == 3 and (width - N_MEM) % 8 == 0
    longest = max(len(_ids(tok, d)) for d in DOCS) + 3
    assert width - N_MEM == -(-longest // 8) * 8
    assert batch.n_truncated == 0
    for r, doc in enumerate(DOCS):
        row, mask = batch.ids[r], batch.mask[r]
        assert row[-N_MEM:].tolist() == list(tok.mem_token_ids)  # the model reads hidden[:, -n_mem:]
        expected = [tok.enc_id, tok.bos_id, *_ids(tok, doc), tok.eos_id, *tok.mem_token_ids]
        assert _content(row, mask) == expected
        n_pad = width - len(expected)
        assert not mask[:n_pad].any() and mask[n_pad:].all()  # left padding
        assert (row[:n_pad] == tok.pad_id).all()


def test_encoder_content_independent_of_bucket(tok):
    rows = []
    for bucket, length in [(None, None), (8, None), (32, None), (None, 67)]:
        b = encoder_batch(tok, DOCS, doc_max_length=64, bucket=bucket, length=length)
        rows.append([_content(b.ids[r], b.mask[r]) for r in range(len(DOCS))])
    assert all(r == rows[0] for r in rows)


def test_encoder_fixed_official_length(tok):
    batch = encoder_batch(tok, DOCS, doc_max_length=64, length=64 + 3)
    assert batch.ids.shape == (3, 64 + 3 + N_MEM)
    with pytest.raises(ValueError):
        encoder_batch(tok, DOCS, doc_max_length=64, length=60)


def test_encoder_truncation(tok):
    long_doc = " ".join(DOCS * 6)
    doc_max = 20
    batch = encoder_batch(tok, [long_doc, DOCS[2]], doc_max_length=doc_max, bucket=32)
    assert batch.truncated.tolist() == [True, False] and batch.n_truncated == 1
    assert batch.ids.shape == (2, doc_max + 3 + N_MEM)  # bucket is capped at doc_max_length + 3
    row = batch.ids[0]
    assert batch.mask[0].all()
    assert row[:-N_MEM].tolist() == [tok.enc_id, tok.bos_id, *_ids(tok, long_doc)[: doc_max + 1]]
    assert tok.eos_id not in row.tolist()  # the tail and </s> are lost, as in the official code
    assert row[-N_MEM:].tolist() == list(tok.mem_token_ids)


def test_encoder_short_query_length(tok):
    batch = encoder_batch(tok, ["Who won?"], doc_max_length=32, bucket=16)
    assert batch.ids.shape == (1, 16 + N_MEM)


def test_encoder_rejects_clara_tokens_in_text(tok):
    with pytest.raises(ValueError, match="text 1"):
        encoder_batch(tok, ["fine", "bad <MEM0> text"], doc_max_length=16)


# --------------------------------------------------------------------------------------- generator


def _decoded_targets(tok, batch, r):
    return tok.hf.decode(batch.ids[r][batch.loss_mask[r]].tolist())


def test_generator_loss_mask_covers_answer_and_eos(tok):
    answers = ["Marie Curie", "Paris", "In 1998."]
    prompts = [
        standard_prompt(tok, q, 2, a) for q, a in zip(["Who?", "Capital of France?", "When?"], answers)
    ]
    batch = generator_batch(tok, prompts, max_len=512, bucket=32, expect_docs=2)
    assert batch.ids.dtype == np.int32 and batch.mask.dtype == bool and batch.loss_mask.dtype == bool
    assert batch.ids.shape[1] % 32 == 0 and batch.n_truncated == 0
    for r, (p, a) in enumerate(zip(prompts, answers)):
        assert _decoded_targets(tok, batch, r) == f" {a}</s>"
        full = _ids(tok, p.full)
        n_prompt = len(_ids(tok, p.prompt))
        assert _content(batch.ids[r], batch.mask[r]) == full
        target_ids = batch.ids[r][batch.loss_mask[r]].tolist()
        assert target_ids == full[n_prompt:] and target_ids[-1] == tok.eos_id
        assert not (batch.loss_mask[r] & ~batch.mask[r]).any()  # pads never in the loss
        n_pad = batch.ids.shape[1] - len(full)
        assert not batch.loss_mask[r, : n_pad + n_prompt].any()  # prompt never in the loss
        assert not batch.mask[r, :n_pad].any() and batch.mask[r, n_pad:].all()


def test_generator_qa_and_paraphrase_targets(tok):
    prompts = [qa_prompt(tok, ["Who won?"], ["Marie Curie"]), paraphrase_prompt(tok, "A river.", 0)]
    batch = generator_batch(tok, prompts, max_len=512, bucket=None, expect_docs=1)
    assert batch.mask[np.argmax([len(_ids(tok, p.full)) for p in prompts])].all()  # bucket=None: longest
    assert _decoded_targets(tok, batch, 0) == " Question: Who won?\nAnswer: Marie Curie</s>"
    assert _decoded_targets(tok, batch, 1) == " A river.</s>"


def test_generator_inference_prompts_have_no_targets(tok):
    prompts = [standard_prompt(tok, "Who?", 1), standard_prompt(tok, "Capital of France?", 1)]
    batch = generator_batch(tok, prompts, max_len=512, bucket=16, expect_docs=1)
    assert not batch.loss_mask.any()
    for r, p in enumerate(prompts):
        assert _content(batch.ids[r], batch.mask[r]) == _ids(tok, p.prompt)
        assert batch.ids[r, -1] == _ids(tok, p.prompt)[-1]  # left padding: generation continues at the end


def test_generator_right_truncation(tok):
    long = standard_prompt(tok, "Who?", 1, "Marie Curie was the first person to win two Nobel Prizes.")
    short = standard_prompt(tok, "Who?", 1, "Paris")
    n_prompt = len(_ids(tok, long.prompt))
    max_len = n_prompt + 6  # " Paris</s>" is 6 tiny-BPE tokens: Ġ P a ri s </s>
    assert len(_ids(tok, short.full)) <= max_len < len(_ids(tok, long.full))
    batch = generator_batch(tok, [long, short], max_len=max_len, bucket=32)
    assert batch.truncated.tolist() == [True, False] and batch.n_truncated == 1
    assert batch.ids.shape[1] == max_len  # bucket capped at max_len
    assert batch.loss_mask[0].sum() == 6 and batch.ids[0, -1] != tok.eos_id
    assert _content(batch.ids[0], batch.mask[0]) == _ids(tok, long.full)[:max_len]
    assert _decoded_targets(tok, batch, 1) == " Paris</s>"


def test_generator_fixed_length(tok):
    batch = generator_batch(tok, [standard_prompt(tok, "Who?", 1, "Paris")], max_len=300, length=300)
    assert batch.ids.shape == (1, 300)


def test_expect_docs_names_the_bad_row(tok):
    prompts = [standard_prompt(tok, "Who?", 2, "Paris"), standard_prompt(tok, "Who?", 1, "Paris")]
    with pytest.raises(ValueError, match="row 1"):
        generator_batch(tok, prompts, max_len=512, expect_docs=2)
    spoofed = standard_prompt(tok, "Who <MEM0>?", 1, "Paris")
    with pytest.raises(ValueError, match="row 0"):
        generator_batch(tok, [spoofed], max_len=512, expect_docs=1)


def test_prompt_must_be_token_prefix(tok):
    # A prompt cut inside a word: the tiny BPE encodes "Q" alone but "Question" as one merged token.
    bad = RenderedPrompt(prompt="<s> [INST] x [/INST] Q", full="<s> [INST] x [/INST] Question</s>")
    assert _ids(tok, bad.full)[: len(_ids(tok, bad.prompt))] != _ids(tok, bad.prompt)
    with pytest.raises(ValueError, match="row 0.*prefix"):
        generator_batch(tok, [bad], max_len=512)


# ------------------------------------------------------------------------------------------ labels


def test_label_ids_shift():
    ids = np.array([[1, 1, 5, 6, 7, 2], [1, 5, 6, 8, 9, 2]], dtype=np.int32)
    loss_mask = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=bool)
    targets, target_mask = label_ids(ids, loss_mask)
    assert targets.shape == ids.shape and targets.dtype == ids.dtype
    assert targets[:, :-1].tolist() == ids[:, 1:].tolist()
    assert target_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0]]
    # The logits at t predict t+1: the masked targets are exactly the loss-masked tokens.
    assert targets[target_mask].tolist() == ids[loss_mask].tolist()


def test_texts_longer_than_the_tokenizer_limit_are_cut_without_transformers_warning(tok, caplog):
    """Documents and prompts beyond the tokenizer's model_max_length (4096 here) are cut by the
    layouts, which count the cut; transformers' "sequence length is longer than the specified
    maximum" warning would only be noise on top (issue #18 item 6)."""
    import logging

    long_text = "word " * 5000
    with caplog.at_level(logging.WARNING, logger="transformers"):
        batch = encoder_batch(tok, [long_text], doc_max_length=16, bucket=8)
        rows = generator_batch(tok, [RenderedPrompt(long_text, long_text + "x")], max_len=32, bucket=8)
    assert batch.truncated.tolist() == [True] and rows.truncated.tolist() == [True]
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]
