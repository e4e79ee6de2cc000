"""What each CLaRa stage trains, and how a stage's jitted, sharded step is put together.

| stage  | trains                        | <MEM*> rows | loss                                  |
|--------|-------------------------------|-------------|---------------------------------------|
| stage1 | compressor + generator        | trained     | CE (QA / paraphrase) + λ·MSE, 1 doc   |
| stage2 | compressor + generator        | trained     | CE + λ·MSE over k docs in given order |
| stage3 | query reasoner + generator    | frozen      | CE through the straight-through top-k |

Stage 3 freezes the <MEM*> rows (the official code lets the query reasoner's gradient move
them, which silently changes what the "frozen" compressor produces): with them frozen, an
index of compressed documents built before stage 3 stays exact, and the step may read cached
candidate embeddings instead of re-compressing B×N documents. The official release also
stops training the rows from stage 2 on, but only as a side effect of how PEFT reloads
adapters; we keep training them in stage 2, where the compressor still learns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from clara_jax.model.clara import COMPRESSOR, GENERATOR, QUERY_REASONER, ClaraConfig
from clara_jax.model.decoder import Decoder
from clara_jax.parallel.rules import DEFAULT_RULES, shard_state, state_shardings
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
    train_mem_rows: bool
    docs_per_example: int = 1


def stage_spec(stage: str, *, docs_per_example: int = 1, train_mem_rows: bool | None = None) -> StageSpec:
    table = {
        "stage1": ((COMPRESSOR, GENERATOR), True),
        "stage2": ((COMPRESSOR, GENERATOR), True),
        "stage3": ((QUERY_REASONER, GENERATOR), False),
    }
    if stage not in table:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(table)}")
    adapters, rows = table[stage]
    if train_mem_rows and stage == "stage3":
        raise ValueError(
            "stage3 keeps the <MEM*> rows frozen: training them would change the frozen compressor"
        )
    return StageSpec(stage, adapters, rows if train_mem_rows is None else train_mem_rows, docs_per_example)


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


def build_stage_trainer(
    model: Decoder,
    spec: StageSpec,
    clara: ClaraConfig,
    optim: OptimizerConfig,
    mesh,
    example_batch,
    *,
    rules=DEFAULT_RULES,
    seed: int = 0,
    batch_axes=("data", "fsdp"),
    gumbel: bool = False,
    straight_through: bool = True,
) -> StageTrainer:
    """Split the model for `spec`, place state and frozen weights on `mesh`, jit the step.

    `example_batch` only provides shapes ([micro_steps, batch, ...] per leaf).
    """
    graphdef, trainable, frozen = split_trainable(model, spec.adapters, spec.train_mem_rows)
    # The state is donated to every step: give it buffers of its own, so neither the caller's model
    # nor a frozen leaf that shares an array with a trainable one (a copied adapter) is invalidated.
    trainable = jax.tree.map(lambda x: x.copy(), trainable)
    tx = make_optimizer(optim)
    schedule = learning_rate_schedule(optim)
    state = TrainState.create(trainable, tx, jax.random.key(seed))
    shardings = StepShardings(
        state=state_shardings(state, mesh, rules),
        frozen=state_shardings(frozen, mesh, rules),
        batch=micro_batch_shardings(example_batch, mesh, batch_axes),
    )
    state = shard_state(state, shardings.state)
    frozen = shard_state(frozen, shardings.frozen)
    loss_fn = stage_loss_fn(
        spec.name,
        clara,
        docs_per_example=spec.docs_per_example,
        gumbel=gumbel,
        straight_through=straight_through,
    )
    step = compile_train_step(make_train_step(graphdef, loss_fn, tx, schedule), shardings, mesh)
    return StageTrainer(step, state, frozen, graphdef, shardings, schedule)
