"""Answer quality and retrieval of stage-1 CLaRa on real text, with SmolLM2-135M-Instruct on CPU.

    python benchmarks/quality_smollm2.py                       # full run (defaults below)
    python benchmarks/quality_smollm2.py --rates 4,16,32 --json /tmp/quality.json
    python benchmarks/quality_smollm2.py --quick               # smoke run: numbers mean nothing

Data: /work/shared/data/clara_pretrain_sample.jsonl (see its README), split by line: 0-799 train,
800-899 dev, 900-999 test. Stage 1 (SCP, QA targets) trains only on the train lines; everything
reported here is measured on the test lines, with the first question of each test record.

Rows of the table (answer F1 / Cover-EM "acc" / EM, official metrics):
  compressed CR{r}        generator adapter reading the passage as one compressed memory block
                          (the standard prompt, k=1), one stage-1 model per compression rate;
  full text (base)        the plain base SmolLM2-Instruct reading the passage as text, the fair
                          baseline (the passage cut to doc_max_length tokens, what the compressor sees);
  full text (generator)   the same text prompt through the CR{primary} model's generator adapter;
  no document (...)       the question alone, base model and generator adapter;
and retrieval among 20 candidates (the question's own test passage + 19 other test passages):
  QR CR{r}                the query reasoner initialised as a copy of the trained compressor (as
                          stage 3 starts; no stage-3 training), cosine over memory vectors;
  BM25                    rank-bm25 Okapi over lowercase word tokens, same candidate sets;
  chance                  k / 20.

Stage 1 trains the generator on the QA_SYSTEM prompt ("generate questions ... and answer them"),
not on the standard question-answering prompt used here (that is stage 2), so the compressed
rows measure how much of the answer the memory carries after SCP alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time

import numpy as np

DATA = "/work/shared/data/clara_pretrain_sample.jsonl"
TRAIN_LINES = range(0, 800)
TEST_LINES = range(900, 1000)
CANDIDATES = 20
KS = (1, 5)


def read_lines(path: str, lines: range) -> list[dict]:
    """Records at the given 0-based line numbers: the split is by position, never shuffled."""
    with open(path) as f:
        raw = f.readlines()
    if len(raw) < lines.stop:
        raise ValueError(f"{path}: {len(raw)} lines, the split needs {lines.stop}")
    return [json.loads(raw[i]) for i in lines]


def write_train_split(path: str, out: str) -> str:
    with open(path) as f:
        raw = f.readlines()
    with open(out, "w") as f:
        f.writelines(raw[i] for i in TRAIN_LINES)
    return out


def test_questions(records: list[dict], max_questions: int):
    """(question, gold answers, index of its own passage): the first question of each test record."""
    out = []
    for i, r in enumerate(records):
        if r["question"] and r["answers"]:
            out.append((r["question"][0], [r["answers"][0]], i))
    return out[:max_questions]


def candidate_sets(n_passages: int, owners: list[int], seed: int) -> tuple[np.ndarray, list[int]]:
    """[Q, 20] passage indices (own passage at a random position) and that position per question."""
    rng = np.random.default_rng(seed)
    sets, gold = [], []
    for own in owners:
        others = rng.choice([j for j in range(n_passages) if j != own], CANDIDATES - 1, replace=False)
        pos = int(rng.integers(CANDIDATES))
        sets.append(np.insert(others, pos, own))
        gold.append(pos)
    return np.stack(sets), gold


def bm25_topk(questions: list[str], passages: list[str], sets: np.ndarray, k: int) -> list[list[int]]:
    from rank_bm25 import BM25Okapi

    def words(text):
        return re.findall(r"\w+", text.lower())

    out = []
    for q, cand in zip(questions, sets):
        scores = BM25Okapi([words(passages[j]) for j in cand]).get_scores(words(q))
        out.append([int(i) for i in np.argsort(-scores, kind="stable")[:k]])
    return out


def train_stage1(args, rate: int, workdir: str, train_path: str, base_dir: str) -> dict:
    """One stage-1 run through the project's own config + loop; resumes if `workdir` has checkpoints."""
    from clara_jax.training.config import load_config
    from clara_jax.training.loop import run_training

    overrides = [
        f"--config.model.path={base_dir}",
        "--config.model.dtype=float32",
        f"--config.clara.compression_rate={rate}",
        f"--config.clara.doc_max_length={args.doc_max_length}",
        f"--config.clara.generator_max_length={args.generator_max_length}",
        f"--config.data.train={train_path}",
        f"--config.total_steps={args.steps}",
        f"--config.batch.global_size={args.global_batch}",
        f"--config.batch.micro_size={args.micro_batch}",
        f"--config.optim.lr={args.lr}",
        f"--config.checkpoint.every_steps={max(args.steps, 1)}",
        "--config.checkpoint.async_save=False",
        "--config.log_every=5",
    ]
    config = load_config("configs/stage1_scp.py:smollm2_135m", overrides)
    start = time.perf_counter()
    summary = run_training(config, workdir, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    trained = summary.last_step - summary.first_step
    return {
        "rate": rate,
        "workdir": workdir,
        "steps": summary.last_step,
        "steps_this_run": trained,
        "train_seconds": seconds,
        "seconds_per_step": seconds / trained if trained else None,
        "final_loss": summary.final_metrics.get("loss"),
        "overrides": overrides,
    }


def text_generate(clara, prompts: list[str], adapter: str | None, max_new_tokens: int) -> list[str]:
    """Greedy answers to rendered text prompts (no memory), fixed batch shapes like ClaraInference."""
    from clara_jax.data.layouts import generator_batch
    from clara_jax.data.pipeline import bucket_length, pad_left
    from clara_jax.data.prompts import RenderedPrompt
    from clara_jax.inference.generation import SamplingConfig, generate

    tok, bs = clara.tok, clara.batch_size
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id
    )
    answers = []
    for start in range(0, len(prompts), bs):
        chunk = [RenderedPrompt(p, None) for p in prompts[start : start + bs]]
        real = len(chunk)
        chunk += [chunk[-1]] * (bs - real)
        gen = generator_batch(tok, chunk, 1 << 30, bucket=1)
        width = bucket_length(gen.ids.shape[1], clara.bucket)
        ids = clara._put(pad_left(gen.ids, width, tok.pad_id))
        mask = clara._put(pad_left(gen.mask, width, False))
        out = np.asarray(generate(clara.model, ids, mask, sampling=sampling, adapter=adapter))
        for row in out[:real]:
            row = [t for t in row.tolist() if t not in (tok.pad_id, tok.eos_id)]
            answers.append(tok.hf.decode(row, skip_special_tokens=True).strip())
    return answers


