"""Loading a base onto a mesh: every device's shard is read from the files by itself.

A 7B base must never exist whole on one device or in host memory, so the load is watched:
every host buffer handed to a device and every slice read from disk must be at most that
device's share of its tensor, and the result must equal the single-device load bit for bit.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from clara_jax.formats.safetensors_io import open_checkpoint  # noqa: E402
from clara_jax.interop import hf  # noqa: E402
from clara_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from clara_jax.parallel.rules import DEFAULT_RULES, state_shardings  # noqa: E402
from tests import hf_reference as ref  # noqa: E402

FSDP = 8


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig.from_spec(f"data=1,fsdp={FSDP},tensor=1"))


# llama: separate, untied projections; phi3: fused qkv / gate_up rows and tied embeddings.
@pytest.fixture(scope="module", params=["llama", "phi3"])
def checkpoint(request, tmp_path_factory):
    """A tiny perturbed HF model saved in bfloat16, as real bases ship."""
    path = tmp_path_factory.mktemp(request.param)
    ref.build_family(request.param).to(torch.bfloat16).save_pretrained(path)
    return path


def _flat(model):
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}


def test_each_device_receives_only_its_share(checkpoint, mesh, monkeypatch):
    """bfloat16 on disk, float32 in the model: converted shard by shard, equal to the one-device load."""
    expected = _flat(hf.load_decoder(checkpoint))  # one device, the reference
    disk_shapes = {key: f.readable_shape(key) for key, f in open_checkpoint(checkpoint).items()}
    reads, placed, shards, transfers = [], [], [], []
    read_slice, make_array = hf.read_slice, jax.make_array_from_callback
    device_put = jax.device_put

    def recording_read(path, key, index):
        value = read_slice(path, key, index)
        reads.append((key, tuple((s.start, s.stop) for s in index), value.size))
        return value

    def recording_make(shape, sharding, callback, dtype=None):
        placed.append(shape)

        def recorded(index):
            value = callback(index)
            shards.append((shape, sharding.shard_shape(shape), value))
            return value

        return make_array(shape, sharding, recorded, dtype)

    def recording_put(x, *args, **kwargs):
        transfers.append(np.shape(x))
        return device_put(x, *args, **kwargs)

    monkeypatch.setattr(hf, "read_slice", recording_read)
    monkeypatch.setattr(jax, "make_array_from_callback", recording_make)
    monkeypatch.setattr(jax, "device_put", recording_put)
    model = hf.load_decoder(checkpoint, mesh=mesh)
    monkeypatch.undo()

    assert not transfers, "base tensors must reach the devices only through their shard callbacks"
    got = _flat(model)
    assert got.keys() == expected.keys()
    assert len(placed) == len(got) - 1  # every parameter but the empty <MEM*> rows
    assert all(value.shape == share for _, share, value in shards), "a device got more than its shard"
    for key, _, size in reads:  # a 1-D tensor is replicated by the rules: its share is all of it
        disk = disk_shapes[key]
        assert size * (FSDP if len(disk) == 2 else 1) <= math.prod(disk), f"{key}: read more than a share"
    assert reads and len(reads) == len({(key, index) for key, index, _ in reads}), "a slice read twice"

    target = dict(nnx.to_flat_state(state_shardings(model, mesh, DEFAULT_RULES)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        assert value.sharding.is_equivalent_to(target[path].get_value(), value.ndim), path
        split = FSDP if "embed" in var.get_metadata("axes") else 1  # FSDP shards every matrix
        assert math.prod(value.sharding.shard_shape(value.shape)) * split == value.size, path
        assert value.dtype == expected[path].dtype, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]), err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["llama"], indirect=True)  # untied: lm_head grows too
def test_build_model_on_a_mesh_creates_every_parameter_in_its_shards(checkpoint, mesh):
    """The base is read into its shards; the CLaRa rows and adapters are initialised in theirs
    (under jit), with the values a single-device build gives."""
    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.training.build import build_model
    from clara_jax.training.config import load_config

    config = load_config(
        "configs/stage3_e2e.py:tiny",
        [f"--config.model.path={checkpoint}", f"--config.model.tokenizer={TINY_TOKENIZER_DIR}"],
    )
    eager = build_model(config)
    sharded = build_model(config, mesh=mesh)
    assert sharded.model.config == eager.model.config
    assert sharded.model.trainable_token_ids == eager.model.trainable_token_ids
    expected = _flat(eager.model)
    target = dict(nnx.to_flat_state(state_shardings(sharded.model, mesh, DEFAULT_RULES)))
    got = _flat(sharded.model)
    assert got.keys() == expected.keys()
    for path, value in got.items():
        assert value.sharding.is_equivalent_to(target[path].get_value(), value.ndim), path
        # reductions over the vocabulary may round differently in the jitted init of the new rows
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(expected[path]), rtol=1e-6, err_msg=str(path)
        )
