"""Logical axis names -> mesh axes, resolved into NamedShardings for states and batches.

Every decoder Variable names its dimensions with logical axes ("embed", "mlp", ...). An
ordered rule table (EasyLM/MaxText style) maps those names onto mesh axes, so changing the
parallelism layout is a config edit, not a model edit. We resolve shardings here instead of
using flax's `out_sharding` metadata, which would shard eagerly at variable creation.

Resolution is forgiving where it has to be: mesh axes that are absent or of size 1 are
dropped, a mesh axis is used at most once per array, and a dimension that does not divide
evenly stays replicated, so tiny test models run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Rationale:
# - Weights: FSDP shards the model dimension ("embed") of every matrix, so parameters and
#   optimizer state are split across fsdp and all-gathered layer by layer; tensor parallelism
#   shards the head, MLP and vocabulary dimensions, the Megatron layout whose matmuls need
#   only one reduction per block. A weight thus spans fsdp x tensor.
# - "layers" (the scan axis) is never sharded: each scan step would need a whole layer.
# - Norm scales and LoRA ranks are tiny; splitting them costs more than it saves. LoRA factors
#   still inherit the embed/heads/mlp sharding of the projection they adapt.
# - Activations (marked in the decoder, applied by `activation_constraint` in the train step):
#   the batch is split over data *and* fsdp (FSDP is data parallelism with sharded weights);
#   the residual stream's hidden dim and the sequence stay whole (no context parallelism yet);
#   heads, the MLP's inner dim and the vocabulary follow their tensor-parallel weights.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def parse_rules(spec: str, base: Rules = DEFAULT_RULES) -> tuple[tuple[str, MeshAxes], ...]:
    """Config overrides on top of `base`: "embed=fsdp,mlp=tensor+fsdp,vocab=" (empty = replicate).

    An overridden name takes precedence (its rule goes first); the rest of `base` is kept.
    """
    overrides = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if "=" not in part:
            raise ValueError(f"sharding rule {part!r} must look like logical=mesh_axis[+mesh_axis]")
        name, axes = (x.strip() for x in part.split("=", 1))
        known = {n for n, _ in base}
        if name not in known:
            raise ValueError(f"sharding rule for unknown logical axis {name!r}; known: {sorted(known)}")
        mesh_axes = tuple(a for a in axes.split("+") if a) or None
        overrides.append((name, mesh_axes[0] if mesh_axes and len(mesh_axes) == 1 else mesh_axes))
    return tuple(overrides) + tuple(base)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)  # lists from YAML / ml_collections


def _resolve_dim(name, rules, mesh_shape, used: set, dim: int | None):
    """Mesh axes for one dimension: the first rule for `name` that still yields an axis.

    Later rules for the same name are fallbacks, consulted only when an earlier one resolves
    to nothing on this mesh.
    """
    candidates = [axes for logical, axes in rules if logical == name]
    if not candidates:
        known = sorted({logical for logical, _ in rules})
        raise ValueError(
            f"logical axis {name!r} has no sharding rule (rules cover {known}); "
            f"add ({name!r}, None) to replicate it"
        )
    for mesh_axes in candidates:
        if mesh_axes is None:
            return ()
        axes = [a for a in _as_tuple(mesh_axes) if mesh_shape.get(a, 1) > 1 and a not in used]
        # Keep the longest prefix whose size divides the dimension: a batch of 2 on
        # (data=2, fsdp=2) is still split over data.
        while axes and dim is not None and dim % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        if axes:
            return tuple(axes)
    return ()


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, mesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names.

    `mesh` may be a Mesh or an AbstractMesh; `shape`, when given, makes indivisible
    dimensions fall back to replication instead of failing at device_put/jit time.
    """
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match array shape {tuple(shape)}")
    mesh_shape = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        dim = None if shape is None else shape[i]
        dim_axes = () if name is None else _resolve_dim(name, rules, mesh_shape, used, dim)
        used.update(dim_axes)
        spec.append(None if not dim_axes else dim_axes[0] if len(dim_axes) == 1 else dim_axes)
    return PartitionSpec(*spec)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state_or_module: Any, mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings laid out like `nnx.state(module)`: each Variable keeps its type and
    metadata with the sharding as its value (as `nnx.get_named_sharding` does), so the result
    can be passed straight to `jax.jit(in_shardings=...)` or `shard_state`.

    Works on concrete and abstract (`nnx.eval_shape`) states. Variables without `axes`
    metadata, scalars and bare arrays are replicated.
    """
    state = nnx.state(state_or_module) if isinstance(state_or_module, nnx.Module) else state_or_module

    def one(path, leaf):
        if not _is_variable(leaf):
            return replicated(mesh)
        shape = tuple(getattr(leaf.get_value(), "shape", ()))
        axes = leaf.get_metadata("axes", None)
        if axes is None or not shape:
            return leaf.replace(replicated(mesh))
        try:
            spec = logical_to_spec(tuple(axes), rules, mesh, shape)
        except ValueError as e:
            raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None
        return leaf.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def shard_state(state, shardings):
    """Place every leaf of `state` on its sharding (one batched transfer).

    `shardings` is the output of `state_shardings` or any tree with the same structure whose
    leaves are shardings (bare or inside Variables); Variables in `state` keep their metadata.
    """
    leaves, treedef = jax.tree.flatten(state, is_leaf=_is_variable)
    targets = treedef.flatten_up_to(shardings)
    values = [x.get_raw_value() if _is_variable(x) else x for x in leaves]
    targets = [s.get_raw_value() if _is_variable(s) else s for s in targets]
    placed = jax.device_put(values, targets)
    out = [x.replace(v) if _is_variable(x) else v for x, v in zip(leaves, placed)]
    return jax.tree.unflatten(treedef, out)


def activation_constraint(mesh, rules: Rules = DEFAULT_RULES):
    """`constrain(x, logical_axes)` for `model.activation_sharding`: a sharding constraint from the
    rules (an indivisible dimension stays replicated, as for weights)."""

    def constrain(x, axes):
        spec = logical_to_spec(axes, rules, mesh, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain
