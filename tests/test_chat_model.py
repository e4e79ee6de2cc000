"""ChatModel: batched jitted chat completion with a base decoder (the server's and synthesis' backend)."""

import shutil

import numpy as np
import pytest

from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.inference.chat import ChatModel, load_chat_model
from clara_jax.interop.hf import save_decoder

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "Who wrote the first novel?"},
        {"role": "assistant", "content": "She did, at twenty."},
        {"role": "user", "content": "The river flows through the old city and into the sea. " * 6},
    ],
] + [[{"role": "user", "content": f"Question number {i}: how long is the river?"}] for i in range(6)]


@pytest.fixture(scope="module")
def chat():
    return load_chat_model("tiny", batch_size=8, seed=0)


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time(chat):
    assert len(CONVERSATIONS) > chat.batch_size  # two batches, the second one padded
    batched = chat.chat(CONVERSATIONS, max_new_tokens=12)
    single = [chat.chat([c], max_new_tokens=12)[0] for c in CONVERSATIONS]
    assert batched == single
    assert len({r.prompt_tokens for r in batched}) > 2  # prompts of different lengths shared a batch
    for conv, r in zip(CONVERSATIONS, batched):
        assert r.prompt_tokens == chat.count_tokens(conv)
        assert r.finish_reason == "length" and r.completion_tokens == 12 and isinstance(r.text, str)


@pytest.mark.slow
def test_one_device_pads_to_power_of_two_batches(monkeypatch):
    """Without data parallelism a lone request runs as a batch of 1, three as a batch of 4."""
    import clara_jax.inference.chat as chat_module

    single_device = load_chat_model("tiny", batch_size=8, data_parallel=False)
    shapes = []
    real_generate = chat_module.generate

    def spy(model, ids, mask, **kw):
        shapes.append(ids.shape[0])
        return real_generate(model, ids, mask, **kw)

    monkeypatch.setattr(chat_module, "generate", spy)
    batched = single_device.chat(CONVERSATIONS[:3], max_new_tokens=6)
    alone = [single_device.chat([c], max_new_tokens=6)[0] for c in CONVERSATIONS[:3]]
    assert shapes == [4, 1, 1, 1] and batched == alone


@pytest.mark.slow
def test_per_conversation_limits_equal_separate_calls(chat):
    limits = [3, 12, 7]
    mixed = chat.chat(CONVERSATIONS[:3], max_new_tokens=limits)
    assert [r.completion_tokens for r in mixed] == limits
    assert mixed == [chat.chat([c], max_new_tokens=n)[0] for c, n in zip(CONVERSATIONS, limits)]
    with pytest.raises(ValueError, match="2 limits for 3 conversations"):
        chat.chat(CONVERSATIONS[:3], max_new_tokens=[3, 4])


def test_fewer_new_tokens_are_cut_from_the_bucketed_run(chat):
    """max_new_tokens=5 compiles for a bucket of 16 new tokens, then the reply is cut to exactly 5."""
    row = chat._generate([chat.encode(CONVERSATIONS[1])], _sampling(chat, 16), None)[0]
    assert not set(row[:5].tolist()) & set(chat.eos_token_ids)
    short = chat.chat(CONVERSATIONS[1:2], max_new_tokens=5)[0]
    assert short.completion_tokens == 5 and short.finish_reason == "length"
    assert short.text == chat.tok.hf.decode(row[:5].tolist(), skip_special_tokens=True)


def test_end_of_sequence_stops_the_reply(chat):
    """Declare the 4th greedy token an EOS: the reply must stop there with finish_reason 'stop'."""
    conv = CONVERSATIONS[1]
    ids = chat.encode(conv)
    sampling_row = chat._generate([ids], _sampling(chat, 16), None)[0]
    stop_token = int(sampling_row[3])
    first = sampling_row.tolist().index(stop_token)
    stopper = ChatModel("stopper", chat.tok, chat.model, batch_size=8)
    stopper.eos_token_ids = (stop_token,)
    [result] = stopper.chat([conv], max_new_tokens=16)
    assert result.finish_reason == "stop"
    assert result.completion_tokens == first + 1  # the EOS token counts as generated
    assert result.text == chat.tok.hf.decode(sampling_row[:first].tolist(), skip_special_tokens=True)


def _sampling(chat, n):
    from clara_jax.inference.generation import SamplingConfig

    return SamplingConfig(max_new_tokens=n, eos_token_ids=chat.eos_token_ids, pad_token_id=chat.tok.pad_id)


def test_sampling_is_seeded(chat):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = chat.chat(CONVERSATIONS[:2], seed=1, **kw)
    assert a == chat.chat(CONVERSATIONS[:2], seed=1, **kw)
    assert a != chat.chat(CONVERSATIONS[:2], seed=2, **kw)


def test_prompt_too_long_is_a_clear_error(chat):
    long = [{"role": "user", "content": "word " * chat.max_context}]
    with pytest.raises(
        ValueError, match=r"conversations\[1\]: the prompt has \d+ tokens, more than the 1016"
    ):
        chat.chat([CONVERSATIONS[0], long], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        chat.chat(CONVERSATIONS[:1], max_new_tokens=chat.max_context)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], r"conversations\[0\]: expected a non-empty list"),
        ([{"role": "robot", "content": "hi"}], r"conversations\[0\]\[0\]\.role: expected one of"),
        ([{"role": "user"}], r"conversations\[0\]\[0\]\.content: expected a string, got NoneType"),
        (["hi"], r"conversations\[0\]\[0\]: expected an object"),
    ],
)
def test_malformed_messages_name_the_field(chat, bad, message):
    with pytest.raises(ValueError, match=message):
        chat.chat([bad], max_new_tokens=4)


def test_transformers_directory_loads_the_same_model(chat, tmp_path):
    save_decoder(chat.model, tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_TOKENIZER_DIR / name, tmp_path / "base" / name)
    loaded = load_chat_model(str(tmp_path / "base"), batch_size=8)
    assert loaded.name == "base" and loaded.max_context == chat.max_context
    np.testing.assert_array_equal(loaded.encode(CONVERSATIONS[1]), chat.encode(CONVERSATIONS[1]))
    assert loaded.chat(CONVERSATIONS[:3], max_new_tokens=8) == chat.chat(CONVERSATIONS[:3], max_new_tokens=8)
    (tmp_path / "base" / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        load_chat_model(str(tmp_path / "base"))


def test_unknown_specs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'tiny'"):
        load_chat_model(str(tmp_path / "missing"))
    (tmp_path / "clara.json").write_text("{}")
    with pytest.raises(ValueError, match="clara-jax model directory"):
        load_chat_model(str(tmp_path))
