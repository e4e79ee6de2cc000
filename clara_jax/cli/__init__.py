"""`clara-jax`: the command-line entry point.

One module per sub-command (`demo`, `train`, `eval`, `export`, `search`, `convert`, `compile`,
`serve`, `synthesize`, `plot`), each with `add_parser(subparsers)` and its handler; `common` holds
the exit statuses, the logging set-up and the error line they share. Handlers import their heavy
machinery (jax, the models, uvicorn) lazily, so `clara-jax --help` answers instantly and `compile`
pins the JAX platform before jax starts.
"""

from __future__ import annotations

import argparse
import sys

from clara_jax.cli import (
    common,
    compile,
    convert,
    demo,
    eval,
    export,
    plot,
    search,
    serve,
    synthesize,
    train,
)

# in the order `clara-jax --help` lists them
COMMANDS = (demo, train, eval, export, search, convert, compile, serve, synthesize, plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clara-jax",
        description="CLaRa (continuous latent reasoning for retrieval-augmented generation) in JAX/Flax.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=common.EXIT_STATUS_HELP,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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
        return common.EXIT_BAD_INPUT
    if getattr(args, "takes_overrides", False):
        return args.func(args, overrides)
    if overrides:
        parser.error(f"{args.command} takes no --config.* overrides")
    return args.func(args)
