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


def create_sharded(make: Callable[[], M], mesh=None, rules: Rules = DEFAULT_RULES) -> M:
    """`make()`, with every Variable created in the layout `rules` give it on `mesh`."""
    if mesh is None:
        return make()
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh, rules))()
    return nnx.merge(graphdef, state)


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

    def changed(state) -> M:
        module = nnx.merge(graphdef, state)
        change(module)
        return module

    abstract = nnx.eval_shape(changed, state)
    out_shardings = state_shardings(nnx.state(abstract, written), mesh, rules)
    new = jax.jit(lambda s: nnx.state(changed(s), written), out_shardings=out_shardings)(state)
    return nnx.merge(nnx.graphdef(abstract), new, nnx.state(model, nnx.Not(written)))
