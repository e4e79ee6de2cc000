"""Periodic dev-set retrieval during stage 3: Recall@k of the query reasoner on held-out questions.

The training recall is measured on the batch the step just trained on; this one is measured on a
fixed set of dev questions, so a curve of it says whether the query reasoner generalises. Stage 3
freezes the compressor and the <MEM*> rows, so the candidates' memory vectors are computed once
and cached; each evaluation only encodes the questions with the query reasoner (one jitted
program, fixed shapes) and ranks the candidates by the run's score (`clara.retrieval_score`,
cosine by default), as `clara-jax eval --mode rerank` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data.pipeline import encoder_rows
from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.model.clara import ClaraConfig, compress, encode_query
from clara_jax.model.topk import retrieval_scores
from clara_jax.training.objectives import recall_at


class DevRetrieval:
    """`evaluate(model) -> {"recall@1": …, "recall@k": …}` on the first `n_questions` labelled records.

    `records` are RetrievalRecords (question, docs, pos_index); questions without gold are dropped
    (their recall is 0 by definition and would only dilute the curve). Every candidate of a record
    is ranked: records with fewer than the most are padded, and the padding can never be retrieved.
    """

    def __init__(
        self,
        records: Sequence,
        tok: ClaraTokenizer,
        clara: ClaraConfig,
        *,
        n_questions: int = 64,
        query_max_length: int = 64,
        bucket: int = 32,
        ks: Sequence[int] = (1, 5),
    ):
        labelled = [r for r in records if r.pos_index]
        if not labelled:
            raise ValueError("dev retrieval needs records with pos_index (gold positions)")
        chosen = labelled[:n_questions]
        n = max(len(r.docs) for r in chosen)
        self.n_candidates = n
        self.ks = tuple(sorted({min(k, min(len(r.docs) for r in chosen)) for k in ks}))
        self.questions = len(chosen)
        self._docs = [d for r in chosen for d in (*r.docs, *[r.docs[0]] * (n - len(r.docs)))]
        positives, valid = np.zeros((len(chosen), n), bool), np.zeros((len(chosen), n), bool)
        for i, r in enumerate(chosen):
            positives[i, list(r.pos_index)] = True
            valid[i, : len(r.docs)] = True
        self._positives, self._valid = jnp.asarray(positives), jnp.asarray(valid)
        queries = encoder_rows(tok, [r.question for r in chosen], query_max_length, bucket)
        self._query_ids, self._query_mask = jnp.asarray(queries.ids), jnp.asarray(queries.mask)
        self._doc_max_length, self._bucket, self._clara = clara.doc_max_length, bucket, clara
        self._tok = tok
        self._memory = None  # [Q, N, n_mem·D], filled on first use (the compressor is frozen)
        n_mem, ks_, score = clara.n_mem, self.ks, clara.retrieval_score

        def ranks(model, ids, mask, memory, positives, valid):
            query = encode_query(model, ids, mask, n_mem)
            scores = jnp.where(valid, retrieval_scores(query, memory, score), -jnp.inf)
            _, indices = jax.lax.top_k(scores, max(ks_))
            return {f"recall@{k}": recall_at(indices, positives, k) for k in ks_}

        self._ranks = jax.jit(ranks)
        self._compress = jax.jit(lambda model, ids, mask: compress(model, ids, mask, n_mem)[0])

    def candidate_memory(self, model, chunk: int = 256) -> jax.Array:
        """The candidates under the (frozen) compressor, computed once."""
        if self._memory is None:
            enc = encoder_rows(self._tok, self._docs, self._doc_max_length, self._bucket)
            parts = []
            for start in range(0, len(self._docs), chunk):
                ids, mask = enc.ids[start : start + chunk], enc.mask[start : start + chunk]
                real = len(ids)
                if real < chunk:  # one compiled shape for every chunk
                    ids = np.concatenate([ids, np.repeat(ids[-1:], chunk - real, 0)])
                    mask = np.concatenate([mask, np.repeat(mask[-1:], chunk - real, 0)])
                parts.append(self._compress(model, jnp.asarray(ids), jnp.asarray(mask))[:real])
            memory = jnp.concatenate(parts)
            self._memory = memory.reshape(self.questions, self.n_candidates, -1)
        return self._memory

    def evaluate(self, model) -> dict:
        memory = self.candidate_memory(model)
        out = self._ranks(model, self._query_ids, self._query_mask, memory, self._positives, self._valid)
        return {k: float(v) for k, v in jax.device_get(out).items()}
