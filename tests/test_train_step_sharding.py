"""The same train step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices and on 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.parallel.mesh import MeshConfig, make_mesh
from clara_jax.training.optimizer import OptimizerConfig
from clara_jax.training.stages import stage_program, stage_spec
from tests import clara_fixtures as fx


def _micro_batches(stage, seed):
    make = (
        (lambda s: fx.stage12_batch(seed=s, b=4))
        if stage != "stage3"
        else (lambda s: fx.stage3_batch(seed=s, b=4, n=5))
    )
    batches = [make(seed + i) for i in range(2)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _run(stage, mesh, steps=2):
    model = fx.tiny_clara(dropout=0.1)
    # Adam divides by sqrt(v): near-zero gradient entries turn float reassociation noise into
    # parameter differences of order lr, so the learning rate sets how close two runs can be.
    trainer = stage_program(
        model,
        stage_spec(stage),
        fx.clara_config(),
        OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0),
        mesh,
        _micro_batches(stage, 0),
    ).start()
    state, losses = trainer.state, []
    for i in range(steps):
        state, metrics = trainer.step(state, trainer.frozen, _micro_batches(stage, 10 * i))
        losses.append(float(metrics["loss"]))
    return state, losses, trainer


def _meshes():
    one = make_mesh(MeshConfig.from_spec("data=1,fsdp=1,tensor=1"), devices=jax.devices()[:1])
    eight = make_mesh(MeshConfig.from_spec("data=2,fsdp=2,tensor=2"))
    return one, eight


@pytest.fixture(scope="module")
def stage1_on_eight():
    """Two stage-1 steps on the 8-device mesh: compared with one device below, and its compiled step
    is the one whose memory report is checked (one compilation of it for both tests)."""
    return _run("stage1", _meshes()[1])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_sharded_step_equals_single_device(stage, request):
    assert jax.device_count() == 8, "tests/conftest.py must set 8 host devices before jax is imported"
    one, eight = _meshes()
    state1, losses1, _ = _run(stage, one)
    if stage == "stage1":
        state8, losses8, trainer8 = request.getfixturevalue("stage1_on_eight")
    else:
        state8, losses8, trainer8 = _run(stage, eight)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    leaves1, leaves8 = jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)
    assert len(leaves1) == len(leaves8) > 0
    for a, b in zip(leaves1, leaves8):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    # the parameters really are distributed over the 8 devices
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state8.params)}
    assert any("fsdp" in s or "tensor" in s for s in specs), specs
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state8.params))


def test_stage_specs():
    assert stage_spec("stage3").adapters == ("query_reasoner", "generator")
    assert not stage_spec("stage3").train_mem_rows and stage_spec("stage1").train_mem_rows
    with pytest.raises(ValueError, match="frozen compressor"):
        stage_spec("stage3", train_mem_rows=True)
    with pytest.raises(ValueError, match="unknown stage"):
        stage_spec("stage4")
