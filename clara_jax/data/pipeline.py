"""Deterministic, resumable, process-sharded batches of a stage's records.

Each epoch visits the records in a permutation drawn from (seed, epoch); a global batch is
the next `global_size` of them (the incomplete tail is dropped, as the official sampler
does). The iterator's whole state is two integers, saved with every checkpoint, so a
resumed run sees exactly the batches it would have seen.

Every process tokenizes the whole global batch (cheap next to a train step) and keeps the
rows of its own devices: shapes then agree across processes by construction, and lengths can
follow the batch (bucketed, see clara_jax.data.layouts) rather than one worst-case padding.
Arrays come out as [micro_steps, micro_size, ...], the layout training/step.py accumulates over.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from clara_jax.data.layouts import encoder_batch, generator_batch, label_ids
from clara_jax.data.prompts import paraphrase_prompt, qa_prompt, standard_prompt
from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.model.field_checks import check_fields
from clara_jax.model.stage_registry import get_stage


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    doc_max_length: int
    query_max_length: int
    generator_max_length: int
    bucket: int = 32
    docs_per_example: int = 1  # stages 1/2
    top_k: int = 5  # stage 3: memory slots in the generator prompt
    candidates: int = 20  # stage 3: candidates per question (fewer are padded and masked)

    def __post_init__(self):
        check_fields(  # doc_max_length and top_k are the method's: checked with the clara settings
            ("clara.docs_per_example", self.docs_per_example, self.docs_per_example >= 1, ">= 1"),
            ("clara.query_max_length", self.query_max_length, self.query_max_length >= 1, ">= 1"),
            (
                "clara.generator_max_length",
                self.generator_max_length,
                self.generator_max_length >= 16,
                ">= 16",
            ),
            ("data.bucket", self.bucket, self.bucket >= 1, ">= 1"),
        )


def bucket_length(n: int, bucket: int) -> int:
    """Round up to bucket·2^i: few distinct shapes (few compilations), little padding."""
    size = bucket
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass
class TokenStats:
    """Running counts a run reports: nothing is cut silently."""

    examples: int = 0
    docs: int = 0
    docs_truncated: int = 0
    targets_truncated: int = 0
    queries: int = 0
    queries_truncated: int = 0
    # stage 3 keeps a question's first `candidates` documents: gold passages (pos_index) beyond them
    # are lost to training, counted here (and the questions that lost at least one)
    positives: int = 0
    positives_dropped: int = 0
    examples_positives_dropped: int = 0

    def add(self, other: TokenStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def pad_left(array: np.ndarray, width: int, value) -> np.ndarray:
    return np.pad(array, ((0, 0), (width - array.shape[1], 0)), constant_values=value)


def encoder_rows(tok, texts, max_length, bucket):
    """Encoder rows padded to a bucketed width (tokenized once, at their natural width)."""
    enc = encoder_batch(tok, texts, max_length, bucket=1)
    width = min(bucket_length(enc.ids.shape[1] - tok.n_mem, bucket), max_length + 3) + tok.n_mem
    return dataclasses.replace(
        enc, ids=pad_left(enc.ids, width, tok.pad_id), mask=pad_left(enc.mask, width, False)
    )


def _generator(tok, prompts, cfg: LayoutConfig, expect_docs: int):
    gen = generator_batch(tok, prompts, cfg.generator_max_length, bucket=1, expect_docs=expect_docs)
    width = min(bucket_length(gen.ids.shape[1], cfg.bucket), cfg.generator_max_length)
    ids, mask = pad_left(gen.ids, width, tok.pad_id), pad_left(gen.mask, width, False)
    targets, target_mask = label_ids(ids, pad_left(gen.loss_mask, width, False))
    arrays = dict(gen_ids=ids, gen_mask=mask, targets=targets, target_mask=target_mask)
    return arrays, gen.n_truncated


def tokenize_compression(tok: ClaraTokenizer, records: Sequence, cfg: LayoutConfig, rng: np.random.Generator):
    """Stage 1 (one doc, QA or paraphrase target) and stage 2 (k docs, QA target) arrays."""
    k = cfg.docs_per_example
    prompts, docs = [], []
    for r in records:
        if hasattr(r, "kind"):  # stage-1 record
            docs.append(r.doc)
            if r.kind == "paraphrase":
                prompts.append(paraphrase_prompt(tok, r.answers[0], rng, k=1))
            else:
                prompts.append(qa_prompt(tok, list(r.questions), list(r.answers), k=1))
        else:  # stage-2 record
            if len(r.docs) != k:
                raise ValueError(f"expected {k} documents per example, a record has {len(r.docs)}")
            docs.extend(r.docs)
            prompts.append(standard_prompt(tok, r.question, k, r.answer))
    enc = encoder_rows(tok, docs, cfg.doc_max_length, cfg.bucket)
    arrays, gen_truncated = _generator(tok, prompts, cfg, k)
    arrays.update(enc_ids=enc.ids, enc_mask=enc.mask)
    stats = TokenStats(len(records), len(docs), enc.n_truncated, gen_truncated)
    return arrays, stats


def count_dropped_positives(records: Sequence, candidates: int) -> TokenStats:
    """The gold passages (distinct `pos_index` entries) of retrieval records, and those at an index
    >= `candidates`, which stage 3 (first `candidates` documents of each question) never sees."""
    stats = TokenStats(examples=len(records))
    for r in records:
        gold = set(r.pos_index)
        dropped = sum(p >= candidates for p in gold)
        stats.positives += len(gold)
        stats.positives_dropped += dropped
        stats.examples_positives_dropped += dropped > 0
    return stats


def tokenize_retrieval(
    tok: ClaraTokenizer, records: Sequence, cfg: LayoutConfig, rng=None, candidate_memory=None
):
    """Stage 3 arrays: short queries, N candidates per question (padded, masked), k slots.

    `candidate_memory(texts) -> (memory [n, n_mem, D], truncated [n])` replaces the candidates'
    encoder rows with their precomputed memory vectors (`cand_memory` [B, N, n_mem, D]).
    A gold passage beyond the first N candidates is dropped, and counted in the stats.
    """
    n = cfg.candidates
    docs, valid, positives = [], np.zeros((len(records), n), bool), np.zeros((len(records), n), bool)
    for i, r in enumerate(records):
        cands = list(r.docs[:n])
        valid[i, : len(cands)] = True
        docs.extend(cands + [cands[0]] * (n - len(cands)))  # padding candidates are masked out
        for p in r.pos_index:
            if p < n:
                positives[i, p] = True
    queries = encoder_rows(tok, [r.question for r in records], cfg.query_max_length, cfg.bucket)
    prompts = [standard_prompt(tok, r.question, cfg.top_k, r.answer) for r in records]
    arrays, gen_truncated = _generator(tok, prompts, cfg, cfg.top_k)
    arrays.update(query_ids=queries.ids, query_mask=queries.mask, cand_valid=valid, positives=positives)
    if candidate_memory is None:
        enc = encoder_rows(tok, docs, cfg.doc_max_length, cfg.bucket)
        arrays.update(enc_ids=enc.ids, enc_mask=enc.mask)
        truncated = enc.truncated
    else:
        memory, truncated = candidate_memory(docs)
        arrays["cand_memory"] = memory.reshape(len(records), n, *memory.shape[1:])
    dropped = count_dropped_positives(records, n)
    stats = TokenStats(
        len(records),
        len(docs),
        int(truncated[valid.reshape(-1)].sum()),
        gen_truncated,
        queries=len(records),
        queries_truncated=queries.n_truncated,
        positives=dropped.positives,
        positives_dropped=dropped.positives_dropped,
        examples_positives_dropped=dropped.examples_positives_dropped,
    )
    return arrays, stats


def to_micro_steps(arrays: dict, examples: int, micro_size: int, docs_per_example: dict) -> dict:
    """[examples·d, ...] -> [micro_steps, micro_size·d, ...] for every array."""
    steps = examples // micro_size
    out = {}
    for key, value in arrays.items():
        per = docs_per_example.get(key, 1)
        out[key] = value.reshape(steps, micro_size * per, *value.shape[1:])
    return out


def _shape_only(lookup):
    """A `candidate_memory` lookup that returns rows of the right shape and dtype without gathering
    them (a read-only broadcast of one zero row): for walking the batches' shapes only."""
    if lookup is None:
        return None
    row = []

    def stub(texts):
        if not row:
            memory, _ = lookup(list(texts[:1]))
            row.append(np.zeros(memory.shape[1:], memory.dtype))
        return np.broadcast_to(row[0], (len(texts), *row[0].shape)), np.zeros(len(texts), bool)

    return stub


