"""Tokenizer contract: CLaRa token ids, padding, chat rendering (docs/official_code.md §1.2, §1.6)."""

from __future__ import annotations

import shutil

import pytest

from clara_jax.data.tiny_tokenizer import MISTRAL_CHAT_TEMPLATE, TINY_TOKENIZER_DIR, build_tiny_tokenizer
from clara_jax.data.tokenizer import clara_special_tokens, load_tokenizer, render_chat

N_MEM = 8
SYSTEM = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)


def _qa_messages(n_docs=2, n_mem=N_MEM, question="Who wrote the first novel?"):
    docs = ("".join(f"<MEM{i}>" for i in range(n_mem)) + "<SEP>") * n_docs
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Background:\n{docs}\n\nQuestion:{question}"},
    ]


def test_special_token_list_order():
    assert clara_special_tokens(3) == ["<MEM0>", "<MEM1>", "<MEM2>", "<AE>", "<ENC>", "<SEP>"]
    with pytest.raises(ValueError):
        clara_special_tokens(0)


def test_tiny_tokenizer_fits_tiny_models(tok):
    assert tok.base_vocab_size == 384
    assert tok.vocab_size == 384 + N_MEM + 3 <= 512
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.hf.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


def test_clara_ids_are_consecutive_in_order(tok):
    base = tok.base_vocab_size
    expected = list(range(base, base + N_MEM + 3))
    assert list(tok.mem_token_ids) + [tok.ae_id, tok.enc_id, tok.sep_id] == expected
    assert tok.hf.convert_tokens_to_ids(clara_special_tokens(N_MEM)) == expected
    assert tok.n_mem == N_MEM and len(tok) == len(tok.hf) == tok.vocab_size


def test_special_tokens_are_never_split(tok):
    hf = tok.hf
    for t in clara_special_tokens(N_MEM) + ["<s>", "</s>"]:
        assert hf.encode(t, add_special_tokens=False) == [hf.convert_tokens_to_ids(t)]
    # Glued to text and to each other, as in the prompts and the encoder input (§1.4, §1.6).
    ids = hf.encode("Background:\n<MEM0><MEM1><SEP><ENC><s>doc</s><MEM7>x", add_special_tokens=False)
    for t in ["<MEM0>", "<MEM1>", "<SEP>", "<ENC>", "<s>", "</s>", "<MEM7>"]:
        assert ids.count(hf.convert_tokens_to_ids(t)) == 1
    assert hf.decode(ids) == "Background:\n<MEM0><MEM1><SEP><ENC><s>doc</s><MEM7>x"


@pytest.mark.parametrize(
    "text",
    ["The river flows through the old city.", "  two  spaces,\ttab\nnew line", "Ünïcödé — 東京 🙂 1998!"],
)
def test_round_trip(tok, text):
    hf = tok.hf
    ids = hf.encode(text, add_special_tokens=False)
    assert tok.bos_id not in ids
    assert hf.decode(ids) == text
    with_bos = hf.encode(text)  # Llama/Mistral behaviour: bos prepended, no eos
    assert with_bos == [tok.bos_id] + ids
    assert hf.decode(with_bos, skip_special_tokens=True) == text


def test_pad_is_bos_and_padding_is_left(tok):
    hf = tok.hf
    assert tok.pad_id == tok.bos_id == hf.pad_token_id
    assert hf.padding_side == "left"
    batch = hf(["a much longer sentence than the other", "short"], padding="longest")
    long_ids, short_ids = batch["input_ids"]
    long_mask, short_mask = batch["attention_mask"]
    assert len(long_ids) == len(short_ids)
    n_pad = short_mask.index(1)
    assert n_pad > 0 and short_ids[:n_pad] == [tok.pad_id] * n_pad and all(short_mask[n_pad:])
    assert short_ids[n_pad:] == hf.encode("short") and all(long_mask)


def test_reload_and_saved_extended_tokenizer_give_identical_ids(tok, tmp_path):
    again = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)
    text = render_chat(tok, _qa_messages(), add_generation_prompt=True)
    assert again.hf.encode(text) == tok.hf.encode(text)

    tok.hf.save_pretrained(tmp_path)
    for n_mem in (N_MEM, None):  # None: detected from the saved <MEM*> tokens
        reloaded = load_tokenizer(tmp_path, n_mem=n_mem)
        assert reloaded.n_mem == N_MEM
        assert reloaded.base_vocab_size == tok.base_vocab_size
        assert reloaded.vocab_size == tok.vocab_size
        assert reloaded.mem_token_ids == tok.mem_token_ids
        assert (reloaded.ae_id, reloaded.enc_id, reloaded.sep_id) == (tok.ae_id, tok.enc_id, tok.sep_id)
        assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert reloaded.hf.encode(text) == tok.hf.encode(text)
        assert render_chat(reloaded, _qa_messages(), add_generation_prompt=True) == text


