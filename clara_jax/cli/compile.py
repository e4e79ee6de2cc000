"""`clara-jax compile`: compile stages' train steps ahead of time for a described TPU topology and check
they fit in HBM (clara_jax.training.aot).

jax is imported only inside `run`, after the host platform is pinned to CPU, and libtpu is found
before any TPU device is described: building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from clara_jax.cli.common import EXIT_FAILED, EXIT_OK, error


def parse_stages(text: str, default: str) -> list[str]:
    """`--stages 1,3` (or stage1,stage3) as stage names; empty: the config's own stage."""
    from clara_jax.model.stage_registry import STAGE_NAMES
    from clara_jax.training.aot import AotError

    if not text:
        return [default]
    stages = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name = part if part.startswith("stage") else f"stage{part}"
        if name not in STAGE_NAMES:
            raise AotError(f"--stages {text!r}: {part!r} is not a stage; use 1, 2, 3 (or stage1, ...)")
        stages.append(name)
    return stages


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if not os.environ.get("JAX_PLATFORMS"):
        import jax  # the host runs on CPU; the TPU is only described (no probing for a local one)

        jax.config.update("jax_platforms", "cpu")

    from clara_jax.model.stage_registry import STAGE_NAMES
    from clara_jax.training.aot import (
        AotError,
        Topology,
        compile_stage,
        find_libtpu,
        load_stage_config,
        topology_devices,
    )
    from clara_jax.training.config import ConfigError, stage_config_spec

    try:
        topology = Topology.parse(args.topology)
        first = load_stage_config(args.config, overrides, args.parallelism)
        stages = list(STAGE_NAMES) if args.all_stages else parse_stages(args.stages, first.stage)
        libtpu = find_libtpu(args.libtpu)
        if libtpu is None:
            raise AotError(
                "libtpu not found: pip install 'clara_jax[tpu]', or `pip install --no-deps --target "
                ".venv/libtpu-aside libtpu==<version jax[tpu] pins>` (scripts/bootstrap.sh does this), "
                "or pass --libtpu PATH / set TPU_LIBRARY_PATH"
            )
        devices = topology_devices(topology, libtpu)
        print(f"topology {topology.name}: {len(devices)} x {devices[0].device_kind} (libtpu {libtpu})")
        results = []
        for stage in stages:
            config = (
                first
                if stage == first.stage
                else load_stage_config(stage_config_spec(args.config, stage), overrides, args.parallelism)
            )
            result = compile_stage(
                config,
                topology,
                devices,
                hbm_bytes=int(args.hbm_gib * 2**30) if args.hbm_gib else None,
                dcn_spec=args.dcn_mesh,
                gen_length=args.gen_length,
                query_length=args.query_length,
            )
            print(result.summary(), flush=True)
            results.append(result)
    except (AotError, ConfigError) as err:
        return error("compile", err)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=2)
        print(f"wrote {args.json}")
    too_big = [r for r in results if not r.fits]
    hint = (
        "try a larger topology, --config.model.remat=full, a smaller --config.batch.micro_size, or more fsdp"
    )
    for r in too_big:
        need = (
            f"the TPU compiler ran out of HBM ({r.error})"
            if r.error
            else f"needs {r.total_bytes / 2**30:.2f} GiB per device, more than the "
            f"{r.hbm_bytes / 2**30:.2f} GiB of HBM per chip"
        )
        print(f"clara-jax compile: error: {r.stage} on {r.topology}: {need}; {hint}", file=sys.stderr)
    return EXIT_FAILED if too_big else EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    from clara_jax.training.aot import HBM_GIB  # a table: the module imports jax only in its functions

    p = subparsers.add_parser(
        "compile",
        help="compile a stage's train step ahead of time for a TPU topology and check it fits in HBM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Lower and compile the real train step of one or more stages, with the config's mesh and\n"
        "sharding rules, for a TPU slice described by libtpu (no TPU needed), and report the per-device\n"
        "memory XLA plans (arguments, outputs, temporaries, generated code) against the chip's HBM.\n"
        "Shapes are the longest the data pipeline can produce (doc_max_length, generator_max_length).\n"
        "Exit status: 0 fits, 1 does not fit, 2 bad input (topology, mesh, config, no libtpu).\n\n"
        "  clara-jax compile --config configs/stage1_scp.py:mistral_7b --topology v5e:4x4 --stages 1,3 \\\n"
        "      --config.batch.micro_size=16 --json aot.json\n\n"
        f"Topologies: GENERATION:AxB[xC][xNslices] with GENERATION in {', '.join(sorted(HBM_GIB))}\n"
        "(HBM per chip GiB: " + ", ".join(f"{g} {h:g}" for g, h in sorted(HBM_GIB.items())) + ").",
    )
    p.add_argument(
        "--config",
        required=True,
        help="configs/FILE.py:ARG (a file), or NAME:ARG for a config of the installed package, e.g. configs/stage1_scp.py:mistral_7b or stage1_scp:mistral_7b",
    )
    p.add_argument(
        "--topology", required=True, help="e.g. v5e:4x4 (v5e-16), v5p:2x2x1 (v5p-8), v5e:4x4x2slices"
    )
    p.add_argument(
        "--stages",
        default="",
        help="comma-separated stages to compile, e.g. 1,3 (default: the config's own stage); the other "
        "stages' configs are the sibling files with the same ARG and the same --config.* overrides",
    )
    p.add_argument("--all-stages", action="store_true", help="compile stages 1, 2 and 3")
    p.add_argument(
        "--parallelism",
        default="",
        help="a sharding preset of configs/common.py applied before the overrides "
        "(fsdp, fsdp_tp2, fsdp_tp4, dp: mesh, remat and dtype for 7B-class models)",
    )
    p.add_argument("--libtpu", default=None, help="path of libtpu.so (or its directory)")
    p.add_argument(
        "--hbm-gib", type=float, default=0.0, help="HBM per device to check against (default: the chip's)"
    )
    p.add_argument("--dcn-mesh", default="", help="mesh axes across slices, e.g. data=2 (default data=-1)")
    p.add_argument(
        "--gen-length", type=int, default=0, help="generator length (default generator_max_length)"
    )
    p.add_argument(
        "--query-length",
        type=int,
        default=0,
        help="stage-3 query tokens before <MEM*> (default query_max_length+3)",
    )
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.set_defaults(func=run, takes_overrides=True)
    return p
