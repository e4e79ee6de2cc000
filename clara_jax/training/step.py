"""One jitted train step: micro-batch gradient accumulation, clipping, AdamW, donated state.

The model is split once, outside jit, into a graph definition, the trainable state (the
stage's adapters and, in stage 1, the <MEM*> rows) and the frozen rest. The step is a pure
function of (TrainState, frozen, batch); `compile_train_step` jits it with explicit shardings
over a named mesh and donates the state, and can lower + compile ahead of time to report
memory before the first step runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax.parallel.rules import DEFAULT_RULES, logical_to_spec

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any  # nnx.State of the trainable leaves
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng) -> TrainState:
        """`rng` is stored as raw uint32 key data, which checkpoints can hold."""
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def adapter_grad_norms(grads) -> dict:
    """`grad_norm/<role>` per trained adapter (before clipping): e.g. whether the query reasoner
    receives any signal in stage 3, next to the generator's."""
    adapters = grads["adapters"] if "adapters" in grads else {}
    return {f"grad_norm/{role}": optax.tree.norm(tree) for role, tree in adapters.items()}


def _top_key(path) -> str:
    entry = path[0]
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _map_held(tree, held: tuple[str, ...], fn):
    """`tree` (params, grads or updates) with `fn` applied to the leaves under the top-level keys
    named in `held`; the tree's own type is kept."""
    if not held:
        return tree
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(x) if _top_key(path) in held else x, tree)


def make_train_step(
    graphdef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule=None,
    held: tuple[str, ...] = (),
):
    """`step(state, frozen, batch) -> (state, metrics)`; every batch leaf is [micro_steps, ...].

    Gradients and metrics are averaged over micro-batches (each micro-batch loss is itself a
    token mean, as in the official DeepSpeed runs). Everything stays on device.

    `held` names top-level parts of the state's params that ride along unchanged (the <MEM*> rows
    of stage 2, kept in its checkpoints so stage 3 inherits stage 1's rows): no gradient reaches
    them, so neither the clipping norm nor Adam's moments see them, and their update is zero
    (weight decay included).
    """

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(state.rng)
        micro_steps = jax.tree.leaves(batch)[0].shape[0]

        def loss_of(params, micro_batch, key):
            params = _map_held(params, held, jax.lax.stop_gradient)
            return loss_fn(nnx.merge(graphdef, params, frozen), micro_batch, key)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def accumulate(carry, inputs):
            micro_batch, index = inputs
            (_, metrics), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_rng, index))
            return _tree_add(carry, (grads, metrics)), None

        first = jax.tree.map(lambda x: x[0], batch)
        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        metric_shapes = jax.eval_shape(lambda: loss_of(state.params, first, step_rng)[1])
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
        (grads, metrics), _ = jax.lax.scan(
            accumulate, (zero_grads, zero_metrics), (batch, jnp.arange(micro_steps))
        )
        grads = jax.tree.map(lambda g: g / micro_steps, grads)
        metrics = {k: v / micro_steps for k, v in metrics.items()}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = _map_held(updates, held, jnp.zeros_like)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics.update(adapter_grad_norms(grads))
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step


@dataclasses.dataclass(frozen=True)
class StepShardings:
    state: Any
    frozen: Any
    batch: Any


def micro_batch_shardings(batch, mesh, rules=DEFAULT_RULES) -> Any:
    """Leaves are [micro_steps, batch, ...]: the batch dim goes where the "batch" rule says (rows
    that do not divide stay whole), never the micro-step dim."""

    def one(x):
        axes = (None, "batch") + (None,) * (len(x.shape) - 2) if len(x.shape) > 1 else (None,) * len(x.shape)
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape))

    return jax.tree.map(one, batch)


def global_batch(arrays: dict, shardings: dict) -> dict:
    """Host arrays that every process holds whole (the same global batch everywhere) as global
    arrays on `shardings`: each device takes its own slice (right for any device order,
    including hybrid DCN meshes)."""
    return {
        k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
        for k, v in arrays.items()
    }


def compile_train_step(step_fn, shardings: StepShardings, mesh):
    """jit with explicit in/out shardings and the state donated."""
    metrics_sharding = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(shardings.state, shardings.frozen, shardings.batch),
        out_shardings=(shardings.state, metrics_sharding),
        donate_argnums=(0,),
    )
