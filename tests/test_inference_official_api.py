"""The official-named ClaraInference methods take the official arguments and defaults and return
what the official ones return; evaluation keeps every candidate of every record."""

import argparse
import inspect
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clara_jax.data.pipeline import encoder_rows
from clara_jax.data.prompts import PARAPHRASE_SYSTEM, PARAPHRASE_TEMPLATES, memory_block, standard_prompt
from clara_jax.data.records import RetrievalRecord
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.inference import evaluate
from clara_jax.inference.clara_model import ClaraInference
from clara_jax.model.clara import ClaraConfig, compress
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.lora import LoRAConfig

DOCS = [
    "Mava lives in Vienna. Mava likes orange.",
    "Tavo keeps a goat.",
    "Sumi was born in 1962.",
    "Lona's mentor is Teme.",
    "Teme lives in Madrid.",
    "Fato keeps a dog.",
]

# modeling_clara.py at the official commit: (name, default) of every parameter after `self`
OFFICIAL = {
    "compress_documents": [("documents", None)],
    "generate_from_text": [("questions", None), ("documents", None), ("max_new_tokens", 128)],
    "generate_from_compressed_documents_and_questions": [
        ("questions", None),
        ("compressed_documents", None),
        ("max_new_tokens", 128),
    ],
    "generate_from_paraphrase": [("questions", None), ("documents", None), ("max_new_tokens", 128)],
    "generate_from_questions": [
        ("questions", None),
        ("max_new_tokens", 128),
        ("temperature", 0.5),
        ("documents", None),
        ("stage2_mips", False),
        ("stage2_retrieval_top_n", None),
        ("time_count", False),
    ],
}


@pytest.fixture(scope="module")
def inference():
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    lora = LoRAConfig(rank=4, alpha=8)
    add_clara_parts(model, vocab_size=tok.vocab_size, mem_token_ids=tok.mem_token_ids, lora=lora, seed=0)
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8, top_k=2)
    return ClaraInference(tok, model, clara, batch_size=4, data_parallel=False)


def test_official_names_have_the_official_signatures_and_our_extras_are_keyword_only():
    for name, official in OFFICIAL.items():
        params = list(inspect.signature(getattr(ClaraInference, name)).parameters.values())[1:]
        positional = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        assert [(p.name, None if p.default is p.empty else p.default) for p in positional] == official, name
        extras = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        if name != "compress_documents":
            assert "max_length" in extras and "sampling" in extras, name
            assert inspect.signature(getattr(ClaraInference, name)).parameters["max_length"].default == 1024


def test_compress_documents_returns_the_vectors_and_the_mse_of_the_real_documents(inference):
    """6 documents in batches of 4: the padding rows of the second batch must not count."""
    memory, mse = inference.compress_documents(DOCS)
    assert isinstance(mse, float) and mse > 0
    tok, clara = inference.tok, inference.clara
    enc = encoder_rows(tok, DOCS, clara.doc_max_length, inference.bucket)  # one batch, no padding rows
    one_batch = jax.jit(lambda m, ids, mask: compress(m, ids, mask, clara.n_mem))
    want_memory, want_mse = one_batch(inference.model, jnp.asarray(enc.ids), jnp.asarray(enc.mask))
    np.testing.assert_allclose(memory, want_memory, atol=1e-5)
    np.testing.assert_allclose(mse, float(want_mse), rtol=1e-5)
    with pytest.raises(TypeError, match="not the"):
        inference.generate_from_compressed_documents_and_questions(["Q?"], (memory, mse))


