"""A tiny CLaRa model and hand-built batches in the encoder/generator layouts.

Token ids: base vocabulary 0..499, then <MEM0..3> = 500..503, <AE> 504, <ENC> 505, <SEP> 506.
"""

from __future__ import annotations

import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clara_jax.model.clara import ROLES, ClaraConfig
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.model.lora import LoRAConfig

BASE_VOCAB, N_MEM = 500, 4
MEM = tuple(range(BASE_VOCAB, BASE_VOCAB + N_MEM))
AE, ENC, SEP = BASE_VOCAB + N_MEM, BASE_VOCAB + N_MEM + 1, BASE_VOCAB + N_MEM + 2
BOS, EOS = 1, 2


def clara_config(**kw) -> ClaraConfig:
    return ClaraConfig(mem_token_ids=MEM, doc_max_length=16, compression_rate=4, top_k=2, **kw)


def tiny_clara(seed: int = 0, perturb: bool = True, dropout: float = 0.0) -> Decoder:
    model = Decoder(tiny_config(vocab_size=BASE_VOCAB), rngs=nnx.Rngs(seed))
    lora = LoRAConfig(rank=4, alpha=8, dropout=dropout)
    add_clara_parts(model, vocab_size=SEP + 1, mem_token_ids=MEM, lora=lora, seed=seed)
    for i, role in enumerate(ROLES):
        if perturb:  # non-zero B so every adapter changes the function
            for f in model.adapters[role].factors.values():
                f["b"].set_value(0.05 * jax.random.normal(jax.random.key(seed * 7 + i), f["b"].shape))
    return model


def encoder_rows(rng, n, length, min_len=3):
    """[pad…] <ENC> <s> doc </s> <MEM0..3>, left padded to `length` + N_MEM."""
    ids = np.zeros((n, length + N_MEM), np.int32)
    mask = np.zeros_like(ids, dtype=bool)
    for r in range(n):
        body = [ENC, BOS, *rng.integers(3, BASE_VOCAB, rng.integers(min_len, length - 2)), EOS]
        ids[r, length - len(body) : length] = body
        mask[r, length - len(body) :] = True
        ids[r, length:] = MEM
    return ids, mask


def generator_rows(rng, b, k, prompt_len=6, answer_len=4, width=None):
    """<s> p… [<MEM0..3><SEP>]·k q… answer… </s> with targets on the answer and </s>."""
    rows, loss_rows = [], []
    for _ in range(b):
        pre = [BOS, *rng.integers(3, BASE_VOCAB, rng.integers(2, prompt_len))]
        block = [t for _ in range(k) for t in (*MEM, SEP)]
        post = list(rng.integers(3, BASE_VOCAB, 3))
        answer = [*rng.integers(3, BASE_VOCAB, answer_len), EOS]
        seq = pre + block + post + answer
        rows.append(seq)
        loss_rows.append([False] * (len(seq) - len(answer)) + [True] * len(answer))
    width = max(max(map(len, rows)), width or 0)
    ids = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width), bool)
    loss = np.zeros((b, width), bool)
    for r, (seq, lm) in enumerate(zip(rows, loss_rows)):
        ids[r, width - len(seq) :] = seq
        mask[r, width - len(seq) :] = True
        loss[r, width - len(seq) :] = lm
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], 1)
    target_mask = np.concatenate([loss[:, 1:], np.zeros((b, 1), bool)], 1)
    return dict(gen_ids=ids, gen_mask=mask, targets=targets, target_mask=target_mask)


def stage12_batch(seed=0, b=2, k=1, doc_len=12):
    rng = np.random.default_rng(seed)
    enc_ids, enc_mask = encoder_rows(rng, b * k, doc_len)
    batch = dict(enc_ids=enc_ids, enc_mask=enc_mask, **generator_rows(rng, b, k, width=8 + 5 * k + 8))
    return {key: jnp.asarray(v) for key, v in batch.items()}


def stage3_batch(seed=0, b=2, n=5, k=2, doc_len=12):
    rng = np.random.default_rng(seed)
    enc_ids, enc_mask = encoder_rows(rng, b * n, doc_len)
    query_ids, query_mask = encoder_rows(rng, b, 8)
    positives = np.zeros((b, n), bool)
    positives[np.arange(b), rng.integers(0, n, b)] = True
    batch = dict(
        enc_ids=enc_ids,
        enc_mask=enc_mask,
        query_ids=query_ids,
        query_mask=query_mask,
        cand_valid=np.ones((b, n), bool),
        positives=positives,
        **generator_rows(rng, b, k),
    )
    return {key: jnp.asarray(v) for key, v in batch.items()}


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TensorBoard event files in `directory` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(directory)):
        data = open(os.path.join(directory, name), "rb").read()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