def test_saved_tokenizer_with_other_n_mem_is_rejected(tok, tmp_path):
    tok.hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not consecutive"):
        load_tokenizer(tmp_path, n_mem=4)  # <MEM0..3> exist but <AE> is not right after them
    with pytest.raises(ValueError, match="missing"):
        load_tokenizer(tmp_path, n_mem=16)


def test_base_tokenizer_without_clara_tokens():
    base = load_tokenizer(TINY_TOKENIZER_DIR)
    assert base.n_mem == 0 and base.mem_token_ids == () and base.sep_id is None
    assert base.vocab_size == base.base_vocab_size == 384
    assert base.pad_id == base.bos_id


def test_chat_template_renders_mistral_strings(tok):
    messages = _qa_messages(n_docs=1, n_mem=2, question="What is the capital of France?")
    user = messages[1]["content"]
    assert user == "Background:\n<MEM0><MEM1><SEP>\n\nQuestion:What is the capital of France?"
    prompt = render_chat(tok, messages, add_generation_prompt=True)
    assert prompt == f"<s> [INST] {SYSTEM}\n\n{user} [/INST]"
    full = render_chat(
        tok, messages + [{"role": "assistant", "content": "Paris"}], add_generation_prompt=False
    )
    assert full == f"<s> [INST] {SYSTEM}\n\n{user} [/INST] Paris</s>"


@pytest.mark.parametrize(
    "answer", ["Paris", "In 1998.", "Question: Who?\nAnswer: Marie Curie", ". starts with a dot"]
)
def test_prompt_len_prefix(tok, answer):
    hf = tok.hf
    messages = _qa_messages()
    prompt = render_chat(tok, messages, add_generation_prompt=True)
    full = render_chat(
        tok, messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False
    )
    prompt_ids = hf(prompt, add_special_tokens=False)["input_ids"]
    full_ids = hf(full, add_special_tokens=False)["input_ids"]
    prompt_len = len(prompt_ids)
    assert full_ids[:prompt_len] == prompt_ids
    assert full_ids[0] == tok.bos_id and full_ids.count(tok.bos_id) == 1
    assert full_ids[-1] == tok.eos_id
    assert hf.decode(full_ids[prompt_len:]) == f" {answer}</s>"


def test_system_role_fallback_folds_into_user():
    no_system = (
        "{%- for m in messages %}{%- if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{%- endif %}"
        "{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<assistant>' }}{%- endif %}"
    )
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=2, chat_template=no_system)
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USER"}]
    assert render_chat(tok, messages, add_generation_prompt=True) == "<user>SYS\nUSER</s><assistant>"


def test_other_template_errors_propagate():
    # The old Mistral-v0.2 template has no system role and raises "roles must alternate", which
    # the official fallback does not catch (docs/official_code.md §1.6).
    from jinja2.exceptions import TemplateError

    old = (
        "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=2, chat_template=old)
    with pytest.raises(TemplateError, match="alternate"):
        render_chat(tok, _qa_messages(n_mem=2), add_generation_prompt=True)


def test_missing_chat_template_is_a_clear_error(tmp_path):
    d = tmp_path / "no_template"
    shutil.copytree(TINY_TOKENIZER_DIR, d)
    (d / "chat_template.jinja").unlink()
    tok = load_tokenizer(d, n_mem=2)
    with pytest.raises(ValueError, match="no chat template") as err:
        render_chat(tok, _qa_messages(n_mem=2), add_generation_prompt=True)
    assert str(d) in str(err.value)


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
        load_tokenizer(tmp_path, n_mem=4)
    assert str(tmp_path) in str(err.value)
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(missing)
    assert str(missing) in str(err.value)


def test_bundled_asset_equals_fresh_build(tmp_path):
    fresh = build_tiny_tokenizer(tmp_path)
    assert len(fresh) == 384
    assert fresh.chat_template == MISTRAL_CHAT_TEMPLATE
    bundled = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert bundled == sorted(p.name for p in tmp_path.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(bundled)
    for name in bundled:
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