def text_prompts(tok, questions: list[str], passages: list[str] | None, doc_max_length: int) -> list[str]:
    """The standard system prompt with the passage as text (cut like the compressor's input) or none."""
    from clara_jax.data.prompts import STANDARD_SYSTEM
    from clara_jax.data.tokenizer import render_chat

    out = []
    for i, q in enumerate(questions):
        if passages is None:
            user = f"Question:{q}"
        else:
            ids = tok.hf(passages[i], add_special_tokens=False)["input_ids"][:doc_max_length]
            user = f"Background:\n{tok.hf.decode(ids)}\n\nQuestion:{q}"
        messages = [{"role": "system", "content": STANDARD_SYSTEM}, {"role": "user", "content": user}]
        out.append(render_chat(tok, messages, add_generation_prompt=True))
    return out


def evaluate_rate(args, model_dir, questions, golds, owners, passages, sets, gold_pos, with_baselines):
    """Compressed QA and QR retrieval for one trained model (+ text / no-doc rows when asked)."""
    from flax import nnx

    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.inference.metrics import qa_scores, retrieval_scores
    from clara_jax.interop.model_dir import load_clara_model
    from clara_jax.model.clara import COMPRESSOR, QUERY_REASONER

    tok, model, clara_cfg = load_clara_model(model_dir)
    # stage 3 starts the query reasoner as a copy of the trained compressor (build.init_from_previous_stage)
    nnx.update(model.adapters[QUERY_REASONER], nnx.state(model.adapters[COMPRESSOR]))
    clara = ClaraInference(tok, model, clara_cfg, batch_size=args.batch_size, query_max_length=64)
    rows, preds, timing = {}, {}, {}
    rate = clara_cfg.compression_rate

    start = time.perf_counter()
    memory, _ = clara.compress_documents(passages)  # each test passage once: [P, n_mem, D]
    timing["compress_s"] = time.perf_counter() - start

    start = time.perf_counter()
    own = memory[np.asarray(owners)]
    answers = clara.generate_from_compressed_documents_and_questions(questions, own, args.max_new_tokens)
    timing["generate_compressed_s"] = time.perf_counter() - start
    rows[f"compressed CR{rate}"] = qa_scores(answers, golds)
    preds[f"compressed CR{rate}"] = answers

    start = time.perf_counter()
    topk, _ = clara.rerank(questions, candidate_memory=memory[sets], k=max(KS))
    timing["rerank_s"] = time.perf_counter() - start
    gold = [[p] for p in gold_pos]
    rows[f"QR CR{rate} (compressor copy)"] = retrieval_scores(topk.tolist(), gold, ks=KS)

    if with_baselines:
        own_text = [passages[i] for i in owners]
        variants = [
            ("full text (base)", own_text, None),
            (f"full text (CR{rate} generator)", own_text, "generator"),
            ("no document (base)", None, None),
            (f"no document (CR{rate} generator)", None, "generator"),
        ]
        for name, docs, adapter in variants:
            start = time.perf_counter()
            prompts = text_prompts(tok, questions, docs, clara_cfg.doc_max_length)
            answers = text_generate(clara, prompts, adapter, args.max_new_tokens)
            timing[f"{name}_s"] = time.perf_counter() - start
            rows[name] = qa_scores(answers, golds)
            preds[name] = answers
    return rows, preds, timing


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="stage-1 optimizer steps per rate")
    parser.add_argument("--rates", default="16", help="compression rates, comma separated (e.g. 4,16,32)")
    parser.add_argument(
        "--max-questions", type=int, default=50, help="test questions (<= 100: one per record)"
    )
    parser.add_argument(
        "--workdir", default="", help="run directory (default: a new temp dir); reruns resume"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 steps of batch 2, 4 questions, a pool of 20 passages",
    )
    parser.add_argument("--pool", type=int, default=100, help="test passages to draw candidates from (>= 20)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--generator-max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="inference batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate sets")
    parser.add_argument("--json", default="", help="write all results (and predictions) here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.max_questions, args.pool = 2, 4, CANDIDATES
        args.global_batch = args.micro_batch = args.batch_size = 2
        args.generator_max_length, args.max_new_tokens = 256, 16
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    primary = 16 if 16 in rates else rates[0]
    command = shlex.join([sys.executable, *sys.argv])
    wall = time.perf_counter()
    args.json = os.path.abspath(args.json) if args.json else ""
    args.workdir = os.path.abspath(args.workdir) if args.workdir else ""
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/ is repo-relative
    from clara_jax.inference.metrics import format_table, retrieval_scores
    from clara_jax.interop.gguf import smollm2_dir

    # the resolved directory, not the magic "smollm2": the saved model records its base by path
    base_dir = smollm2_dir()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="clara-quality-"))
    os.makedirs(workdir, exist_ok=True)
    train_path = write_train_split(DATA, os.path.join(workdir, "train_lines_0-799.jsonl"))

    test = read_lines(DATA, TEST_LINES)[: max(args.pool, CANDIDATES)]
    passages = [r["docs"][0] for r in test]
    qs = test_questions(test, args.max_questions)
    questions, golds, owners = [q for q, _, _ in qs], [g for _, g, _ in qs], [o for _, _, o in qs]
    sets, gold_pos = candidate_sets(len(passages), owners, args.seed)

    runs, qa_rows, ret_rows, preds, timings = [], {}, {}, {}, {}
    for rate in rates:
        run = train_stage1(args, rate, os.path.join(workdir, f"cr{rate}"), train_path, base_dir)
        runs.append(run)
        print(f"trained CR{rate}: {run['steps']} steps in {run['train_seconds']:.0f} s", flush=True)
        rows, p, t = evaluate_rate(
            args,
            os.path.join(run["workdir"], "model"),
            questions,
            golds,
            owners,
            passages,
            sets,
            gold_pos,
            with_baselines=rate == primary,
        )
        for name, metrics in rows.items():
            (ret_rows if "recall@1" in metrics else qa_rows)[name] = metrics
        preds.update(p)
        timings[f"CR{rate}"] = t

    start = time.perf_counter()
    bm25 = bm25_topk(questions, passages, sets, max(KS))
    timings["bm25_s"] = time.perf_counter() - start
    gold = [[p] for p in gold_pos]
    ret_rows["BM25 (lowercase words)"] = retrieval_scores(bm25, gold, ks=KS)
    ret_rows["chance"] = {f"recall@{k}": k / CANDIDATES for k in KS}

    order = [f"compressed CR{r}" for r in rates] + [n for n in qa_rows if not n.startswith("compressed")]
    qa_rows = {n: qa_rows[n] for n in order}
    wall = time.perf_counter() - wall
    print()
    print(f"command: {command}")
    print(
        f"data: {DATA} train lines 0-799, test lines 900-999; {len(questions)} test questions "
        f"(first of each record), {CANDIDATES} candidates each (seed {args.seed})"
    )
    for run in runs:
        per = (
            f"{run['seconds_per_step']:.2f} s/step incl. load+compile"
            if run["seconds_per_step"]
            else "resumed"
        )
        print(
            f"CR{run['rate']}: {run['steps']} steps (global batch {args.global_batch}, micro "
            f"{args.micro_batch}, lr {args.lr}), final loss {run['final_loss']}, "
            f"train {run['train_seconds']:.0f} s ({per})"
        )
    print()
    print("QA on held-out test questions (x100):")
    print(format_table(qa_rows, ["f1", "acc", "em", "avg_output_length"], scale=100, digits=2))
    print()
    print(f"Retrieval, own passage among {CANDIDATES} test passages (x100):")
    print(format_table(ret_rows, [f"recall@{k}" for k in KS], scale=100, digits=2))
    print()
    print(f"wall time: {wall:.0f} s")
    if args.quick:
        print("(--quick: a 2-step smoke run; the numbers are not meaningful)")

    if args.json:
        result = {
            "command": command,
            "quick": args.quick,
            "args": vars(args),
            "base_model": base_dir,
            "questions": len(questions),
            "runs": runs,
            "qa": qa_rows,
            "retrieval": ret_rows,
            "timings": timings,
            "wall_seconds": wall,
            "examples": [
                {"question": q, "gold": g[0], **{name: p[i] for name, p in preds.items()}}
                for i, (q, g) in enumerate(zip(questions, golds))
            ],
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
