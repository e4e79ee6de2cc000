"""Data parallelism over one process's devices, shared by every batched inference front end."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def replicate_over_local_devices(model, batch_size: int):
    """(model, row sharding or None, batch size).

    With several local devices the weights are replicated once, batches are split row-wise over
    the devices, and the batch size is rounded up to a multiple of the device count, so every
    device gets whole rows."""
    devices = jax.local_devices()
    if len(devices) < 2:
        return model, None, batch_size
    mesh = Mesh(np.asarray(devices), ("data",))
    model = jax.device_put(model, NamedSharding(mesh, PartitionSpec()))
    return model, NamedSharding(mesh, PartitionSpec("data")), -(-batch_size // len(devices)) * len(devices)
