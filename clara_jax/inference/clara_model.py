"""Answering with a trained CLaRa model; the calls follow the official `CLaRa` class.

    clara = ClaraInference(tokenizer, model, clara_config)
    memory, mse = clara.compress_documents(["doc one", "doc two"])       # [n, n_mem, D], float
    answers = clara.generate_from_text(questions, documents)             # k docs per question
    answers = clara.generate_from_paraphrase([""] * n, [[doc] for doc in docs])
    answers, topk = clara.generate_from_questions(questions, documents=candidates)  # rerank, answer

The official-named methods take the official arguments, in the official order, with the official
defaults (128 new tokens, generator prompts cut at 1024 tokens) and return what the official
methods return; what this implementation adds (sampling, seeded template choice, precomputed
candidate memory, candidate counts that differ between questions) is keyword-only.

Lengths are bucketed (clara_jax.data.pipeline.bucket_length) and batches padded to a fixed
size, so a stream of requests reuses a handful of compiled programs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data.layouts import generator_batch
from clara_jax.data.pipeline import bucket_length, encoder_rows, pad_left
from clara_jax.data.prompts import (
    PARAPHRASE_SYSTEM,
    PARAPHRASE_TEMPLATES,
    RenderedPrompt,
    memory_block,
    standard_prompt,
)
from clara_jax.data.tokenizer import ClaraTokenizer, render_chat
from clara_jax.inference.data_parallel import replicate_over_local_devices
from clara_jax.inference.generation import SamplingConfig, generate
from clara_jax.interop.model_dir import load_clara_model, model_dir_path, read_model_meta
from clara_jax.model.clara import COMPRESSOR, QUERY_REASONER, ClaraConfig, compress, encode_query, splice
from clara_jax.model.decoder import Decoder
from clara_jax.model.topk import retrieval_scores

log = logging.getLogger(__name__)

# what encodes a question for ranking: the trained query reasoner (stage 3), or the compressor
# (what stage 3 starts from; for ranking with a stage-1/2 model)
QUERY_ENCODERS = (QUERY_REASONER, COMPRESSOR)

MAX_NEW_TOKENS = 128  # the official methods' default answer length
PROMPT_MAX_LENGTH = 1024  # the official methods tokenize generator prompts with truncation at 1024


def compress_rows(model: Decoder, ids, mask, n_mem: int):
    """`clara.compress` at inference, with the alignment MSE per document ([n]) instead of the
    batch mean: a fixed-size batch is padded with repeated rows, whose MSE must not count. The
    mean of these over a batch is `compress`'s MSE (a test holds the two together)."""
    hidden = model.hidden_states(ids, attention_mask=mask, adapter=COMPRESSOR)
    h32 = hidden.astype(jnp.float32)
    mem_mean = h32[:, -n_mem:].mean(axis=1)
    text_mask = mask.astype(jnp.float32).at[:, -n_mem:].set(0.0)[..., None]
    text_mean = (h32 * text_mask).sum(axis=1) / jnp.maximum(text_mask.sum(axis=1), 1.0)
    return hidden[:, -n_mem:], jnp.mean(jnp.square(text_mean - mem_mean), axis=-1)


