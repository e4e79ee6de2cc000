"""Will the train step fit? Its memory as XLA plans it, against the device's memory, before step 0.

`clara-jax train` compiles its step ahead of time (training/ahead.py); the compiled program says how
many bytes it needs per device: its arguments (train state, frozen weights, batch), its outputs (the
new state, mostly written over the donated old one) and its temporaries (activations kept for the
backward pass, gradients, logits). This module sets that against the memory there is:

- on an accelerator, each device's own memory: `bytes_limit - bytes_in_use` from
  `device.memory_stats()`, plus what the step's own arguments already hold there;
- on CPU, the host's RAM: `MemAvailable` from /proc/meminfo (capped by a cgroup limit), plus what the
  weights and train state already hold; the simulated devices of one process share it, so the step's
  per-device figure counts once per local device.

A step that cannot fit is refused (StepDoesNotFit, a ConfigError: exit status 2) with settings that
would fit, each checked by compiling the step for it (compile-only, at the lowest backend optimisation
on CPU, which leaves XLA's buffer assignment unchanged): the largest micro-batch that divides the
global batch, full rematerialisation at the same micro-batch, and a generator half as long.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Callable

import jax

from clara_jax.training.run_spec import ConfigError

log = logging.getLogger(__name__)

# Micro sizes whose proportional share of the measured temporaries exceeds the memory by more than
# this factor are not compiled: temporaries shrink about in proportion to the rows each device
# computes, or less (measured: SmolLM2-135M stage 1 on CPU, micro 8 -> 4 -> 2 kept 49.0 %, then 50.2 %
# of them; the tiny model on 8 CPU devices, 4 -> 1 rows each, kept 28 %), so these cannot fit.
SKIP_FACTOR = 1.15
TIGHT = 0.9  # a step that fits but takes more than this share of the memory is logged as a warning
MAX_MICRO_COMPILES = 3  # micro sizes actually compiled in the search (the others are estimated)
GENERATOR_KEYS = ("gen_ids", "gen_mask", "targets", "target_mask")


class StepDoesNotFit(ConfigError):
    """The train step needs more memory than the device has: `clara-jax train` exits 2 before step 0."""

    def __init__(self, message: str, *, memory: StepMemory, available: Available, largest_micro: int | None):
        super().__init__(message)
        self.memory, self.available, self.largest_micro = memory, available, largest_micro


def gib(n: float) -> str:
    """Bytes in GiB (MiB below one GiB)."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes of one compiled step per device (XLA's memory analysis), and how many device copies
    share the memory it is checked against (the local devices on CPU, where they share the RAM)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (the train state)
    temp_bytes: int
    code_bytes: int = 0
    copies: int = 1
    error: str = ""  # the compiler refused the program for lack of memory (no byte counts then)

    @classmethod
    def of(cls, compiled, copies: int = 1) -> StepMemory | None:
        try:
            mem = compiled.memory_analysis()
        except (NotImplementedError, jax.errors.JaxRuntimeError):  # a backend without one
            mem = None
        if mem is None:
            return None
        size = lambda field: int(getattr(mem, field, 0) or 0)
        return cls(
            size("argument_size_in_bytes"),
            size("output_size_in_bytes"),
            size("alias_size_in_bytes"),
            size("temp_size_in_bytes"),
            size("generated_code_size_in_bytes"),
            copies,
        )

    @property
    def per_device(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def total(self) -> int:
        return self.per_device * self.copies

    def parts(self) -> str:
        times = f" per device, x {self.copies} devices" if self.copies > 1 else ""
        return (
            f"arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
            f"({gib(self.alias_bytes)} of them written over the donated state), temporaries "
            f"{gib(self.temp_bytes)}" + (f", code {gib(self.code_bytes)}" if self.code_bytes else "") + times
        )


@dataclasses.dataclass(frozen=True)
class Available:
    bytes: int
    what: str  # where the figure comes from, for the log line and the error


def host_available_bytes() -> int | None:
    """The host RAM a new allocation can take: MemAvailable, capped by the cgroup's headroom."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _inactive_file(path: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom() -> int | None:
    """limit - (usage - reclaimable page cache) of this container's memory cgroup (v2, then v1)."""
    for limit_file, usage_file, stat_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat",
        ),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            return max(limit - usage + _inactive_file(stat_file), 0)
    return None


