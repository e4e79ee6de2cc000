"""The loop's step clock (issue #18): step times from completion to completion, each compilation of
the train step detected, timed with its batch shapes and kept out of the step's time."""

import time

import jax
import jax.numpy as jnp

from clara_jax.training.loop import StepClock


def _step(state, frozen, batch):
    return state + batch["x"].sum(), {"loss": batch["x"].mean()}


def test_compilations_are_counted_per_shape_and_kept_out_of_the_step_time():
    clock = StepClock(jax.jit(_step))
    state = jnp.float32(0)
    clock.restart()
    wall = time.perf_counter()
    state, metrics = clock.dispatch(state, None, {"x": jnp.ones(4)}, step=1)
    seconds = clock.finished(metrics)
    wall = time.perf_counter() - wall
    assert len(clock.compiles) == 1 and clock.compiles[0]["shapes"] == {"x": (4,)}
    assert 0 < seconds <= wall - clock.compiles[0]["seconds"] + 1e-6

    state, metrics = clock.dispatch(state, None, {"x": jnp.ones(4)}, step=2)  # cached: no compile
    assert clock.finished(metrics) > 0 and len(clock.compiles) == 1
    state, metrics = clock.dispatch(state, None, {"x": jnp.ones(8)}, step=3)  # a new bucket
    clock.finished(metrics)
    assert [(c["step"], c["shapes"]) for c in clock.compiles] == [(1, {"x": (4,)}), (3, {"x": (8,)})]
    assert float(state) == 16.0


def test_restart_keeps_work_between_steps_out():
    clock = StepClock(jax.jit(_step))
    state, metrics = clock.dispatch(jnp.float32(0), None, {"x": jnp.ones(2)}, step=1)
    clock.finished(metrics)
    time.sleep(0.2)  # e.g. an evaluation or a checkpoint save
    clock.restart()
    state, metrics = clock.dispatch(state, None, {"x": jnp.ones(2)}, step=2)
    assert clock.finished(metrics) < 0.2
