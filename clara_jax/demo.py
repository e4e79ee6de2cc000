"""The embedded default: all three CLaRa stages on a seeded synthetic corpus, on a laptop CPU.

1. write the synthetic knowledge corpus (clara_jax.data.synthetic) into WORKDIR/data;
2. score the untrained model (fresh adapters) on the held-out evaluation questions;
3. train stage 1 (SCP) -> stage 2 (instruction tuning) -> stage 3 (end to end), each stage
   starting from the previous one's checkpoint, exactly as `clara-jax train` does, each evaluated
   during training on the dev people's questions (never the evaluation ones): stage 1 and 2 on
   records of their own layout derived from `dev_with_pos.jsonl` (`dev_stage_files`), stage 3 on
   that file itself;
4. score the trained model the same way and print the before/after table.

Every number is measured in the run; nothing is scripted. Re-running resumes each stage from
its checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import time

from clara_jax.data.sources import read_records
from clara_jax.data.synthetic import SyntheticCorpusConfig, chance_recall, write_corpus
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer
from clara_jax.formats.jsonl import read_json_lines
from clara_jax.inference.clara_model import ClaraInference
from clara_jax.inference.evaluate import evaluate_gold_ablation, evaluate_retrieval_qa
from clara_jax.interop.model_dir import load_clara_model
from clara_jax.model.config import tiny_config
from clara_jax.model.stage_registry import STAGE_NAMES, get_stage
from clara_jax.training.build import build_model
from clara_jax.training.config import load_config
from clara_jax.training.loop import run_training
from clara_jax.training.pretrain_base import base_ready, corpus_texts, pretrain_base

# The demo's base LLM: small enough for a laptop CPU, big enough to learn the corpus's language.
# Stage-3 optimizer steps at scale 1 (batch 32).
STAGE3_STEPS = 50
DEMO_BASE = tiny_config(
    hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32
)


# Evaluation during training (training/stage_eval.py), on the dev split: records per evaluation (a
# multiple of the stage's micro-batch) and answer length (the final evaluation's).
DEV_EVAL_RECORDS = {"stage1": 16, "stage2": 32}
EVAL_MAX_NEW_TOKENS = 12


def dev_stage_files(data_dir: str, docs_per_example: int = 5, seed: int = 0) -> dict[str, str]:
    """Stage-1 and stage-2 records for evaluation during training, derived from the dev split
    (`dev_with_pos.jsonl`: the dev people, held out like the evaluation ones and used only to choose
    settings), so no stage is ever evaluated on the final evaluation questions.

    - `stage1_dev.jsonl`: one QA record per dev passage that answers a single-hop dev question, with
      every such question about it (the stage-1 QA layout: the compressed passage must carry the
      answers);
    - `stage2_dev.jsonl`: each dev question with `docs_per_example` of its candidates, every gold
      passage among them and the rest its first non-gold candidates, in a seeded order (the stage-2
      layout), and its gold answer as the target.
    """
    dev = read_json_lines(os.path.join(data_dir, "dev_with_pos.jsonl"))
    by_passage: dict[str, list] = {}
    for r in dev:
        if len(r["pos_index"]) == 1:  # a single-hop question: one passage holds the answer
            qa = by_passage.setdefault(r["docs"][r["pos_index"][0]], [[], []])
            qa[0].append(r["question"])
            qa[1].append(r["golden_answers"][0])
    stage1 = [
        {"data_type": "qa", "question": qs, "answers": answers, "docs": [doc]}
        for doc, (qs, answers) in by_passage.items()
    ]
    rng = random.Random(seed)
    stage2 = []
    for r in dev:
        gold = list(r["pos_index"])[:docs_per_example]
        others = [i for i in range(len(r["docs"])) if i not in r["pos_index"]]
        picked = gold + others[: docs_per_example - len(gold)]
        rng.shuffle(picked)
        stage2.append(
            {
                "question": r["question"],
                "docs": [r["docs"][i] for i in picked],
                "answer": r["golden_answers"][0],
            }
        )
    paths = {}
    for stage, records in (("stage1", stage1), ("stage2", stage2)):
        paths[stage] = os.path.join(data_dir, f"{stage}_dev.jsonl")
        with open(paths[stage], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def stage_overrides(data_dir: str, base_dir: str, scale: float, seed: int = 0) -> dict[str, list[str]]:
    """Settings of the demo's three runs (tiny model, short synthetic passages)."""
    dev_files = dev_stage_files(data_dir, seed=seed)
    eval_every = lambda n: f"--config.data.eval_every={max(int(n * scale), 1)}"  # noqa: E731
    common = [
        f"--config.seed={seed}",
        f"--config.model.path={base_dir}",
        "--config.model.dtype=float32",
        "--config.clara.doc_max_length=48",
        "--config.clara.compression_rate=8",
        "--config.clara.query_max_length=24",
        "--config.clara.generator_max_length=256",
        "--config.lora.rank=16",
        "--config.lora.alpha=32",
        "--config.lora.dropout=0.0",
        "--config.checkpoint.every_steps=50",
        "--config.log_every=5",
        f"--config.data.eval_max_new_tokens={EVAL_MAX_NEW_TOKENS}",
    ]
    steps = lambda n: f"--config.total_steps={max(int(n * scale), 2)}"  # noqa: E731
    return {
        "stage1": common
        + [
            f"--config.data.train={data_dir}/stage1_train.jsonl",
            f"--config.data.eval={dev_files['stage1']}",
            eval_every(25),
            f"--config.data.eval_questions={DEV_EVAL_RECORDS['stage1']}",
            "--config.data.num_epochs=20",
            "--config.batch.global_size=16",
            "--config.batch.micro_size=16",
            "--config.optim.lr=3e-3",
            steps(100),
        ],
        "stage2": common
        + [
            f"--config.data.train={data_dir}/stage2_train.jsonl",
            f"--config.data.eval={dev_files['stage2']}",
            eval_every(20),
            f"--config.data.eval_questions={DEV_EVAL_RECORDS['stage2']}",
            "--config.batch.global_size=16",
            "--config.batch.micro_size=16",
            "--config.optim.lr=2e-3",
            steps(60),
        ],
        "stage3": common
        + [
            f"--config.data.train={data_dir}/stage3_train.jsonl",
            # dev Recall@k on the dev people (never the eval ones): where stage-3 settings are chosen
            f"--config.data.eval={data_dir}/dev_with_pos.jsonl",
            eval_every(25),
            f"--config.data.eval_questions={max(int(125 * scale), 8)}",
            # chosen on the dev split over 3 seeds (benchmarks/demo_stage3_dev.py, README): from
            # stage-2 dev Recall@1 0.224/0.400/0.276, batch 32 reached 0.296/0.476/0.412, batch 16
            # 0.300/0.400/0.380; lr 1e-4 0.252, 4e-4 0.236, 1e-3 fell to ~0.1; τ 0.05 0.284 (seed 0)
            "--config.batch.global_size=32",
            "--config.batch.micro_size=8",
            "--config.optim.lr=2e-4",
            "--config.clara.top_k=5",
            steps(STAGE3_STEPS),
        ],
    }


