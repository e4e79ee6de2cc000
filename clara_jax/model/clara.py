"""CLaRa's three roles on one decoder: compressor, query reasoner, generator.

Each role is the same frozen base under its own adapter. Documents and queries use the
encoder layout `[pad…] <ENC> <s> text </s> <MEM0> … <MEM{n-1}>` (clara_jax.data.layouts), so
the memory states are always the last `n_mem` positions: a static slice, whatever the padding.
The generator's prompt carries `<MEM0>…<MEM{n-1}><SEP>` blocks; `splice` writes document j's
vectors into the j-th block, found by token id, so prompts of any length need no offsets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clara_jax.model.decoder import Decoder
from clara_jax.model.topk import SCORE_FUNCTIONS

COMPRESSOR = "compressor"
QUERY_REASONER = "query_reasoner"
GENERATOR = "generator"
ROLES = (COMPRESSOR, QUERY_REASONER, GENERATOR)
# Stage 3's objective: the generator's CE through the top-k (the paper's method), a multi-positive
# InfoNCE on the gold candidates (the official `stage2_pretrain_retrieval`, the paper's "Sup-"
# retriever baseline), or their sum (CE + infonce_weight · InfoNCE).
RETRIEVAL_LOSSES = ("lm", "infonce", "lm+infonce")


@dataclasses.dataclass(frozen=True)
class ClaraConfig:
    """Method settings shared by every stage (docs/official_code.md §1–3)."""

    mem_token_ids: tuple  # ids of <MEM0>…<MEM{n-1}>, consecutive (the tokenizer's contract)
    doc_max_length: int = 256
    compression_rate: int = 32
    mse_weight: float = 0.1
    top_k: int = 5
    temperature: float = 0.02
    topk_mask_mode: str = "exact"  # "official" reproduces the log(mask + 1e-8) of the release
    retrieval_score: str = "cosine"  # or "dot": the official MIPS branch (unnormalised inner product)
    retrieval_loss: str = "lm"  # one of RETRIEVAL_LOSSES
    infonce_weight: float = 1.0  # the InfoNCE term's factor (retrieval_loss "infonce" / "lm+infonce")

    def __post_init__(self):
        if self.retrieval_score not in SCORE_FUNCTIONS:
            raise ValueError(
                f"retrieval_score must be one of {SCORE_FUNCTIONS}, got {self.retrieval_score!r}"
            )
        if self.retrieval_loss not in RETRIEVAL_LOSSES:
            raise ValueError(f"retrieval_loss must be one of {RETRIEVAL_LOSSES}, got {self.retrieval_loss!r}")
        if not self.infonce_weight > 0:
            raise ValueError(f"infonce_weight must be > 0, got {self.infonce_weight}")
        if not 1 <= self.compression_rate <= self.doc_max_length:
            raise ValueError(
                f"compression_rate={self.compression_rate} must be in [1, doc_max_length={self.doc_max_length}]"
            )
        if len(self.mem_token_ids) != self.n_mem:
            raise ValueError(
                f"{len(self.mem_token_ids)} memory-token ids for n_mem = doc_max_length // compression_rate "
                f"= {self.n_mem}"
            )
        ids = tuple(int(i) for i in self.mem_token_ids)
        if ids != tuple(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"memory-token ids must be consecutive, got {ids}")
        object.__setattr__(self, "mem_token_ids", ids)

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compression_rate


def compress(model: Decoder, ids, mask, n_mem: int, *, adapter=COMPRESSOR, dropout_rng=None):
    """Memory vectors [n, n_mem, D] (post-final-norm states) and the MSE alignment term.

    The MSE ties the mean memory state to the mean of the valid non-memory states (<ENC>, <s>,
    text, </s>), computed in float32 (the official code does it in bf16).
    """
    hidden = model.hidden_states(ids, attention_mask=mask, adapter=adapter, dropout_rng=dropout_rng)
    memory = hidden[:, -n_mem:]
    h32 = hidden.astype(jnp.float32)
    mem_mean = h32[:, -n_mem:].mean(axis=1)
    text_mask = mask.astype(jnp.float32).at[:, -n_mem:].set(0.0)[..., None]
    text_mean = (h32 * text_mask).sum(axis=1) / jnp.maximum(text_mask.sum(axis=1), 1.0)
    mse = jnp.mean(jnp.square(text_mean - mem_mean))
    return memory, mse


def encode_query(model: Decoder, ids, mask, n_mem: int, *, dropout_rng=None):
    """The query reasoner's retrieval vector [B, n_mem·D]: a question compressed like a document."""
    memory, _ = compress(model, ids, mask, n_mem, adapter=QUERY_REASONER, dropout_rng=dropout_rng)
    return memory.reshape(memory.shape[0], -1)


def splice(model: Decoder, ids, memory, mem_token_ids):
    """Generator input embeddings with memory [B, k, n_mem, D] written into the <MEM> slots.

    The j-th occurrence of <MEM0> in a row opens document j's block; <SEP> keeps its embedding.
    """
    embeds = model.embed_tokens(ids)
    n_mem = len(mem_token_ids)
    first = mem_token_ids[0]
    is_mem = (ids >= first) & (ids < first + n_mem)
    doc = jnp.cumsum(ids == first, axis=1) - 1
    doc = jnp.clip(doc, 0, memory.shape[1] - 1)
    slot = jnp.clip(ids - first, 0, n_mem - 1)
    rows = jnp.arange(ids.shape[0])[:, None]
    gathered = memory[rows, doc, slot].astype(embeds.dtype)
    return jnp.where(is_mem[..., None], gathered, embeds)


def generator_logits(model: Decoder, ids, mask, memory, mem_token_ids, *, dropout_rng=None):
    """float32 logits of the generator reading the spliced memory."""
    embeds = splice(model, ids, memory, mem_token_ids)
    hidden = model.hidden_states(
        inputs_embeds=embeds, attention_mask=mask, adapter=GENERATOR, dropout_rng=dropout_rng
    )
    return model.logits(hidden)


def select_documents(weights, memory):
    """Documents picked by the straight-through top-k: W [B,k,N] · M [B,N,n_mem,D] -> [B,k,n_mem,D].

    The forward value is exactly the chosen documents in score order; the backward carries the
    soft distributions' gradient to the scores (and so to the query reasoner).
    """
    b, n, m, d = memory.shape
    flat = memory.reshape(b, n, m * d).astype(jnp.float32)
    selected = jnp.einsum("bkn,bnd->bkd", weights, flat, precision=jax.lax.Precision.HIGHEST)
    return selected.reshape(b, weights.shape[1], m, d).astype(memory.dtype)
