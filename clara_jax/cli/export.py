"""`clara-jax export`: compress a corpus into sharded memory vectors (clara_jax.inference.export)."""

from __future__ import annotations

import argparse

from clara_jax.cli.common import (
    EXIT_OK,
    add_multihost_arguments,
    distributed_config_from_args,
    error,
    refuse_urls,
)

# clara_jax.inference.export.DTYPES, spelled out so that building the parser imports no numpy
# (tests/test_bad_input_cli.py checks that the two agree).
DTYPES = ("float32", "bfloat16", "float16")


def run(args: argparse.Namespace) -> int:
    import time

    if (refused := refuse_urls("export", {"--out": args.out})) is not None:
        return refused

    from clara_jax.inference.export import export_corpus
    from clara_jax.parallel.distributed import DistributedError, initialize_distributed

    t0 = time.perf_counter()
    try:
        initialize_distributed(distributed_config_from_args(args))  # before any device is touched
        manifest = export_corpus(
            args.model,
            args.corpus,
            args.out,
            dtype=args.dtype,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, DistributedError) as exc:
        return error("export", exc)
    seconds = time.perf_counter() - t0
    if manifest["complete"]:
        print(
            f"exported {manifest['count']} documents in {manifest['num_shards']} shards "
            f"({manifest['dtype']}, [{manifest['n_mem']}, {manifest['hidden_size']}] each) to {args.out} "
            f"in {seconds:.1f}s"
        )
    else:
        print(f"this process's shards are done ({seconds:.1f}s); other processes are still exporting")
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="compress a corpus into sharded memory vectors for offline retrieval (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress every document of a corpus with the model's compressor and write\n"
        "OUT/shard-NNNNN.safetensors (tensor 'embeddings' [n, n_mem, D], ids in the metadata) and\n"
        "OUT/manifest.json (model fingerprint, settings, per-shard sha256). Re-running resumes: finished\n"
        "shards are verified and skipped, torn ones redone; a different model, corpus or dtype is refused.\n"
        "On several JAX processes, process p exports shards p, p+P, ….\n\n"
        "The corpus is JSONL of {'id', 'text'} or {'id', 'title', 'text'} (text = title + newline + text),\n"
        "or the same columns in .json / .parquet (read with HF datasets).\n\n"
        "  clara-jax export --model runs/s3/model --corpus wiki.jsonl --out runs/wiki-index --dtype bfloat16",
    )
    p.add_argument("--model", required=True, help="a model directory (a run's WORKDIR/model)")
    p.add_argument("--corpus", required=True, help="documents: .jsonl, .json or .parquet")
    p.add_argument("--out", required=True, help="export directory (created; resumed if it exists)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored vector dtype (default float32)")
    p.add_argument("--shard-size", type=int, default=4096, help="documents per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per model call (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in log files)")
    add_multihost_arguments(p)
    p.set_defaults(func=run)
    return p
