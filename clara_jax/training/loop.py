"""The training loop: resume, step, log, checkpoint, stop cleanly on preemption.

Host work overlaps device work: a step's metrics are fetched while the next step runs, so the
loop never blocks on the loss it just dispatched (except at checkpoints, where the state about
to be saved must be known finite).

Multi-process runs (see clara_jax/parallel/distributed.py): every process runs this same loop
on one mesh over all devices, builds the same global batch and keeps its own devices' rows,
and takes part in every checkpoint and in gathering the final model; only process 0 writes
metrics, TensorBoard events, plots, config.json and WORKDIR/model. A preemption notice
(SIGTERM) to any process is turned into one agreed step by JAX's preemption sync service, at
which all processes save and stop together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from clara_jax.data.pipeline import BatchIterator, TokenStats, count_dropped_positives
from clara_jax.data.records import DataError
from clara_jax.data.sources import read_records, require_records
from clara_jax.file_io import is_url, url_refusal
from clara_jax.formats.checkpoint_meta import run_meta
from clara_jax.interop.gguf import resolve_model_path
from clara_jax.model.flops import forward_flops, lora_train_flops, measured_matmul_flops
from clara_jax.model.stage_registry import get_stage
from clara_jax.parallel.distributed import barrier
from clara_jax.parallel.mesh import MeshConfig, describe, make_mesh, num_slices
from clara_jax.parallel.rules import parse_rules
from clara_jax.training.ahead import StepExecutables, batch_structs, compile_ahead
from clara_jax.training.build import build_model, init_from_previous_stage
from clara_jax.training.candidate_cache import CandidateCache, reads_cached_candidates
from clara_jax.training.checkpoint import Checkpointer, abstract_like
from clara_jax.training.config import ConfigError
from clara_jax.training.dev_retrieval import DevRetrieval
from clara_jax.training.metrics import MetricsWriter, plot_history, read_history
from clara_jax.training.run_spec import layout_config, optimizer_config, stage_spec_of
from clara_jax.training.stage_eval import BestStep, StageEval, usable_count
from clara_jax.training.stages import stage_program
from clara_jax.training.step import global_batch

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclasses.dataclass
class RunSummary:
    workdir: str
    stage: str
    first_step: int
    last_step: int
    preempted: bool
    final_metrics: dict
    plots: list
    # the best evaluation (training/stage_eval.py BestStep: lowest eval/loss in stages 1-2, highest
    # dev/recall@1 in stage 3), {} without evaluation: {"metric", "mode", "step", "value"}
    best: dict = dataclasses.field(default_factory=dict)
    # every compilation of the train step in this run: {"step", "shapes", "seconds"} (one per new
    # batch shape: the bucketed lengths), kept out of the step times and the throughput figures;
    # step 0: compiled before step 0 (the memory check's, and data.precompile_buckets')
    compiles: list = dataclasses.field(default_factory=list)

    @property
    def best_step(self) -> int | None:
        return self.best.get("step")


class _StopFlag:
    """SIGTERM / SIGINT (e.g. TPU preemption) ask the loop to save and exit at the next step.

    With several processes, the processes must stop at the same step: SIGTERM is left to JAX's
    preemption sync service (which agrees on a step with the others, see `should_stop`), and
    SIGINT is forwarded to it as a SIGTERM.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        signals = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._multiprocess:
            signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier spreads it to every process
        else:
            self.signal = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """Whether to save and exit after `step` (called at every step, on every process)."""
        if self._multiprocess and _reached_preemption_sync_point(step):
            self.signal = self.signal or "SIGTERM"
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _reached_preemption_sync_point(step: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
        return False


def _mesh_config(config, dcn_mesh: str) -> MeshConfig:
    """`config.mesh` within a slice; across TPU slices `dcn_mesh`, by default data-parallel."""
    if not dcn_mesh and num_slices() > 1:
        dcn_mesh = "data=-1"  # replicas across slices: only the gradient all-reduce crosses DCN
    return MeshConfig.from_spec(config.mesh, dcn_mesh)


# Every row that enters the decoder in a step: generator, compressor (unless cached), query reasoner.
TOKEN_MASKS = ("gen_mask", "enc_mask", "query_mask")


def step_flops(cfg, stage: str, batch: dict, rank: int) -> float:
    """Analytic FLOPs of one optimizer step (what the model computes, padding included):
    the compressor (trained in stages 1/2, forward only in stage 3 unless the candidates come
    from the cache), the query reasoner (stage 3) and the generator; no encoder computes logits."""
    micro, gen_rows, gen_len = batch["gen_ids"].shape
    if get_stage(stage).retrieval:  # candidates are compressed (forward only), the query trains
        _, q_rows, q_len = batch["query_ids"].shape
        encoders = lora_train_flops(cfg, q_rows, q_len, lora_rank=rank, logits=False)
        if "enc_ids" in batch:  # re-compressed in the step (no candidate cache)
            _, enc_rows, enc_len = batch["enc_ids"].shape
            encoders += forward_flops(cfg, enc_rows, enc_len, lora_rank=rank, logits=False)
    else:
        _, enc_rows, enc_len = batch["enc_ids"].shape
        encoders = lora_train_flops(cfg, enc_rows, enc_len, lora_rank=rank, logits=False)
    return micro * (encoders + lora_train_flops(cfg, gen_rows, gen_len, lora_rank=rank))


def read_eval_records(config) -> list | None:
    """The records of `data.eval` when the run evaluates during training (`data.eval_every` > 0),
    read and checked like the training data, before any model is built: the stage's own record
    layout (stage 3 reads evaluation files, golden_answers and pos_index, with at least top-k
    candidates), at least one micro-batch of them, and in stage 3 some with gold positions."""
    if not config.data.eval_every:
        return None
    spec = get_stage(config.stage)
    if not config.data.eval:
        raise DataError("data.eval_every > 0 needs data.eval (the records to evaluate on)")
    kind = "eval" if spec.retrieval else spec.record_kind
    records, report = read_records(
        config.data.eval,
        kind,
        policy=config.data.policy,
        min_docs=config.clara.top_k if spec.retrieval else None,
        docs_per_example=config.clara.docs_per_example if spec.fixed_docs else None,
    )
    log.info("%s", report.summary())
    micro = config.batch.micro_size
    require_records(
        records, report, at_least=micro, purpose=f"one evaluation micro-batch (batch.micro_size = {micro})"
    )
    if spec.retrieval and not any(r.pos_index for r in records):
        raise DataError(
            f"data.eval = {config.data.eval}: no record has pos_index; stage 3's dev Recall@k needs "
            "gold positions (an evaluation file with pos_index, e.g. *_with_pos.jsonl)"
        )
    return records


def dev_retrieval(config, built, records=None) -> DevRetrieval | None:
    """The stage-3 periodic dev Recall@k, when `data.eval_every` > 0 (`records`: data.eval's)."""
    if not get_stage(config.stage).retrieval or not config.data.eval_every:
        return None
    if records is None:
        records = read_eval_records(config)
    return DevRetrieval(
        records,
        built.tokenizer,
        built.clara,
        n_questions=config.data.eval_questions,
        query_max_length=config.clara.query_max_length,
        bucket=config.data.bucket,
        ks=(1, config.clara.top_k),
    )


def stage_eval(config, built, records, graphdef, mesh, *, progress: bool = False) -> StageEval | None:
    """The periodic evaluation of every stage (eval loss, answer scores), when `data.eval_every` > 0."""
    if not config.data.eval_every:
        return None
    micro, rules = config.batch.micro_size, parse_rules(config.sharding_rules)
    n = usable_count(len(records), config.data.eval_questions, micro)
    lookup = None
    if reads_cached_candidates(config):  # as the steps read them: the eval candidates compressed once
        lookup = _candidate_cache(
            config, built, records[:n], mesh, progress=progress, what="evaluation"
        ).lookup
    evaluator = StageEval(
        config.stage,
        records,
        built.tokenizer,
        built.clara,
        layout_config(config),
        graphdef,
        mesh,
        micro_size=micro,
        n_questions=config.data.eval_questions,
        max_new_tokens=config.data.eval_max_new_tokens,
        rules=rules,
        candidate_memory_lookup=lookup,
        seed=config.seed,
    )
    asked = min(config.data.eval_questions, len(records))
    log.info(
        "evaluating every %d steps on %d records of %s (%d micro-batches of %d%s)%s",
        config.data.eval_every,
        evaluator.questions,
        config.data.eval,
        evaluator.micro_steps,
        micro,
        f"; the last {asked - n} of the first {asked} do not fill a micro-batch" if asked > n else "",
        f", answers of at most {config.data.eval_max_new_tokens} tokens" if evaluator.answered else "",
    )
    stats = evaluator.stats  # nothing is cut silently, in the evaluation either
    warn_truncations(stats, "evaluation ")
    if get_stage(config.stage).retrieval:  # the eval loss and answers read the first data.candidates
        warn_dropped_positives(stats, config.data.candidates, f"{config.data.eval} (eval loss and answers)")
    return evaluator


def warn_truncations(stats: TokenStats, prefix: str = "") -> list[str]:
    """Every document, question and generator row the layouts cut, with its limit and counts: a
    warning per kind at the end of a run (and of the evaluation set-up), never silent. The messages."""
    messages = [
        f"{prefix}{what} truncated to {limit}: {cut} of {of}"
        for what, cut, of, limit in (
            ("documents", stats.docs_truncated, stats.docs, "clara.doc_max_length"),
            ("questions", stats.queries_truncated, stats.queries, "clara.query_max_length"),
            (
                "generator prompts + targets",
                stats.targets_truncated,
                stats.examples,
                "clara.generator_max_length",
            ),
        )
        if cut
    ]
    for message in messages:
        log.warning("%s", message)
    return messages


def warn_dropped_positives(stats: TokenStats, candidates: int, where: str) -> str | None:
    """Stage 3 reads each question's first `data.candidates` documents: a gold passage (pos_index)
    beyond them is never a candidate. Never silently: warn with the counts (the message, or None)."""
    if not stats.positives_dropped:
        return None
    message = (
        f"{where}: {stats.positives_dropped} of {stats.positives} gold passages (pos_index), in "
        f"{stats.examples_positives_dropped} of {stats.examples} questions, lie beyond the first "
        f"data.candidates={candidates} candidates and are dropped; raise data.candidates to keep them"
    )
    log.warning("%s", message)
    return message


def _restore_best(best: BestStep, history_path: str | None) -> None:
    """A resumed run's best evaluation so far, from process 0's metrics.jsonl (already cut back to
    the resumed step), the same on every process."""
    if history_path is not None:
        best.restore(read_history(history_path))
    if jax.process_count() > 1:
        found = np.asarray(
            [-1 if best.step is None else best.step, np.nan if best.value is None else best.value], np.float32
        )
        step, value = multihost_utils.broadcast_one_to_all(found)
        best.step, best.value = (None, None) if step < 0 else (int(step), float(value))


class StepClock:
    """Step times from completion to completion, with compilations timed and kept out.

    A step's time runs from the end of the previous step (or of whatever ran between, see
    `restart`) to the moment its outputs are ready, minus the time its dispatch spent compiling: a
    dispatch that grows the jitted step's cache compiled a program for a new batch shape, which is
    logged with its shapes and duration. So tokens/s and FLOP utilisation describe the steps alone,
    and the progress bar, TensorBoard and metrics.jsonl all read the same figure."""

    def __init__(self, step_fn):
        self.step_fn, self.compiles = step_fn, []
        self._since = time.perf_counter()
        self._compile_s = 0.0

    def restart(self) -> None:
        self._since, self._compile_s = time.perf_counter(), 0.0

    def dispatch(self, state, frozen, batch, *, step: int):
        size = self.step_fn._cache_size()
        start = time.perf_counter()
        out = self.step_fn(state, frozen, batch)
        if self.step_fn._cache_size() > size:  # this call compiled a program for new shapes
            seconds = time.perf_counter() - start
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            self.compiles.append({"step": step, "shapes": shapes, "seconds": seconds})
            self._compile_s += seconds
            log.info(
                "compiled the train step for %s in %.1f s (compilation %d)",
                shapes,
                seconds,
                len(self.compiles),
            )
        return out

    def finished(self, outputs) -> float:
        """Wait for `outputs` of the step in flight; its seconds, compilation excluded."""
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        seconds = max(now - self._since - self._compile_s, 1e-9)
        self._since, self._compile_s = now, 0.0
        return seconds


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values())


