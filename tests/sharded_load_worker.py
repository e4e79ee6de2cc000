"""One process of tests/test_sharded_load_multiprocess.py: load a base onto a mesh spanning two
processes, recording every slice this process reads from the safetensors files.

    python -m tests.sharded_load_worker CHECKPOINT REPORT COORDINATOR PROCESS_ID

The report (JSON) holds the slices read (tensor, index, elements), and for every parameter
whether the gathered global array equals this process's own one-device load of the same files.
"""

from __future__ import annotations

import json
import sys


def main(checkpoint: str, report: str, coordinator: str, process_id: int) -> None:
    from clara_jax.parallel.distributed import DistributedConfig, initialize_distributed

    initialize_distributed(
        DistributedConfig(
            coordinator=coordinator, num_processes=2, process_id=process_id, initialization_timeout=60
        )
    )
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from clara_jax.interop import hf
    from clara_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig.from_spec("data=1,fsdp=8,tensor=1"))
    reads, read_slice = [], hf.read_slice

    def recording_read(path, key, index):
        value = read_slice(path, key, index)
        reads.append([key, [[s.start, s.stop] for s in index], int(value.size)])
        return value

    hf.read_slice = recording_read
    model = hf.load_decoder(checkpoint, mesh=mesh)
    hf.read_slice = read_slice
    local = hf.load_decoder(checkpoint, mesh=None)  # the reference: this process, one device
    expected = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(local))}
    equal, addressable = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        name = "/".join(map(str, path))
        held = {str(s.index): s.data.size for s in value.addressable_shards}  # distinct shards here
        shard = value.sharding.shard_shape(value.shape)
        addressable[name] = {
            "held": int(sum(held.values())),
            "size": int(value.size),
            "ways": int(value.size // max(1, int(np.prod(shard)))),  # distinct shards over the mesh
            "ndim": value.ndim,
        }
        whole = np.asarray(multihost_utils.process_allgather(value, tiled=True))
        equal[name] = bool(whole.shape == expected[path].shape and np.array_equal(whole, expected[path]))
    with open(report, "w") as f:
        json.dump(
            {
                "process": jax.process_index(),
                "devices": jax.local_device_count(),
                "reads": reads,
                "equal": equal,
                "addressable": addressable,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
