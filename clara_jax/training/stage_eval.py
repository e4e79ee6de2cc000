"""Evaluation during training, for every stage: the eval loss and the scores of generated answers.

Every `data.eval_every` steps (and before the first), on the first `data.eval_questions` records of
`data.eval` (rounded down to whole micro-batches of `batch.micro_size`):

- the stage's own loss (`objectives.stage_loss_fn` with `train=False`: no dropout, no Gumbel noise,
  no update) on batches tokenized exactly as the training batches are (the same layout, the same
  [micro_steps, micro_size, ...] arrays, stage 3's candidates from a candidate cache when the run
  uses one), averaged over the micro-batches as the train step averages its own:
  `loss`, `ce`, `mse` (stages 1-2), `infonce` (stage 3 with that loss) and `token_accuracy`;
- in stages 2 and 3, greedy answers (at most `data.eval_max_new_tokens` new tokens, 0 turns them
  off) scored against the records' gold answers with the official metrics
  (`inference/metrics.qa_scores`): `em`, `f1`, `cover_em`. Stage 2 answers from each record's k
  documents in their given order (as `clara-jax eval --mode given`), stage 3 from the top-k of the
  query reasoner's ranking of the candidates its steps read, in score order (as `--mode rerank`).
  Stage 1 has no answers to score: its QA targets repeat the questions (`qa_prompt`) and its
  paraphrase targets are passages.

The loss and the answers are one jitted program over arrays of fixed shapes, built once: it compiles
once per run. Every process tokenizes the same records and runs the same program; its outputs are
replicated, so every process reads the same numbers (the loop lets process 0 write them). Stage 3's
dev Recall@k is `training/dev_retrieval.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax.data.layouts import generator_batch
from clara_jax.data.pipeline import (
    LayoutConfig,
    TokenStats,
    bucket_length,
    pad_left,
    to_micro_steps,
    tokenize_compression,
    tokenize_retrieval,
)
from clara_jax.data.prompts import standard_prompt
from clara_jax.data.records import CompressionRecord
from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.inference.generation import SamplingConfig, generate
from clara_jax.inference.metrics import qa_scores
from clara_jax.model.activation_sharding import activation_sharding
from clara_jax.model.clara import GENERATOR, ClaraConfig, compress, encode_query, splice
from clara_jax.model.stage_registry import get_stage
from clara_jax.model.topk import retrieval_scores
from clara_jax.parallel.rules import DEFAULT_RULES, activation_constraint
from clara_jax.training.objectives import candidate_memory, stage_loss_fn
from clara_jax.training.step import global_batch, micro_batch_shardings

log = logging.getLogger(__name__)

# The loss function's metrics that are logged (as eval/<name>); the stage-3 recall of the eval batch
# and the diagnostics are left out: the dev Recall@k (dev_retrieval.py) ranks every candidate.
LOSS_METRICS = ("loss", "ce", "mse", "infonce", "token_accuracy")
ANSWER_METRICS = {"em": "em", "f1": "f1", "acc": "cover_em"}  # qa_scores name -> logged name


def usable_count(n_records: int, n_questions: int, micro_size: int) -> int:
    """How many records the evaluation reads: the first `n_questions`, in whole micro-batches."""
    return min(n_questions, n_records) // micro_size * micro_size


def decode_answers(tok: ClaraTokenizer, tokens: np.ndarray) -> list[str]:
    """Generated ids [n, T] -> answer strings, as ClaraInference decodes them (pad and EOS dropped,
    special tokens skipped, stripped)."""
    answers = []
    for row in np.asarray(tokens):
        row = [t for t in row.tolist() if t not in (tok.pad_id, tok.eos_id)]
        answers.append(tok.hf.decode(row, skip_special_tokens=True).strip())
    return answers


class StageEval:
    """`evaluate(params, frozen) -> {"loss", "ce", ..., "em", "f1", "cover_em"}` of a stage's live
    model (its graph definition split as the trainer splits it) on fixed evaluation records."""

    def __init__(
        self,
        stage: str,
        records: Sequence,
        tok: ClaraTokenizer,
        clara: ClaraConfig,
        layout: LayoutConfig,
        graphdef,
        mesh,
        *,
        micro_size: int,
        n_questions: int = 64,
        max_new_tokens: int = 16,
        rules=DEFAULT_RULES,
        candidate_memory_lookup=None,
        seed: int = 0,
    ):
        retrieval = get_stage(stage).retrieval
        n = usable_count(len(records), n_questions, micro_size)
        if n == 0:
            raise ValueError(
                f"evaluation needs at least batch.micro_size = {micro_size} records, got "
                f"{min(n_questions, len(records))} (data.eval_questions = {n_questions}, "
                f"{len(records)} in data.eval)"
            )
        self.records = list(records[:n])
        self.questions, self.micro_steps = n, n // micro_size
        rng = np.random.default_rng([seed, 2])  # the paraphrase templates: the same at every evaluation
        if retrieval:
            arrays, stats = tokenize_retrieval(
                tok, self.records, layout, rng, candidate_memory=candidate_memory_lookup
            )
            per = {"enc_ids": layout.candidates, "enc_mask": layout.candidates}
            k = layout.top_k
        else:
            arrays, stats = tokenize_compression(tok, self.records, layout, rng)
            k = layout.docs_per_example
            per = {"enc_ids": k, "enc_mask": k}
        self.stats: TokenStats = stats
        batch = to_micro_steps(arrays, n, micro_size, per)

        answered = max_new_tokens > 0 and not isinstance(self.records[0], CompressionRecord)
        self.answered = answered
        prompts = None
        if answered:
            rendered = [standard_prompt(tok, r.question, k) for r in self.records]
            gen = generator_batch(tok, rendered, layout.generator_max_length, bucket=1, expect_docs=k)
            if gen.n_truncated:
                log.warning(
                    "evaluation prompts truncated to clara.generator_max_length: %d of %d",
                    gen.n_truncated,
                    n,
                )
            width = min(bucket_length(gen.ids.shape[1], layout.bucket), layout.generator_max_length)
            prompts = to_micro_steps(
                {
                    "ids": pad_left(gen.ids, width, tok.pad_id),
                    "mask": pad_left(gen.mask, width, False),
                },
                n,
                micro_size,
                {},
            )
            self.golds = [list(getattr(r, "answers", None) or (r.answer,)) for r in self.records]

        self._tok = tok
        self._batch = global_batch(batch, micro_batch_shardings(batch, mesh, rules))
        self._prompts = (
            global_batch(prompts, micro_batch_shardings(prompts, mesh, rules)) if prompts else None
        )
        self.last_answers: list[str] = []

        loss_fn = stage_loss_fn(stage, clara, docs_per_example=layout.docs_per_example, train=False)
        constrain = activation_constraint(mesh, rules) if mesh.size > 1 else None
        sampling = SamplingConfig(
            max_new_tokens=max(max_new_tokens, 1), eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id
        )
        n_mem, top_k = clara.n_mem, clara.top_k

        def answer_memory(model, micro):
            """[B, k, n_mem, D]: stage 2's documents in their order, stage 3's top-k in score order."""
            if not retrieval:
                memory, _ = compress(model, micro["enc_ids"], micro["enc_mask"], n_mem)
                return memory.reshape(micro["gen_ids"].shape[0], k, n_mem, memory.shape[-1])
            memory = candidate_memory(model, micro, clara)  # [B, N, n_mem, D]
            b, n_cand = memory.shape[:2]
            query = encode_query(model, micro["query_ids"], micro["query_mask"], n_mem)
            scores = retrieval_scores(query, memory.reshape(b, n_cand, -1), clara.retrieval_score)
            scores = jnp.where(micro["cand_valid"], scores, -jnp.inf)
            _, indices = jax.lax.top_k(scores, top_k)
            return jnp.take_along_axis(memory, indices[:, :, None, None], axis=1)

        def run(params, frozen, batch, prompts):
            model = nnx.merge(graphdef, params, frozen)

            def losses(micro):
                with activation_sharding(constrain):
                    _, metrics = loss_fn(model, micro, jax.random.key(0))  # the key is unused
                return {m: metrics[m].astype(jnp.float32) for m in LOSS_METRICS if m in metrics}

            # the mean of the micro-batch values, as the train step reports a global batch
            metrics = jax.tree.map(lambda v: v.mean(), jax.lax.map(losses, batch))
            if prompts is None:
                return metrics, None

            def answers(inputs):
                micro, prompt = inputs
                embeds = splice(model, prompt["ids"], answer_memory(model, micro), clara.mem_token_ids)
                return generate(
                    model,
                    inputs_embeds=embeds,
                    attention_mask=prompt["mask"],
                    sampling=sampling,
                    adapter=GENERATOR,
                )

            return metrics, jax.lax.map(answers, (batch, prompts))

        # replicated outputs: every process holds the whole result (multi-host safe to read)
        self._run = jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def evaluate(self, params, frozen) -> dict:
        """The scores of the model `nnx.merge(graphdef, params, frozen)`; blocks until they are known."""
        metrics, tokens = self._run(params, frozen, self._batch, self._prompts)
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if tokens is not None:
            tokens = np.asarray(jax.device_get(tokens))
            self.last_answers = decode_answers(self._tok, tokens.reshape(self.questions, -1))
            scores = qa_scores(self.last_answers, self.golds)
            out.update({name: scores[key] for key, name in ANSWER_METRICS.items()})
        return out


@dataclasses.dataclass
class BestStep:
    """The best evaluation so far: the lowest `eval/loss` (stages 1-2), or the highest
    `dev/recall@1` (stage 3, whose purpose is retrieval); ties keep the earlier step."""

    metric: str
    mode: str  # "min" | "max"
    step: int | None = None
    value: float | None = None

    @classmethod
    def for_stage(cls, stage: str) -> BestStep:
        return cls("dev/recall@1", "max") if get_stage(stage).retrieval else cls("eval/loss", "min")

    def update(self, step: int, row: dict) -> bool:
        """Take `row` (metric name -> value) of `step` if it is better; whether it was."""
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        better = self.value is None or (value < self.value if self.mode == "min" else value > self.value)
        if better:
            self.step, self.value = int(step), float(value)
        return better

    def restore(self, rows: Sequence[dict]) -> None:
        """The best of a resumed run's history (metrics.jsonl rows, in order)."""
        for row in rows:
            self.update(row["step"], row)

    def as_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value}