class BatchIterator:
    """Global batches of tokenized records; `state()` / `restore()` make it resumable."""

    def __init__(
        self,
        records: Sequence,
        tok: ClaraTokenizer,
        stage: str,
        layout: LayoutConfig,
        *,
        global_size: int,
        micro_size: int,
        seed: int,
        num_epochs: int = 1,
        candidate_memory=None,
    ):
        """`candidate_memory`: see `tokenize_retrieval` (stage 3 with a frozen compressor)."""
        if len(records) < global_size:
            raise ValueError(f"{len(records)} records cannot fill one global batch of {global_size}")
        self.records, self.tok, self.stage, self.layout = records, tok, stage, layout
        self.global_size, self.micro_size, self.seed, self.num_epochs = (
            global_size,
            micro_size,
            seed,
            num_epochs,
        )
        self.candidate_memory = candidate_memory
        self.epoch, self.index = 0, 0
        self.stats = TokenStats()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.records) // self.global_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint data state has seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def remaining_shapes(self, limit: int | None = None) -> list[dict]:
        """The distinct shapes of the batches this iterator has yet to give, at most `limit` of them
        ahead: `{key: (shape, dtype)}` per shape, in the order they first appear. A batch's widths
        follow its longest rows (bucketed), so this tokenizes those batches once on the host; the
        iterator itself does not move. Stage 3's cached candidate memory is not gathered (its shape
        is fixed)."""
        walker = copy.copy(self)
        walker.stats = TokenStats()
        walker.candidate_memory = _shape_only(self.candidate_memory)
        seen = {}
        for arrays in itertools.islice(walker, limit):
            key = tuple((k, v.shape, v.dtype.str) for k, v in arrays.items())
            seen.setdefault(key, {k: (v.shape, v.dtype) for k, v in arrays.items()})
        return list(seen.values())

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.epoch >= self.num_epochs:
            raise StopIteration
        order = self._order(self.epoch)[self.index * self.global_size : (self.index + 1) * self.global_size]
        batch_records = [self.records[int(i)] for i in order]
        rng = np.random.default_rng([self.seed, self.epoch, self.index, 1])  # paraphrase template choice
        if get_stage(self.stage).retrieval:
            arrays, stats = tokenize_retrieval(
                self.tok, batch_records, self.layout, rng, candidate_memory=self.candidate_memory
            )
            per = {"enc_ids": self.layout.candidates, "enc_mask": self.layout.candidates}
        else:
            arrays, stats = tokenize_compression(self.tok, batch_records, self.layout, rng)
            k = self.layout.docs_per_example
            per = {"enc_ids": k, "enc_mask": k}
        self.index += 1
        self.stats.add(stats)
        return to_micro_steps(arrays, self.global_size, self.micro_size, per)
