"""Joining a multi-process JAX run: `jax.distributed.initialize` from flags or the environment.

Every process of a multi-host run (TPU pod hosts, GPU nodes, or several CPU processes on one
machine) must call `initialize_distributed` before anything touches a device; afterwards
`jax.devices()` lists the devices of all processes and one mesh spans them. JAX's own runtime
does the work (coordinator service, cluster auto-detection, gloo collectives on CPU); this
module only decides which arguments to pass and says clearly what went wrong.

Sources, strongest first: explicit flags, then the environment variables
CLARA_JAX_COORDINATOR (HOST:PORT of process 0), CLARA_JAX_NUM_PROCESSES, CLARA_JAX_PROCESS_ID
and CLARA_JAX_INIT_TIMEOUT (seconds). Any explicit value means "multi-process"; `mode="auto"`
lets JAX detect the cluster (Cloud TPU, Slurm, Open MPI) and fill in whatever is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

MODES = ("off", "auto")
ENV_COORDINATOR = "CLARA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "CLARA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CLARA_JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "CLARA_JAX_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 300


class DistributedError(RuntimeError):
    """Joining the multi-process run failed (peers missing, timeout, called too late)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins (or does not join) a multi-process run.

    `mode` is "off" (single process unless explicit values are given) or "auto" (JAX's cluster
    detection). `initialization_timeout` bounds how long a process waits for the others, so a
    missing peer is an error, not a hang.
    """

    mode: str = "off"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = DEFAULT_INIT_TIMEOUT

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"multihost mode {self.mode!r}: expected one of {MODES}")
        if self.coordinator is not None:
            host, sep, port = self.coordinator.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(
                    f"coordinator address {self.coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234"
                )
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes = {self.num_processes}: expected >= 1")
        if self.process_id is not None:
            if self.process_id < 0:
                raise ValueError(f"process_id = {self.process_id}: expected >= 0")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(
                    f"process_id = {self.process_id} is outside [0, {self.num_processes}) "
                    f"(num_processes = {self.num_processes})"
                )
        if self.initialization_timeout < 1:
            raise ValueError(f"initialization_timeout = {self.initialization_timeout}: expected >= 1 second")

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    @property
    def enabled(self) -> bool:
        """Whether `jax.distributed.initialize` will be called at all."""
        if self.mode == "auto":
            return True
        return self.explicit and self.num_processes != 1

    @classmethod
    def from_args(
        cls,
        mode: str = "off",
        coordinator: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        *,
        local_device_ids: Sequence[int] | None = None,
        initialization_timeout: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> DistributedConfig:
        """Flags win over the environment; `environ` defaults to `os.environ`."""
        env = os.environ if environ is None else environ
        return cls(
            mode=mode or "off",
            coordinator=coordinator or env.get(ENV_COORDINATOR) or None,
            num_processes=_pick_int(num_processes, env, ENV_NUM_PROCESSES),
            process_id=_pick_int(process_id, env, ENV_PROCESS_ID),
            local_device_ids=tuple(local_device_ids) if local_device_ids is not None else None,
            initialization_timeout=_pick_int(initialization_timeout, env, ENV_INIT_TIMEOUT)
            or DEFAULT_INIT_TIMEOUT,
        )


def _pick_int(value: int | None, env: Mapping[str, str], name: str) -> int | None:
    if value is not None:
        return int(value)
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected an integer") from None


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Join the run described by `cfg`; True when this is a multi-process run.

    Must come before any JAX call that touches a device (jax.devices(), an array, a jit):
    afterwards the backend exists and JAX refuses to initialize.
    """
    import jax
    from jax._src import xla_bridge

    if not cfg.enabled:
        return False
    if jax.distributed.is_initialized():
        log.info(
            "jax.distributed already initialized: process %d of %d", jax.process_index(), jax.process_count()
        )
        return jax.process_count() > 1
    if cfg.mode == "off":
        missing = [
            flag
            for flag, value in (
                ("--coordinator", cfg.coordinator),
                ("--num-processes", cfg.num_processes),
                ("--process-id", cfg.process_id),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"multi-process run without cluster auto-detection needs {', '.join(missing)} "
                f"(or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); "
                "or pass --multihost auto on a TPU pod, Slurm or Open MPI"
            )
    if xla_bridge.backends_are_initialized():
        raise DistributedError(
            "initialize_distributed was called after JAX had already set up its devices; call it "
            "first, before anything uses jax.devices(), arrays or jit"
        )
    # CPU processes exchange collectives over TCP with gloo (JAX's CPU default, made explicit).
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        coordinator_address=cfg.coordinator,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids is not None else None,
        initialization_timeout=cfg.initialization_timeout,
    )
    where = (
        f"coordinator {cfg.coordinator}, process {cfg.process_id} of {cfg.num_processes}"
        if cfg.explicit
        else "cluster auto-detection"
    )
    log.info("joining a multi-process run (%s, timeout %d s)", where, cfg.initialization_timeout)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as err:
        hint = (
            "; auto-detection found no TPU pod, Slurm or Open MPI environment: give --coordinator, "
            "--num-processes and --process-id"
            if cfg.mode == "auto" and not cfg.explicit
            else ""
        )
        raise DistributedError(f"jax.distributed.initialize failed ({where}): {err}{hint}") from err
    log.info(
        "process %d of %d: %d local %s device(s) of %d in total",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.local_devices()[0].platform,
        jax.device_count(),
    )
    return jax.process_count() > 1


_barriers = 0


def barrier(name: str, timeout_seconds: int = 1800) -> None:
    """Wait until every process gets here (a no-op for one process).

    Uses the coordination service's barrier, not a device collective: CPU (gloo) collectives
    give up after about 30 s, too short while process 0 alone writes a model directory.
    """
    import jax

    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _barriers += 1  # every process passes the same barriers in the same order
    client = distributed.global_state.client
    if client is None:  # initialized by other means: fall back to a device collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"{name} #{_barriers}")
        return
    client.wait_at_barrier(f"clara_jax:{name}:{_barriers}", timeout_in_ms=timeout_seconds * 1000)
