"""How a stage's jitted, sharded step is put together (what each stage trains, and why stage 3
freezes the <MEM*> rows: model/stage_registry.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from clara_jax.model.activation_sharding import activation_sharding
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.decoder import Decoder
from clara_jax.model.stage_registry import get_stage
from clara_jax.parallel.rules import DEFAULT_RULES, activation_constraint, shard_state, state_shardings
from clara_jax.training.objectives import stage_loss_fn
from clara_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from clara_jax.training.step import (
    StepShardings,
    TrainState,
    compile_train_step,
    make_train_step,
    micro_batch_shardings,
)
from clara_jax.training.trainable import split_trainable


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    adapters: tuple
    train_mem_rows: bool  # the optimizer updates the <MEM*> rows
    docs_per_example: int = 1
    keep_mem_rows: bool = False  # the rows are in the train state (and checkpoints) even when held

    @property
    def state_has_rows(self) -> bool:
        return self.train_mem_rows or self.keep_mem_rows

    @property
    def held(self) -> tuple[str, ...]:
        """Parts of the train state carried unchanged by the step (make_train_step's `held`)."""
        return ("embed_rows",) if self.keep_mem_rows and not self.train_mem_rows else ()


def stage_spec(stage: str, *, docs_per_example: int = 1, train_mem_rows: bool | None = None) -> StageSpec:
    """The registry's stage; `train_mem_rows` overrides its default where the rows are in the state
    (stage 2's `clara.stage2_trains_mem_rows`; False holds stage 1's)."""
    s = get_stage(stage)
    if train_mem_rows and not s.keeps_mem_rows:
        raise ValueError(
            f"{stage} keeps the <MEM*> rows frozen: training them would change the frozen compressor"
        )
    rows = s.trains_mem_rows if train_mem_rows is None else train_mem_rows
    return StageSpec(stage, s.adapters, rows, docs_per_example, keep_mem_rows=s.keeps_mem_rows)


@dataclasses.dataclass
class StageTrainer:
    """The pieces a training loop needs: donated state, frozen weights, the compiled step."""

    step: Any  # jitted (state, frozen, batch) -> (state, metrics)
    state: TrainState
    frozen: Any
    graphdef: Any
    shardings: StepShardings
    schedule: Any

    def model(self) -> Decoder:
        from flax import nnx

        return nnx.merge(self.graphdef, self.state.params, self.frozen)


@dataclasses.dataclass
class StageProgram:
    """A stage's jitted step and everything its shapes and shardings depend on. Built the same way
    from a concrete model (`clara-jax train`) and from an abstract one (`clara-jax compile`)."""

    step: Any  # jitted (state, frozen, batch) -> (state, metrics)
    graphdef: Any
    trainable: Any  # the parameters the stage trains (arrays, or ShapeDtypeStructs)
    frozen: Any
    abstract_state: TrainState  # ShapeDtypeStructs
    tx: Any
    schedule: Any
    shardings: StepShardings
    seed: int  # of the state's PRNG key

    def start(self) -> StageTrainer:
        """The trainer: the program with its state created and placed on its shardings (a concrete
        model only)."""
        # The state is donated to every step: give it buffers of its own, so neither the caller's
        # model nor a frozen leaf that shares an array with a trainable one (a copied adapter) is
        # invalidated.
        trainable = jax.tree.map(lambda x: x.copy(), self.trainable)
        state = shard_state(
            TrainState.create(trainable, self.tx, jax.random.key(self.seed)), self.shardings.state
        )
        frozen = shard_state(self.frozen, self.shardings.frozen)
        return StageTrainer(self.step, state, frozen, self.graphdef, self.shardings, self.schedule)


def stage_program(
    model: Decoder,
    spec: StageSpec,
    clara: ClaraConfig,
    optim: OptimizerConfig,
    mesh,
    example_batch,
    *,
    rules=DEFAULT_RULES,
    seed: int = 0,
    gumbel: bool = False,
    straight_through: bool = True,
    candidate_dropout: bool = False,
) -> StageProgram:
    """Split `model` (concrete or `nnx.eval_shape`d) for `spec`, resolve every sharding from `rules`
    (the batch rows too, by the "batch" rule) and jit the step; nothing is placed or run.

    `example_batch` only provides shapes ([micro_steps, batch, ...] per leaf).
    """
    graphdef, trainable, frozen = split_trainable(model, spec.adapters, spec.state_has_rows)
    tx = make_optimizer(optim)
    schedule = learning_rate_schedule(optim)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(seed)), trainable)
    shardings = StepShardings(
        state=state_shardings(abstract_state, mesh, rules),
        frozen=state_shardings(frozen, mesh, rules),
        batch=micro_batch_shardings(example_batch, mesh, rules),
    )
    stage_loss = stage_loss_fn(
        spec.name,
        clara,
        docs_per_example=spec.docs_per_example,
        gumbel=gumbel,
        straight_through=straight_through,
        candidate_dropout=candidate_dropout,
    )
    # one device has nothing to pin: its program stays free of constraint ops
    constrain = activation_constraint(mesh, rules) if mesh.size > 1 else None

    def loss_fn(model, batch, rng):  # traced with the decoder's activation marks applied
        with activation_sharding(constrain):
            return stage_loss(model, batch, rng)

    step = compile_train_step(
        make_train_step(graphdef, loss_fn, tx, schedule, held=spec.held), shardings, mesh
    )
    return StageProgram(step, graphdef, trainable, frozen, abstract_state, tx, schedule, shardings, seed)
