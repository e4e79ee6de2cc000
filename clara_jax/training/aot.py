"""Ahead-of-time compilation of a stage's train step for a TPU topology that is described, not present.

`libtpu` can describe a TPU slice (its chips, their coordinates and the compiler target) on a
CPU-only host; XLA then compiles the real train step, with its shardings, for that slice and
tells how much HBM each chip would need. This answers "does Mistral-7B stage 3 fit on a v5e-16
with this mesh and batch?" in minutes, before any TPU is rented.

Nothing full-size is ever allocated: the model, the optimizer state and the batch are shapes
(`nnx.eval_shape` / `jax.eval_shape`), the step is the one `clara-jax train` runs
(`training/step.py` with the stage's loss and the config's sharding rules).

libtpu is found, in order, from `--libtpu PATH`, `$TPU_LIBRARY_PATH`, an importable `libtpu`
package (the `[tpu]` extra), or `<venv>/libtpu-aside/libtpu/libtpu.so`, where
`scripts/bootstrap.sh` installs it aside so that jax does not probe for a TPU in every process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

# HBM per chip in GiB, as Google's Cloud TPU system-architecture pages list them
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e (Trillium) 32 GiB. v4 and v5p run in megacore mode (one JAX device per chip), so a
# device owns a whole chip's HBM on every generation listed here.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Topology dimensions per generation (2-D tori for the "lite" chips, 3-D for the others), and the
# accelerator-type name libtpu would read from the TPU VM's metadata (count = chips, or cores).
_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}
_ACCELERATOR_TYPE = {
    "v4": "v4-{cores}",
    "v5e": "v5litepod-{chips}",
    "v5p": "v5p-{cores}",
    "v6e": "v6e-{chips}",
}
_TOPOLOGY_RE = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<shape>\d+(?:x\d+)*?)(?:x(?P<slices>\d+)slices)?$")


class AotError(ValueError):
    """Bad input to the compile command (topology, mesh, config): exit status 2."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice shape: generation, chips per dimension, number of slices (over DCN)."""

    generation: str
    shape: tuple[int, ...]
    slices: int = 1

    @classmethod
    def parse(cls, spec: str) -> Topology:
        """'v5e:4x4', 'v5p:2x2x1', 'v5e:4x4x2slices' (two v5e-16 slices joined over DCN)."""
        m = _TOPOLOGY_RE.match(spec.strip().lower())
        if not m:
            raise AotError(
                f"topology {spec!r}: expected GENERATION:AxB[xC][xNslices], e.g. v5e:4x4, v5p:2x2x1, "
                "v5e:4x4x2slices"
            )
        gen = _ALIASES.get(m["gen"], m["gen"])
        if gen not in HBM_GIB:
            raise AotError(
                f"topology {spec!r}: unknown TPU generation {m['gen']!r}; known: {sorted(HBM_GIB)}"
            )
        shape = tuple(int(x) for x in m["shape"].split("x"))
        if len(shape) != _DIMS[gen]:
            want = "x".join(["N"] * _DIMS[gen])
            raise AotError(f"topology {spec!r}: {gen} slices are {_DIMS[gen]}-D ({want}), got {m['shape']!r}")
        slices = int(m["slices"] or 1)
        if min(shape) < 1 or slices < 1:
            raise AotError(f"topology {spec!r}: every dimension and the slice count must be >= 1")
        return cls(gen, shape, slices)

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.generation}:{dims}" + (f"x{self.slices}slices" if self.slices > 1 else "")

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def hbm_bytes(self) -> int:
        return int(HBM_GIB[self.generation] * 2**30)

    @property
    def accelerator_type(self) -> str:
        chips = self.chips_per_slice
        return _ACCELERATOR_TYPE[self.generation].format(chips=chips, cores=2 * chips)