def test_paraphrase_puts_a_row_of_documents_in_one_prompt_with_a_random_choice_template(
    inference, monkeypatch
):
    seen = []
    monkeypatch.setattr(inference, "_generate", lambda *a: seen.append(a) or ["x"] * len(a[0]))
    assert inference.generate_from_paraphrase(["", ""], [DOCS[:2], DOCS[2:4]], rng=3) == ["x", "x"]
    prompts, memory, max_new_tokens, _, max_length = seen[-1]
    assert memory.shape[:2] == (2, 2) and (max_new_tokens, max_length) == (128, 1024)
    picker = random.Random(3)
    for prompt in prompts:
        template = picker.choice(PARAPHRASE_TEMPLATES)  # one draw per prompt, in order
        assert PARAPHRASE_SYSTEM in prompt.prompt and prompt.full is None
        assert template.format(docs=memory_block(inference.tok, 2)) in prompt.prompt
    random.seed(11)  # no rng: Python's global generator, as the official random.choice
    inference.generate_from_paraphrase([""] * 6, [[d] for d in DOCS])
    random.seed(11)
    inference.generate_from_paraphrase([""] * 6, [[d] for d in DOCS])
    assert seen[-1][0] == seen[-2][0]
    with pytest.raises(ValueError, match="same number of documents"):
        inference.generate_from_paraphrase(["", ""], [DOCS[:2], DOCS[2:3]])
    with pytest.raises(ValueError, match="2 questions but 1"):
        inference.generate_from_paraphrase(["", ""], [DOCS[:2]])


def test_generator_prompts_are_cut_at_max_length_and_counted(inference, caplog):
    tok = inference.tok
    memory, _ = inference.compress_documents(DOCS[:2])
    short, long = "Who keeps a goat?", "Who keeps " + "a very old " * 30 + "goat?"
    short_len = len(tok.hf(standard_prompt(tok, short, 1).prompt, add_special_tokens=False)["input_ids"])
    with caplog.at_level("WARNING", logger="clara_jax.inference.clara_model"):
        answers = inference.generate_from_compressed_documents_and_questions(
            [short, long], memory, 2, max_length=short_len + 8
        )
    assert len(answers) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"generate: 1 of 2 prompts cut to max_length={short_len + 8} tokens"
    ]
    with pytest.raises(ValueError, match="max_length=12"):  # a cut into the memory slots
        inference.generate_from_compressed_documents_and_questions([short, long], memory, 2, max_length=12)


def test_rerank_never_retrieves_a_padding_candidate(inference, monkeypatch):
    """The padding slots hold the query itself: only the mask keeps them out of the top-k."""
    rng = np.random.default_rng(0)
    n_mem, dim = inference.clara.n_mem, 8
    queries = rng.normal(size=(2, n_mem * dim)).astype(np.float32)
    memory = rng.normal(size=(2, 5, n_mem, dim)).astype(np.float32)
    mask = np.array([[True] * 3 + [False] * 2, [True] * 5])
    memory[0, 3:] = queries[0].reshape(n_mem, dim)
    monkeypatch.setattr(inference, "encode_queries", lambda qs: queries[: len(qs)])
    topk, _ = inference.rerank(["a", "b"], candidate_memory=memory, candidate_mask=mask, k=3)
    assert sorted(topk[0]) == [0, 1, 2]
    unmasked, _ = inference.rerank(["a", "b"], candidate_memory=memory, k=2)
    assert sorted(unmasked[0]) == [3, 4]  # what the mask prevents
    with pytest.raises(ValueError, match="exceeds the 3 candidates"):
        inference.rerank(["a", "b"], candidate_memory=memory, candidate_mask=mask, k=4)
    with pytest.raises(NotImplementedError, match="generate_from_index"):
        inference.generate_from_questions(["a", "b"], stage2_mips=True)