def _check_steps_fit_data(config: ml_collections.ConfigDict, n_records: int) -> None:
    """Refuse a `total_steps` the data cannot feed: the run would stop early, its schedule sized for
    steps that never run (BatchIterator drops the last partial batch of every epoch)."""
    per_epoch = n_records // config.batch.global_size
    available = per_epoch * config.data.num_epochs
    if config.total_steps and config.total_steps > available:
        needed = -(-config.total_steps // per_epoch)
        raise ConfigError(
            f"total_steps={config.total_steps}, but {config.data.train} gives {per_epoch} steps per epoch "
            f"({n_records} records / global batch {config.batch.global_size}) x data.num_epochs="
            f"{config.data.num_epochs} = {available} steps; set --config.data.num_epochs={needed} "
            f"or --config.total_steps={available}"
        )


def _candidate_cache(
    config, built, records, mesh, *, progress: bool, what: str = "training"
) -> CandidateCache | None:
    """Stage 3 compresses each distinct candidate once, as its compressor cannot change."""
    if not reads_cached_candidates(config):
        return None
    cache = CandidateCache.for_config(config, built, records, mesh, progress=progress)
    log.info(
        "compressed %d distinct %s candidates once in %.1f s (%.1f MB on each host); the steps read them",
        len(cache),
        what,
        cache.seconds,
        cache.nbytes / 1e6,
    )
    return cache


def _when(step: int) -> str:
    return f"step {step}" if step else "before step 0"


def _with_remat(model, remat: str):
    """The same model (its arrays shared, not copied) with another rematerialisation policy."""
    graphdef, params = nnx.split(model)
    other = nnx.merge(graphdef, params)
    other.remat = remat
    return other


def _compile_ahead(config, built, spec, trainer, state, batches, mesh, total_steps, *, steps_left):
    """The step to call in the loop, and its compilations before step 0 (training/ahead.py): for the
    next batch's shape when `memory_check` is on, for every batch shape the run has left with
    `data.precompile_buckets`; the memory check refuses a step that cannot fit (StepDoesNotFit)."""
    precompile = bool(config.data.get("precompile_buckets", False))
    if not (config.get("memory_check", True) or precompile) or steps_left <= 0:
        return trainer.step, []
    start = time.perf_counter()
    shapes = batches.remaining_shapes(limit=steps_left if precompile else 1)
    if precompile:
        log.info(
            "the run's %d remaining batches come in %d shape(s) (bucketed lengths; found in %.1f s)",
            steps_left,
            len(shapes),
            time.perf_counter() - start,
        )
    rules = parse_rules(config.sharding_rules)
    optim = optimizer_config(config, total_steps)

    def candidate_program(candidate_shapes, remat=None):  # the same step for other settings
        model = built.model if remat is None else _with_remat(built.model, remat)
        return stage_program(
            model,
            spec,
            built.clara,
            optim,
            mesh,
            batch_structs(candidate_shapes),
            seed=config.seed,
            gumbel=config.clara.gumbel,
            straight_through=config.clara.straight_through,
            candidate_dropout=config.clara.candidate_dropout,
            rules=rules,
        )

    def generator_probe(length: int):  # the next batch with a shorter generator: (cut, rows) or None
        probe = copy.copy(batches)
        probe.layout = dataclasses.replace(batches.layout, generator_max_length=length)
        probe.stats = TokenStats()
        try:
            next(probe)
        except (ValueError, StopIteration):  # e.g. the memory slots no longer fit in a row
            return None
        return probe.stats.targets_truncated, probe.stats.examples

    steps = StepExecutables(trainer.step)
    compiles = compile_ahead(
        config,
        steps,
        state,
        trainer.frozen,
        trainer.shardings.batch,
        shapes,
        mesh,
        candidate_program,
        rules=rules,
        generator_probe=generator_probe,
    )
    return steps, compiles


def run_training(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, dcn_mesh: str = ""
) -> RunSummary:
    """Train one stage in `workdir` (resuming from its newest checkpoint).

    `dcn_mesh` (e.g. "data=2") gives the mesh axes that span slices or, off TPUs, processes;
    the mesh size of an axis is its `config.mesh` size times its DCN size.
    """
    for what, path in (("--workdir", workdir), ("init_from", config.get("init_from") or "")):
        if is_url(path):  # never a local folder named "gs:" in its place
            raise ConfigError(url_refusal(what, path))
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    stage = config.stage
    spec = get_stage(stage)
    # Data first: a bad file fails in a second, before a model is built or a directory written.
    records, report = read_records(
        config.data.train,
        spec.record_kind,
        policy=config.data.policy,
        # a retrieval stage needs top-k candidates; the others compress a fixed number of docs
        min_docs=config.clara.top_k if spec.retrieval else None,
        docs_per_example=config.clara.docs_per_example if spec.fixed_docs else None,
    )
    log.info("%s", report.summary())
    if spec.retrieval:
        candidates = config.data.candidates
        warn_dropped_positives(count_dropped_positives(records, candidates), candidates, config.data.train)
    global_size = config.batch.global_size
    require_records(records, report, at_least=global_size, purpose=f"one global batch of {global_size}")
    _check_steps_fit_data(config, len(records))
    eval_records = read_eval_records(config)  # data.eval too, before a model is built
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(_mesh_config(config, dcn_mesh))
    log.info(
        "%s: %s on mesh %s, process %d of %d",
        workdir,
        config.stage,
        describe(mesh),
        jax.process_index(),
        jax.process_count(),
    )

    built = build_model(config, mesh=mesh)
    init_info = init_from_previous_stage(built, config, config.init_from) if config.init_from else None

    cache = _candidate_cache(config, built, records, mesh, progress=progress and is_main)

    def make_batches(num_epochs: int) -> BatchIterator:
        return BatchIterator(
            records,
            built.tokenizer,
            stage,
            layout_config(config),
            global_size=config.batch.global_size,
            micro_size=config.batch.micro_size,
            seed=config.seed,
            num_epochs=num_epochs,
            candidate_memory=cache.lookup if cache else None,
        )

    batches = make_batches(config.data.num_epochs)
    total_steps = config.total_steps or batches.total_steps
    spec = stage_spec_of(config)
    first = next(make_batches(1))  # shapes only: the step's shardings depend on ranks, not lengths
    trainer = stage_program(
        built.model,
        spec,
        built.clara,
        optimizer_config(config, total_steps),
        mesh,
        first,
        seed=config.seed,
        gumbel=config.clara.gumbel,
        straight_through=config.clara.straight_through,
        candidate_dropout=config.clara.candidate_dropout,
        rules=parse_rules(config.sharding_rules),
    ).start()
    del first
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    state = trainer.state
    # a checkpoint of other settings (e.g. lora.rank) raises CheckpointMismatch: no silent restart
    restored = ckpt.restore_latest(abstract_like(state, trainer.shardings.state), config=config.to_dict())
    start_step = 0
    if restored is not None:
        start_step, state, data_state, _ = restored
        batches.restore(data_state)
        log.info("resumed from %s step %d", ckpt.directory, start_step)
    if jax.process_count() > 1:  # e.g. a checkpoint one host could read and another could not
        multihost_utils.assert_equal(
            np.int32(start_step if restored is not None else -1),
            "processes resumed from different checkpoints (-1: none)",
        )
    # before step 0: the step compiled for the next batch (and, on request, every batch shape of the
    # run), its memory checked against the device's; a step that cannot fit stops here (exit 2)
    try:
        train_step, ahead_compiles = _compile_ahead(
            config,
            built,
            spec,
            trainer,
            state,
            batches,
            mesh,
            total_steps,
            steps_left=total_steps - start_step,
        )
    except BaseException:
        ckpt.close()
        raise
    dev = dev_retrieval(config, built, eval_records)
    evaluator = stage_eval(config, built, eval_records, trainer.graphdef, mesh, progress=progress and is_main)
    best = BestStep.for_stage(stage) if evaluator is not None else None

    meta = run_meta(
        config.to_dict(),
        init_info,
        {"vocab_size": built.tokenizer.vocab_size, "n_mem": built.tokenizer.n_mem},
    )
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step if restored else None)
    if best is not None and restored is not None:  # the evaluations before the resumed step count too
        _restore_best(best, writer.path if is_main else None)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)

    from tqdm.auto import tqdm

    # FLOP utilisation is reported against the devices' peak: given, or measured here once.
    peak_flops = (config.peak_flops or measured_matmul_flops()) * jax.device_count()

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not (progress and is_main),
        unit="step",
        desc=stage,
        dynamic_ncols=True,
    )
    step = start_step
    last_good = start_step if restored else None
    pending = None  # (step, metrics on device, wall time, flops) of the previous step
    final_metrics, preempted = {}, False

    def flush(entry):
        nonlocal final_metrics
        done_step, device_metrics, seconds, flops, tokens = entry
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not _finite(metrics):
            bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
            raise TrainingDiverged(
                f"non-finite metrics at step {done_step}: {bad}; stopped without saving. The last good "
                f"checkpoint is step {last_good} in {ckpt.directory}"
                if last_good is not None
                else f"non-finite metrics at step {done_step}: {bad}; stopped before any checkpoint was written"
            )
        metrics["tokens_per_s"] = tokens / seconds
        metrics["flops_per_s"] = flops / seconds
        metrics["utilisation"] = metrics["flops_per_s"] / peak_flops
        final_metrics = metrics
        if done_step % config.log_every == 0 or done_step == total_steps:
            writer.write(done_step, metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            lr=f"{metrics.get('learning_rate', 0):.1e}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            gflops=f"{metrics['flops_per_s'] / 1e9:.1f}",
        )

    def evaluate(at_step: int) -> bool:
        """The evaluation during training (`data.eval_every`): the eval loss and answer scores of the
        current model, and in stage 3 the dev Recall@k of its query reasoner, in order with the
        training rows; runs between steps, before the next one takes the state. Whether it ran."""
        if evaluator is None or at_step % config.data.eval_every:
            return False
        jax.block_until_ready(state.params)  # the step in flight is not the evaluation's time
        start = time.perf_counter()
        rows = {}
        if dev is not None:
            rows["dev"] = dev.evaluate(nnx.merge(trainer.graphdef, state.params, trainer.frozen))
        rows["eval"] = evaluator.evaluate(state.params, trainer.frozen)
        best.update(at_step, {f"{p}/{k}": v for p, scores in rows.items() for k, v in scores.items()})
        if best.step is not None:
            rows["eval"]["best_step"] = best.step
        for prefix, scores in rows.items():
            writer.write(at_step, scores, prefix=prefix)
        log.info(
            "step %d: %s (%.1f s)",
            at_step,
            ", ".join(f"{p}/{k} {v:.4g}" for p, scores in rows.items() for k, v in scores.items()),
            time.perf_counter() - start,
        )
        return True

    clock = StepClock(train_step)
    with jax.set_mesh(mesh), _StopFlag() as stop:
        try:
            if step == 0:
                evaluate(0)  # where the model starts
            clock.restart()
            while step < total_steps:
                try:
                    arrays = next(batches)  # host work, overlapping the step in flight
                except StopIteration:
                    break
                batch = global_batch(arrays, trainer.shardings.batch)
                if pending is not None and pending[2] is None:  # the step in flight ends
                    pending = (*pending[:2], clock.finished(pending[1]), *pending[3:])
                state, metrics = clock.dispatch(state, trainer.frozen, batch, step=step + 1)
                step += 1
                if pending is not None:
                    flush(pending)
                tokens = sum(int(arrays[k].sum()) for k in TOKEN_MASKS if k in arrays)
                flops = step_flops(built.model.config, stage, arrays, config.lora.rank)
                pending = (step, metrics, None, flops, tokens)
                bar.update(1)
                eval_due = evaluator is not None and step % config.data.eval_every == 0
                save_due = step % config.checkpoint.every_steps == 0 or step == total_steps
                if eval_due or save_due:  # the state is needed now: this step's time ends here
                    pending = (step, metrics, clock.finished(metrics), flops, tokens)
                evaluate(step)
                stopping = stop.should_stop(step)
                if save_due or stopping:
                    if pending[2] is None:
                        pending = (step, metrics, clock.finished(metrics), flops, tokens)
                    flush(pending)  # never checkpoint a state whose loss is not finite
                    pending = None
                    ckpt.save(step, state, batches.state(), meta, wait=stopping)
                    last_good = step
                if eval_due or save_due or stopping:
                    clock.restart()  # evaluation and saving stay out of the next step's time
                if stopping:
                    preempted = True
                    log.warning("%s received: saved step %d, exiting", stop.signal, step)
                    break
            if pending is not None:
                if pending[2] is None:
                    pending = (*pending[:2], clock.finished(pending[1]), *pending[3:])
                flush(pending)
        finally:
            bar.close()
            ckpt.close()
            writer.close()
    compiles = ahead_compiles + clock.compiles
    if compiles:
        log.info(
            "the train step compiled %d time(s) (%d before step 0, %d during the run), %.1f s in all (%s)",
            len(compiles),
            len(ahead_compiles),
            len(clock.compiles),
            sum(c["seconds"] for c in compiles),
            "; ".join(f"{_when(c['step'])}: {c['shapes']} in {c['seconds']:.1f} s" for c in compiles),
        )

    plots = plot_history(workdir) if (is_main and config.plot and not preempted) else []
    trainer.state = state
    if not preempted and step >= total_steps:  # the finished model, for inference and export
        from clara_jax.interop.model_dir import save_clara_model

        # every process takes part (the arrays may live on several hosts); process 0 writes
        save_clara_model(
            trainer.model(),
            built.tokenizer,
            built.clara,
            os.path.join(workdir, "model"),
            base_path=os.path.abspath(resolve_model_path(config.model.path)) if config.model.path else "",
            run_config=config.to_dict(),
            write=is_main,
        )
    barrier("run_training end")  # nobody returns before process 0 has finished writing
    stats = batches.stats
    warn_truncations(stats)
    if get_stage(stage).retrieval:  # (`spec` is the StageSpec by now)
        warn_dropped_positives(stats, config.data.candidates, "the batches trained on")
    if best is not None and best.step is not None:
        log.info(
            "%s: best evaluation at step %d (%s = %.4g, the %s of the evaluations every %d steps)",
            stage,
            best.step,
            best.metric,
            best.value,
            "lowest" if best.mode == "min" else "highest",
            config.data.eval_every,
        )
    return RunSummary(
        workdir,
        stage,
        start_step,
        step,
        preempted,
        final_metrics,
        plots,
        best=best.as_dict() if best is not None and best.step is not None else {},
        compiles=compiles,
    )
