"""`clara-jax eval`: official EM / F1 / Cover-EM (and Recall@k) of a trained model on evaluation files."""

from __future__ import annotations

import argparse

from clara_jax.cli.common import EXIT_OK, configure_logging, error


def run(args: argparse.Namespace) -> int:
    """Per-dataset EM / F1 / Cover-EM (and Recall@k when reranking) of a trained model."""
    import json
    import os

    from clara_jax.data.records import DataError
    from clara_jax.inference.clara_model import load_inference
    from clara_jax.inference.evaluate import evaluate_records, read_eval_file
    from clara_jax.inference.metrics import format_table

    configure_logging()
    try:  # every file is read and checked before the model is loaded: bad data fails in seconds
        data = {
            os.path.splitext(os.path.basename(path))[0]: read_eval_file(
                path, k=args.k, limit=args.limit, policy=args.policy
            )
            for path in args.data
        }
        clara = load_inference(args.model, batch_size=args.batch_size, progress=True)
        results = {
            name: evaluate_records(
                clara, records, mode=args.mode, k=args.k, max_new_tokens=args.max_new_tokens
            )["scores"]
            for name, records in data.items()
        }
    except (DataError, FileNotFoundError, ValueError) as err:
        return error("eval", err)
    columns = sorted({key for scores in results.values() for key in scores})
    print(format_table(results, columns, scale=100, digits=2, mean_row="mean" if len(results) > 1 else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score a trained model on evaluation files (official EM / F1 / Cover-EM / Recall@k)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score WORKDIR/model on one or more evaluation files in the official formats\n"
        "({question, docs, golden_answers|answer, pos_index?}). Metrics follow the official evaluate.py:\n"
        "the first gold answer, SQuAD normalisation, F1 with the yes/no guard, Cover-EM, and Recall@k\n"
        "averaged over all questions. Prints a per-dataset table (percentages).\n\n"
        "  clara-jax eval --model runs/s3/model --data eval/musique.jsonl eval/hotpotqa.jsonl --json scores.json",
    )
    p.add_argument("--model", required=True, help="a model directory (a run's WORKDIR/model)")
    p.add_argument("--data", nargs="+", required=True, help="evaluation files (.jsonl/.json/.parquet)")
    p.add_argument(
        "--mode",
        choices=("rerank", "given"),
        default="rerank",
        help="rerank: the query reasoner picks the top-k of all candidates (stage-3 evaluation); "
        "given: answer from docs[:k] in file order (compressor evaluation)",
    )
    p.add_argument("-k", type=int, default=5, help="documents the generator reads (default 5)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default: the official evaluation's, 64 with --mode rerank, "
        "128 with --mode given)",
    )
    p.add_argument("--limit", type=int, default=0, help="score only the first N questions of each file")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    p.add_argument(
        "--policy",
        choices=("error", "skip"),
        default="error",
        help="a bad record stops the run (error, default) or is skipped, counted and logged (skip)",
    )
    p.add_argument("--json", default="", help="also write the scores to this JSON file")
    p.set_defaults(func=run)
    return p
