"""`clara-jax demo`: the embedded default, all three stages on a seeded synthetic corpus."""

from __future__ import annotations

import argparse

from clara_jax.cli.common import EXIT_OK, configure_logging


def run(args: argparse.Namespace) -> int:
    """All three stages on a seeded synthetic corpus, then a before/after table."""
    from clara_jax.demo import run_demo

    configure_logging()
    run_demo(args.workdir, scale=args.scale, n_eval=args.eval_questions, seed=args.seed)
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="the embedded default: train a tiny CLaRa through stages 1-3 on synthetic data (~10 min on a CPU)",
        description="Writes a seeded synthetic knowledge corpus, pretrains a tiny base LLM on its training passages, "
        "scores the untrained model, trains stage 1 (SCP) -> stage 2 (instruction tuning) -> stage 3 (end to end) "
        "with `clara-jax train`'s machinery, and prints a before/after table of stage-3 Recall@1/@5 (against "
        "chance) and answer EM/F1 on held-out questions, plus where the plots are. Re-running resumes.",
    )
    p.add_argument(
        "--workdir", default="runs/demo", help="where data, checkpoints and plots go (default runs/demo)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (default 1.0)")
    p.add_argument(
        "--eval-questions",
        type=int,
        default=200,
        help="held-out questions to score (default 200, all of them)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the base pretraining and every stage; the corpus stays the same (default 0)",
    )
    p.set_defaults(func=run)
    return p