def test_evaluation_keeps_every_candidate_of_each_record(inference, monkeypatch):
    """Records of 3 and 5 candidates, the second one's gold at index 4 (beyond the smallest count):
    with a query reasoner that points exactly at the gold, both golds come first."""
    records = [
        RetrievalRecord("Q0?", "goat", ("goat",), tuple(DOCS[:3]), (1,)),
        RetrievalRecord("Q1?", "dog", ("dog",), tuple(DOCS[1:6]), (4,)),
    ]
    gold = inference._memory([DOCS[1], DOCS[5]]).reshape(2, -1)
    monkeypatch.setattr(inference, "encode_queries", lambda qs: gold[: len(qs)])
    out = evaluate.evaluate_retrieval_qa(inference, records, k=2, max_new_tokens=2, ks=(1, 2))
    assert out["topk"][:, 0].tolist() == [1, 4]
    assert out["scores"]["recall@1"] == 1.0 and len(out["answers"]) == 2
    assert out["memory"].shape[:2] == (2, 5) and not out["memory"][0, 3:].any()  # padding slots
    assert (out["topk"][0] < 3).all()
    time_counted = inference.generate_from_questions(
        ["Q0?", "Q1?"], 2, documents=[r.docs for r in records], time_count=True
    )
    assert len(time_counted) == 6 and time_counted[1][:, 0].tolist() == [1, 4]


def test_answer_lengths_default_to_the_official_evaluation(monkeypatch):
    """Official evaluate.py: stage 2 (rerank) passes 64 new tokens; stages 1/1_2 (given) keep 128."""
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_retrieval_qa", lambda *a, **kw: seen.update(rerank=kw))
    monkeypatch.setattr(evaluate, "evaluate_given_documents", lambda *a, **kw: seen.update(given=kw))
    evaluate.evaluate_records(None, [], mode="rerank")
    evaluate.evaluate_records(None, [], mode="given")
    evaluate.evaluate_records(None, [], mode="given", max_new_tokens=7)
    assert seen["rerank"]["max_new_tokens"] == 64 and seen["given"]["max_new_tokens"] == 7
    evaluate.evaluate_records(None, [], mode="given")
    assert seen["given"]["max_new_tokens"] == 128
    from clara_jax.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(["eval", "--model", "m", "--data", "d"]).max_new_tokens is None


def test_an_untrained_query_reasoner_is_named_and_the_compressor_can_rank_instead(inference, caplog):
    """Issue #18 item 5: ranking with a stage-1/2 model silently used a never-trained query reasoner."""
    import logging

    tok, model, clara = inference.tok, inference.model, inference.clara
    fresh = ClaraInference(tok, model, clara, batch_size=4, data_parallel=False)
    assert not fresh.query_reasoner_trained  # every adapter of the fixture is as created (B = 0)
    questions = ["Who keeps a goat?", "Where does Mava live?"]
    with caplog.at_level(logging.WARNING, logger="clara_jax.inference.clara_model"):
        fresh.encode_queries(questions)
        fresh.encode_queries(questions)
    warned = [r for r in caplog.records if "never trained" in r.getMessage()]
    assert len(warned) == 1 and "--query-encoder compressor" in warned[0].getMessage()

    by_compressor = ClaraInference(
        tok, model, clara, batch_size=4, data_parallel=False, query_encoder="compressor"
    )
    enc = encoder_rows(tok, questions, by_compressor.query_max_length, by_compressor.bucket)
    want, _ = compress(model, jnp.asarray(enc.ids), jnp.asarray(enc.mask), clara.n_mem)
    np.testing.assert_allclose(
        by_compressor.encode_queries(questions), np.asarray(want).reshape(2, -1), atol=1e-5
    )
    with pytest.raises(ValueError, match="query_encoder must be one of"):
        ClaraInference(tok, model, clara, data_parallel=False, query_encoder="generator")

    trained = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    add_clara_parts(
        trained,
        vocab_size=tok.vocab_size,
        mem_token_ids=tok.mem_token_ids,
        lora=LoRAConfig(rank=4, alpha=8),
        seed=0,
    )
    b = next(iter(trained.adapters["query_reasoner"].factors.values()))["b"]
    b.set_value(b[...] + 0.01)
    assert ClaraInference(tok, trained, clara, data_parallel=False).query_reasoner_trained
