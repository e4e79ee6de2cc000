"""`clara-jax eval`: official EM / F1 / Cover-EM (and Recall@k) of a trained model on evaluation files,
or (`--task paraphrase`) the official paraphrase-quality metrics of its compressor + generator."""

from __future__ import annotations

import argparse

from clara_jax.cli.common import EXIT_OK, configure_logging, error, refuse_urls

ENTITY_NOTE = (
    "note: entity_preservation_approx is a rule-based stand-in for the official spaCy NER entity "
    "preservation (capitalised names, numbers, short quotes); it is not the official number."
)


def _check_task_flags(args: argparse.Namespace) -> None:
    """Flags of one task given to the other are refused, not silently ignored."""
    qa_only = {"--mode": args.mode, "-k": args.k, "--query-encoder": args.query_encoder}
    paraphrase_only = {
        "--bertscore-model": args.bertscore_model,
        "--bertscore-layer": args.bertscore_layer,
        "--bertscore-idf": args.bertscore_idf or None,
        "--predictions": args.predictions or None,
        "--seed": args.seed,
    }
    wrong = qa_only if args.task == "paraphrase" else paraphrase_only
    given = [flag for flag, value in wrong.items() if value is not None]
    if given:
        other = "qa" if args.task == "paraphrase" else "paraphrase"
        raise ValueError(f"{', '.join(given)} belong(s) to --task {other}, not --task {args.task}")
    if args.bertscore_model is None and (args.bertscore_layer is not None or args.bertscore_idf):
        raise ValueError("--bertscore-layer / --bertscore-idf need --bertscore-model DIR")


def _run_qa(args: argparse.Namespace):
    from clara_jax.inference.clara_model import load_inference
    from clara_jax.inference.evaluate import evaluate_records, read_eval_file

    mode, k = args.mode or "rerank", 5 if args.k is None else args.k
    # every file is read and checked before the model is loaded: bad data fails in seconds
    data = {
        _name(path): read_eval_file(path, k=k, limit=args.limit, policy=args.policy) for path in args.data
    }
    clara = load_inference(
        args.model,
        batch_size=args.batch_size,
        progress=True,
        query_encoder=args.query_encoder or "query_reasoner",
    )
    return {
        name: evaluate_records(clara, records, mode=mode, k=k, max_new_tokens=args.max_new_tokens)["scores"]
        for name, records in data.items()
    }