def _template_picker(rng):
    """`choice` of the official `random.choice` (rng None: Python's global generator, as there),
    of a given `random.Random`, or of a fresh one seeded with an int."""
    if rng is None:
        return random.choice
    if isinstance(rng, random.Random):
        return rng.choice
    return random.Random(rng).choice


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
        query_encoder: str = QUERY_REASONER,
    ):
        if query_encoder not in QUERY_ENCODERS:
            raise ValueError(f"query_encoder must be one of {QUERY_ENCODERS}, got {query_encoder!r}")
        self.query_encoder = query_encoder
        self._untrained_warned = False
        self.tok, self.model, self.clara = tokenizer, model, clara
        # official inference frames a question like a document: at most doc_max_length tokens
        self.query_max_length = query_max_length or clara.doc_max_length
        self.bucket, self.progress = bucket, progress
        self._rows = None
        if data_parallel:  # weights replicated once, each batch split over this process's devices
            self.model, self._rows, batch_size = replicate_over_local_devices(model, batch_size)
        self.batch_size = batch_size
        n_mem = clara.n_mem
        self._compress = jax.jit(lambda m, ids, mask: compress_rows(m, ids, mask, n_mem))
        if query_encoder == QUERY_REASONER:
            self._query = jax.jit(lambda m, ids, mask: (encode_query(m, ids, mask, n_mem),))
        else:  # the compressor encodes the question as a document: what stage 3 starts from
            self._query = jax.jit(
                lambda m, ids, mask: (compress(m, ids, mask, n_mem)[0].reshape(ids.shape[0], -1),)
            )
        self._splice = jax.jit(lambda m, ids, memory: splice(m, ids, memory, clara.mem_token_ids))

    def _put(self, array) -> jax.Array:
        """A batch on the devices: split over them when data parallel."""
        return jax.device_put(array, self._rows) if self._rows is not None else jnp.asarray(array)

    def _chunks(self, n: int, what: str):
        from tqdm.auto import tqdm

        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=what, unit="batch", disable=not self.progress or len(starts) < 2)

    # ------------------------------------------------------------------ encoders
    def _batched(self, texts: Sequence[str], fn, max_length: int, what: str) -> tuple[np.ndarray, ...]:
        """The outputs of `fn` (a tuple of per-row arrays) over `texts`, in fixed-size batches."""
        if not len(texts):
            raise ValueError(f"{what}: no texts given")
        out, cut = [], 0
        for start in self._chunks(len(texts), what):
            chunk = list(texts[start : start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)  # fixed batch shape: no recompiles
            enc = encoder_rows(self.tok, chunk, max_length, self.bucket)
            cut += int(enc.truncated[:real].sum())
            result = fn(self.model, self._put(enc.ids), self._put(enc.mask))
            out.append([np.asarray(x)[:real] for x in result])
        if cut:
            log.warning("%s: %d of %d texts cut to %d tokens", what, cut, len(texts), max_length)
        return tuple(np.concatenate(parts) for parts in zip(*out))

    def _memory(self, documents: Sequence[str]) -> np.ndarray:
        """[n, n_mem, D] memory vectors under the compressor (no dropout)."""
        return self._batched(documents, self._compress, self.clara.doc_max_length, "compress")[0]

    def compress_documents(self, documents: Sequence[str]) -> tuple[np.ndarray, float]:
        """As the official method: (memory vectors [n, n_mem, D], the compressor's alignment MSE).

        The MSE is the training-time term, also computed at inference: the squared gap between a
        document's mean memory state and its mean text state, averaged over dimensions and over
        all `documents` (the official value is the batch mean of the same, in bf16)."""
        memory, mse = self._batched(documents, self._compress, self.clara.doc_max_length, "compress")
        return memory, float(mse.mean())

    @property
    def query_reasoner_trained(self) -> bool:
        """False when every LoRA B factor of the query reasoner is zero: the adapter as created,
        never trained (a stage-1 or stage-2 model), which ranks with the bare base model."""
        factors = self.model.adapters[QUERY_REASONER].factors.values()
        return any(bool(np.any(np.asarray(jax.device_get(f["b"][...])))) for f in factors)

    def encode_queries(self, questions: Sequence[str]) -> np.ndarray:
        """[n, n_mem·D] query vectors (a batch of questions padded to its own length), from the
        query reasoner or, with `query_encoder="compressor"`, from the compressor."""
        if self.query_encoder == QUERY_REASONER and not self._untrained_warned:
            self._untrained_warned = True
            if not self.query_reasoner_trained:
                log.warning(
                    "this model's query reasoner was never trained (its LoRA B factors are all zero, "
                    "as after stage 1 or 2): questions are encoded by the bare base model. Stage 3 "
                    "starts from the compressor; to rank as it does, use query_encoder='compressor' "
                    "(clara-jax eval --query-encoder compressor)"
                )
        return self._batched(questions, self._query, self.query_max_length, "queries")[0]

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        prompts,
        memory: np.ndarray,
        max_new_tokens: int,
        sampling: SamplingConfig | None,
        max_length: int,
    ):
        """Greedy (or sampled) answers for rendered prompts with memory [B, k, n_mem, D]; a prompt
        longer than `max_length` tokens is cut on the right, as the official tokenizer call does."""
        sampling = sampling or SamplingConfig(
            max_new_tokens=max_new_tokens, eos_token_ids=(self.tok.eos_id,), pad_token_id=self.tok.pad_id
        )
        answers, cut = [], 0
        k = memory.shape[1]
        for start in self._chunks(len(prompts), "generate"):
            chunk = list(prompts[start : start + self.batch_size])
            mem = memory[start : start + self.batch_size]
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)
            mem = np.concatenate([mem, np.repeat(mem[-1:], self.batch_size - real, 0)])
            try:
                gen = generator_batch(self.tok, chunk, max_length, bucket=1, expect_docs=k)
            except ValueError as err:
                raise ValueError(
                    f"{err} (generator prompts are cut at max_length={max_length} tokens)"
                ) from err
            cut += int(gen.truncated[:real].sum())
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
        if cut:
            log.warning(
                "generate: %d of %d prompts cut to max_length=%d tokens", cut, len(prompts), max_length
            )
        return answers

    def generate_from_compressed_documents_and_questions(
        self,
        questions: Sequence[str],
        compressed_documents: np.ndarray,
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        sampling: SamplingConfig | None = None,
        max_length: int = PROMPT_MAX_LENGTH,
    ) -> list[str]:
        """compressed_documents: [B·k, n_mem, D] (k = rows / B), documents in prompt order."""
        if isinstance(compressed_documents, tuple):
            raise TypeError(
                "compressed_documents is a tuple: pass the vectors, not the (vectors, mse) pair that "
                "compress_documents returns"
            )
        compressed = np.asarray(compressed_documents)
        b = len(questions)
        if not b or compressed.shape[0] < b or compressed.shape[0] % b:
            raise ValueError(
                f"{compressed.shape[0]} compressed documents do not split evenly over {b} questions"
            )
        k = compressed.shape[0] // b
        memory = compressed.reshape(b, k, *compressed.shape[1:])
        prompts = [standard_prompt(self.tok, q, k) for q in questions]
        return self._generate(prompts, memory, max_new_tokens, sampling, max_length)

    @staticmethod
    def _equal_rows(questions, documents) -> int:
        """The documents per question, which the official methods need to be the same for all."""
        if len(documents) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(documents)} lists of documents")
        counts = {len(d) for d in documents}
        if len(counts) != 1:
            raise ValueError(
                f"every question needs the same number of documents, got counts {sorted(counts)}"
            )
        return counts.pop()

    def generate_from_text(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        sampling: SamplingConfig | None = None,
        max_length: int = PROMPT_MAX_LENGTH,
    ) -> list[str]:
        """Compress each question's documents (all rows need the same count) and answer."""
        self._equal_rows(questions, documents)
        flat = [doc for docs in documents for doc in docs]
        return self.generate_from_compressed_documents_and_questions(
            questions, self._memory(flat), max_new_tokens, sampling=sampling, max_length=max_length
        )

    def generate_from_paraphrase(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        rng: random.Random | int | None = None,
        sampling: SamplingConfig | None = None,
        max_length: int = PROMPT_MAX_LENGTH,
    ) -> list[str]:
        """Reconstruct text from memory: one prompt per row of `documents`, holding all of that row's
        documents (rows of equal length). `questions` only sets the number of prompts, as in the
        official method. Each prompt draws its instruction template like the official
        `random.choice`: from Python's global generator, or from `rng` (a `random.Random`, or a
        seed) so that calls repeat."""
        k = self._equal_rows(questions, documents)
        choose = _template_picker(rng)
        block = memory_block(self.tok, k)
        prompts = []
        for _ in questions:
            user = choose(PARAPHRASE_TEMPLATES).format(docs=block)
            messages = [{"role": "system", "content": PARAPHRASE_SYSTEM}, {"role": "user", "content": user}]
            prompts.append(RenderedPrompt(render_chat(self.tok, messages, add_generation_prompt=True), None))
        flat = [doc for docs in documents for doc in docs]
        memory = self._memory(flat).reshape(len(questions), k, self.clara.n_mem, -1)
        return self._generate(prompts, memory, max_new_tokens, sampling, max_length)

    # ------------------------------------------------------------------ retrieval
    def _candidate_memory(self, candidates: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Memory [B, N, n_mem, D] of every question's candidates, N the most any question has, and
        the mask [B, N] of real candidates; the padding slots hold zeros."""
        counts = np.asarray([len(c) for c in candidates])
        n = int(counts.max()) if len(counts) else 0
        mask = np.arange(n)[None, :] < counts[:, None]
        flat = [doc for docs in candidates for doc in docs]
        vectors = self._memory(flat) if flat else np.zeros((0, self.clara.n_mem, 1), np.float32)
        memory = np.zeros((len(candidates), n, *vectors.shape[1:]), vectors.dtype)
        memory[mask] = vectors  # row-major order of the mask = the order of `flat`
        return memory, mask

    def _rank(self, questions, memory: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        """Top-k indices [B, k] by the model's score (`clara.retrieval_score`: cosine, or the dot
        product); a masked candidate can never be among them."""
        fewest = int(mask.sum(axis=1).min())
        if k > fewest:
            raise ValueError(f"top-k = {k} exceeds the {fewest} candidates of a question")
        queries = self.encode_queries(questions)
        b, n = memory.shape[:2]
        scores = retrieval_scores(
            jnp.asarray(queries), jnp.asarray(memory.reshape(b, n, -1)), self.clara.retrieval_score
        )
        scores = jnp.where(jnp.asarray(mask), scores, -jnp.inf)
        return np.asarray(jax.lax.top_k(scores, k)[1])

    def _candidates(self, questions, candidates, candidate_memory, candidate_mask):
        if candidate_memory is None:
            if candidates is None:
                raise ValueError("pass the candidate documents (or candidate_memory)")
            if len(candidates) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(candidates)} lists of candidates")
            return self._candidate_memory(candidates)
        memory = np.asarray(candidate_memory)
        if memory.shape[0] != len(questions):
            raise ValueError(f"{len(questions)} questions but candidate_memory for {memory.shape[0]}")
        if candidate_mask is None:
            return memory, np.ones(memory.shape[:2], bool)
        mask = np.asarray(candidate_mask, bool)
        if mask.shape != memory.shape[:2]:
            raise ValueError(
                f"candidate_mask {mask.shape} does not match candidate_memory {memory.shape[:2]}"
            )
        return memory, mask

    def rerank(
        self,
        questions: Sequence[str],
        candidates: Sequence[Sequence[str]] | None = None,
        *,
        candidate_memory: np.ndarray | None = None,
        candidate_mask: np.ndarray | None = None,
        k: int | None = None,
    ):
        """Top-k candidate indices [B, k] by the query reasoner's score, and the candidates' memory
        [B, N, n_mem, D]. Questions may have different numbers of candidates (each at least k): the
        shorter rows are padded to the longest with zero vectors that are masked out of the ranking.
        `candidate_memory` replaces compressing `candidates`; `candidate_mask` [B, N] (True = a real
        candidate) marks its padding."""
        k = k or self.clara.top_k
        memory, mask = self._candidates(questions, candidates, candidate_memory, candidate_mask)
        return self._rank(questions, memory, mask, k), memory

    def generate_from_questions(
        self,
        questions: Sequence[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = 0.5,
        documents: Sequence[Sequence[str]] | None = None,
        stage2_mips: bool = False,
        stage2_retrieval_top_n: int | None = None,
        time_count: bool = False,
        *,
        candidate_memory: np.ndarray | None = None,
        candidate_mask: np.ndarray | None = None,
        k: int | None = None,
        sampling: SamplingConfig | None = None,
        max_length: int = PROMPT_MAX_LENGTH,
    ):
        """Stage-3 inference: rerank each question's `documents`, answer from the top-k in score order.

        Returns (answers, topk [B, k]), or with `time_count` (answers, topk, compress seconds, query
        seconds, generate seconds, their sum) as the official method does. `temperature` and
        `stage2_retrieval_top_n` are accepted and, as in the official method with given documents,
        do not change the result (the top-k's forward value is the hard top-k). `stage2_mips` (the
        official retrieval-server path) is not supported: use
        `clara_jax.inference.index.generate_from_index` over an exported corpus instead."""
        del temperature, stage2_retrieval_top_n
        if stage2_mips:
            raise NotImplementedError(
                "stage2_mips (the official retrieval server) is not supported; search an exported corpus "
                "with clara_jax.inference.index.generate_from_index"
            )
        k = k or self.clara.top_k
        start = time.perf_counter()
        memory, mask = self._candidates(questions, documents, candidate_memory, candidate_mask)
        compressed = time.perf_counter()
        topk = self._rank(questions, memory, mask, k)
        ranked = time.perf_counter()
        selected = np.take_along_axis(memory, topk[:, :, None, None], axis=1)
        prompts = [standard_prompt(self.tok, q, k) for q in questions]
        answers = self._generate(prompts, selected, max_new_tokens, sampling, max_length)
        if not time_count:
            return answers, topk
        compress_s, query_s, generate_s = (
            compressed - start,
            ranked - compressed,
            time.perf_counter() - ranked,
        )
        return answers, topk, compress_s, query_s, generate_s, compress_s + query_s + generate_s


def load_inference(model_dir: str, **kw) -> ClaraInference:
    """A ready `ClaraInference` (the official-style API) from a saved model directory, with the
    padding bucket the model was trained with (unless overridden in `kw`)."""
    tok, model, clara = load_clara_model(model_dir)
    run = read_model_meta(model_dir_path(model_dir)).get("run_config") or {}
    if run:
        kw.setdefault("bucket", run["data"]["bucket"])
    return ClaraInference(tok, model, clara, **kw)