def find_libtpu(explicit: str | None = None) -> str | None:
    """Path of libtpu.so from the option, the environment, the `libtpu` package or the aside dir."""
    candidates = [explicit, os.environ.get("TPU_LIBRARY_PATH")]
    try:
        import importlib.util

        spec = importlib.util.find_spec("libtpu")
        if spec is not None and spec.origin:
            candidates.append(os.path.join(os.path.dirname(spec.origin), "libtpu.so"))
    except (ImportError, ValueError):
        pass
    candidates.append(os.path.join(sys.prefix, "libtpu-aside", "libtpu", "libtpu.so"))
    for path in candidates:
        if path and os.path.isdir(path):
            path = os.path.join(path, "libtpu.so")
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    if explicit:
        raise AotError(f"--libtpu {explicit!r}: no libtpu.so there")
    return None


def topology_devices(topology: Topology, libtpu_path: str):
    """Compile-only TPU devices of `topology` (no TPU needed: libtpu only describes them)."""
    os.environ["TPU_LIBRARY_PATH"] = libtpu_path
    # On a host that is not a TPU VM, libtpu would try the VM metadata server and warn; say who we are.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    # No chip is opened, so several compilations may run side by side (libtpu locks by default).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {"topology_name": f"{topology.generation}:{'x'.join(map(str, topology.shape))}"}
    if topology.generation in ("v4", "v5p"):
        kwargs["chip_config_name"] = "megacore"
    if topology.slices > 1:
        kwargs["num_slices"] = topology.slices
    try:
        desc = topologies.get_topology_desc(platform="tpu", **kwargs)
    except Exception as err:  # libtpu reports bad shapes as runtime errors
        raise AotError(f"topology {topology.name}: libtpu refused it: {err}") from None
    return list(desc.devices)


@dataclasses.dataclass
class CompileResult:
    """One stage's compiled step: per-device bytes XLA plans for, against the chip's HBM."""

    stage: str
    topology: str
    mesh: str
    devices: int
    settings: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    lower_seconds: float
    compile_seconds: float
    error: str = ""  # the compiler's own out-of-memory message (then no byte counts exist)

    @property
    def total_bytes(self) -> int:
        """Peak per device: inputs + outputs not aliased to (donated) inputs + scratch + program."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.error and self.total_bytes <= self.hbm_bytes

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, fits=self.fits)
        return out

    def summary(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        head = f"{self.stage} on {self.topology} ({self.devices} devices, mesh {self.mesh}): {verdict}\n"
        if self.error:
            return head + f"  the TPU compiler gave up after {self.compile_seconds:.1f} s: {self.error}"
        return (
            f"{self.stage} on {self.topology} ({self.devices} devices, mesh {self.mesh}): {verdict}\n"
            f"  per device: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
            f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}, code {gib(self.code_bytes)}\n"
            f"  total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
            f"({100 * self.total_bytes / self.hbm_bytes:.0f} %); lowered in {self.lower_seconds:.1f} s, "
            f"compiled in {self.compile_seconds:.1f} s"
        )


def _vocabulary(config):
    """(base vocab, CLaRa vocab, <MEM*> ids): from the tokenizer when there is one, else from the
    preset's vocabulary plus n_mem + 3 CLaRa tokens (as `load_tokenizer` adds them)."""
    from clara_jax.model.presets import preset

    n_mem = config.clara.doc_max_length // config.clara.compression_rate
    if config.model.tokenizer or config.model.path or config.model.preset == "tiny":
        from clara_jax.data.tokenizer import load_tokenizer
        from clara_jax.training.build import tokenizer_dir

        tok = load_tokenizer(tokenizer_dir(config), n_mem=n_mem)
        return tok.base_vocab_size, tok.vocab_size, tok.mem_token_ids
    base = preset(config.model.preset).vocab_size
    return base, base + n_mem + 3, tuple(range(base, base + n_mem))


def abstract_model(config):
    """The stage's model (base + CLaRa rows + three adapters) as shapes only, and its ClaraConfig:
    `build_model`'s recipe on the preset's architecture, with no weights read."""
    from flax import nnx

    from clara_jax.model.decoder import Decoder
    from clara_jax.model.presets import preset
    from clara_jax.training.build import add_clara_parts
    from clara_jax.training.run_spec import clara_settings

    base_vocab, vocab, mem_ids = _vocabulary(config)
    arch = preset(config.model.preset).replace(vocab_size=base_vocab)

    def build():
        model = Decoder(arch, rngs=nnx.Rngs(0), dtype=config.model.dtype, remat=config.model.remat)
        add_clara_parts(model, config, vocab, mem_ids, base_vocab)
        return model

    return nnx.eval_shape(build), clara_settings(config).model_config(mem_ids)


