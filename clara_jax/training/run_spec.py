"""A run config (configs/*.py: a ConfigDict, or its saved dict) as typed settings, read in one place.

Each section becomes a frozen dataclass that checks its own fields in `__post_init__`: the ones the
model, data and optimizer code already take (LoRAConfig, LayoutConfig, OptimizerConfig, MeshConfig,
ClaraSettings, which a saved model directory's clara section is read with too) or a small one here. `RunSpec.from_config` builds every section, adds the checks that span sections,
and raises one ConfigError listing every problem, before anything heavy starts.
"""

from __future__ import annotations

import dataclasses

from clara_jax.data.pipeline import LayoutConfig
from clara_jax.model.clara_settings import ClaraSettings
from clara_jax.model.decoder import REMAT_POLICIES, DTypePolicy
from clara_jax.model.field_checks import Check, SettingsError, check_fields, field_problems
from clara_jax.model.lora import LoRAConfig
from clara_jax.model.presets import PRESETS
from clara_jax.model.stage_registry import STAGE_NAMES, Stage, get_stage
from clara_jax.parallel.mesh import MeshConfig
from clara_jax.parallel.rules import parse_rules
from clara_jax.training.optimizer import OptimizerConfig
from clara_jax.training.stages import StageSpec, stage_spec


class ConfigError(ValueError):
    """A run config that cannot run: `clara-jax train` prints it and exits 2."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`model.*`: which base, and how it computes (`dtype` is parsed into a DTypePolicy)."""

    preset: str
    path: str = ""
    tokenizer: str = ""
    dtype: DTypePolicy | str = "float32"
    remat: str = "none"

    def __post_init__(self):
        try:
            policy = DTypePolicy.parse(self.dtype)
        except (TypeError, ValueError):
            policy = None
        check_fields(
            ("model.preset", self.preset, self.preset in PRESETS, f"one of {sorted(PRESETS)}"),
            (
                "model.path",
                self.path,
                bool(self.path) or self.preset == "tiny",
                "a local transformers directory (only the 'tiny' preset has a built-in random init)",
            ),
            (
                "model.dtype",
                self.dtype,
                policy is not None,
                "'float32', 'bfloat16' or 'p=float32,c=bfloat16'",
            ),
            ("model.remat", self.remat, self.remat in REMAT_POLICIES, f"one of {sorted(REMAT_POLICIES)}"),
        )
        object.__setattr__(self, "dtype", policy)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`data.*` besides the layout's `bucket` and `candidates`."""

    train: str = ""
    eval: str = ""
    policy: str = "error"
    num_epochs: int = 1
    cache_candidates: bool = True
    eval_every: int = 0
    eval_questions: int = 64
    eval_max_new_tokens: int = 16
    precompile_buckets: bool = False

    def __post_init__(self):
        check_fields(
            ("data.policy", self.policy, self.policy in ("error", "skip"), "'error' or 'skip'"),
            ("data.num_epochs", self.num_epochs, self.num_epochs >= 1, ">= 1"),
            (
                "data.eval_every",
                self.eval_every,
                self.eval_every >= 0,
                ">= 0 (0: no evaluation during training)",
            ),
            ("data.eval_questions", self.eval_questions, self.eval_questions >= 1, ">= 1"),
            (
                "data.eval_max_new_tokens",
                self.eval_max_new_tokens,
                self.eval_max_new_tokens >= 0,
                ">= 0 (0: no answers generated during evaluation)",
            ),
        )


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """`batch.*`: examples per optimizer step, and per micro-step (accumulation = global / micro)."""

    global_size: int = 128
    micro_size: int = 8

    def __post_init__(self):
        micro, size = self.micro_size, self.global_size
        check_fields(
            ("batch.micro_size", micro, micro >= 1, ">= 1"),
            (
                "batch.global_size",
                size,
                micro != 0 and size >= micro and size % micro == 0,
                f"a multiple of batch.micro_size = {micro}",
            ),
        )


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """`checkpoint.*`."""

    every_steps: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        check_fields(
            ("checkpoint.every_steps", self.every_steps, self.every_steps >= 1, ">= 1"),
            ("checkpoint.keep", self.keep, self.keep >= 1, ">= 1"),
        )


def _from_section(cls, section):
    """A settings dataclass from the config section whose keys its fields mirror."""
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


def clara_settings(c) -> ClaraSettings:
    return ClaraSettings.from_section(c.clara)


def lora_config(c) -> LoRAConfig:
    return _from_section(LoRAConfig, c.lora)


def layout_config(c) -> LayoutConfig:
    k = c.clara
    return LayoutConfig(
        doc_max_length=k.doc_max_length,
        query_max_length=k.query_max_length,
        generator_max_length=k.generator_max_length,
        bucket=c.data.bucket,
        docs_per_example=k.docs_per_example,
        top_k=k.top_k,
        candidates=c.data.candidates,
    )


