"""Answering with a trained CLaRa model; the calls mirror the official `CLaRa` class.

    clara = ClaraInference(tokenizer, model, clara_config)
    memory = clara.compress_documents(["doc one", "doc two"])          # [n, n_mem, D]
    answers = clara.generate_from_text(questions, documents)            # k docs per question
    answers, topk = clara.generate_from_questions(questions, candidates)  # rerank, then answer

Lengths are bucketed (clara_jax.data.pipeline.bucket_length) and batches padded to a fixed
size, so a stream of requests reuses a handful of compiled programs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data.layouts import generator_batch
from clara_jax.data.pipeline import bucket_length, encoder_rows, pad_left
from clara_jax.data.prompts import paraphrase_prompt, standard_prompt
from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.inference.data_parallel import replicate_over_local_devices
from clara_jax.inference.generation import SamplingConfig, generate
from clara_jax.interop.model_dir import load_clara_model, model_dir_path, read_model_meta
from clara_jax.model.clara import ClaraConfig, compress, encode_query, splice
from clara_jax.model.decoder import Decoder
from clara_jax.model.topk import cosine_scores

log = logging.getLogger(__name__)


class ClaraInference:
    def __init__(
        self,
        tokenizer: ClaraTokenizer,
        model: Decoder,
        clara: ClaraConfig,
        *,
        batch_size: int = 8,
        bucket: int = 32,
        query_max_length: int | None = None,
        data_parallel: bool = True,
        progress: bool = False,
    ):
        self.tok, self.model, self.clara = tokenizer, model, clara
        # official inference frames a question like a document: at most doc_max_length tokens
        self.query_max_length = query_max_length or clara.doc_max_length
        self.bucket, self.progress = bucket, progress
        self._rows = None
        if data_parallel:  # weights replicated once, each batch split over this process's devices
            self.model, self._rows, batch_size = replicate_over_local_devices(model, batch_size)
        self.batch_size = batch_size
        n_mem = clara.n_mem
        self._compress = jax.jit(lambda m, ids, mask: compress(m, ids, mask, n_mem)[0])
        self._query = jax.jit(lambda m, ids, mask: encode_query(m, ids, mask, n_mem))
        self._splice = jax.jit(lambda m, ids, memory: splice(m, ids, memory, clara.mem_token_ids))

    def _put(self, array) -> jax.Array:
        """A batch on the devices: split over them when data parallel."""
        return jax.device_put(array, self._rows) if self._rows is not None else jnp.asarray(array)

    def _chunks(self, n: int, what: str):
        from tqdm.auto import tqdm

        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=what, unit="batch", disable=not self.progress or len(starts) < 2)

    # ------------------------------------------------------------------ encoders
    def _batched(self, texts: Sequence[str], fn, max_length: int, what: str) -> np.ndarray:
        out, cut = [], 0
        for start in self._chunks(len(texts), what):
            chunk = list(texts[start : start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)  # fixed batch shape: no recompiles
            enc = encoder_rows(self.tok, chunk, max_length, self.bucket)
            cut += int(enc.truncated[:real].sum())
            out.append(np.asarray(fn(self.model, self._put(enc.ids), self._put(enc.mask)))[:real])
        if cut:
            log.warning("%s: %d of %d texts cut to %d tokens", what, cut, len(texts), max_length)
        return np.concatenate(out)

    def compress_documents(self, documents: Sequence[str]) -> np.ndarray:
        """[n, n_mem, D] memory vectors under the compressor (no dropout)."""
        return self._batched(documents, self._compress, self.clara.doc_max_length, "compress")

    def encode_queries(self, questions: Sequence[str]) -> np.ndarray:
        """[n, n_mem·D] query-reasoner vectors (a batch of questions padded to its own length)."""
        return self._batched(questions, self._query, self.query_max_length, "queries")

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts, memory: np.ndarray, max_new_tokens: int, sampling: SamplingConfig | None):
        """Greedy (or sampled) answers for rendered prompts with memory [B, k, n_mem, D]."""
        sampling = sampling or SamplingConfig(
            max_new_tokens=max_new_tokens, eos_token_ids=(self.tok.eos_id,), pad_token_id=self.tok.pad_id
        )
        answers = []
        k = memory.shape[1]
        for start in self._chunks(len(prompts), "generate"):
            chunk = list(prompts[start : start + self.batch_size])
            mem = memory[start : start + self.batch_size]
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)
            mem = np.concatenate([mem, np.repeat(mem[-1:], self.batch_size - real, 0)])
            gen = generator_batch(self.tok, chunk, 1 << 30, bucket=1, expect_docs=k)
            width = bucket_length(gen.ids.shape[1], self.bucket)
            ids = self._put(pad_left(gen.ids, width, self.tok.pad_id))
            mask = self._put(pad_left(gen.mask, width, False))
            embeds = self._splice(self.model, ids, self._put(mem))
            tokens = np.asarray(
                generate(
                    self.model,
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    sampling=sampling,
                    adapter="generator",
                )
            )
            for row in tokens[:real]:
                row = [t for t in row.tolist() if t not in (self.tok.pad_id, self.tok.eos_id)]
                answers.append(self.tok.hf.decode(row, skip_special_tokens=True).strip())
        return answers

    def generate_from_compressed_documents_and_questions(
        self, questions: Sequence[str], compressed: np.ndarray, max_new_tokens: int = 128, sampling=None
    ) -> list[str]:
        """compressed: [B·k, n_mem, D] (k = rows / B), documents in prompt order."""
        b = len(questions)
        if compressed.shape[0] % b:
            raise ValueError(
                f"{compressed.shape[0]} compressed documents do not split evenly over {b} questions"
            )
        k = compressed.shape[0] // b
        memory = compressed.reshape(b, k, *compressed.shape[1:])
        prompts = [standard_prompt(self.tok, q, k) for q in questions]
        return self._generate(prompts, memory, max_new_tokens, sampling)

    def generate_from_text(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        max_new_tokens: int = 128,
        sampling=None,
    ) -> list[str]:
        """Compress each question's documents (all rows need the same count) and answer."""
        counts = {len(d) for d in documents}
        if len(counts) != 1:
            raise ValueError(
                f"every question needs the same number of documents, got counts {sorted(counts)}"
            )
        flat = [doc for docs in documents for doc in docs]
        return self.generate_from_compressed_documents_and_questions(
            questions, self.compress_documents(flat), max_new_tokens, sampling
        )

    def generate_from_paraphrase(
        self, documents: Sequence[str], max_new_tokens: int = 128, seed: int = 0, sampling=None
    ) -> list[str]:
        """Reconstruct each document from its memory; the template choice is seeded."""
        rng = np.random.default_rng(seed)
        prompts = [paraphrase_prompt(self.tok, "", rng) for _ in documents]
        prompts = [type(p)(prompt=p.prompt, full=None) for p in prompts]
        memory = self.compress_documents(documents)[:, None]
        return self._generate(prompts, memory, max_new_tokens, sampling)

    def rerank(
        self,
        questions: Sequence[str],
        candidates: Sequence[Sequence[str]] | None = None,
        *,
        candidate_memory: np.ndarray | None = None,
        k: int | None = None,
    ):
        """Top-k candidate indices [B, k] by query-reasoner cosine, and the candidates' memory."""
        k = k or self.clara.top_k
        if candidate_memory is None:
            counts = {len(c) for c in candidates}
            if len(counts) != 1:
                raise ValueError(f"every question needs the same number of candidates, got {sorted(counts)}")
            n = counts.pop()
            if k > n:
                raise ValueError(f"top-k = {k} exceeds the {n} candidates per question")
            flat = [doc for docs in candidates for doc in docs]
            candidate_memory = self.compress_documents(flat).reshape(len(questions), n, self.clara.n_mem, -1)
        queries = self.encode_queries(questions)
        b, n = candidate_memory.shape[:2]
        scores = cosine_scores(jnp.asarray(queries), jnp.asarray(candidate_memory.reshape(b, n, -1)))
        topk = np.asarray(jax.lax.top_k(scores, k)[1])
        return topk, candidate_memory

    def generate_from_questions(
        self,
        questions: Sequence[str],
        candidates: Sequence[Sequence[str]] | None = None,
        *,
        candidate_memory: np.ndarray | None = None,
        k: int | None = None,
        max_new_tokens: int = 64,
        sampling=None,
    ):
        """Stage-3 inference: rerank the candidates, answer from the top-k (score order)."""
        topk, memory = self.rerank(questions, candidates, candidate_memory=candidate_memory, k=k)
        selected = np.take_along_axis(memory, topk[:, :, None, None], axis=1)
        prompts = [standard_prompt(self.tok, q, topk.shape[1]) for q in questions]
        return self._generate(prompts, selected, max_new_tokens, sampling), topk


def load_inference(model_dir: str, **kw) -> ClaraInference:
    """A ready `ClaraInference` (the official-style API) from a saved model directory, with the
    padding bucket the model was trained with (unless overridden in `kw`)."""
    tok, model, clara = load_clara_model(model_dir)
    run = read_model_meta(model_dir_path(model_dir)).get("run_config") or {}
    if run:
        kw.setdefault("bucket", run["data"]["bucket"])
    return ClaraInference(tok, model, clara, **kw)
