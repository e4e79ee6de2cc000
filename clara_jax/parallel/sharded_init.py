"""Creating NNX parameters straight into their shards.

Eager initialisation materialises every new array whole on the default device before it can
be resharded; at 7B that alone can exhaust one accelerator. Here the initialiser runs under
`jax.jit` with `out_shardings` from the sharding rules, so each device computes only its own
shard. Without a mesh both helpers simply run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

from clara_jax.parallel.rules import DEFAULT_RULES, Rules, state_shardings

M = TypeVar("M", bound=nnx.Module)


def _in_their_shards(state, mesh, rules: Rules):
    """Inside a jitted initialiser: pin each new Variable to the layout `rules` give it. The
    shapes are known while tracing, so one trace yields both the program and its output layout
    (no `eval_shape` pass first to learn the shapes for `out_shardings`)."""
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh, rules))


def create_sharded(make: Callable[[], M], mesh=None, rules: Rules = DEFAULT_RULES) -> M:
    """`make()`, with every Variable created in the layout `rules` give it on `mesh`."""
    if mesh is None:
        return make()
    structure = []

    def init():
        graphdef, state = nnx.split(make())
        structure.append(graphdef)  # static: read once the trace is done
        return _in_their_shards(state, mesh, rules)

    state = jax.jit(init)()
    return nnx.merge(structure[0], state)


def change_sharded(
    model: M, change: Callable[[M], None], written, mesh=None, rules: Rules = DEFAULT_RULES
) -> M:
    """`change(model)` (in place: it may add Variables, resize them or set static fields), with
    the Variables the `written` filter selects computed straight into their shards.

    Only those Variables are outputs of the jitted change; the rest (a frozen base) are read,
    never copied. With a mesh the result is a new module: use it instead of `model`.
    """
    if mesh is None:
        change(model)
        return model
    graphdef, state = nnx.split(model)
    structure = []

    def changed(state):
        module = nnx.merge(graphdef, state)
        change(module)
        structure.append(nnx.graphdef(module))
        return _in_their_shards(nnx.state(module, written), mesh, rules)

    new = jax.jit(changed)(state)
    return nnx.merge(structure[0], new, nnx.state(model, nnx.Not(written)))
