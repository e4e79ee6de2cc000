"""Evaluation during training (training/stage_eval.py): the eval loss is the stage's training loss
without dropout, the answers are ClaraInference's and are scored by the official metrics, the best
step, the config checks, and a run that logs all of it to metrics.jsonl, TensorBoard and the plots."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from clara_jax.data.pipeline import to_micro_steps, tokenize_compression
from clara_jax.data.records import InstructionRecord
from clara_jax.data.sources import read_records
from clara_jax.data.synthetic import SyntheticCorpusConfig, write_corpus
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.inference.metrics import qa_scores
from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_clara_parts
from clara_jax.parallel.mesh import MeshConfig, make_mesh
from clara_jax.training.build import BuiltModel
from clara_jax.training.config import ConfigError, load_config
from clara_jax.training.objectives import stage_loss_fn
from clara_jax.training.run_spec import clara_settings, layout_config, lora_config, stage_spec_of
from clara_jax.training.stage_eval import BestStep, usable_count
from clara_jax.training.trainable import split_trainable
from tests import clara_fixtures as fx

CONFIGS = {
    "stage1": "configs/stage1_scp.py",
    "stage2": "configs/stage2_instruct.py",
    "stage3": "configs/stage3_e2e.py",
}
SMALL = SyntheticCorpusConfig(
    n_entities=40, n_distractors=0, n_candidates=8, n_hard_negatives=2, n_stage2_train=8,
    n_stage3_train=16, n_eval=8, docs_per_example=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), SMALL)


def _config(stage: str, eval_file, extra=()):
    return load_config(
        f"{CONFIGS[stage]}:tiny,runlocal",
        [
            f"--config.data.eval={eval_file}",
            "--config.data.eval_every=1",
            "--config.data.eval_questions=8",
            f"--config.clara.docs_per_example={2 if stage == 'stage2' else 1}",
            "--config.data.candidates=8",
            "--config.clara.top_k=2",
            "--config.clara.doc_max_length=32",
            "--config.clara.generator_max_length=256",
            "--config.batch.global_size=4",
            "--config.batch.micro_size=4",
            *extra,
        ],
    )


_MODELS = {}


def _built(config) -> BuiltModel:
    """A tiny model of `config`'s settings (the same shapes and LoRA for every config here, built
    once), its adapters' B factors non-zero so that each adapter, and its dropout, changes the
    function. Built directly: build_model's sharded initialisation is slower on a shared CPU."""
    settings = clara_settings(config)
    if not _MODELS:
        tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=settings.n_mem)
        model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
        add_clara_parts(
            model,
            vocab_size=tok.vocab_size,
            mem_token_ids=tok.mem_token_ids,
            lora=lora_config(config),
            seed=0,
        )
        for i, adapter in enumerate(model.adapters.values()):
            for f in adapter.factors.values():
                f["b"].set_value(0.05 * jax.random.normal(jax.random.key(i), f["b"].shape))
        _MODELS.update(tok=tok, model=model)
    tok, model = _MODELS["tok"], _MODELS["model"]
    assert tok.n_mem == settings.n_mem and model.adapters["generator"].lora_config == lora_config(config)
    return BuiltModel(tok, model, settings.model_config(tok.mem_token_ids))


def _evaluator(config, records):
    """The loop's evaluator (training/loop.py stage_eval) of the tiny model, on one device."""
    from clara_jax.training.loop import stage_eval

    mesh = make_mesh(MeshConfig.from_spec(config.mesh), devices=jax.devices()[:1])
    built = _built(config)
    spec = stage_spec_of(config)
    graphdef, params, frozen = split_trainable(built.model, spec.adapters, spec.state_has_rows)
    with jax.set_mesh(mesh):
        evaluator = stage_eval(config, built, records, graphdef, mesh)
    return built, evaluator, graphdef, params, frozen


