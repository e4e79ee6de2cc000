"""The train step compiled before step 0: the memory check, and every bucket shape on request.

`clara-jax train` compiles its step for the shape of the first batch it will take (`memory_check`,
on by default) or for every batch shape the run's data will produce (`data.precompile_buckets`),
before step 0, logging each compilation with its shapes and seconds; the memory check
(training/memory_check.py) reads each compiled program's memory analysis and refuses a step that
cannot fit. The compiled executables are the ones the steps then call (`StepExecutables`): nothing
compiles twice, and a run that compiled every bucket ahead compiles nothing mid-way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from clara_jax.parallel.rules import DEFAULT_RULES
from clara_jax.training import memory_check as mc
from clara_jax.training.step import micro_batch_shardings

log = logging.getLogger(__name__)


def shape_key(batch: dict) -> tuple:
    """What tells two batches' programs apart: every leaf's shape and (canonical) dtype."""
    return tuple(
        (k, tuple(v.shape), np.dtype(jax.dtypes.canonicalize_dtype(v.dtype)).str) for k, v in batch.items()
    )


def batch_structs(shapes: dict, shardings: dict | None = None) -> dict:
    """`{key: (shape, dtype)}` as ShapeDtypeStructs (on the step's batch shardings)."""
    return {
        k: jax.ShapeDtypeStruct(
            s, jax.dtypes.canonicalize_dtype(dt), sharding=None if shardings is None else shardings[k]
        )
        for k, (s, dt) in shapes.items()
    }


class StepExecutables:
    """The jitted train step, with executables compiled ahead of time for some batch shapes.

    A batch of a compiled shape runs its executable; any other shape goes to the jitted step, which
    compiles it on first use. `_cache_size()` counts both, as the loop's StepClock reads it to tell
    a compiling dispatch from a cached one."""

    def __init__(self, jitted):
        self.jitted = jitted
        self.executables = {}

    def compile(self, state, frozen, batch: dict, **compile_kwargs):
        """Lower and compile the step for `batch` (ShapeDtypeStructs); (executable, seconds)."""
        start = time.perf_counter()
        compiled = self.jitted.lower(state, frozen, batch).compile(**compile_kwargs)
        self.executables[shape_key(batch)] = compiled
        return compiled, time.perf_counter() - start

    def __call__(self, state, frozen, batch):
        compiled = self.executables.get(shape_key(batch))
        return (compiled or self.jitted)(state, frozen, batch)

    def _cache_size(self) -> int:
        return len(self.executables) + self.jitted._cache_size()


def _batch_bytes(shapes: dict) -> int:
    return sum(math.prod(s) * np.dtype(dt).itemsize for s, dt in shapes.values())


def _agree(ok: bool) -> bool:
    """Every process refuses the step if one of them must (they would otherwise wait on each other)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def compile_ahead(
    config,
    steps: StepExecutables,
    state,
    frozen,
    batch_shardings: dict,
    shapes: list[dict],
    mesh,
    candidate_program: Callable,
    *,
    rules=DEFAULT_RULES,
    generator_probe: Callable | None = None,
) -> list[dict]:
    """Compile the step for each of `shapes` ({key: (shape, dtype)}), the largest batch first, and
    with `config.memory_check` refuse one that cannot fit (StepDoesNotFit, naming settings that would:
    `candidate_program(shapes, remat=None)` builds the step for them). Returns the compilations
    ({"step": 0, "shapes", "seconds"}, as the loop's StepClock records them). `generator_probe`: see
    memory_check.find_fitting_settings."""
    check = config.get("memory_check", True)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    copies = mc.memory_copies(local)
    compiles, largest, available = [], None, None

    def candidate(shapes, remat=None):
        return _candidate_memory(candidate_program, shapes, remat, mesh, copies)

    def does_not_fit(shape, memory):
        return mc.find_fitting_settings(
            config,
            shape,
            memory,
            available,
            candidate,
            generator_probe=generator_probe,
            rows_per_device=lambda m: _rows_per_device(shape, config, m, mesh, rules),
        )

    def measure_available() -> bool:  # once, after the first compilation; False: the check is off
        nonlocal available, check
        if check and available is None:
            available = mc.available_memory(local, mc.resident_bytes(state, frozen))
            if available is None:
                log.info("memory check skipped: %s does not report its free memory", local[0].platform)
                check = False
        return check

    for shape in sorted(shapes, key=_batch_bytes, reverse=True):
        with jax.set_mesh(mesh):
            try:
                compiled, seconds = steps.compile(state, frozen, batch_structs(shape, batch_shardings))
            except jax.errors.JaxRuntimeError as err:  # an accelerator's compiler refusing it outright
                if "RESOURCE_EXHAUSTED" not in str(err) or not measure_available():
                    raise
                raise does_not_fit(
                    shape, mc.StepMemory(0, 0, 0, 0, copies=copies, error=_first_line(err))
                ) from None
        text = {k: tuple(s) for k, (s, _) in shape.items()}
        compiles.append({"step": 0, "shapes": text, "seconds": seconds})
        log.info(
            "compiled the train step for %s in %.1f s before step 0 (compilation %d of %d)",
            text,
            seconds,
            len(compiles),
            len(shapes),
        )
        if not check:
            continue
        memory = mc.StepMemory.of(compiled, copies)
        if memory is None:
            log.info("memory check skipped: the compiler gives no memory analysis on %s", local[0].platform)
            check = False
            continue
        if not measure_available():
            continue
        if largest is None or memory.total > largest[0].total:
            largest = (memory, shape)
        if not _agree(mc.fits(memory, available)):
            log.info("%s: does not fit", mc.describe(memory, available, shape))
            raise does_not_fit(shape, memory)
    if largest is not None:
        memory, shape = largest
        tight = memory.total > mc.TIGHT * available.bytes
        (log.warning if tight else log.info)(
            "%s%s%s",
            mc.describe(memory, available, shape),
            f" (the largest of {len(shapes)} batch shapes)" if len(shapes) > 1 else "",
            "; close to the limit: other programs' memory use can still make it run out" if tight else "",
        )
    return compiles


def _first_line(err) -> str:
    return str(err).strip().splitlines()[0].rstrip(".")


def _rows_per_device(shape: dict, config, micro: int, mesh, rules) -> float:
    """The generator rows each device computes at `micro` (the batch rule's mesh axes split them
    when they divide, else every device computes them all)."""
    b = config.batch
    gen = mc.reshaped_micro(shape, b.micro_size, micro, b.global_size)["gen_ids"][0]
    spec = micro_batch_shardings({"x": jax.ShapeDtypeStruct(gen, np.int32)}, mesh, rules)["x"].spec
    axes = spec[1] if len(spec) > 1 else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return gen[1] / math.prod(mesh.shape[a] for a in axes)


def _candidate_memory(candidate_program, shapes, remat, mesh, copies):
    """Compile (only) the step for other settings: its memory (None without an analysis). On CPU at
    the lowest backend optimisation: XLA plans the same buffers, in about half the time."""
    start = time.perf_counter()
    program = candidate_program(shapes, remat=remat)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), program.frozen)
    options = {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else None
    with jax.set_mesh(mesh):
        lowered = program.step.lower(
            program.abstract_state, frozen, batch_structs(shapes, program.shardings.batch)
        )
        try:
            compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
            memory = mc.StepMemory.of(compiled, copies)
        except jax.errors.JaxRuntimeError as err:  # an accelerator's compiler refusing it: does not fit
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            memory = mc.StepMemory(0, 0, 0, 0, copies=copies, error=_first_line(err))
    log.info(
        "memory check: batch %s%s needs %s (compiled in %.1f s, not run)",
        {k: tuple(s) for k, (s, _) in shapes.items()},
        f" with model.remat={remat}" if remat else "",
        "?" if memory is None else mc.needs(memory),
        time.perf_counter() - start,
    )
    return memory
