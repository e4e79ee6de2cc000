"""Where activations live on the mesh: the decoder names their dimensions, the caller maps the names.

The decoder marks its activations with logical axes ("batch", "seq", "act_embed", "act_heads",
"act_mlp", "act_vocab"). Inside `activation_sharding(fn)` every mark becomes `fn(x, axes)`, which
the training step sets to a `with_sharding_constraint` resolved from the run's rule table
(parallel/rules.py: `activation_constraint`). Outside it (inference, tests) a mark does nothing.
XLA's propagation from the weight and batch shardings usually finds the same layout; the marks pin
it, so editing a rule moves the activations, and an FSDP step gathers weights rather than
activations (MaxText's `with_logical_constraint`, without a dependency of the model on the mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

_CONSTRAIN: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "clara_jax_activation_sharding", default=None
)


def shard_as(x, axes: Sequence[str | None]):
    """`x` with its dimensions named `axes` (one per dimension): constrained when a mapping is active."""
    constrain = _CONSTRAIN.get()
    return x if constrain is None else constrain(x, tuple(axes))


@contextlib.contextmanager
def activation_sharding(constrain: Callable | None) -> Iterator[None]:
    """Trace under `constrain(x, axes) -> x` (None: marks do nothing)."""
    token = _CONSTRAIN.set(constrain)
    try:
        yield
    finally:
        _CONSTRAIN.reset(token)