def _evaluate(built_tok, model, clara, records, reader_check: bool = False, query_encoder="query_reasoner"):
    inference = ClaraInference(
        built_tok, model, clara, batch_size=25, query_max_length=24, query_encoder=query_encoder
    )
    result = evaluate_retrieval_qa(inference, records, k=clara.top_k, max_new_tokens=12)
    scores = result["scores"]
    if reader_check:  # does the generator read? (the answers with and without the gold passages)
        ablation = evaluate_gold_ablation(
            inference, records, k=clara.top_k, max_new_tokens=12, memory=result["memory"]
        )
        scores.update({f"em_{name}": s["em"] for name, s in ablation["scores"].items()})
    return scores


def run_demo(
    workdir: str,
    *,
    scale: float = 1.0,
    n_eval: int = 200,
    seed: int = 0,
    log=print,
) -> dict:
    """`seed` seeds the base pretraining and every stage; the corpus and its questions are fixed."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    data_dir = os.path.join(workdir, "data")
    files = write_corpus(data_dir, SyntheticCorpusConfig())
    log(
        f"[demo] synthetic corpus in {data_dir}: "
        + ", ".join(
            f"{name} {sum(1 for _ in open(path))}"
            for name, path in files.items()
            if str(path).endswith(".jsonl")
        )
    )
    eval_records, _ = read_records(str(files["eval_with_pos"]), "eval")
    eval_records = eval_records[:n_eval]
    raw_eval = read_json_lines(files["eval_with_pos"])[:n_eval]

    base_dir = os.path.join(workdir, "base")
    if not base_ready(base_dir):
        log(f"[demo] pretraining a tiny base LLM on the training passages -> {base_dir}")
        tok = load_tokenizer(TINY_TOKENIZER_DIR)
        texts = corpus_texts(read_json_lines(files["stage1_train"]))
        pretrain_base(
            DEMO_BASE.replace(vocab_size=tok.base_vocab_size),
            tok,
            texts,
            steps=max(int(200 * scale), 2),
            out_dir=base_dir,
            seed=seed,
            log=log,
        )
    overrides = stage_overrides(data_dir, base_dir, scale, seed)
    configs = {
        stage: load_config(get_stage(stage).config_module + ":tiny,runlocal", overrides[stage])
        for stage in STAGE_NAMES
    }

    log("[demo] scoring the untrained model (fresh adapters) ...")
    fresh = build_model(configs["stage3"])
    # fresh adapters: compressor = query reasoner = the base; ranking by the compressor says so plainly
    before = _evaluate(fresh.tokenizer, fresh.model, fresh.clara, eval_records, query_encoder="compressor")

    previous, summaries, after_stage2 = "", {}, None
    for stage in STAGE_NAMES:
        config = configs[stage]
        config.init_from = previous
        stage_dir = os.path.join(workdir, stage)
        log(f"[demo] training {stage} ({config.total_steps} steps) in {stage_dir}")
        summaries[stage] = run_training(config, stage_dir)
        previous = stage_dir
        successor = get_stage(stage).successor
        if successor is not None and successor.query_from_compressor:
            # what stage 3 starts from: its query reasoner is this compressor
            tok, model, clara = load_clara_model(os.path.join(stage_dir, "model"))
            after_stage2 = _evaluate(
                tok, model, clara, eval_records, reader_check=True, query_encoder="compressor"
            )

    after = _evaluate(*load_clara_model(os.path.join(previous, "model")), eval_records, reader_check=True)
    chance = {"recall@1": chance_recall(raw_eval, 1), "recall@5": chance_recall(raw_eval, 5)}
    result = {
        "before": before,
        "after_stage2": after_stage2,
        "after": after,
        "chance": chance,
        "n_eval": len(eval_records),
        "seconds": time.perf_counter() - start,
        "plots": {s: summaries[s].plots for s in summaries},
        # the best evaluation during training (lowest dev eval loss in stages 1-2, highest dev Recall@1 in stage 3)
        "best": {s: summaries[s].best for s in summaries},
    }
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(format_results(result))
    return result


def format_results(result: dict) -> str:
    rows = [
        ("Recall@1 (stage-3 reranking)", "recall@1"),
        ("Recall@5", "recall@5"),
        ("answer EM", "em"),
        ("answer F1", "f1"),
        ("answer Cover-EM", "acc"),
        ("answer EM, gold among the 5", "em_with_gold"),
        ("answer EM, no gold among the 5", "em_without_gold"),
    ]
    lines = [
        f"held-out questions: {result['n_eval']} (each with 20 candidate passages, gold among them)",
        f"{'metric':<32}{'chance':>9}{'before':>9}{'stage 2':>9}{'stage 3':>9}",
    ]

    def cell(column: str, key: str) -> str:
        value = result[column].get(key)
        return f"{'' if value is None else f'{value:.3f}':>9}"

    for label, key in rows:
        lines.append(
            f"{label:<32}{cell('chance', key)}{cell('before', key)}{cell('after_stage2', key)}{cell('after', key)}"
        )
    lines.append(
        "(before: fresh adapters; stage 2: after stages 1-2 with the query reasoner = the compressor; "
        "stage 3: after all three stages; the last two rows give the generator 5 compressed "
        "candidates with every gold passage among them, or none: equal EMs mean it answers from the "
        "question alone, which leaves stage 3 little to learn from)"
    )
    lines.append(f"wall time: {result['seconds'] / 60:.1f} min")
    for stage, best in result.get("best", {}).items():
        if best:
            lines.append(
                f"{stage} best dev evaluation during training: step {best['step']} "
                f"({best['metric']} {best['value']:.3f})"
            )
    for stage, paths in result["plots"].items():
        if paths:
            lines.append(f"{stage} plots: {', '.join(paths)}")
    return "\n".join(lines)
