"""Mesh construction and logical-axis sharding rules, down to a sharded decoder forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from clara_jax.model.config import tiny_config
from clara_jax.model.decoder import Decoder
from clara_jax.model.lora import LoRAConfig
from clara_jax.parallel.mesh import MeshConfig, describe, make_mesh
from clara_jax.parallel.rules import (
    DEFAULT_RULES,
    logical_to_spec,
    replicated,
    shard_state,
    state_shardings,
)

P = PartitionSpec


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig.from_spec("data=2,fsdp=2,tensor=2"))


def _model():
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    model.add_adapter("generator", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    return model


@pytest.fixture(scope="module")
def model():
    model = _model()
    # B starts at zero; make the adapter matter so the sharded LoRA path is really checked.
    key = jax.random.key(2)
    for i, factors in enumerate(model.adapters["generator"].factors.values()):
        b = factors["b"]
        b.set_value(0.05 * jax.random.normal(jax.random.fold_in(key, i), b.shape))
    return model


# ----------------------------------------------------------------------------- mesh
def test_default_mesh_infers_data_axis():
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_mesh_infers_minus_one_in_any_position(mesh):
    inferred = make_mesh(MeshConfig.from_spec("data=2,fsdp=-1,tensor=2"))
    assert dict(inferred.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert describe(mesh) == "data=2 fsdp=2 tensor=2 (8 cpu devices, auto)"


def test_mesh_on_a_device_subset():
    mesh = make_mesh(MeshConfig.from_spec("data=-1,tensor=2"), devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "tensor": 2}


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("data=3,fsdp=-1", "data=3,fsdp=-1 (product 3) does not divide the 8 available devices"),
        ("data=2,fsdp=2", "data=2,fsdp=2 (product 4) does not match the 8 available devices"),
    ],
)
def test_bad_mesh_shape_names_device_count_and_shape(spec, fragment):
    with pytest.raises(ValueError, match=r"8 available devices") as err:
        make_mesh(MeshConfig.from_spec(spec))
    assert fragment in str(err.value)


def test_mesh_config_rejects_two_inferred_axes_and_bad_specs():
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig.from_spec("data=-1,fsdp=-1")
    with pytest.raises(ValueError, match="expected name=size"):
        MeshConfig.from_spec("data")
    with pytest.raises(ValueError, match="not an integer"):
        MeshConfig.from_spec("data=two")
    with pytest.raises(ValueError, match="duplicate"):
        MeshConfig.from_spec("data=2,data=4")
    with pytest.raises(ValueError, match="not mesh axes"):
        MeshConfig.from_spec("data=-1", dcn_spec="tensor=2")


def test_from_spec_parses_and_accepts_lists():
    cfg = MeshConfig.from_spec(" data=2, fsdp=-1 ,tensor=2", dcn_spec="data=-1")
    assert cfg.axes == (("data", 2), ("fsdp", -1), ("tensor", 2))
    assert cfg.dcn_axes == (("data", -1),)
    assert MeshConfig.from_spec("data=-1").axes == (("data", -1),)
    assert MeshConfig(axes=[["data", 4], ["tensor", "2"]]).axes == (("data", 4), ("tensor", 2))


def test_dcn_shape_resolution():
    cfg = MeshConfig(axes=(("data", 1), ("fsdp", -1), ("tensor", 2)), dcn_axes=(("data", -1),))
    assert cfg.resolve(32, num_granules=4) == ((1, 4, 2), (4, 1, 1))
    # One slice: the DCN -1 collapses to 1 and a plain (non-hybrid) mesh is built.
    assert not cfg.uses_dcn(1)
    assert dict(make_mesh(cfg).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="does not match the 1 available slices"):
        make_mesh(MeshConfig(dcn_axes=(("data", 2),)))


# ----------------------------------------------------------------------------- rules
def test_logical_to_spec_basic(mesh):
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES, mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", "embed", "mlp"), DEFAULT_RULES, mesh) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("batch", "seq"), DEFAULT_RULES, mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec((None, "norm"), DEFAULT_RULES, mesh) == P(None, None)


def test_size_one_and_absent_axes_are_dropped():
    mesh = make_mesh(MeshConfig.from_spec("data=4,fsdp=1,tensor=2"))
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES, mesh) == P("tensor", None)
    assert logical_to_spec(("batch",), DEFAULT_RULES, mesh) == P("data")
    only_data = make_mesh(MeshConfig.from_spec("data=-1"))
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, only_data) == P(None, None)


def test_mesh_axis_is_used_once(mesh):
    # Both dims want "tensor": the later one loses it.
    assert logical_to_spec(("q_heads", "mlp"), DEFAULT_RULES, mesh) == P("tensor", None)
    assert logical_to_spec(("batch", "embed"), DEFAULT_RULES, mesh) == P(("data", "fsdp"), None)


def test_indivisible_dims_are_replicated(mesh):
    assert logical_to_spec(("kv_heads",), DEFAULT_RULES, mesh, shape=(2,)) == P("tensor")
    assert logical_to_spec(("kv_heads",), DEFAULT_RULES, mesh, shape=(3,)) == P(None)
    # A multi-axis rule keeps the longest prefix that divides.
    assert logical_to_spec(("batch",), DEFAULT_RULES, mesh, shape=(2,)) == P("data")
    assert logical_to_spec(("batch",), DEFAULT_RULES, mesh, shape=(3,)) == P(None)


def test_fallback_rules_and_unknown_names(mesh):
    rules = (("heads", "model"), ("heads", "tensor"))  # no "model" axis: fall back
    assert logical_to_spec(("heads",), rules, mesh) == P("tensor")
    with pytest.raises(ValueError, match="'mystery' has no sharding rule"):
        logical_to_spec(("mystery",), DEFAULT_RULES, mesh)
    with pytest.raises(ValueError, match="do not match array shape"):
        logical_to_spec(("embed",), DEFAULT_RULES, mesh, shape=(4, 4))


def test_batch_and_replicated(mesh):
    assert logical_to_spec(("batch", None, None), DEFAULT_RULES, mesh) == P(("data", "fsdp"), None, None)
    assert replicated(mesh).spec == P()


# ----------------------------------------------------------------------------- decoder state
def _spec(shardings, *path):
    node = shardings
    for key in path:
        node = node[key]
    return node.get_raw_value().spec


@pytest.mark.slow
def test_state_shardings_of_tiny_decoder(mesh, model):
    shardings = state_shardings(model, mesh, DEFAULT_RULES)
    assert _spec(shardings, "embed") == P("tensor", "fsdp")
    assert _spec(shardings, "lm_head") == P("tensor", "fsdp")
    assert _spec(shardings, "layers", "q_proj") == P(None, "fsdp", "tensor")
    assert _spec(shardings, "layers", "k_proj") == P(None, "fsdp", "tensor")  # 2 kv heads x 16
    assert _spec(shardings, "layers", "down_proj") == P(None, "tensor", "fsdp")
    assert _spec(shardings, "layers", "attn_norm") == P(None, None)
    assert _spec(shardings, "final_norm") == P(None)
    factors = ("adapters", "generator", "factors")
    assert _spec(shardings, *factors, "q_proj", "a") == P(None, "fsdp", None)
    assert _spec(shardings, *factors, "q_proj", "b") == P(None, None, "tensor")
    assert _spec(shardings, *factors, "down_proj", "a") == P(None, "tensor", None)
    # Same tree as nnx.state, Variable types kept.
    state = nnx.state(model)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    assert isinstance(shardings["adapters"]["generator"]["factors"]["q_proj"]["a"], nnx.LoRAParam)


def test_state_shardings_of_abstract_state(mesh, model):
    abstract = nnx.state(nnx.eval_shape(_model))
    assert isinstance(abstract["embed"].get_raw_value(), jax.ShapeDtypeStruct)
    from_abstract = state_shardings(abstract, mesh, DEFAULT_RULES)
    concrete = state_shardings(model, mesh, DEFAULT_RULES)
    assert jax.tree.leaves(from_abstract) == jax.tree.leaves(concrete)


def test_variables_without_axes_and_bare_arrays_are_replicated(mesh):
    state = nnx.State({"w": nnx.Param(jnp.ones((4, 4))), "step": jnp.zeros(()), "x": jnp.ones((8,))})
    shardings = state_shardings(state, mesh, DEFAULT_RULES)
    assert shardings["w"].get_raw_value().spec == P()
    assert shardings["step"].spec == P()
    assert shardings["x"].spec == P()


@pytest.mark.slow
def test_sharded_forward_matches_single_device(mesh, model):
    rules = DEFAULT_RULES
    ids = jax.random.randint(jax.random.key(3), (4, 12), 0, tiny_config().vocab_size)
    mask = np.ones((4, 12), bool)
    mask[1, :3] = False  # left padding
    mask[3, :7] = False
    ids = jnp.where(mask, ids, 0)
    expected = np.asarray(model(ids, jnp.asarray(mask), adapter="generator"))

    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    sharded = shard_state(state, shardings)
    rows = NamedSharding(mesh, logical_to_spec(("batch", None), rules, mesh))
    logits_sharding = NamedSharding(
        mesh, logical_to_spec(("batch", "seq", "act_vocab"), rules, mesh, expected.shape)
    )

    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask, adapter="generator")

    forward = jax.jit(forward, in_shardings=(shardings, rows, rows), out_shardings=logits_sharding)
    logits = forward(sharded, jax.device_put(ids, rows), jax.device_put(jnp.asarray(mask), rows))

    err = float(np.max(np.abs(np.asarray(logits) - expected)))
    print(f"max |sharded - single-device| = {err:.3g}")
    assert err < 1e-5, err

    # Params really live in pieces: embed (512, 64) over tensor x fsdp.
    embed = sharded["embed"].get_raw_value()
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in embed.addressable_shards} == {(256, 32)}
    lora_a = sharded["adapters"]["generator"]["factors"]["q_proj"]["a"].get_raw_value()
    assert {s.data.shape for s in lora_a.addressable_shards} == {(2, 32, 4)}
    # And so do the logits: rows over data x fsdp, vocab over tensor.
    assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert {s.data.shape for s in logits.addressable_shards} == {(1, 12, 256)}


def test_rules_from_config_override_the_defaults():
    from clara_jax.parallel.rules import DEFAULT_RULES, parse_rules

    rules = parse_rules("mlp=tensor+fsdp, vocab=")
    assert rules[0] == ("mlp", ("tensor", "fsdp")) and rules[1] == ("vocab", None)
    assert rules[2:] == DEFAULT_RULES
    assert parse_rules("") == DEFAULT_RULES
    with pytest.raises(ValueError, match="unknown logical axis"):
        parse_rules("heads=tensor")
    with pytest.raises(ValueError, match="must look like"):
        parse_rules("embed")
