"""What every `clara-jax` command shares: the exit statuses, one logging set-up, the error line, and
the multi-process flags of `train` and `export`.

Nothing here imports jax (or anything heavy): `clara-jax --help` builds every sub-parser.
"""

from __future__ import annotations

import logging
import sys

EXIT_OK = 0
EXIT_FAILED = 1  # a check that ran and failed: `compile` finds a step that does not fit, `serve` cannot bind
EXIT_BAD_INPUT = 2  # usage, config, data, a missing file, a step too big: refused, with a message
EXIT_DIVERGED = 3  # a run that stopped itself: training diverged (non-finite loss), synthesis gave up

EXIT_STATUS_HELP = """\
exit status:
  0  success (and a `train` run stopped by SIGTERM/SIGINT after saving its checkpoint)
  1  a check that ran and failed: `compile` finds a step that does not fit in HBM, `serve` cannot
     bind its port
  2  bad input: usage, config, data, a missing file or model, a `train` step that does not fit in
     memory (a message, never a traceback)
  3  a run that stopped itself: `train` diverged (non-finite loss; the last good checkpoint is
     named), `synthesize` gave up after --max-consecutive-errors backend failures in a row"""

NOISY_LOGGERS = ("absl", "orbax", "jax", "etils", "tensorboardX", "httpx", "httpcore")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on `sys.stderr` as it is when a record is emitted (like logging.lastResort)."""

    def __init__(self):
        logging.Handler.__init__(self)  # not StreamHandler's, which would fix the stream now

    @property
    def stream(self):
        return sys.stderr


def configure_logging() -> None:
    """INFO to stderr with timestamps; the libraries that chatter at INFO are held to WARNING.

    The handler writes to `sys.stderr` as it is when a record is emitted, not as it was when the
    command started: a command run in-process (tests, notebooks) leaves no handler behind that
    holds a stream its caller has since closed."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_StderrHandler()],
        force=True,
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def error(command: str, message: object) -> int:
    """Print `clara-jax COMMAND: error: MESSAGE` to stderr; returns EXIT_BAD_INPUT."""
    print(f"clara-jax {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def refuse_urls(command: str, outputs: dict[str, str | None]) -> int | None:
    """Exit code 2 and the message if any output flag names an object-store URL (issue #20), else
    None. Checked before the command imports its heavy modules or writes anything."""
    from clara_jax.file_io import is_url, url_refusal

    for flag, path in outputs.items():
        if path and is_url(path):
            return error(command, url_refusal(flag, path))
    return None


def add_multihost_arguments(parser) -> None:
    """The `--multihost/--coordinator/--num-processes/--process-id` flags of multi-process commands."""
    from clara_jax.parallel.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, MODES

    group = parser.add_argument_group(
        "multi-process runs",
        f"Every process runs the same command. Explicit values (or {ENV_COORDINATOR}, "
        f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}) imply a multi-process run; on a TPU pod, Slurm or "
        "Open MPI, --multihost auto detects them.",
    )
    group.add_argument(
        "--multihost",
        choices=MODES,
        default="off",
        help="auto: jax.distributed with cluster auto-detection; off (default): single process "
        "unless the values below are given",
    )
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes")
    group.add_argument(
        "--process-id", type=int, default=None, metavar="I", help="this process's index, 0..N-1"
    )


def distributed_config_from_args(args):
    """The parsed flags of `add_multihost_arguments`, completed from the environment."""
    from clara_jax.parallel.distributed import DistributedConfig

    return DistributedConfig.from_args(
        getattr(args, "multihost", "off"),
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )
