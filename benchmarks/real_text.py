"""CLaRa stages 1 -> 2 -> 3 and the evaluation on real text, SmolLM2-135M-Instruct on a CPU.

    python benchmarks/real_text.py --workdir runs/real          # the full run (71.7 min measured on 2 cores)
    python benchmarks/real_text.py --workdir /tmp/rt --quick    # smoke run: minutes, numbers mean nothing
    clara-jax eval --model runs/real/stage3/model --data runs/real/data/test.jsonl -k 5

Data (../shared/data, see its README):
  stage 1   the official SCP sample, train lines 0-799 (QA targets, cut to --stage1-generator-length);
  stage 2-3 the MuSiQue and HotpotQA training subsets (100 questions each), split by position within
            each file: questions 0-64 train, 65-74 dev (stage-3 dev Recall@k), 75-99 test (reported).
Every question is scored among CANDIDATES passages: its gold passages (2-4), then its own distractors
in file order, filled from other questions' passages when it has too few (4 HotpotQA questions
have 4), shuffled. Stage 2 reads k=5 of them (the gold ones first, then distractors, shuffled).

Reported on the held-out test questions (rows of the tables):
  QA (answer F1 / Cover-EM / EM, the official metrics), 5 given documents = the stage-2 layout:
    compressed CR16, stage 2 / stage 3   the generator reading the 5 documents as memory vectors;
    end to end, stage 2 / stage 3        the query reasoner's top-5 of the CANDIDATES, compressed;
    full text (base)                     the plain base model reading the 5 documents as text;
    no document (base)                   the question alone.
  Retrieval Recall@1/@5 among CANDIDATES (recall = gold found / gold count, the official definition):
    query reasoner after stage 2         a copy of the trained compressor, as stage 3 starts it;
    query reasoner after stage 3;
    BM25 (rank-bm25, lowercase words), chance (k / CANDIDATES).
Nothing is tuned on the test questions; stage-3 settings may be chosen on the dev questions.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCP = SHARED / "clara_pretrain_sample.jsonl"
MUSIQUE = SHARED / "multihop_train" / "musique_train.json"
HOTPOTQA = SHARED / "multihop_train" / "hotpotqa_train.json"
SCP_TRAIN_LINES = 800
SPLITS = {"train": (0, 65), "dev": (65, 75), "test": (75, 100)}
CANDIDATES = 10
K = 5
KS = (1, 5)


# --- data -----------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_data(data_dir: Path, variants: int) -> dict[str, Path]:
    """Every file the run reads, written once from the shared data (deterministic)."""
    from clara_jax.data.multihop import instruction_record, passage_pool, retrieval_record, split_by_position
    from clara_jax.data.sources import hotpotqa_to_retrieval, musique_to_retrieval

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(SCP, encoding="utf-8") as f:
        scp = f.readlines()[:SCP_TRAIN_LINES]
    files = {"stage1": data_dir / "stage1_train.jsonl"}
    files["stage1"].write_text("".join(scp), encoding="utf-8")

    rows: dict[str, list[dict]] = {"stage2": [], "stage3": [], "dev": [], "test": [], "test_given": []}
    for records in (musique_to_retrieval(MUSIQUE)[0], hotpotqa_to_retrieval(HOTPOTQA)[0]):
        split = split_by_position(records, SPLITS)
        for name, part in split.items():
            pool = passage_pool(part)  # fillers come from the same split's passages
            for r in part:
                if name == "train":
                    for v in range(variants):  # the same question, other distractors' order
                        rows["stage2"].append(instruction_record(r, K, pool, seed=v))
                        rows["stage3"].append(retrieval_record(r, CANDIDATES, pool, seed=v))
                else:
                    rows[name].append(retrieval_record(r, CANDIDATES, pool))
                    if name == "test":
                        rows["test_given"].append(instruction_record(r, K, pool))
    for name, part in rows.items():
        files[name] = write_jsonl(data_dir / f"{name}.jsonl", part)
    return files


# --- training -------------------------------------------------------------------------------------


def stage_overrides(args, files: dict[str, Path], base_dir: str) -> dict[str, list[str]]:
    common = [
        f"--config.seed={args.seed}",
        f"--config.model.path={base_dir}",
        "--config.model.dtype=float32",
        f"--config.clara.doc_max_length={args.doc_max_length}",
        f"--config.clara.compression_rate={args.compression_rate}",
        "--config.clara.query_max_length=64",
        "--config.lora.rank=16",
        "--config.lora.alpha=32",
        "--config.log_every=2",
        "--config.checkpoint.async_save=False",
    ]
    steps = lambda n: [f"--config.total_steps={n}", f"--config.checkpoint.every_steps={max(n // 2, 1)}"]  # noqa: E731
    return {
        "stage1": common
        + steps(args.stage1_steps)
        + [
            f"--config.data.train={files['stage1']}",
            f"--config.clara.generator_max_length={args.stage1_generator_length}",
            f"--config.batch.global_size={args.batch}",
            f"--config.batch.micro_size={args.micro_batch}",
            f"--config.optim.lr={args.stage1_lr}",
        ],
        "stage2": common
        + steps(args.stage2_steps)
        + [
            f"--config.data.train={files['stage2']}",
            f"--config.data.num_epochs={args.epochs}",
            "--config.clara.generator_max_length=256",
            f"--config.batch.global_size={args.batch}",
            f"--config.batch.micro_size={args.micro_batch}",
            f"--config.optim.lr={args.stage2_lr}",
        ],
        "stage3": common
        + steps(args.stage3_steps)
        + [
            f"--config.data.train={files['stage3']}",
            f"--config.data.num_epochs={args.epochs}",
            f"--config.data.eval={files['dev']}",
            f"--config.data.eval_every={max(args.stage3_steps // 2, 1)}",
            "--config.data.eval_questions=20",
            "--config.clara.generator_max_length=256",
            f"--config.clara.top_k={K}",
            f"--config.batch.global_size={args.batch}",
            f"--config.batch.micro_size={args.micro_batch}",
            f"--config.optim.lr={args.stage3_lr}",
            "--config.optim.schedule=constant",
        ],
    }


def train(stage: str, overrides: list[str], workdir: Path, init_from: str, progress: bool) -> dict:
    from clara_jax.model.stage_registry import get_stage
    from clara_jax.training.config import load_config
    from clara_jax.training.loop import run_training

    config = load_config(f"{get_stage(stage).config_module}:smollm2_135m", overrides)
    config.init_from = init_from
    start = time.perf_counter()
    summary = run_training(config, str(workdir), progress=progress)
    seconds = time.perf_counter() - start
    return {
        "stage": stage,
        "workdir": str(workdir),
        "steps": summary.last_step,
        "steps_this_run": summary.last_step - summary.first_step,
        "seconds": seconds,
        "final_loss": summary.final_metrics.get("loss"),
        "plots": summary.plots,
    }


# --- evaluation -----------------------------------------------------------------------------------


def bm25_topk(questions: list[str], candidates: list[list[str]], k: int) -> list[list[int]]:
    from rank_bm25 import BM25Okapi

    def words(text):
        return re.findall(r"\w+", text.lower())

    out = []
    for q, docs in zip(questions, candidates):
        scores = BM25Okapi([words(d) for d in docs]).get_scores(words(q))
        out.append([int(i) for i in np.argsort(-scores, kind="stable")[:k]])
    return out


def compressor_state(model) -> list[np.ndarray]:
    import jax
    from flax import nnx

    from clara_jax.model.clara import COMPRESSOR

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.adapters[COMPRESSOR]))]


def evaluate_model(
    model_dir: Path, test, given, *, query_from_compressor: bool, batch_size: int, max_new: int, reuse=None
):
    """Retrieval and QA of one trained model on the test questions; each distinct test passage is
    compressed once and shared by the retrieval, the end-to-end answers and the given-docs answers.
    `reuse` = (compressor weights, memory) of an earlier model: stage 3 freezes the compressor, so
    when the weights are equal its memory vectors are too, and are not computed again."""
    from flax import nnx

    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.inference.metrics import qa_scores, retrieval_scores
    from clara_jax.interop.model_dir import load_clara_model
    from clara_jax.model.clara import COMPRESSOR, QUERY_REASONER

    tok, model, clara_cfg = load_clara_model(str(model_dir))
    if query_from_compressor:  # what stage 3 starts from
        nnx.update(model.adapters[QUERY_REASONER], nnx.state(model.adapters[COMPRESSOR]))
    clara = ClaraInference(tok, model, clara_cfg, batch_size=batch_size, query_max_length=64)
    timing = {}
    start = time.perf_counter()
    passages = list(dict.fromkeys(d for r in [*test, *given] for d in r.docs))
    where = {p: i for i, p in enumerate(passages)}
    weights = compressor_state(model)
    if reuse is not None and all(np.array_equal(a, b) for a, b in zip(weights, reuse[0])):
        memory = reuse[1]
    else:
        memory, _ = clara.compress_documents(passages)
    timing["compress_s"] = time.perf_counter() - start

    questions = [r.question for r in test]
    golds = [list(r.answers) for r in test]
    sets = np.array([[where[d] for d in r.docs] for r in test])
    start = time.perf_counter()
    topk, _ = clara.rerank(questions, candidate_memory=memory[sets], k=K)
    timing["rerank_s"] = time.perf_counter() - start
    retrieval = retrieval_scores(topk.tolist(), [list(r.pos_index) for r in test], ks=KS)

    answers = {}
    start = time.perf_counter()
    chosen = memory[np.take_along_axis(sets, topk, axis=1)]  # [Q, K, n_mem, D], score order
    answers["end to end"] = clara.generate_from_compressed_documents_and_questions(
        questions, chosen.reshape(-1, *chosen.shape[2:]), max_new
    )
    given_sets = np.array([[where[d] for d in r.docs] for r in given])
    given_memory = memory[given_sets]
    answers["compressed, 5 given"] = clara.generate_from_compressed_documents_and_questions(
        questions, given_memory.reshape(-1, *given_memory.shape[2:]), max_new
    )
    timing["generate_s"] = time.perf_counter() - start
    qa = {name: qa_scores(a, golds) for name, a in answers.items()}
    return retrieval, qa, answers, timing, (weights, memory)


def text_baselines(test_given, golds, *, doc_max_length: int, batch_size: int, max_new: int):
    """The plain base model with the 5 given documents as text (each cut as the compressor cuts it)
    and with no document, under the same system prompt."""
    from clara_jax.data.prompts import STANDARD_SYSTEM
    from clara_jax.inference.chat import load_chat_model
    from clara_jax.inference.metrics import qa_scores

    chat = load_chat_model("smollm2", batch_size=batch_size)
    hf = chat.tok.hf

    def cut(text: str) -> str:
        return hf.decode(hf(text, add_special_tokens=False)["input_ids"][:doc_max_length])

    conversations = {
        "full text (base)": [
            f"Background:\n{chr(10).join(cut(d) for d in r.docs)}\n\nQuestion:{r.question}"
            for r in test_given
        ],
        "no document (base)": [f"Question:{r.question}" for r in test_given],
    }
    qa, answers = {}, {}
    for name, users in conversations.items():
        results = chat.chat(
            [[{"role": "system", "content": STANDARD_SYSTEM}, {"role": "user", "content": u}] for u in users],
            max_new_tokens=max_new,
        )
        answers[name] = [r.text.strip() for r in results]
        qa[name] = qa_scores(answers[name], golds)
    return qa, answers


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run directory; a rerun resumes every stage")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps per stage, 8 test questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc-max-length", type=int, default=128)
    p.add_argument("--compression-rate", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="global batch of every stage")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage1-steps", type=int, default=20)
    p.add_argument("--stage1-generator-length", type=int, default=320, help="QA targets are cut here")
    p.add_argument("--stage1-lr", type=float, default=2e-4)
    p.add_argument("--stage2-steps", type=int, default=12)
    p.add_argument("--stage2-lr", type=float, default=2e-4)
    p.add_argument("--stage3-steps", type=int, default=32)
    p.add_argument("--stage3-lr", type=float, default=2e-4)
    p.add_argument(
        "--variants", type=int, default=1, help="copies of each training question (distractor order)"
    )
    p.add_argument("--epochs", type=int, default=2, help="data.num_epochs of stages 2 and 3")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=10, help="inference batch size")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.stage1_steps = args.stage2_steps = args.stage3_steps = 2
        args.batch = args.micro_batch = 2
        args.stage1_generator_length = 192
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    wall = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    from clara_jax.data.sources import read_records
    from clara_jax.inference.metrics import format_table
    from clara_jax.interop.gguf import smollm2_dir

    base_dir = smollm2_dir()  # the resolved directory: a saved model records its base by path
    files = write_data(workdir / "data", args.variants)
    test, _ = read_records(str(files["test"]), "eval")
    given, _ = read_records(str(files["test_given"]), "eval")
    if args.quick:
        test, given = test[:8], given[:8]
    overrides = stage_overrides(args, files, base_dir)

    runs, previous, reuse = {}, "", None
    results: dict = {"qa": {}, "retrieval": {}, "answers": {}, "timing": {}}
    for stage in ("stage1", "stage2", "stage3"):
        runs[stage] = train(stage, overrides[stage], workdir / stage, previous, not args.no_progress)
        previous = str(workdir / stage)
        print(f"{stage}: {runs[stage]['steps']} steps, {runs[stage]['seconds']:.0f} s", flush=True)
        if stage == "stage1":
            continue
        retrieval, qa, answers, timing, reuse = evaluate_model(
            workdir / stage / "model",
            test,
            given,
            query_from_compressor=stage == "stage2",
            batch_size=args.batch_size,
            max_new=args.max_new_tokens,
            reuse=reuse,
        )
        label = "stage 2" if stage == "stage2" else "stage 3"
        results["retrieval"][f"query reasoner after {label}"] = retrieval
        for name in qa:
            results["qa"][f"{name}, {label}"] = qa[name]
            results["answers"][f"{name}, {label}"] = answers[name]
        results["timing"][stage] = timing

    start = time.perf_counter()
    qa, answers = text_baselines(
        given,
        [list(r.answers) for r in test],
        doc_max_length=args.doc_max_length,
        batch_size=args.batch_size,
        max_new=args.max_new_tokens,
    )
    results["qa"].update(qa)
    results["answers"].update(answers)
    results["timing"]["baselines_s"] = time.perf_counter() - start
    from clara_jax.inference.metrics import retrieval_scores

    bm25 = bm25_topk([r.question for r in test], [list(r.docs) for r in test], K)
    results["retrieval"]["BM25 (lowercase words)"] = retrieval_scores(
        bm25, [list(r.pos_index) for r in test], ks=KS
    )
    results["retrieval"]["chance"] = {f"recall@{k}": k / CANDIDATES for k in KS}
    wall = time.perf_counter() - wall

    print()
    print(f"command: {command}")
    print(
        f"test: {len(test)} questions (MuSiQue + HotpotQA positions {SPLITS['test']}), "
        f"{CANDIDATES} candidates each; QA from {K} given documents or the top {K}"
    )
    for stage, run in runs.items():
        print(f"{stage}: {run['steps']} steps, final loss {run['final_loss']}, {run['seconds']:.0f} s")
    print()
    print("QA on the held-out test questions (x100):")
    print(format_table(results["qa"], ["f1", "acc", "em"], scale=100, digits=1))
    print()
    print(f"Retrieval among {CANDIDATES} candidates (x100):")
    print(format_table(results["retrieval"], [f"recall@{k}" for k in KS], scale=100, digits=1))
    print(f"\nwall time: {wall / 60:.1f} min")
    if args.quick:
        print("(--quick: a smoke run; the numbers mean nothing)")
    out = {
        "command": command,
        "args": vars(args),
        "runs": runs,
        "wall_seconds": wall,
        "questions": [r.question for r in test],
        "golds": [list(r.answers) for r in test],
        **results,
    }
    with open(workdir / "real_text_results.json", "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {workdir / 'real_text_results.json'}")
    return out


if __name__ == "__main__":
    main()
