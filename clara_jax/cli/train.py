"""`clara-jax train`: one stage from a config file, resumable, single- or multi-process."""

from __future__ import annotations

import argparse
import sys

from clara_jax.cli.common import (
    EXIT_DIVERGED,
    EXIT_OK,
    add_multihost_arguments,
    configure_logging,
    distributed_config_from_args,
    error,
)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Train one stage; resumes from the newest checkpoint in the workdir."""
    from clara_jax.parallel.distributed import DistributedError, initialize_distributed

    configure_logging()
    try:  # before anything touches a device: joining a multi-process run must come first
        initialize_distributed(distributed_config_from_args(args))
    except (ValueError, DistributedError) as err:
        return error("train", err)

    from clara_jax.data.records import DataError
    from clara_jax.training.config import ConfigError, load_config
    from clara_jax.training.loop import TrainingDiverged, run_training

    try:
        config = load_config(args.config, overrides)
        summary = run_training(config, args.workdir, progress=not args.no_progress, dcn_mesh=args.dcn_mesh)
    except (ConfigError, DataError, FileNotFoundError) as err:
        return error("train", err)
    except TrainingDiverged as err:
        print(f"clara-jax train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    status = "preempted, checkpoint saved" if summary.preempted else "done"
    print(
        f"{summary.stage}: steps {summary.first_step} -> {summary.last_step} ({status}); workdir {summary.workdir}"
    )
    if summary.final_metrics:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(summary.final_metrics.items())))
    if summary.best:
        best = summary.best
        which = "lowest" if best["mode"] == "min" else "highest"
        print(f"  best evaluation: step {best['step']} ({best['metric']} = {best['value']:.4g}, the {which})")
    if summary.compiles:
        seconds = sum(c["seconds"] for c in summary.compiles)
        ahead = sum(1 for c in summary.compiles if c["step"] == 0)
        print(
            f"  the train step compiled {len(summary.compiles)} time(s), one per batch shape "
            f"({ahead} before step 0, {len(summary.compiles) - ahead} during the run), "
            f"{seconds:.1f} s in all (kept out of the step times)"
        )
    for path in summary.plots:
        print(f"  plot: {path}")
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train one CLaRa stage from a config file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one stage (stage1 SCP, stage2 instruction tuning, stage3 end-to-end).\n\n"
        "  clara-jax train --config configs/stage1_scp.py:tiny,runlocal --workdir runs/s1 \\\n"
        "      --config.data.train data/stage1_train.jsonl --config.optim.lr 3e-4\n\n"
        "Any config field can be overridden with --config.FIELD=VALUE (or --config.FIELD VALUE).\n"
        "The run resumes from the newest readable checkpoint in WORKDIR; SIGTERM/SIGINT save and exit 0.\n"
        "Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard/, WORKDIR/checkpoints/ and PNG plots.\n\n"
        "Before step 0 the step is compiled and its memory (arguments, outputs, temporaries) set against\n"
        "the device's (accelerator memory, or the host's available RAM on CPU): a step that cannot fit\n"
        "exits 2 naming the largest micro_size that fits, remat=full and a shorter generator, each\n"
        "checked by compiling it (--config.memory_check=false skips it). --config.data.precompile_buckets\n"
        "=true compiles every batch shape of the run before step 0, so that no step stalls mid-run.\n\n"
        "Multi-process (every process runs the same command; process 0 writes logs, plots and the model):\n"
        "  clara-jax train ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # or 1\n"
        "  clara-jax train ... --multihost auto     # TPU pod, Slurm or Open MPI: detected by JAX",
    )
    p.add_argument(
        "--config",
        required=True,
        help="configs/FILE.py:ARG (a file), or NAME:ARG for a config of the installed package, e.g. configs/stage1_scp.py:tiny,runlocal or stage1_scp:tiny,runlocal",
    )
    p.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in log files)")
    p.add_argument(
        "--dcn-mesh",
        default="",
        help="mesh axes spanning TPU slices (or, off TPUs, processes), e.g. data=2; the mesh size of an "
        "axis is its --config.mesh size times this (default: data=-1 on several slices, else none)",
    )
    add_multihost_arguments(p)
    p.set_defaults(func=run, takes_overrides=True)
    return p