def _run_paraphrase(args: argparse.Namespace):
    import json
    import logging

    from clara_jax.inference.clara_model import load_inference
    from clara_jax.inference.evaluate import (
        PARAPHRASE_MAX_NEW_TOKENS,
        evaluate_paraphrase,
        read_paraphrase_file,
    )
    from clara_jax.inference.paraphrase_metrics import BertScorer, rouge_scores

    data = {
        _name(path): read_paraphrase_file(path, limit=args.limit, policy=args.policy) for path in args.data
    }
    rouge_scores(["check"], ["check"])  # rouge-score missing: fail before the model loads
    scorer = None
    if args.bertscore_model:
        scorer = BertScorer(args.bertscore_model, layer=args.bertscore_layer, idf=args.bertscore_idf)
        logging.getLogger("clara_jax.eval").info(
            "BERTScore: %s, layer %d, idf %s",
            args.bertscore_model,
            scorer.layer,
            "on" if scorer.idf else "off",
        )
    clara = load_inference(args.model, batch_size=args.batch_size, progress=True)
    max_new = args.max_new_tokens or PARAPHRASE_MAX_NEW_TOKENS
    seed = 0 if args.seed is None else args.seed
    results, rows = {}, []
    for name, docs in data.items():
        out = evaluate_paraphrase(clara, docs, max_new_tokens=max_new, bertscore=scorer, seed=seed)
        results[name] = out["scores"]
        for i, (doc, para) in enumerate(zip(docs, out["paraphrases"])):
            per = {key: values[i] for key, values in out["per_record"].items()}
            rows.append({"dataset": name, "index": i, "doc": doc, "paraphrase": para, **per})
    if args.predictions:
        with open(args.predictions, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {args.predictions}")
    if scorer is not None:
        print(f"BERTScore: {args.bertscore_model}, layer {scorer.layer}, idf {'on' if scorer.idf else 'off'}")
    else:
        print("BERTScore: not computed (pass --bertscore-model DIR, a local encoder directory)")
    print(ENTITY_NOTE)
    return results


def _name(path: str) -> str:
    import os

    return os.path.splitext(os.path.basename(path))[0]


def run(args: argparse.Namespace) -> int:
    """Per-dataset scores of a trained model: QA (EM / F1 / Cover-EM / Recall@k) or paraphrase quality."""
    import json

    if (refused := refuse_urls("eval", {"--json": args.json, "--predictions": args.predictions})) is not None:
        return refused

    from clara_jax.data.records import DataError
    from clara_jax.inference.metrics import format_table

    configure_logging()
    try:
        _check_task_flags(args)
        results = _run_paraphrase(args) if args.task == "paraphrase" else _run_qa(args)
    except (DataError, FileNotFoundError, ValueError, ImportError) as err:
        return error("eval", err)
    columns = sorted({key for scores in results.values() for key in scores} - {"n"})
    print(format_table(results, columns, scale=100, digits=2, mean_row="mean" if len(results) > 1 else None))
    if args.task == "paraphrase":
        print("passages scored: " + ", ".join(f"{name} {scores['n']}" for name, scores in results.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score a trained model on evaluation files (official EM / F1 / Cover-EM / Recall@k, "
        "or paraphrase quality)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="--task qa (default): score WORKDIR/model on evaluation files in the official formats\n"
        "({question, docs, golden_answers|answer, pos_index?}). Metrics follow the official evaluate.py:\n"
        "the first gold answer, SQuAD normalisation, F1 with the yes/no guard, Cover-EM, and Recall@k\n"
        "averaged over all questions. Prints a per-dataset table (percentages).\n\n"
        "--task paraphrase: the official stage1_paraphrase evaluation. Each passage of a stage-1 (SCP)\n"
        "file ({data_type, question, answers, docs: [passage]}) is compressed alone, the generator\n"
        "rebuilds it from its memory tokens (generate_from_paraphrase, greedy, 128 new tokens), and the\n"
        "paraphrase is scored against the passage itself: ROUGE-1 / ROUGE-L F-measure (rouge-score,\n"
        "no stemmer), BERTScore P/R/F1 with a local encoder (--bertscore-model; the official run\n"
        "uses roberta-large, layer 17, no idf), and entity_preservation_approx, a rule-based stand-in\n"
        "for the official spaCy NER (the share of the passage's names, numbers and short quotes that\n"
        "the paraphrase keeps; NOT the official number). Means over passages, `n` the count.\n\n"
        "  clara-jax eval --model runs/s3/model --data eval/musique.jsonl eval/hotpotqa.jsonl --json scores.json\n"
        "  clara-jax eval --task paraphrase --model runs/s1/model --data dev.jsonl --limit 40 \\\n"
        "      --bertscore-model ~/encoders/roberta-large --predictions paraphrases.jsonl --json scores.json",
    )
    p.add_argument("--model", required=True, help="a model directory (a run's WORKDIR/model)")
    p.add_argument("--data", nargs="+", required=True, help="evaluation files (.jsonl/.json/.parquet)")
    p.add_argument(
        "--task",
        choices=("qa", "paraphrase"),
        default="qa",
        help="qa (default): answers and Recall@k on question records; paraphrase: how well the "
        "generator rebuilds stage-1 passages from their compressed memory",
    )
    p.add_argument(
        "--mode",
        choices=("rerank", "given"),
        default=None,
        help="(qa) rerank (default): the query reasoner picks the top-k of all candidates (stage-3 "
        "evaluation); given: answer from docs[:k] in file order (compressor evaluation)",
    )
    p.add_argument("-k", type=int, default=None, help="(qa) documents the generator reads (default 5)")
    p.add_argument(
        "--query-encoder",
        choices=("query_reasoner", "compressor"),
        default=None,
        help="(qa, rerank) what encodes the questions: the query reasoner (default; stage 3 trains it) "
        "or the compressor, which is what stage 3 starts from: rank with it to score a stage-1/2 "
        "model, whose query reasoner was never trained (eval warns when that is the case)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default: the official evaluation's, 64 with --mode rerank, "
        "128 with --mode given and with --task paraphrase)",
    )
    p.add_argument(
        "--limit", type=int, default=0, help="score only the first N questions (or passages) of each file"
    )
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    p.add_argument(
        "--policy",
        choices=("error", "skip"),
        default="error",
        help="a bad record stops the run (error, default) or is skipped, counted and logged (skip)",
    )
    p.add_argument("--json", default="", help="also write the scores to this JSON file")
    para = p.add_argument_group("--task paraphrase")
    para.add_argument(
        "--bertscore-model",
        default=None,
        metavar="DIR",
        help="a local Hugging Face encoder directory (config.json, tokenizer, safetensors) for "
        "BERTScore; loaded offline, no remote code. Without it BERTScore is not computed",
    )
    para.add_argument(
        "--bertscore-layer",
        type=int,
        default=None,
        metavar="N",
        help="hidden layer whose states BERTScore compares (1 = first; default: 17 for a 24-layer "
        "RoBERTa such as roberta-large, the official setting, else the last layer)",
    )
    para.add_argument(
        "--bertscore-idf",
        action="store_true",
        help="weight tokens by idf over the file's passages (off by default, as in the official run)",
    )
    para.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the paraphrase instruction templates each prompt draws (default 0)",
    )
    para.add_argument(
        "--predictions",
        default="",
        metavar="FILE",
        help="also write each passage, its paraphrase and its scores to this JSONL file",
    )
    p.set_defaults(func=run)
    return p