def device_free_bytes(device) -> int | None:
    """An accelerator's free memory (`bytes_limit - bytes_in_use`), None if it does not say."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def resident_bytes(*trees) -> dict:
    """{device: bytes} this process's arrays in `trees` already hold on each device."""
    held = {}
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            for shard in getattr(leaf, "addressable_shards", ()):
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def available_memory(devices, resident: dict) -> Available | None:
    """The memory the step may use: what is free plus what its own arguments already hold (they are
    counted in the step's figure). None when the platform does not say (the check is skipped)."""
    if devices[0].platform == "cpu":
        free = host_available_bytes()
        if free is None:
            return None
        held = sum(resident.get(d, 0) for d in devices)
        return Available(
            free + held,
            f"host RAM: {gib(free)} available (MemAvailable) + {gib(held)} already held by the weights "
            "and train state",
        )
    per_device = []
    for d in devices:
        free = device_free_bytes(d)
        if free is None:
            return None
        per_device.append((free + resident.get(d, 0), free, d))
    total, free, device = min(per_device, key=lambda t: t[0])
    return Available(
        total,
        f"{device.device_kind} {device.id} memory: {gib(free)} free + {gib(total - free)} already held by the "
        "weights and train state",
    )


def memory_copies(devices) -> int:
    """How many per-device figures the memory is checked against: all local devices on CPU."""
    return len(devices) if devices[0].platform == "cpu" else 1


def fits(memory: StepMemory, available: Available) -> bool:
    return not memory.error and memory.total <= available.bytes


def needs(memory: StepMemory) -> str:
    return f"more than there is (the compiler: {memory.error})" if memory.error else gib(memory.total)


def describe(memory: StepMemory, available: Available, shapes: dict) -> str:
    """The one line a run logs before step 0."""
    share = 100 * memory.total / max(available.bytes, 1)
    return (
        f"memory check: the train step for batch {_shapes_text(shapes)} needs {gib(memory.total)} "
        f"({memory.parts()}) of {gib(available.bytes)} available ({available.what}): {share:.0f} %"
    )


def _shapes_text(shapes: dict) -> str:
    return "{" + ", ".join(f"{k}: {tuple(s)}" for k, (s, _) in shapes.items()) + "}"


