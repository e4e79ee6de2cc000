"""Inference from a saved model directory: the official-style API, cached decoding, eval CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clara_jax import cli
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.inference.clara_model import ClaraInference
from clara_jax.inference.generation import SamplingConfig, generate
from clara_jax.interop.hf import load_decoder, save_decoder
from clara_jax.interop.model_dir import load_clara_model, save_clara_model
from clara_jax.model.clara import ROLES, ClaraConfig, splice
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


def _model(tok, base=None, seed=0):
    model = (
        load_decoder(base)
        if base
        else Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(seed))
    )
    lora = LoRAConfig(rank=4, alpha=8)
    add_clara_parts(model, vocab_size=tok.vocab_size, mem_token_ids=tok.mem_token_ids, lora=lora, seed=seed)
    model.embed_rows[...] = model.embed_rows[...] + 0.3  # "trained" rows
    for i, role in enumerate(ROLES):
        for f in model.adapters[role].factors.values():
            f["b"].set_value(0.05 * jax.random.normal(jax.random.key(i), f["b"].shape))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = _model(tok)
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8, top_k=2)
    out = tmp_path_factory.mktemp("model")
    save_clara_model(model, tok, clara, str(out))
    return tok, model, clara, out


@pytest.mark.slow
def test_saved_model_reloads_identically(saved):
    tok, model, clara, out = saved
    tok2, model2, clara2 = load_clara_model(str(out))
    assert clara2 == clara and tok2.mem_token_ids == tok.mem_token_ids
    a = ClaraInference(tok, model, clara, batch_size=4)
    b = ClaraInference(tok2, model2, clara2, batch_size=4)
    np.testing.assert_allclose(b.compress_documents(DOCS)[0], a.compress_documents(DOCS)[0], atol=1e-6)
    np.testing.assert_allclose(b.encode_queries(["Where?"]), a.encode_queries(["Where?"]), atol=1e-6)
    assert b.generate_from_text(["Who?"], [DOCS[:2]], max_new_tokens=6) == a.generate_from_text(
        ["Who?"], [DOCS[:2]], max_new_tokens=6
    )


@pytest.mark.slow
def test_model_with_referenced_base(tmp_path):
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    base = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(3))
    save_decoder(base, tmp_path / "base")
    model = _model(tok, base=tmp_path / "base", seed=3)
    clara = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=32, compression_rate=8)
    save_clara_model(model, tok, clara, str(tmp_path / "m"), base_path=str(tmp_path / "base"))
    assert not (tmp_path / "m" / "base").exists()  # referenced, not copied
    _, loaded, _ = load_clara_model(str(tmp_path / "m"))
    ids = jnp.asarray([[tok.enc_id, tok.bos_id, 50, 60, *tok.mem_token_ids, tok.sep_id]])
    for role in ROLES:
        np.testing.assert_allclose(loaded(ids, adapter=role), model(ids, adapter=role), atol=1e-6)


@pytest.mark.slow
def test_greedy_from_spliced_embeddings_equals_recomputation(saved):
    tok, model, clara, _ = saved
    inference = ClaraInference(tok, model, clara, batch_size=2)
    memory = jnp.asarray(inference.compress_documents(DOCS[:4])[0].reshape(2, 2, clara.n_mem, -1))
    from clara_jax.data.layouts import generator_batch
    from clara_jax.data.prompts import standard_prompt

    gen = generator_batch(tok, [standard_prompt(tok, q, 2) for q in ("Where?", "Who keeps a goat?")], 512)
    embeds = splice(model, jnp.asarray(gen.ids), memory, clara.mem_token_ids)
    mask = jnp.asarray(gen.mask)
    tokens = np.asarray(
        generate(
            model,
            inputs_embeds=embeds,
            attention_mask=mask,
            adapter="generator",
            sampling=SamplingConfig(max_new_tokens=10),
        )
    )
    forward = jax.jit(
        lambda m, e, k: m(inputs_embeds=e, attention_mask=k, adapter="generator")[:, -1].argmax(-1)
    )
    seq, m = embeds, mask
    for step in range(10):  # no cache: re-run everything, append the argmax's embedding
        nxt = np.asarray(forward(model, seq, m))
        np.testing.assert_array_equal(tokens[:, step], nxt)
        seq = jnp.concatenate([seq, model.embed_tokens(jnp.asarray(nxt)[:, None])], axis=1)
        m = jnp.concatenate([m, jnp.ones((2, 1), bool)], axis=1)


@pytest.mark.slow
def test_official_style_api(saved):
    tok, model, clara, _ = saved
    inference = ClaraInference(tok, model, clara, batch_size=4)
    answers, topk = inference.generate_from_questions(
        ["Where does Mava live?", "Who keeps a dog?"], 5, documents=[DOCS[:4], DOCS[2:]], k=2
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers) and topk.shape == (2, 2)
    assert (topk >= 0).all() and (topk < 4).all()
    p1 = inference.generate_from_paraphrase(["", ""], [DOCS[:1], DOCS[1:2]], max_new_tokens=5, rng=1)
    assert p1 == inference.generate_from_paraphrase(["", ""], [DOCS[:1], DOCS[1:2]], max_new_tokens=5, rng=1)
    with pytest.raises(ValueError, match="same number of documents"):
        inference.generate_from_text(["a", "b"], [DOCS[:2], DOCS[:3]])
    with pytest.raises(ValueError, match="exceeds"):
        inference.rerank(["a"], [DOCS[:2]], k=3)


@pytest.mark.slow
def test_eval_cli(saved, tmp_path, capsys):
    _, _, _, out = saved
    data = tmp_path / "eval.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(
                json.dumps(
                    {
                        "question": f"Q{i}?",
                        "docs": DOCS[i : i + 3],
                        "golden_answers": ["Vienna"],
                        "pos_index": [0],
                    }
                )
                + "\n"
            )
    scores = tmp_path / "scores.json"
    code = cli.main(
        [
            "eval",
            "--model",
            str(out),
            "--data",
            str(data),
            "-k",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
            str(scores),
        ]
    )
    assert code == 0
    result = json.load(open(scores))["eval"]
    assert {"em", "f1", "acc", "recall@1", "recall@2"} <= set(result)
    assert "eval" in capsys.readouterr().out
    # --query-encoder compressor ranks as stage 3 starts (for a model whose query reasoner is untrained)
    args = ["eval", "--model", str(out), "--data", str(data), "-k", "2", "--max-new-tokens", "4"]
    assert cli.main([*args, "--query-encoder", "compressor", "--json", str(scores)]) == 0
    assert {"recall@1", "recall@2"} <= set(json.load(open(scores))["eval"])
    code = cli.main(["eval", "--model", str(tmp_path), "--data", str(data), "-k", "2"])
    assert code == 2  # not a model directory: a clear error, not a traceback


@pytest.mark.slow
def test_data_parallel_over_local_devices_equals_one_device(saved):
    tok, model, clara, _ = saved
    assert jax.local_device_count() == 8
    parallel = ClaraInference(tok, model, clara, batch_size=3)
    single = ClaraInference(tok, model, clara, batch_size=3, data_parallel=False)
    assert parallel.batch_size == 8 and single.batch_size == 3
    np.testing.assert_allclose(
        parallel.compress_documents(DOCS)[0], single.compress_documents(DOCS)[0], atol=1e-5
    )
    assert parallel.generate_from_text(
        ["Who?", "Where?"], [DOCS[:2], DOCS[2:4]], max_new_tokens=5
    ) == single.generate_from_text(["Who?", "Where?"], [DOCS[:2], DOCS[2:4]], max_new_tokens=5)


def test_questions_are_cut_only_beyond_the_official_inference_limit(saved, caplog):
    """Official inference frames a question like a document (doc_max_length + 3 tokens); a cut is logged."""
    tok, model, clara, _ = saved
    inference = ClaraInference(tok, model, clara, batch_size=2, data_parallel=False)
    assert inference.query_max_length == clara.doc_max_length == 32
    with caplog.at_level("WARNING", logger="clara_jax.inference.clara_model"):
        inference.encode_queries(["Where does Fato live?"])
        assert not caplog.records
        inference.encode_queries(["Where does Fato live?", "Why " * 60 + "?"])
    assert [r.getMessage() for r in caplog.records] == ["queries: 1 of 2 texts cut to 32 tokens"]