def optimizer_config(c, total_steps: int | None = None) -> OptimizerConfig:
    """`optim.*` over `total_steps` (default: the config's, at least 1). Reads a saved config dict
    too: a stage restoring its predecessor's checkpoint rebuilds that run's optimizer."""
    o = c["optim"]
    steps = total_steps or int(c["total_steps"] or 1)
    return OptimizerConfig(
        learning_rate=o["lr"],
        schedule=o["schedule"],
        total_steps=max(steps, 1),
        warmup_ratio=o["warmup_ratio"],
        min_lr_ratio=o["min_lr_ratio"],
        b1=o["b1"],
        b2=o["b2"],
        weight_decay=o["weight_decay"],
        clip_norm=o["clip_norm"],
    )


def stage_spec_of(c) -> StageSpec:
    """The run's StageSpec: the registry's stage, `clara.docs_per_example`, and whether stage 2
    trains the <MEM*> rows it otherwise holds (`clara.stage2_trains_mem_rows`; the official code
    freezes them from stage 2 on)."""
    stage = get_stage(c.stage)
    holds_rows = stage.keeps_mem_rows and not stage.trains_mem_rows
    return stage_spec(
        stage.name,
        docs_per_example=c.clara.docs_per_example,
        train_mem_rows=True if holds_rows and c.clara.stage2_trains_mem_rows else None,
    )


def _stage(name: str) -> Stage:
    check_fields(("stage", name, name in STAGE_NAMES, f"one of {STAGE_NAMES}"))
    return get_stage(name)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Every setting of a run, typed and checked."""

    stage: Stage
    seed: int
    model: ModelSettings
    clara: ClaraSettings
    lora: LoRAConfig
    layout: LayoutConfig
    data: DataSettings
    batch: BatchSettings
    optim: OptimizerConfig
    total_steps: int  # 0: derived from the data
    mesh: MeshConfig
    rules: tuple
    checkpoint: CheckpointSettings
    log_every: int

    @classmethod
    def from_config(cls, c) -> RunSpec:
        """The settings of config `c`, or a ConfigError with every problem, one line each."""
        problems = []

        def section(build):
            try:
                return build()
            except SettingsError as err:
                problems.extend(err.problems)

        sections = dict(
            stage=section(lambda: _stage(c.stage)),
            model=section(lambda: _from_section(ModelSettings, c.model)),
            lora=section(lambda: lora_config(c)),
            clara=section(lambda: clara_settings(c)),
            layout=section(lambda: layout_config(c)),
            data=section(lambda: _from_section(DataSettings, c.data)),
            batch=section(lambda: _from_section(BatchSettings, c.batch)),
            optim=section(lambda: optimizer_config(c)),
            mesh=section(lambda: _parsed(c, "mesh", MeshConfig.from_spec)),
            rules=section(lambda: _parsed(c, "sharding_rules", parse_rules)),
            checkpoint=section(lambda: _from_section(CheckpointSettings, c.checkpoint)),
        )
        problems += field_problems(*_run_checks(c, sections["stage"]))
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
        return cls(**sections, seed=c.seed, total_steps=c.total_steps, log_every=c.log_every)


def _parsed(c, field: str, parse):
    """A spec string parsed, its parser's message as the field's problem."""
    try:
        return parse(c[field])
    except ValueError as err:
        raise SettingsError([f"{field} = {c[field]!r}: {err}"]) from None


def _run_checks(c, stage: Stage | None) -> list[Check]:
    """The run's own scalars, and what one section asks of another."""
    d = c.data
    checks = [
        ("total_steps", c.total_steps, c.total_steps >= 0, ">= 0 (0: derived from the data)"),
        ("log_every", c.log_every, c.log_every >= 1, ">= 1"),
    ]
    if d.eval_every > 0:  # evaluation during training (training/stage_eval.py)
        what = (
            "an evaluation file with pos_index (the dev questions to rank and answer)"
            if stage is not None and stage.retrieval
            else f"a file of {stage.name if stage else 'the stage'}'s records (the dev records to evaluate on)"
        )
        micro = c.batch.micro_size
        checks += [
            ("data.eval", d.eval, bool(d.eval), f"{what} when data.eval_every > 0"),
            (
                "data.eval_questions",
                d.eval_questions,
                d.eval_questions >= micro,
                f">= batch.micro_size = {micro} when data.eval_every > 0 (the eval loss reads whole micro-batches)",
            ),
        ]
    if stage is not None and stage.retrieval:
        k = c.clara
        checks += [
            ("data.candidates", d.candidates, d.candidates >= k.top_k, f">= clara.top_k = {k.top_k}"),
            ("clara.mse_weight", k.mse_weight, k.mse_weight == 0, "0 in stage 3 (the compressor is frozen)"),
            (
                "data.cache_candidates",
                d.cache_candidates,
                not (k.candidate_dropout and d.cache_candidates),
                "false with clara.candidate_dropout = true (dropout compresses a candidate differently "
                "in every step, so there is nothing to cache)",
            ),
        ]
    return checks