def abstract_batch(config, n_mem: int, gen_length: int = 0, query_length: int = 0) -> dict:
    """The longest batch the data pipeline can produce for this config, as ShapeDtypeStructs
    laid out [micro_steps, micro_size·(docs), length] (data/pipeline.py). Encoder rows are
    <ENC> <s> doc </s> + n_mem memory tokens; the generator row is at most generator_max_length;
    stage 3 with cached candidates reads cand_memory [micro_steps, micro_size, N, n_mem, D]."""
    import jax
    import jax.numpy as jnp

    from clara_jax.model.decoder import DTypePolicy
    from clara_jax.model.presets import preset
    from clara_jax.model.stage_registry import get_stage
    from clara_jax.training.candidate_cache import reads_cached_candidates

    c, b = config.clara, config.batch
    steps, micro = b.global_size // b.micro_size, b.micro_size
    enc_len = c.doc_max_length + 3 + n_mem
    gen_len = gen_length or c.generator_max_length
    ids = lambda rows, length: jax.ShapeDtypeStruct((steps, rows, length), jnp.int32)
    flags = lambda rows, length: jax.ShapeDtypeStruct((steps, rows, length), jnp.bool_)
    retrieval = get_stage(config.stage).retrieval
    docs = config.data.candidates if retrieval else c.docs_per_example
    batch = {
        "enc_ids": ids(micro * docs, enc_len),
        "enc_mask": flags(micro * docs, enc_len),
        "gen_ids": ids(micro, gen_len),
        "gen_mask": flags(micro, gen_len),
        "targets": ids(micro, gen_len),
        "target_mask": flags(micro, gen_len),
    }
    if retrieval and reads_cached_candidates(config):  # the candidates come compressed (loop.py)
        hidden = preset(config.model.preset).hidden_size
        del batch["enc_ids"], batch["enc_mask"]
        batch["cand_memory"] = jax.ShapeDtypeStruct(  # hidden states: the compute dtype
            (steps, micro, docs, n_mem, hidden), DTypePolicy.parse(config.model.dtype).compute
        )
    if retrieval:
        q_len = (query_length or c.query_max_length + 3) + n_mem
        batch.update(
            query_ids=ids(micro, q_len),
            query_mask=flags(micro, q_len),
            cand_valid=flags(micro, docs),
            positives=flags(micro, docs),
        )
    return batch


def _mesh_for(config, devices, topology: Topology, dcn_spec: str):
    from clara_jax.parallel.mesh import MeshConfig, make_mesh

    if topology.slices > 1 and not dcn_spec:
        dcn_spec = "data=-1"  # replicas across slices: only the gradient all-reduce crosses DCN
    try:
        mesh_cfg = MeshConfig.from_spec(config.mesh, dcn_spec)
        return make_mesh(mesh_cfg, devices)
    except (ValueError, AssertionError, NotImplementedError) as err:
        per_slice = len(devices) // topology.slices
        raise AotError(
            f"mesh {config.mesh!r}{f' (dcn {dcn_spec!r})' if dcn_spec else ''} does not fit topology "
            f"{topology.name} ({len(devices)} devices, {per_slice} per slice): {err}. "
            "Set --config.mesh so the sizes multiply to the devices per slice (one size may be -1)"
        ) from None


