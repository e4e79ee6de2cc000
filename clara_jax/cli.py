"""`clara-jax`: the command-line entry point.

Each sub-command lives in a small function here and imports its heavy machinery lazily, so
`clara-jax --help` answers instantly.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """All three stages on a seeded synthetic corpus, then a before/after table."""
    import logging

    from clara_jax.demo import run_demo

    _configure_logging(logging)
    run_demo(args.workdir, scale=args.scale, n_eval=args.eval_questions, seed=args.seed)
    return 0


def _configure_logging(logging) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax", "etils", "tensorboardX"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Train one stage; resumes from the newest checkpoint in the workdir."""
    import logging

    from clara_jax.parallel.distributed import (
        DistributedError,
        distributed_config_from_args,
        initialize_distributed,
    )

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # before anything touches a device: joining a multi-process run must come first
        initialize_distributed(distributed_config_from_args(args))
    except (ValueError, DistributedError) as err:
        print(f"clara-jax train: error: {err}", file=sys.stderr)
        return 2

    from clara_jax.data.records import DataError
    from clara_jax.training.config import ConfigError, load_config
    from clara_jax.training.loop import TrainingDiverged, run_training

    try:
        config = load_config(args.config, overrides)
        summary = run_training(config, args.workdir, progress=not args.no_progress, dcn_mesh=args.dcn_mesh)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"clara-jax train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"clara-jax train: {err}", file=sys.stderr)
        return 3
    status = "preempted, checkpoint saved" if summary.preempted else "done"
    print(
        f"{summary.stage}: steps {summary.first_step} -> {summary.last_step} ({status}); workdir {summary.workdir}"
    )
    if summary.final_metrics:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(summary.final_metrics.items())))
    for path in summary.plots:
        print(f"  plot: {path}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from clara_jax.training.metrics import plot_history

    paths = plot_history(args.workdir)
    if not paths:
        print(f"clara-jax plot: no metrics.jsonl with data in {args.workdir}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Per-dataset EM / F1 / Cover-EM (and Recall@k when reranking) of a trained model."""
    import json
    import logging
    import os

    from clara_jax.data.records import DataError
    from clara_jax.inference.clara_model import load_inference
    from clara_jax.inference.evaluate import evaluate_records, read_eval_file
    from clara_jax.inference.metrics import format_table

    _configure_logging(logging)
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
        print(f"clara-jax eval: error: {err}", file=sys.stderr)
        return 2
    columns = sorted({key for scores in results.values() for key in scores})
    print(format_table(results, columns, scale=100, digits=2, mean_row="mean" if len(results) > 1 else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clara-jax",
        description="CLaRa (continuous latent reasoning for retrieval-augmented generation) in JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="the embedded default: train a tiny CLaRa through stages 1-3 on synthetic data (~10 min on a CPU)",
        description="Writes a seeded synthetic knowledge corpus, pretrains a tiny base LLM on its training passages, "
        "scores the untrained model, trains stage 1 (SCP) -> stage 2 (instruction tuning) -> stage 3 (end to end) "
        "with `clara-jax train`'s machinery, and prints a before/after table of stage-3 Recall@1/@5 (against "
        "chance) and answer EM/F1 on held-out questions, plus where the plots are. Re-running resumes.",
    )
    demo.add_argument(
        "--workdir", default="runs/demo", help="where data, checkpoints and plots go (default runs/demo)"
    )
    demo.add_argument(
        "--scale", type=float, default=1.0, help="multiply every stage's step count (default 1.0)"
    )
    demo.add_argument(
        "--eval-questions", type=int, default=100, help="held-out questions to score (default 100)"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the base pretraining and every stage; the corpus stays the same (default 0)",
    )
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train",
        help="train one CLaRa stage from a config file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one stage (stage1 SCP, stage2 instruction tuning, stage3 end-to-end).\n\n"
        "  clara-jax train --config configs/stage1_scp.py:tiny,runlocal --workdir runs/s1 \\\n"
        "      --config.data.train data/stage1_train.jsonl --config.optim.lr 3e-4\n\n"
        "Any config field can be overridden with --config.FIELD=VALUE (or --config.FIELD VALUE).\n"
        "The run resumes from the newest readable checkpoint in WORKDIR; SIGTERM/SIGINT save and exit 0.\n"
        "Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard/, WORKDIR/checkpoints/ and PNG plots.\n\n"
        "Multi-process (every process runs the same command; process 0 writes logs, plots and the model):\n"
        "  clara-jax train ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # or 1\n"
        "  clara-jax train ... --multihost auto     # TPU pod, Slurm or Open MPI: detected by JAX",
    )
    train.add_argument(
        "--config", required=True, help="configs/FILE.py:ARG, e.g. configs/stage1_scp.py:tiny,runlocal"
    )
    train.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and plots")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in log files)")
    train.add_argument(
        "--dcn-mesh",
        default="",
        help="mesh axes spanning TPU slices (or, off TPUs, processes), e.g. data=2; the mesh size of an "
        "axis is its --config.mesh size times this (default: data=-1 on several slices, else none)",
    )
    from clara_jax.parallel.distributed import add_multihost_arguments

    add_multihost_arguments(train)
    train.set_defaults(func=_train, takes_overrides=True)

    ev = sub.add_parser(
        "eval",
        help="score a trained model on evaluation files (official EM / F1 / Cover-EM / Recall@k)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score WORKDIR/model on one or more evaluation files in the official formats\n"
        "({question, docs, golden_answers|answer, pos_index?}). Metrics follow the official evaluate.py:\n"
        "the first gold answer, SQuAD normalisation, F1 with the yes/no guard, Cover-EM, and Recall@k\n"
        "averaged over all questions. Prints a per-dataset table (percentages).\n\n"
        "  clara-jax eval --model runs/s3/model --data eval/musique.jsonl eval/hotpotqa.jsonl --json scores.json",
    )
    ev.add_argument("--model", required=True, help="a model directory (a run's WORKDIR/model)")
    ev.add_argument("--data", nargs="+", required=True, help="evaluation files (.jsonl/.json/.parquet)")
    ev.add_argument(
        "--mode",
        choices=("rerank", "given"),
        default="rerank",
        help="rerank: the query reasoner picks the top-k of all candidates (stage-3 evaluation); "
        "given: answer from docs[:k] in file order (compressor evaluation)",
    )
    ev.add_argument("-k", type=int, default=5, help="documents the generator reads (default 5)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    ev.add_argument("--limit", type=int, default=0, help="score only the first N questions of each file")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    ev.add_argument(
        "--policy",
        choices=("error", "skip"),
        default="error",
        help="a bad record stops the run (error, default) or is skipped, counted and logged (skip)",
    )
    ev.add_argument("--json", default="", help="also write the scores to this JSON file")
    ev.set_defaults(func=_eval)

    from clara_jax.inference.export import add_export_parser
    from clara_jax.inference.index import add_search_parser
    from clara_jax.interop.convert_cli import add_convert_parser
    from clara_jax.serving.cli import add_serve_parser
    from clara_jax.synthesis.cli import add_synthesize_parser
    from clara_jax.training.aot import add_compile_parser

    add_export_parser(sub)
    add_search_parser(sub)
    add_convert_parser(sub)
    add_compile_parser(sub)
    add_serve_parser(sub)
    add_synthesize_parser(sub)

    plot = sub.add_parser("plot", help="(re)draw the PNG plots of a workdir's metrics.jsonl")
    plot.add_argument("--workdir", required=True)
    plot.set_defaults(func=_plot)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--config.a.b=v` / `--config.a.b v` out of argv (argparse cannot declare them)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--config."):
            if "=" not in item and i + 1 < len(argv):
                item = f"{item}={argv[i + 1]}"
                i += 1
            overrides.append(item)
        else:
            rest.append(item)
        i += 1
    return rest, overrides


def main(argv=None) -> int:
    parser = build_parser()
    rest, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "takes_overrides", False):
        return args.func(args, overrides)
    if overrides:
        parser.error(f"{args.command} takes no --config.* overrides")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