def reshaped_micro(shapes: dict, micro: int, new_micro: int, global_size: int) -> dict:
    """The batch shapes laid out for another micro size ([micro_steps, micro·docs, ...] per key)."""
    steps = global_size // new_micro
    return {k: ((steps, s[1] // micro * new_micro, *s[2:]), dtype) for k, (s, dtype) in shapes.items()}


def shorter_generator(shapes: dict, width: int) -> dict:
    return {k: ((*s[:2], width), dt) if k in GENERATOR_KEYS else (s, dt) for k, (s, dt) in shapes.items()}


def find_fitting_settings(
    config,
    shapes: dict,
    measured: StepMemory,
    available: Available,
    compile_candidate: Callable[..., StepMemory | None],
    *,
    rows_per_device: Callable[[int], float] | None = None,
    generator_probe: Callable[[int], tuple[int, int] | None] | None = None,
) -> StepDoesNotFit:
    """The error for a step that does not fit, naming settings that would: each candidate is checked
    by `compile_candidate(shapes, remat=None) -> StepMemory` (compile only, nothing runs).

    `rows_per_device(micro)`: the batch rows each device computes at a micro size (rows that do not
    divide over the batch's mesh axes stay whole); by default the micro size itself.
    `generator_probe(length)`: the same batch laid out with that clara.generator_max_length, as
    (prompts + targets cut, rows), or None if its rows could not hold their documents' memory tokens."""
    rows_per_device = rows_per_device or float
    micro = config.batch.micro_size
    lines = []
    width = shapes["gen_ids"][0][2] if "gen_ids" in shapes else 0
    shorter = width // 2
    cut = generator_probe(shorter) if generator_probe and shorter >= 16 else None
    # a generator half as long would cut the documents' memory tokens out of some prompt
    cuts_memory = shorter >= 16 and generator_probe is not None and cut is None
    # remat and the shorter generator do not depend on the micro-batch search: they compile in two
    # threads beside it (XLA compiles with the GIL released, each mostly on one core)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="memory-check") as pool:
        remat = pool.submit(compile_candidate, shapes, remat="full") if config.model.remat != "full" else None
        shorter_ok = shorter >= 16 and not cuts_memory
        generator = pool.submit(compile_candidate, shorter_generator(shapes, shorter)) if shorter_ok else None
        largest = _search_micro(
            config, shapes, measured, available, compile_candidate, rows_per_device, lines
        )
        remat, generator = (f and f.result() for f in (remat, generator))

    # 2. recompute each layer's activations in the backward pass, at the same micro-batch
    if remat is not None:
        lines.append(
            f"--config.model.remat=full: needs {needs(remat)} at micro_size={micro}: "
            f"{'fits' if fits(remat, available) else 'does not fit'} (activations are recomputed "
            "in the backward pass: slower steps)"
        )

    # 3. a generator half as long, at the same micro-batch (longer prompts + targets are cut, and counted)
    if cuts_memory:
        lines.append(
            f"clara.generator_max_length={shorter} is not an option: it would cut the documents' memory "
            f"tokens out of this batch's prompts ({width} tokens now)"
        )
    elif generator is not None:
        cuts = f"; it cuts {cut[0]} of these {cut[1]} prompts + targets, counted" if cut else ""
        lines.append(
            f"--config.clara.generator_max_length={shorter}: needs {needs(generator)} at "
            f"micro_size={micro}: {'fits' if fits(generator, available) else 'does not fit'} (this "
            f"batch's generator rows are {width} tokens{cuts})"
        )

    what = f"it needs {needs(measured)}" + ("" if measured.error else f" ({measured.parts()})")
    message = (
        f"the train step does not fit in memory: {what} for batch {_shapes_text(shapes)} at "
        f"batch.micro_size={micro}, and {gib(available.bytes)} is available ({available.what}). "
        "Each setting below was checked by compiling the step for it (nothing ran):\n    "
        + "\n    ".join(lines)
        + "\n  (--config.memory_check=false skips this check)"
    )
    return StepDoesNotFit(message, memory=measured, available=available, largest_micro=largest)


def _search_micro(
    config, shapes, measured, available, compile_candidate, rows_per_device, lines
) -> int | None:
    """1. The largest micro-batch that fits, among those that divide the global batch (its lines are
    appended to `lines`). The batch arguments hold the whole global batch at any micro size; the
    temporaries follow the rows each device computes, so a micro size whose share of them is far
    beyond the memory is estimated, not compiled."""
    micro, global_size = config.batch.micro_size, config.batch.global_size
    largest = None
    fixed = measured.per_device - measured.temp_bytes
    too_big, compiled, untried = [], 0, None
    for m in (d for d in range(micro - 1, 0, -1) if global_size % d == 0):
        share = rows_per_device(m) / rows_per_device(micro)
        estimate = int((fixed + measured.temp_bytes * share) * measured.copies)
        if not measured.error and estimate > SKIP_FACTOR * available.bytes:
            too_big.append(f"micro_size={m} (about {gib(estimate)}, estimated from micro_size={micro})")
            continue
        if compiled == MAX_MICRO_COMPILES:
            untried = m
            break
        compiled += 1
        memory = compile_candidate(reshaped_micro(shapes, micro, m, global_size))
        if memory is None:
            untried = m
            break
        if fits(memory, available):
            largest = m
            lines.append(
                f"--config.batch.micro_size={m}: needs {needs(memory)}, the largest micro-batch that fits "
                f"(the global batch of {global_size} in {global_size // m} micro-steps)"
            )
            break
        too_big.append(f"micro_size={m} ({needs(memory)})")
    if largest is None and micro == 1:
        lines.append("batch.micro_size is 1 already")
    elif largest is None:
        lines.append(
            f"no micro_size fits that was tried (micro_size={untried} and below were not tried)"
            if untried
            else f"no micro_size fits, down to 1 (the global batch is {global_size})"
        )
    if too_big:
        lines.append("too large: " + ", ".join(too_big))

    return largest
