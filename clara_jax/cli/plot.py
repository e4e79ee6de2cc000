"""`clara-jax plot`: (re)draw the PNG plots of a workdir's metrics.jsonl."""

from __future__ import annotations

import argparse

from clara_jax.cli.common import EXIT_OK, error


def run(args: argparse.Namespace) -> int:
    from clara_jax.training.metrics import plot_history

    paths = plot_history(args.workdir)
    if not paths:
        return error("plot", f"no metrics.jsonl with data in {args.workdir}")
    print("\n".join(paths))
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="(re)draw the PNG plots of a workdir's metrics.jsonl")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=run)
    return p