@pytest.mark.slow  # a tiny model built and three programs compiled: 17-30 s on the shared 2-core machine
def test_the_eval_loss_is_the_training_loss_without_dropout(corpus):
    """Stage 1 (QA and paraphrase records): the evaluation's loss terms are the training loss
    function's on the same micro-batches, tokenized as the training pipeline does, of the same
    weights without dropout; the model's LoRA dropout (0.1 here) is off in the evaluation."""
    config = _config("stage1", corpus["stage1_eval"], ["--config.data.eval_questions=9"])
    records, _ = read_records(corpus["stage1_eval"], "stage1")
    built, evaluator, graphdef, params, frozen = _evaluator(config, records)
    assert evaluator.questions == 8 and evaluator.micro_steps == 2 and not evaluator.answered  # 9 -> 8
    got = evaluator.evaluate(params, frozen)
    assert set(got) == {"loss", "ce", "mse", "token_accuracy"}

    arrays, _ = tokenize_compression(
        built.tokenizer, records[:8], layout_config(config), np.random.default_rng([config.seed, 2])
    )
    micro = to_micro_steps(arrays, 8, 4, {"enc_ids": 1, "enc_mask": 1})
    train_loss = jax.jit(stage_loss_fn("stage1", built.clara))  # train mode: dropout where the model has it

    def mean_train_metrics(model):
        per_micro = [
            train_loss(model, {k: v[i] for k, v in micro.items()}, jax.random.key(i))[1] for i in range(2)
        ]
        return {key: np.mean([float(m[key]) for m in per_micro]) for key in got}

    model = nnx.merge(graphdef, params, frozen)
    assert model.adapters["compressor"].lora_config.dropout == 0.1
    assert abs(mean_train_metrics(model)["ce"] - got["ce"]) > 1e-4  # training draws dropout
    for adapter in model.adapters.values():  # the same weights without dropout
        adapter.lora_config = dataclasses.replace(adapter.lora_config, dropout=0.0)
    expected = mean_train_metrics(model)
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_the_best_step_is_the_lowest_eval_loss_or_the_highest_dev_recall():
    loss = BestStep.for_stage("stage2")
    assert (loss.metric, loss.mode) == ("eval/loss", "min")
    rows = [{"step": 0, "eval/loss": 3.0}, {"step": 5, "train/loss": 1.0}, {"step": 10, "eval/loss": 2.0},
            {"step": 20, "eval/loss": 2.0}, {"step": 30, "eval/loss": float("nan")}]  # fmt: skip
    loss.restore(rows)  # a resumed run's history
    assert (loss.step, loss.value) == (10, 2.0)  # a tie keeps the earlier step, NaN never wins
    assert loss.update(40, {"eval/loss": 1.5}) and loss.as_dict() == {
        "metric": "eval/loss", "mode": "min", "step": 40, "value": 1.5,
    }  # fmt: skip
    recall = BestStep.for_stage("stage3")
    assert (recall.metric, recall.mode) == ("dev/recall@1", "max")
    recall.restore(
        [
            {"step": 0, "dev/recall@1": 0.2, "eval/loss": 1.0},
            {"step": 5, "dev/recall@1": 0.3, "eval/loss": 9.0},
        ]
    )
    assert recall.step == 5
    assert usable_count(30, 64, 8) == 24 and usable_count(100, 20, 8) == 16 and usable_count(5, 64, 8) == 0


def test_config_checks_name_the_eval_fields():
    for stage in CONFIGS:
        with pytest.raises(ConfigError) as err:
            load_config(
                f"{CONFIGS[stage]}:tiny",
                [
                    "--config.data.eval_every=5",
                    "--config.data.eval_questions=4",
                    "--config.data.eval_max_new_tokens=-1",
                ],
            )
        text = str(err.value)
        assert "data.eval = '': expected" in text and "when data.eval_every > 0" in text, text
        assert "data.eval_questions = 4: expected >= batch.micro_size = 8" in text
        assert "data.eval_max_new_tokens = -1: expected >= 0" in text
    with pytest.raises(ConfigError, match="data.eval = '': expected an evaluation file with pos_index"):
        load_config(
            f"{CONFIGS['stage3']}:tiny", ["--config.data.eval_every=1", "--config.batch.micro_size=1"]
        )
    # off, none of it is needed; on, a file and whole micro-batches are
    load_config(f"{CONFIGS['stage2']}:tiny", ["--config.data.eval_questions=1"])
    load_config(f"{CONFIGS['stage2']}:tiny", ["--config.data.eval_every=5", "--config.data.eval=dev.jsonl"])


def test_eval_records_are_checked_before_a_model_is_built(corpus, tmp_path):
    from clara_jax.data.records import DataError
    from clara_jax.training.loop import read_eval_records

    config = _config("stage3", corpus["eval_no_pos"], ["--config.data.eval_questions=4"])
    no_gold = tmp_path / "no_gold.jsonl"
    rows = [json.loads(line) for line in open(corpus["eval_with_pos"])]
    no_gold.write_text("".join(json.dumps({**r, "pos_index": []}) + "\n" for r in rows))
    config.data.eval = str(no_gold)
    with pytest.raises(DataError, match="data.eval = .*no_gold.jsonl: no record has pos_index"):
        read_eval_records(config)
    config = _config("stage2", corpus["stage2_eval"], ["--config.batch.micro_size=4"])
    one = tmp_path / "one.jsonl"
    one.write_text(open(corpus["stage2_eval"]).readline())
    config.data.eval = str(one)
    with pytest.raises(DataError, match=r"too few for one evaluation micro-batch \(batch.micro_size = 4\)"):
        read_eval_records(config)