def compile_stage(
    config,
    topology: Topology,
    devices,
    *,
    hbm_bytes: int | None = None,
    dcn_spec: str = "",
    gen_length: int = 0,
    query_length: int = 0,
    log=print,
) -> CompileResult:
    """Lower and compile the stage's real train step for `devices`; nothing is executed."""
    import jax

    from clara_jax.parallel.mesh import describe
    from clara_jax.parallel.rules import logical_to_spec, parse_rules
    from clara_jax.training.run_spec import optimizer_config, stage_spec_of
    from clara_jax.training.stages import stage_program

    mesh = _mesh_for(config, devices, topology, dcn_spec)
    rules = parse_rules(config.sharding_rules)
    model, clara = abstract_model(config)
    spec = stage_spec_of(config)
    batch = abstract_batch(config, clara.n_mem, gen_length, query_length)
    # the program `clara-jax train` runs (training/loop.py starts it with stage_program(...).start())
    program = stage_program(
        model,
        spec,
        clara,
        optimizer_config(config, max(config.total_steps, 1000)),
        mesh,
        batch,
        rules=rules,
        seed=config.seed,
        gumbel=config.clara.gumbel,
        straight_through=config.clara.straight_through,
        candidate_dropout=config.clara.candidate_dropout,
    )
    step, state, frozen = program.step, program.abstract_state, program.frozen
    batch_spec = logical_to_spec(("batch",), rules, mesh)[0]
    batch_axes = () if batch_spec is None else (batch_spec,) if isinstance(batch_spec, str) else batch_spec
    splits = math.prod(mesh.shape[a] for a in batch_axes)
    if config.batch.micro_size % splits:
        log(
            f"{config.stage}: warning: batch.micro_size={config.batch.micro_size} is not a multiple of "
            f"{' x '.join(batch_axes)} = {splits} (the batch rule's mesh axes): the rows are split over "
            "fewer devices, or none"
        )
    log(f"{config.stage}: lowering on {describe(mesh)} ...")
    with jax.set_mesh(mesh):
        tick = time.perf_counter()
        lowered = step.lower(state, frozen, batch)
        lower_seconds = time.perf_counter() - tick
        log(f"{config.stage}: compiling (lowered in {lower_seconds:.1f} s) ...")
        tick = time.perf_counter()
        try:
            compiled, error = lowered.compile(), ""
        except jax.errors.JaxRuntimeError as err:
            # XLA refuses programs whose temporaries exceed the chip's HBM: that is a "does not fit".
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            compiled, error = None, str(err).strip().splitlines()[0].rstrip(".")
        compile_seconds = time.perf_counter() - tick
    mem = compiled.memory_analysis() if compiled is not None else None
    if compiled is not None and mem is None:
        raise RuntimeError(f"{config.stage}: the TPU compiler returned no memory analysis")
    size = lambda field: int(getattr(mem, field, 0)) if mem is not None else 0
    b = config.batch
    settings = {
        "preset": config.model.preset,
        "dtype": config.model.dtype,
        "remat": config.model.remat,
        "sharding_rules": config.sharding_rules,
        "global_batch": b.global_size,
        "micro_batch": b.micro_size,
        "micro_steps": b.global_size // b.micro_size,
        "examples_per_device": b.micro_size / splits if b.micro_size % splits == 0 else b.micro_size,
        "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
    }
    return CompileResult(
        stage=config.stage,
        topology=topology.name,
        mesh=" ".join(f"{n}={s}" for n, s in mesh.shape.items()),
        devices=len(devices),
        settings=settings,
        argument_bytes=size("argument_size_in_bytes"),
        output_bytes=size("output_size_in_bytes"),
        alias_bytes=size("alias_size_in_bytes"),
        temp_bytes=size("temp_size_in_bytes"),
        code_bytes=size("generated_code_size_in_bytes"),
        hbm_bytes=hbm_bytes or topology.hbm_bytes,
        lower_seconds=lower_seconds,
        compile_seconds=compile_seconds,
        error=error,
    )


def load_stage_config(spec: str, overrides: list[str], parallelism: str = ""):
    """Load, override and validate a run config; a base path is not needed (shapes come from the preset)."""
    from clara_jax.training.config import apply_overrides, load_config_file, validate

    config = load_config_file(spec)
    if parallelism:
        from clara_jax.parallel.presets import apply_parallelism

        apply_parallelism(config, parallelism)
    config = apply_overrides(config, list(overrides))
    check = config.copy_and_resolve_references()
    if not check.model.path:
        check.model.path = "<architecture from the preset>"
    validate(check)
    return config
