"""`clara-jax compile` lowers the program `clara-jax train` runs: one `stage_program` builds the step
from the concrete model (training) and from shapes alone (the AOT compile), with the same shardings,
and the two lower to the same StableHLO."""

import jax
import pytest

from clara_jax.parallel.mesh import MeshConfig, make_mesh
from clara_jax.parallel.rules import parse_rules
from clara_jax.training.aot import abstract_batch, abstract_model
from clara_jax.training.build import build_model
from clara_jax.training.config import load_config
from clara_jax.training.run_spec import optimizer_config, stage_spec_of
from clara_jax.training.stages import stage_program

SMALL = [
    "--config.clara.doc_max_length=32",
    "--config.clara.generator_max_length=64",
    "--config.clara.query_max_length=16",
    "--config.batch.global_size=8",
    "--config.batch.micro_size=4",
]


def _program(config, model, clara, mesh):
    return stage_program(
        model,
        stage_spec_of(config),
        clara,
        optimizer_config(config, 100),
        mesh,
        abstract_batch(config, clara.n_mem),
        rules=parse_rules(config.sharding_rules),
        seed=config.seed,
        gumbel=config.clara.gumbel,
        straight_through=config.clara.straight_through,
    )


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# stage 3 (a superset: candidates, query, top-k) in the fast lane, stage 1 in the slow one
@pytest.mark.parametrize("module", [pytest.param("stage1_scp", marks=pytest.mark.slow), "stage3_e2e"])
def test_the_compiled_program_is_the_trained_one(module):
    config = load_config(f"{module}:tiny,runlocal", SMALL + ["--config.mesh=data=2,fsdp=2,tensor=2"])
    mesh = make_mesh(MeshConfig.from_spec(config.mesh))
    built = build_model(config, mesh)
    trained = _program(config, built.model, built.clara, mesh)
    model, clara = abstract_model(config)
    compiled = _program(config, model, clara, mesh)

    assert clara == built.clara
    assert _shapes(compiled.frozen) == _shapes(trained.frozen)
    assert compiled.abstract_state == trained.abstract_state
    assert compiled.shardings == trained.shardings
    # the batch rows follow the "batch" rule: data x fsdp on this mesh
    assert all(s.spec[1] == ("data", "fsdp") for s in jax.tree.leaves(trained.shardings.batch))

    batch = abstract_batch(config, clara.n_mem)
    with jax.set_mesh(mesh):
        texts = [
            p.step.lower(p.abstract_state, _shapes(p.frozen), batch).as_text() for p in (trained, compiled)
        ]
    assert texts[0] == texts[1]


def test_a_batch_rule_override_moves_the_batch_rows():
    config = load_config(
        "stage1_scp:tiny,runlocal",
        SMALL + ["--config.mesh=data=2,fsdp=2,tensor=2", "--config.sharding_rules=batch=fsdp"],
    )
    mesh = make_mesh(MeshConfig.from_spec(config.mesh))
    model, clara = abstract_model(config)
    program = _program(config, model, clara, mesh)
    assert {s.spec[1] for s in jax.tree.leaves(program.shardings.batch)} == {"fsdp"}


def _lowered(config, mesh):
    model, clara = abstract_model(config)
    program = _program(config, model, clara, mesh)
    with jax.set_mesh(mesh):
        return program.step.lower(
            program.abstract_state, _shapes(program.frozen), abstract_batch(config, clara.n_mem)
        ).as_text()


def test_the_activation_rules_reach_the_compiled_step():
    """The decoder's activation marks become sharding constraints in the step, resolved from the
    rules: an override of an activation rule changes the program; outside a step they do nothing."""
    from clara_jax.model.activation_sharding import shard_as

    x = jax.numpy.ones((2, 3))
    assert shard_as(x, ("batch", "act_embed")) is x  # no mapping active: untouched

    args = SMALL + ["--config.mesh=data=2,fsdp=2,tensor=2"]
    mesh = make_mesh(MeshConfig.from_spec(load_config("stage1_scp:tiny,runlocal", args).mesh))
    default = _lowered(load_config("stage1_scp:tiny,runlocal", args), mesh)
    moved = _lowered(
        load_config("stage1_scp:tiny,runlocal", args + ["--config.sharding_rules=act_embed=tensor"]), mesh
    )
    constraint = "sharding_constraint" if "sdy.sharding_constraint" in default else "@Sharding"
    assert default.count(constraint) >= 6  # embeddings, heads, attention out, residual, MLP, logits
    assert moved != default
