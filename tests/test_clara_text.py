"""Real text through the real tokenizer, prompts and layouts into the stage objectives."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clara_jax.data.layouts import encoder_batch, generator_batch, label_ids
from clara_jax.data.prompts import qa_prompt, standard_prompt
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.model.clara import ClaraConfig, compress, splice
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.lora import LoRAConfig
from clara_jax.training.objectives import compression_loss, retrieval_loss

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clara_pretrain_sample.jsonl"
N_MEM = 4


def _setup():
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    add_clara_parts(
        model, vocab_size=tok.vocab_size, mem_token_ids=tok.mem_token_ids, lora=LoRAConfig(rank=4), seed=0
    )
    cfg = ClaraConfig(mem_token_ids=tok.mem_token_ids, doc_max_length=64, compression_rate=16, top_k=2)
    return tok, model, cfg


def _train_records(n):
    """Real SCP text (train lines only); CI always has ../shared beside the checkout."""
    if not SAMPLE.exists():
        pytest.skip(f"the shared SCP sample is not at {SAMPLE} (the tests assert on real passage lengths)")
    with open(SAMPLE) as f:
        return [json.loads(next(f)) for _ in range(n)]


def _arrays(enc, gen):
    targets, target_mask = label_ids(gen.ids, gen.loss_mask)
    return {
        k: jnp.asarray(v)
        for k, v in dict(
            enc_ids=enc.ids,
            enc_mask=enc.mask,
            gen_ids=gen.ids,
            gen_mask=gen.mask,
            targets=targets,
            target_mask=target_mask,
        ).items()
    }


@pytest.mark.slow
def test_stage1_on_real_text():
    tok, model, cfg = _setup()
    records = _train_records(2)
    enc = encoder_batch(tok, [r["docs"][0] for r in records], cfg.doc_max_length)
    prompts = [qa_prompt(tok, r["question"][:2], r["answers"][:2]) for r in records]
    gen = generator_batch(tok, prompts, max_len=256, expect_docs=1)
    assert enc.n_truncated == 2  # real passages are longer than 64 tiny-BPE tokens: cut and counted
    batch = _arrays(enc, gen)
    loss, metrics = compression_loss(model, batch, cfg, jax.random.key(0), docs_per_example=1)
    assert np.isfinite(float(loss)) and float(metrics["mse"]) > 0
    # the loss covers exactly the rendered target: decode the scored tokens
    scored = np.asarray(batch["targets"])[np.asarray(batch["target_mask"])]
    first = records[0]
    per_row = np.asarray(batch["target_mask"]).sum(1)
    text = tok.hf.decode(scored[: per_row[0]])
    expected = "\n".join(
        f"Question: {q}\nAnswer: {a}" for q, a in zip(first["question"][:2], first["answers"][:2])
    )
    assert text == " " + expected + "</s>"


@pytest.mark.slow
def test_splice_places_memory_at_the_rendered_slots():
    tok, model, cfg = _setup()
    prompts = [standard_prompt(tok, "Who wrote it?", 2, "Ann."), standard_prompt(tok, "Where?", 2, "Paris.")]
    gen = generator_batch(tok, prompts, max_len=256, expect_docs=2)
    memory = jax.random.normal(jax.random.key(1), (2, 2, N_MEM, 64))
    out = np.asarray(splice(model, jnp.asarray(gen.ids), memory, cfg.mem_token_ids))
    for r in range(2):
        starts = np.flatnonzero(gen.ids[r] == tok.mem_token_ids[0])
        assert [gen.ids[r, s + N_MEM] for s in starts] == [tok.sep_id, tok.sep_id]
        for d, s in enumerate(starts):
            np.testing.assert_allclose(out[r, s : s + N_MEM], memory[r, d], atol=1e-6)


@pytest.mark.slow
def test_stage3_on_real_text_with_short_queries():
    tok, model, cfg = _setup()
    records = _train_records(6)
    docs = [r["docs"][0] for r in records]
    questions = [records[0]["question"][0], records[3]["question"][0]]
    answers = [records[0]["answers"][0], records[3]["answers"][0]]
    cands = encoder_batch(tok, docs, cfg.doc_max_length)  # 2 questions x the same 3 candidates each
    cands_ids = np.concatenate([cands.ids[:3], cands.ids[3:]])
    cands_mask = np.concatenate([cands.mask[:3], cands.mask[3:]])
    queries = encoder_batch(tok, questions, 32)  # queries padded to their own short length
    assert queries.ids.shape[1] <= 32 + 3 + N_MEM < cands.ids.shape[1]
    gen = generator_batch(
        tok, [standard_prompt(tok, q, 2, a) for q, a in zip(questions, answers)], 256, expect_docs=2
    )
    targets, target_mask = label_ids(gen.ids, gen.loss_mask)
    positives = np.zeros((2, 3), bool)
    positives[0, 0] = positives[1, 0] = True
    batch = {
        k: jnp.asarray(v)
        for k, v in dict(
            query_ids=queries.ids,
            query_mask=queries.mask,
            enc_ids=cands_ids,
            enc_mask=cands_mask,
            cand_valid=np.ones((2, 3), bool),
            positives=positives,
            gen_ids=gen.ids,
            gen_mask=gen.mask,
            targets=targets,
            target_mask=target_mask,
        ).items()
    }
    loss, metrics = retrieval_loss(model, batch, cfg, jax.random.key(0))
    assert np.isfinite(float(loss)) and 0.0 <= float(metrics["recall@1"]) <= 1.0
    memory, _ = compress(model, batch["enc_ids"], batch["enc_mask"], N_MEM)
    assert memory.shape == (6, N_MEM, 64)