@pytest.mark.slow  # two stages' evaluations and ClaraInference's programs compiled: ~60 s on 2 shared cores
@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_answers_are_clara_inference_answers_scored_by_the_official_metrics(corpus, stage):
    """The evaluation answers as `clara-jax eval` would (stage 2: the record's documents in order;
    stage 3: the query reasoner's top-k of the candidates, in score order), and scores them with the
    official metrics; a record whose gold is what the model says scores EM 1."""
    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.inference.evaluate import evaluate_retrieval_qa

    eval_file = corpus["stage2_eval" if stage == "stage2" else "eval_with_pos"]
    config = _config(stage, eval_file)
    records, _ = read_records(eval_file, "stage2" if stage == "stage2" else "eval")
    built, evaluator, graphdef, params, frozen = _evaluator(config, records)
    assert evaluator.answered and evaluator.questions == 8
    got = evaluator.evaluate(params, frozen)
    answers = evaluator.last_answers
    assert len(answers) == 8 and {"em", "f1", "cover_em", "loss", "ce"} <= set(got)

    model = nnx.merge(graphdef, params, frozen)
    inference = ClaraInference(
        built.tokenizer, model, built.clara, batch_size=4, bucket=config.data.bucket,
        query_max_length=config.clara.query_max_length, data_parallel=False,
    )  # fmt: skip
    chosen = records[:8]
    if stage == "stage2":
        expected = inference.generate_from_text(
            [r.question for r in chosen], [list(r.docs) for r in chosen], max_new_tokens=16
        )
        golds = [[r.answer] for r in chosen]
    else:
        chosen = [dataclasses.replace(r, docs=r.docs[:8]) for r in chosen]  # the step's candidates
        expected = evaluate_retrieval_qa(inference, chosen, k=2, max_new_tokens=16, ks=(1, 2))["answers"]
        golds = [list(r.answers) for r in chosen]
    assert answers == expected
    official = qa_scores(expected, golds)
    assert (got["em"], got["f1"], got["cover_em"]) == (official["em"], official["f1"], official["acc"])

    # the same questions with the model's own answers as their golds: every answer is exact
    forced = (
        [InstructionRecord(r.question, r.docs, a) for r, a in zip(chosen, answers)]
        if stage == "stage2"
        else [dataclasses.replace(r, answer=a, answers=(a,)) for r, a in zip(chosen, answers)]
    )
    _, again, *_ = _evaluator(config, forced)
    scores = again.evaluate(params, frozen)
    assert again.last_answers == answers and scores["em"] == 1.0 and scores["cover_em"] == 1.0


@pytest.mark.slow  # a 2-step stage-2 run with three evaluations: ~40 s on 2 shared cores
def test_a_run_logs_eval_loss_answers_and_best_step_to_every_sink(corpus, tmp_path):
    from clara_jax.training.loop import run_training
    from clara_jax.training.metrics import read_history

    config = _config(
        "stage2",
        corpus["stage2_eval"],
        [f"--config.data.train={corpus['stage2_train']}", "--config.total_steps=2", "--config.log_every=1"],
    )
    workdir = tmp_path / "run"
    summary = run_training(config, str(workdir), progress=False)
    rows = read_history(str(workdir / "metrics.jsonl"))
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert {"eval/ce", "eval/mse", "eval/token_accuracy", "eval/best_step"} <= set(r)
        assert all(0.0 <= r[f"eval/{k}"] <= 1.0 for k in ("em", "f1", "cover_em"))
    best = min(evals, key=lambda r: r["eval/loss"])
    assert summary.best == {
        "metric": "eval/loss",
        "mode": "min",
        "step": best["step"],
        "value": best["eval/loss"],
    }
    assert summary.best_step == evals[-1]["eval/best_step"] == best["step"]
    scalars = fx.tensorboard_scalars(workdir / "tensorboard")
    for tag in ("eval/loss", "eval/ce", "eval/mse", "eval/em", "eval/f1", "eval/cover_em", "eval/best_step"):
        assert [s for s, _ in scalars[tag]] == [0, 1, 2], tag
    np.testing.assert_allclose(
        [v for _, v in scalars["eval/loss"]], [r["eval/loss"] for r in evals], rtol=1e-6
    )
    names = {os.path.basename(p) for p in summary.plots}
    assert {"loss.png", "answers.png", "accuracy.png"} <= names

    # step times run from completion to completion with the compilation kept out (issue #18): the
    # utilisation against the measured matmul peak is a share, the same figure in every sink
    train = [r for r in rows if "train/utilisation" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0 < r["train/utilisation"] <= 1 for r in train), train
    np.testing.assert_allclose(
        [v for _, v in scalars["train/utilisation"]], [r["train/utilisation"] for r in train], rtol=1e-6
    )
    # one compilation per batch shape (bucketed lengths), each timed, the first before step 0 (the
    # memory check compiles the first batch's shape ahead, and step 1 runs that executable)
    shapes = [str(c["shapes"]) for c in summary.compiles]
    assert summary.compiles[0]["step"] == 0 and len(set(shapes)) == len(shapes) <= 2
    assert all(c["seconds"] > 0 and "gen_ids" in c["shapes"] for c in summary.compiles)
