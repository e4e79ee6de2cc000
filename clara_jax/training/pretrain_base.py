"""A small causal-LM pretraining of a decoder's *base* weights, for the laptop demo.

CLaRa trains LoRA adapters on a frozen, pretrained LLM. The demo has no pretrained LLM to
download, so it makes one: a few hundred full-parameter next-token steps on the training
passages and QA text give a tiny base that knows the language of the corpus (never the
held-out passages), then it is saved as a transformers directory and used exactly like a
real checkpoint (`--config.model.path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.interop.hf import save_decoder
from clara_jax.model.config import DecoderConfig
from clara_jax.model.decoder import Decoder


def _batches(tok: ClaraTokenizer, texts: Sequence[str], batch: int, length: int, seed: int):
    ids = tok.hf(list(texts), add_special_tokens=True)["input_ids"]
    stream = np.asarray([t for row in ids for t in (*row, tok.eos_id)], np.int32)  # packed documents
    n = (len(stream) - 1) // length
    windows = stream[: n * length + 1]
    starts = np.arange(n) * length
    rng = np.random.default_rng(seed)
    while True:
        for chunk in rng.permutation(starts)[: (n // batch) * batch].reshape(-1, batch):
            rows = np.stack([windows[s : s + length + 1] for s in chunk])
            yield rows[:, :-1], rows[:, 1:]


def pretrain_base(
    cfg: DecoderConfig,
    tok: ClaraTokenizer,
    texts: Sequence[str],
    *,
    steps: int,
    out_dir: str,
    lr: float = 3e-3,
    batch: int = 16,
    length: int = 128,
    seed: int = 0,
    log=print,
) -> Decoder:
    """Train every base weight with next-token CE; save weights + tokenizer to `out_dir`."""
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.1)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(inputs)
            logz = jax.nn.logsumexp(logits, -1)
            picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            return jnp.mean(logz - picked)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = _batches(tok, texts, batch, length, seed)
    for i in range(steps):
        inputs, targets = next(data)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(inputs), jnp.asarray(targets))
        if (i + 1) % max(steps // 5, 1) == 0 or i == 0:
            log(f"[base] step {i + 1}/{steps}: LM loss {float(loss):.3f}")
    model = nnx.merge(graphdef, params, rest)
    save_decoder(model, out_dir)
    tok.hf.save_pretrained(out_dir)
    return model


def corpus_texts(records: Sequence[dict]) -> list[str]:
    """Passages and their QA pairs from stage-1 records (the demo's training split)."""
    texts = []
    for r in records:
        texts.append(r["docs"][0])
        if r.get("data_type") != "paraphrase":
            texts.extend(f"Question: {q}\nAnswer: {a}" for q, a in zip(r["question"], r["answers"]))
        else:
            texts.extend(r["answers"])
    return texts


def base_ready(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, "model.safetensors")) and os.path.exists(
        os.path.join(out_dir, "tokenizer.json")
    )
