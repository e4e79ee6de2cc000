"""Stage-3 diagnostics: the numbers that explain a recall curve, the straight-through switch, the
per-adapter gradient norms and the periodic dev retrieval."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clara_jax.data.records import RetrievalRecord
from clara_jax.training.dev_retrieval import DevRetrieval
from clara_jax.training.objectives import stage_loss_fn
from clara_jax.training.retrieval_diagnostics import retrieval_diagnostics
from clara_jax.training.step import TrainState, make_train_step
from clara_jax.training.trainable import split_trainable
from tests import clara_fixtures as fx


def _entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_diagnostics_match_their_definitions():
    scores = np.array([[0.3, 0.1, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    indices = np.array([[0], [0]], np.int32)  # top-1: candidate 0 in both rows
    positives = np.array([[False, True, False, False], [True, False, False, False]])
    valid = np.ones_like(positives)
    tau = 0.1
    got = {k: float(v) for k, v in retrieval_diagnostics(scores, indices, positives, valid, tau).items()}

    np.testing.assert_allclose(got["score_std"], scores.std(axis=1).mean(), rtol=1e-5)
    gaps = [s[0] - s[1:].mean() for s in scores]
    np.testing.assert_allclose(got["topk_gap"], np.mean(gaps), rtol=1e-5)
    soft = np.exp(scores / tau) / np.exp(scores / tau).sum(1, keepdims=True)
    np.testing.assert_allclose(got["topk_entropy"], np.mean([_entropy(r) for r in soft]), rtol=1e-5)
    assert got["gold_outside_topk"] == 0.5  # row 0 missed its gold, row 1 picked it


def test_diagnostics_ignore_invalid_candidates_and_unlabelled_questions():
    scores = np.array([[0.5, 0.1, 9.0], [0.2, 0.4, 0.0]], np.float32)
    valid = np.array([[True, True, False], [True, True, True]])
    indices = np.array([[0], [1]], np.int32)
    positives = np.array([[False, True, False], [False, False, False]])  # row 1 has no gold
    got = retrieval_diagnostics(scores, indices, positives, valid, 0.5)
    np.testing.assert_allclose(float(got["score_std"]), (0.2 + scores[1].std()) / 2, rtol=1e-5)
    assert float(got["gold_outside_topk"]) == 1.0  # of the one labelled question


@pytest.mark.slow  # two compilations of the stage-3 train step: ~50 s on a shared 2-core CPU
def test_train_step_reports_gradient_norms_and_diagnostics_and_the_cut_stops_the_query_reasoner():
    """`straight_through=False` leaves the forward as it is and gives the query reasoner no gradient;
    the step reports that per adapter, next to the retrieval diagnostics."""
    model, cfg = fx.tiny_clara(), fx.clara_config()
    batch = jax.tree.map(lambda x: x[None], fx.stage3_batch())
    graphdef, params, frozen = split_trainable(model, ["query_reasoner", "generator"], False)
    runs = {}
    for straight_through in (True, False):
        tx = optax.sgd(0.0)
        loss_fn = stage_loss_fn("stage3", cfg, straight_through=straight_through)
        step = jax.jit(make_train_step(graphdef, loss_fn, tx))
        _, metrics = step(TrainState.create(params, tx, jax.random.key(0)), frozen, batch)
        assert {"score_std", "topk_gap", "topk_entropy", "gold_outside_topk"} <= set(metrics)
        runs[straight_through] = {k: float(v) for k, v in metrics.items()}
    with_st, cut = runs[True], runs[False]
    assert with_st["loss"] == cut["loss"] and with_st["recall@1"] == cut["recall@1"]  # same forward
    np.testing.assert_allclose(
        with_st["grad_norm"],
        np.hypot(with_st["grad_norm/query_reasoner"], with_st["grad_norm/generator"]),
        rtol=1e-5,
    )
    assert with_st["grad_norm/query_reasoner"] > 1e-6
    assert cut["grad_norm/query_reasoner"] == 0.0 and cut["grad_norm/generator"] > 1e-4


@pytest.mark.slow
def test_dev_retrieval_ranks_with_the_query_reasoner():
    """With the query reasoner equal to the compressor, a candidate whose text is the question
    itself scores cosine 1: recall@1 is 1 when that candidate is the gold, 0 when another is."""
    from clara_jax.training.build import build_model
    from clara_jax.training.config import load_config

    config = load_config("configs/stage3_e2e.py:tiny", ["--config.clara.doc_max_length=32"])
    built = build_model(config)  # fresh adapters: query reasoner == compressor == base
    questions = ["Where does Tavo live?", "What colour does Mirel like?", "Who is Kasu's mentor?"]
    fillers = ["Bino keeps a cat.", "Lupa works as a baker.", "Sere was born in 1961."]

    def records(gold_is_question: bool):
        out = []
        for q in questions:
            docs = (*fillers, q)
            out.append(RetrievalRecord(q, "x", ("x",), docs, (3 if gold_is_question else 0,)))
        return out

    for gold_is_question, expected in ((True, 1.0), (False, 0.0)):
        dev = DevRetrieval(records(gold_is_question), built.tokenizer, built.clara, n_questions=2, ks=(1, 2))
        scores = dev.evaluate(built.model)
        assert dev.questions == 2 and set(scores) == {"recall@1", "recall@2"}
        assert scores["recall@1"] == expected
    # the candidates are compressed once and reused (the compressor is frozen in stage 3)
    memory = dev.candidate_memory(built.model)
    assert dev.candidate_memory(built.model) is memory and memory.shape[:2] == (2, 4)
    assert bool(jnp.all(jnp.isfinite(memory)))
    # records of different widths: every candidate is ranked (a gold beyond the narrowest record's
    # width is found) and the narrow record's padding never is
    wide = RetrievalRecord(
        questions[1], "x", ("x",), (*fillers, "Dapo likes red.", "Nuvi keeps a hen.", questions[1]), (5,)
    )
    narrow = RetrievalRecord(questions[0], "x", ("x",), (fillers[0], questions[0]), (1,))
    dev = DevRetrieval([narrow, wide], built.tokenizer, built.clara, n_questions=2, ks=(1, 5))
    assert dev.n_candidates == 6 and dev.ks == (1, 2)
    assert dev.evaluate(built.model)["recall@1"] == 1.0


@pytest.mark.slow
def test_stage3_run_logs_diagnostics_and_dev_recall_to_every_sink(tmp_path):
    """A 2-step stage-3 run with `data.eval_every=1`: dev Recall@k, the eval loss and the answer
    scores before and after each step, the diagnostics and the query reasoner's gradient norm in
    metrics.jsonl, TensorBoard and the plots; the best step is the highest dev Recall@1."""
    from clara_jax.data.synthetic import SyntheticCorpusConfig, write_corpus
    from clara_jax.training.config import load_config
    from clara_jax.training.loop import run_training
    from clara_jax.training.metrics import read_history

    files = write_corpus(
        tmp_path / "data",
        SyntheticCorpusConfig(
            n_entities=40, n_distractors=0, n_candidates=8, n_hard_negatives=2, n_stage2_train=8,
            n_stage3_train=16, n_eval=8, docs_per_example=2,
        ),
    )  # fmt: skip
    config = load_config(
        "configs/stage3_e2e.py:tiny,runlocal",
        [
            f"--config.data.train={files['stage3_train']}",
            f"--config.data.eval={files['eval_with_pos']}",
            "--config.data.eval_every=1",
            "--config.data.eval_questions=4",
            "--config.data.candidates=8",
            "--config.clara.top_k=2",
            "--config.clara.doc_max_length=32",
            "--config.clara.generator_max_length=256",
            "--config.batch.global_size=4",
            "--config.batch.micro_size=4",
            "--config.total_steps=2",
            "--config.log_every=1",
        ],
    )
    summary = run_training(config, str(tmp_path / "run"), progress=False)
    rows = read_history(str(tmp_path / "run" / "metrics.jsonl"))
    dev_steps = sorted(r["step"] for r in rows if "dev/recall@1" in r)
    assert dev_steps == [0, 1, 2]
    train = [r for r in rows if "train/loss" in r]
    for key in ("score_std", "topk_gap", "topk_entropy", "gold_outside_topk", "grad_norm/query_reasoner"):
        assert all(np.isfinite(r[f"train/{key}"]) for r in train), key
    assert all(r["train/grad_norm/query_reasoner"] > 0 for r in train)
    assert all(0.0 <= r["dev/recall@2"] <= 1.0 for r in rows if "dev/recall@2" in r)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:  # stage 3's own loss (CE only) and the answers from its top-k, on the same dev records
        assert np.isfinite(r["eval/ce"]) and r["eval/loss"] == r["eval/ce"] and "eval/mse" not in r
        assert all(0.0 <= r[f"eval/{k}"] <= 1.0 for k in ("em", "f1", "cover_em", "token_accuracy"))
    dev_rows = [r for r in rows if "dev/recall@1" in r]
    best = max(dev_rows, key=lambda r: (r["dev/recall@1"], -r["step"]))  # the earliest of the highest
    assert summary.best["metric"] == "dev/recall@1" and summary.best_step == best["step"]
    assert evals[-1]["eval/best_step"] == best["step"]
    names = {os.path.basename(p) for p in summary.plots}
    assert {"retrieval_diagnostics.png", "grad_norm.png", "recall.png", "answers.png", "loss.png"} <= names
    scalars = fx.tensorboard_scalars(tmp_path / "run" / "tensorboard")
    for tag in ("dev/recall_at_1", "eval/loss", "eval/em", "eval/f1", "eval/cover_em", "eval/best_step"):
        assert [step for step, _ in scalars[tag]] == [0, 1, 2], tag
