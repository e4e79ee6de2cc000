"""The loss of each CLaRa stage, as a pure function of (model, batch, rng).

Batches are dicts of arrays (clara_jax.data.layouts builds them):
  stages 1/2: enc_ids/enc_mask [B·k, Le] (k documents per example, in prompt order),
              gen_ids/gen_mask/targets/target_mask [B, Lg]
  stage 3:    query_ids/query_mask [B, Lq]; candidates either as enc_ids/enc_mask [B·N, Le]
              (re-compressed under the frozen compressor) or as cand_memory [B, N, n_mem, D]
              (cached from an index); cand_valid, positives [B, N] bool; gen_* as above.

The cross-entropy is the mean over target tokens of the micro-batch, as the official code
computes it; gradient accumulation then averages micro-batch means (training/step.py). The stage-3
InfoNCE term (`clara.retrieval_loss`) is likewise the mean over the micro-batch's labelled questions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clara_jax.model.clara import (
    RETRIEVAL_LOSSES,
    ClaraConfig,
    compress,
    encode_query,
    generator_logits,
    select_documents,
)
from clara_jax.model.stage_registry import get_stage
from clara_jax.model.topk import differentiable_topk, retrieval_scores
from clara_jax.training.retrieval_diagnostics import retrieval_diagnostics


def token_cross_entropy(logits, targets, target_mask):
    """(mean CE over target tokens, token accuracy, number of target tokens)."""
    mask = target_mask.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(mask.sum(), 1.0)
    ce = ((logz - picked) * mask).sum() / n
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return ce, (correct * mask).sum() / n, mask.sum()


def recall_at(indices, positives, k: int):
    """Mean over questions of |top-k ∩ gold| / |gold| (0 for a question without gold), the
    definition of the official evaluate.py; indices < 0 (unfilled slots) never hit."""
    topk = indices[:, :k]
    hit = jnp.take_along_axis(positives, jnp.maximum(topk, 0), axis=1) & (topk >= 0)
    n_pos = positives.sum(axis=1)
    per_question = jnp.where(n_pos > 0, hit.sum(axis=1) / jnp.maximum(n_pos, 1), 0.0)
    return per_question.mean()


def infonce_loss(scores, positives, valid, temperature):
    """Multi-positive InfoNCE over a question's candidates: (mean loss, labelled questions).

    Per question, with logits s / tau over its valid candidates V and gold set P = positives ∩ V:
        loss = logsumexp_{n in V} logits_n - logsumexp_{n in P} logits_n = -log sum_{p in P} softmax(logits)_p
    i.e. the positives share one softmax and the loss rewards their summed probability, as the
    official `_forward_stage2_pretrain_batch` (modeling_clara.py L1500-1508): a question with
    several gold documents is satisfied once their total mass is high, whichever of them holds it.
    Padded candidates (valid False) are in neither sum. Questions without a valid positive are
    left out of the mean; a micro-batch without any gives 0 (the official code's mean over an
    empty set is NaN). The temperature is floored at 1e-6, as the top-k's.

    scores [B, N] (the top-k's scores, before the temperature), positives / valid [B, N] bool.
    """
    tau = jnp.maximum(jnp.asarray(temperature, dtype=jnp.float32), 1e-6)
    logits = scores.astype(jnp.float32) / tau
    valid = valid.astype(bool)
    pos = positives.astype(bool) & valid
    labelled = pos.any(axis=1)
    # rows without a positive are fed zeros (not all -inf) so neither value nor gradient sees NaN
    every = jnp.where(labelled[:, None], jnp.where(valid, logits, -jnp.inf), 0.0)
    gold = jnp.where(labelled[:, None], jnp.where(pos, logits, -jnp.inf), 0.0)
    per_question = jax.nn.logsumexp(every, axis=1) - jax.nn.logsumexp(gold, axis=1)
    n = labelled.sum().astype(jnp.float32)
    loss = jnp.where(labelled, per_question, 0.0).sum() / jnp.maximum(n, 1.0)
    return loss, n


def _generator_loss(model, batch, memory, cfg: ClaraConfig, rng):
    logits = generator_logits(
        model, batch["gen_ids"], batch["gen_mask"], memory, cfg.mem_token_ids, dropout_rng=rng
    )
    return token_cross_entropy(logits, batch["targets"], batch["target_mask"])


def compression_loss(model, batch, cfg: ClaraConfig, rng, *, docs_per_example: int, train: bool = True):
    """Stages 1 and 2: compress k documents, splice them in order, CE + λ·MSE.

    Gradients flow from the generator's CE through the spliced vectors into the compressor.
    """
    rng_c, rng_g = jax.random.split(rng) if train else (None, None)
    memory, mse = compress(model, batch["enc_ids"], batch["enc_mask"], cfg.n_mem, dropout_rng=rng_c)
    b = batch["gen_ids"].shape[0]
    memory = memory.reshape(b, docs_per_example, cfg.n_mem, memory.shape[-1])
    ce, acc, n_tokens = _generator_loss(model, batch, memory, cfg, rng_g)
    loss = ce + cfg.mse_weight * mse
    return loss, {"loss": loss, "ce": ce, "mse": mse, "token_accuracy": acc, "target_tokens": n_tokens}


def candidate_memory(model, batch, cfg: ClaraConfig, dropout_rng=None):
    """[B, N, n_mem, D] candidate vectors from the frozen compressor (no gradient), or the cached
    ones when the batch carries them. With `dropout_rng` the compressor's LoRA dropout is on, as in
    the official trainer (train mode under no_grad); without it the vectors are deterministic,
    which is what lets them be cached."""
    if "cand_memory" in batch:
        if dropout_rng is not None:
            raise ValueError("cached candidates cannot be compressed with dropout")
        return jax.lax.stop_gradient(batch["cand_memory"])
    b, n = batch["cand_valid"].shape
    memory, _ = compress(model, batch["enc_ids"], batch["enc_mask"], cfg.n_mem, dropout_rng=dropout_rng)
    return jax.lax.stop_gradient(memory.reshape(b, n, cfg.n_mem, memory.shape[-1]))


def retrieval_loss(
    model,
    batch,
    cfg: ClaraConfig,
    rng,
    *,
    train: bool = True,
    gumbel: bool = False,
    straight_through: bool = True,
    candidate_dropout: bool = False,
):
    """Stage 3: query reasoner -> scores -> straight-through top-k -> generator CE (and/or InfoNCE).

    The compressor is frozen: the only path from the CE to the query reasoner is the top-k
    weights W, exactly as in CLaRa's Algorithm 1. `straight_through=False` cuts that path (the
    forward is unchanged): the control run of the stage-3 experiment, in which the query
    reasoner receives no gradient from the CE. `candidate_dropout` compresses the candidates with the
    compressor's LoRA dropout on (the official behaviour; it rules out the candidate cache).

    `cfg.retrieval_score` picks cosine or raw dot-product scores (the official MIPS branch);
    `cfg.retrieval_loss` picks the objective: "lm" (CE only, the paper's method), "infonce" (the
    supervised-retriever baseline: InfoNCE on `positives`, no generator pass at all, as the
    official `stage2_pretrain_retrieval`) or "lm+infonce" (CE + infonce_weight · InfoNCE). The
    InfoNCE uses the top-k's scores and temperature, without the Gumbel noise.
    """
    rng_q, rng_g, rng_t = jax.random.split(rng, 3) if train else (None, None, None)
    query = encode_query(model, batch["query_ids"], batch["query_mask"], cfg.n_mem, dropout_rng=rng_q)
    # a key of its own, so the default (deterministic) path draws exactly the keys it always did
    rng_c = jax.random.fold_in(rng, 3) if train and candidate_dropout else None
    memory = candidate_memory(model, batch, cfg, dropout_rng=rng_c)
    b, n = memory.shape[:2]
    scores = retrieval_scores(query, memory.reshape(b, n, -1), cfg.retrieval_score)
    weights, indices = differentiable_topk(
        scores,
        cfg.top_k,
        cfg.temperature,
        mask_mode=cfg.topk_mask_mode,
        key=rng_t if gumbel else None,
        valid_mask=batch["cand_valid"],
    )
    if cfg.retrieval_loss not in RETRIEVAL_LOSSES:
        raise ValueError(f"retrieval_loss must be one of {RETRIEVAL_LOSSES}, got {cfg.retrieval_loss!r}")
    loss, metrics = jnp.float32(0.0), {}
    if cfg.retrieval_loss in ("lm", "lm+infonce"):
        if not straight_through:
            weights = jax.lax.stop_gradient(weights)
        selected = select_documents(weights, memory)
        ce, acc, n_tokens = _generator_loss(model, batch, selected, cfg, rng_g)
        loss = loss + ce
        metrics.update(ce=ce, token_accuracy=acc, target_tokens=n_tokens)
    if cfg.retrieval_loss in ("infonce", "lm+infonce"):
        nce, n_labelled = infonce_loss(scores, batch["positives"], batch["cand_valid"], cfg.temperature)
        loss = loss + cfg.infonce_weight * nce
        metrics.update(infonce=nce, infonce_questions=n_labelled)
    metrics["loss"] = loss
    for k in sorted({1, min(3, cfg.top_k), cfg.top_k}):
        metrics[f"recall@{k}"] = recall_at(indices, batch["positives"], k)
    metrics.update(
        retrieval_diagnostics(
            scores,
            indices,
            batch["positives"],
            batch["cand_valid"],
            cfg.temperature,
            mask_mode=cfg.topk_mask_mode,
        )
    )
    return loss, metrics


def stage_loss_fn(
    stage: str,
    cfg: ClaraConfig,
    *,
    docs_per_example: int = 1,
    gumbel: bool = False,
    straight_through: bool = True,
    candidate_dropout: bool = False,
    train: bool = True,
):
    """The loss function `(model, batch, rng) -> (loss, metrics)` of a stage.

    `train=False` is the evaluation form (training/stage_eval.py): no dropout and no Gumbel noise,
    `rng` unused; on the same batch it equals the training loss of a model without dropout."""
    if get_stage(stage).retrieval:
        return lambda model, batch, rng: retrieval_loss(
            model,
            batch,
            cfg,
            rng,
            train=train,
            gumbel=gumbel,
            straight_through=straight_through,
            candidate_dropout=candidate_dropout,
        )
    return lambda model, batch, rng: compression_loss(
        model, batch, cfg, rng, docs_per_example=docs_per_example, train=train
    )
