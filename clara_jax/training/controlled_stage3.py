"""The controlled stage-3 experiment: does the LM loss alone, through the straight-through top-k,
teach a near-chance query reasoner to retrieve?

Everything except the query reasoner is made right first, so that retrieval is the only thing
left to learn and the only way to lower the loss:

1. *Episodes*: 20 made-up people (clara_jax.data.synthetic's names, facts and templates), one
   short passage each, and a question about one of them. The facts are drawn afresh for every
   episode, and no other candidate holds the answer value, so the answer is in the gold passage
   and nowhere else: it can be neither memorised from the question nor read off a wrong passage.
   Training episodes use one set of names, dev episodes another (never seen in any step).
2. A *reader*: the generator adapter trained with the stage-2 objective on (question, gold
   passage, answer) until it answers from the gold passage's memory vectors. The compressor is
   the base model itself (its adapter is left at identity, the <MEM*> rows untrained): a cheaper
   stand-in for stages 1-2 whose memory vectors stay diverse (a LoRA compressor trained this way on
   a random-init base collapsed every passage onto nearly one direction, pairwise cosine 0.9999,
   which leaves cosine retrieval nothing to work with). The base is a random init with its output
   layer scaled up, as in tests/test_clara_core.py: random logits are too flat to learn from fast.
3. Stage 3 (`stage_program`, the stage-3 loss and step of `clara-jax train`) from a query
   reasoner that retrieves at chance: a LoRA whose B is drawn N(0, query_init_scale²) instead of
   zeros (with B = 0 it would equal the compressor, which already ranks by shared name tokens).
   CE only. The generator is frozen by default (`train_generator=False`): co-trained while the
   retriever is still at chance, it sees a wrong passage 95 % of the time and learns to ignore
   the memory (its CE fell exactly as in the control), and the query reasoner's gradient, which
   only exists through what the generator reads, shrank 50-fold within 70 steps. Dev Recall@1
   over 20 candidates every `eval_every` steps.
4. The control: the same run with `straight_through=False` (stop-gradient on the top-k weights):
   same start, same batches, the query reasoner gets no gradient.

What made it learn (the estimator is untouched): the gradient the estimator gives the candidate
scores is informative from the start (the gold is pushed up in 97 % of questions whose gold was
not picked), but one batch's parameter gradient is a noisy version of it. Its cosine with a
supervised InfoNCE gradient on 128 questions is 0.20 at batch 16 and 0.41 at batch 64, so stage 3
runs at batch 64. τ = 0.05 learned faster than 0.1; at 0.02 the soft top-1 is too peaked to move.
Training questions can carry fewer candidates than the 20 of dev (`train_candidates`): with 5, the
reader sees the gold in 20 % of questions at the start instead of 5 %, and dev Recall@1 rises sooner
with a quarter of the passages to compress per step, but ends lower (see ControlledConfig).
Top-1 because a reader of 5 passages trained the same way guessed from the question (exact match
0.19 with the gold among the 5, 0.16 without it): a random-init base cannot learn to find the right
passage among several in a few hundred steps.

`run_controlled_experiment` returns both curves; `benchmarks/stage3_controlled.py` runs and plots it.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data.pipeline import to_micro_steps, tokenize_compression, tokenize_retrieval
from clara_jax.data.records import InstructionRecord, RetrievalRecord
from clara_jax.data.synthetic import (
    ATTRIBUTE_KINDS,
    Entity,
    SyntheticCorpusConfig,
    attribute_values,
    make_entities,
    passage_qa,
    render_passage,
)
from clara_jax.model.clara import GENERATOR, QUERY_REASONER
from clara_jax.model.stage_registry import get_stage
from clara_jax.parallel.mesh import MeshConfig, make_mesh
from clara_jax.training.build import build_model
from clara_jax.training.config import load_config
from clara_jax.training.dev_retrieval import DevRetrieval
from clara_jax.training.optimizer import OptimizerConfig
from clara_jax.training.run_spec import layout_config
from clara_jax.training.stages import stage_program, stage_spec


@dataclasses.dataclass(frozen=True)
class ControlledConfig:
    seed: int = 0
    n_names: int = 400  # name pool; the last dev_name_fraction of it is only used by dev episodes
    dev_name_fraction: float = 0.25
    facts_per_person: int = 1
    values_per_attribute: int = 8
    n_candidates: int = 20  # per dev question
    # per training question. With 5 the reader gets the gold 20 % of the time at chance and dev
    # Recall@1 rises sooner (0.34 at step 160 against 0.19 with 20), with a quarter of the passages
    # to compress per step, but ends lower (0.62 at step 600 against 0.79 with 20). CI uses 5.
    train_candidates: int = 20
    top_k: int = 1
    temperature: float = 0.05  # 0.02 (the official default) is too peaked to move, 0.1 learns slower (README)
    doc_max_length: int = 32
    compression_rate: int = 8
    lora_rank: int = 32
    lm_head_scale: float = 20.0
    reader_steps: int = 500
    reader_lr: float = 5e-3
    reader_batch: int = 16
    query_init_scale: float = 0.05
    train_generator: bool = False  # True: co-train the generator as `clara-jax train` stage 3 does
    stage3_steps: int = 600
    # The control's query reasoner gets no gradient, so its curve is flat by construction; a short
    # control (e.g. in CI) shows that as well as a full-length one. None = stage3_steps.
    control_steps: int | None = None
    stage3_lr: float = 2e-3
    stage3_batch: int = 64  # at 16 the estimator's per-batch direction is too noisy (README)
    eval_every: int = 40
    eval_questions: int = 100
    # how many of this host's devices the runs use (data parallel; None: all of them). Small CPU
    # runs are faster on one: eight simulated devices on two cores only add collectives.
    devices: int | None = None


class Episodes:
    """Seeded streams of retrieval episodes (see the module docstring, item 1)."""

    def __init__(self, cfg: ControlledConfig):
        syn = SyntheticCorpusConfig(seed=cfg.seed, n_entities=cfg.n_names, n_distractors=0)
        names = [e.name for e in make_entities(syn)]
        n_dev = round(cfg.dev_name_fraction * len(names))
        self.train_names, self.dev_names = names[:-n_dev], names[-n_dev:]
        self.cfg = cfg

    def _person(self, rng, name: str, avoid: dict) -> Entity:
        kinds = sorted(rng.choice(len(ATTRIBUTE_KINDS), self.cfg.facts_per_person, replace=False))
        facts = []
        for i in kinds:
            kind = ATTRIBUTE_KINDS[i]
            values = [
                v for v in attribute_values(kind, self.cfg.values_per_attribute) if v != avoid.get(kind)
            ]
            facts.append((kind, values[rng.integers(len(values))]))
        return Entity(name, tuple(facts), None, False, False)

    def sample(self, rng: np.random.Generator, dev: bool = False) -> RetrievalRecord:
        pool = self.dev_names if dev else self.train_names
        n = self.cfg.n_candidates if dev else self.cfg.train_candidates
        names = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
        gold = self._person(rng, names[0], {})
        questions, answers = passage_qa(gold)
        q = int(rng.integers(len(questions)))
        asked = dict(gold.facts)
        kind = next(k for k, v in gold.facts if v == answers[q])
        # no other passage holds the answer value
        people = [gold] + [self._person(rng, n, {kind: asked[kind]}) for n in names[1:]]
        order = rng.permutation(len(people))
        return RetrievalRecord(
            question=questions[q],
            answer=answers[q],
            answers=(answers[q],),
            docs=tuple(render_passage(people[i]) for i in order),
            pos_index=(int(np.flatnonzero(order == 0)[0]),),
        )

    def batch(self, rng, size: int, dev: bool = False) -> list:
        return [self.sample(rng, dev) for _ in range(size)]


def _config(cfg: ControlledConfig, stage: str):
    return load_config(
        get_stage(stage).config_module + ":tiny",
        [
            f"--config.seed={cfg.seed}",
            f"--config.clara.doc_max_length={cfg.doc_max_length}",
            f"--config.clara.compression_rate={cfg.compression_rate}",
            f"--config.clara.top_k={cfg.top_k}",
            f"--config.clara.temperature={cfg.temperature}",
            "--config.clara.query_max_length=32",
            "--config.clara.generator_max_length=256",
            f"--config.lora.rank={cfg.lora_rank}",
            f"--config.lora.alpha={2 * cfg.lora_rank}",
            "--config.lora.dropout=0.0",
            "--config.data.bucket=16",
        ],
    )


def _put(arrays: dict, shardings) -> dict:
    return jax.device_put({k: jnp.asarray(v) for k, v in arrays.items()}, shardings)


def reader_record(r: RetrievalRecord, k: int, rng: np.random.Generator) -> InstructionRecord:
    """What stage 3 will feed the generator: k passages, the gold one at a random slot (with k=1,
    the gold alone). The reader learns to find the answer among them, as in stage 2."""
    gold = r.pos_index[0]
    others = [i for i in range(len(r.docs)) if i != gold]
    picked = [gold] + [others[i] for i in rng.choice(len(others), k - 1, replace=False)]
    return InstructionRecord(r.question, tuple(r.docs[i] for i in rng.permutation(picked)), r.answer)


def train_reader(cfg: ControlledConfig, episodes: Episodes, mesh, log=print):
    """The generator learns to answer from the gold passage's memory (stage-2 objective, one doc)."""
    config = _config(cfg, "stage2")
    built = build_model(config)
    built.model.lm_head[...] = built.model.lm_head[...] * cfg.lm_head_scale
    layout = dataclasses.replace(layout_config(config), docs_per_example=cfg.top_k)
    rng = np.random.default_rng([cfg.seed, 1])

    def batch():
        records = [reader_record(r, cfg.top_k, rng) for r in episodes.batch(rng, cfg.reader_batch)]
        arrays, _ = tokenize_compression(built.tokenizer, records, layout, rng)
        return to_micro_steps(arrays, cfg.reader_batch, cfg.reader_batch, per)

    per = {"enc_ids": cfg.top_k, "enc_mask": cfg.top_k}
    optim = OptimizerConfig(learning_rate=cfg.reader_lr, total_steps=cfg.reader_steps, warmup_ratio=0.05)
    # the compressor is the base itself: only the generator (the reader) trains
    spec = dataclasses.replace(
        stage_spec("stage2", docs_per_example=cfg.top_k),
        adapters=(GENERATOR,),
        train_mem_rows=False,
        keep_mem_rows=False,
    )
    trainer = stage_program(built.model, spec, built.clara, optim, mesh, batch(), seed=cfg.seed).start()
    state = trainer.state
    for step in range(1, cfg.reader_steps + 1):
        state, metrics = trainer.step(state, trainer.frozen, _put(batch(), trainer.shardings.batch))
        if step % max(cfg.reader_steps // 5, 1) == 0:
            m = jax.device_get(metrics)
            log(
                f"[reader] step {step}: CE {float(m['ce']):.3f}, target-token accuracy {float(m['token_accuracy']):.3f}"
            )
    trainer.state = state
    model = trainer.model()
    key = jax.random.key(cfg.seed + 3)  # a query reasoner unlike the compressor: random, nonzero B
    for i, factors in enumerate(model.adapters[QUERY_REASONER].factors.values()):
        b = factors["b"]
        b.set_value(cfg.query_init_scale * jax.random.normal(jax.random.fold_in(key, i), b.shape))
    return built, model


def reader_exact_match(built, model, records, k: int, seed: int = 0) -> dict:
    """Greedy exact match of the generator reading k passages with the gold among them, and k
    passages without it: the reader must answer from the gold and only from it."""
    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.inference.metrics import exact_match

    inference = ClaraInference(built.tokenizer, model, built.clara, batch_size=20, data_parallel=False)
    rng = np.random.default_rng([seed, 4])
    with_gold = [reader_record(r, k, rng).docs for r in records]
    without = [[d for i, d in enumerate(r.docs) if i not in r.pos_index][:k] for r in records]
    out = {}
    for name, docs in (("gold", with_gold), ("wrong_doc", without)):
        answers = inference.generate_from_text([r.question for r in records], docs, max_new_tokens=8)
        out[f"em_{name}"] = float(np.mean([exact_match(a, r.answer) for a, r in zip(answers, records)]))
    return out


def _stage3_batches(cfg: ControlledConfig, episodes: Episodes, tok, config, seed: int):
    """An endless, seeded stream of stage-3 batches (candidates re-compressed in the step)."""
    layout = dataclasses.replace(layout_config(config), top_k=cfg.top_k, candidates=cfg.train_candidates)
    rng = np.random.default_rng([seed, 2])
    per = {"enc_ids": cfg.train_candidates, "enc_mask": cfg.train_candidates}
    while True:
        arrays, _ = tokenize_retrieval(tok, episodes.batch(rng, cfg.stage3_batch), layout)
        yield to_micro_steps(arrays, cfg.stage3_batch, cfg.stage3_batch, per)


def run_stage3(cfg, episodes, dev_records, built, reader, mesh, *, straight_through: bool, log=print):
    """One stage-3 run from the reader's (near-chance) query reasoner; returns the logged rows:
    dev Recall@k at every `eval_every` steps and the training metrics averaged since the last."""
    config = _config(cfg, "stage3")
    optim = OptimizerConfig(
        learning_rate=cfg.stage3_lr, schedule="constant", total_steps=cfg.stage3_steps, warmup_ratio=0.0
    )
    dev = DevRetrieval(
        dev_records,
        built.tokenizer,
        built.clara,
        n_questions=len(dev_records),
        query_max_length=32,
        bucket=16,
    )
    batches = _stage3_batches(cfg, episodes, built.tokenizer, config, cfg.seed)
    first = next(_stage3_batches(cfg, episodes, built.tokenizer, config, cfg.seed))
    spec = stage_spec("stage3")
    if not cfg.train_generator:  # the reader stays as it is: only the query reasoner can lower the loss
        spec = dataclasses.replace(spec, adapters=(QUERY_REASONER,))
    trainer = stage_program(
        reader,
        spec,
        built.clara,
        optim,
        mesh,
        first,
        seed=cfg.seed,
        straight_through=straight_through,
    ).start()
    state, rows, window = trainer.state, [], []
    name = "straight-through" if straight_through else "control"
    steps = cfg.stage3_steps if straight_through or cfg.control_steps is None else cfg.control_steps
    for step in range(steps + 1):
        if step:
            state, metrics = trainer.step(state, trainer.frozen, _put(next(batches), trainer.shardings.batch))
            window.append(metrics)
        if step % cfg.eval_every == 0 or step == steps:
            trainer.state = state
            row = {"step": step, **{f"dev/{k}": v for k, v in dev.evaluate(trainer.model()).items()}}
            if window:
                host = jax.device_get(window)
                row.update({f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]})
            rows.append(row)
            window = []
            log(
                f"[{name}] step {step}: dev Recall@1 {row['dev/recall@1']:.3f}"
                + (f", train Recall@1 {row['train/recall@1']:.3f}" if step else "")
                + (f", train CE {row['train/ce']:.3f}" if step else "")
                + (f", QR grad norm {row['train/grad_norm/query_reasoner']:.2e}" if step else "")
            )
    return rows


def run_controlled_experiment(cfg: ControlledConfig = ControlledConfig(), log=print) -> dict:
    start = time.perf_counter()
    episodes = Episodes(cfg)
    dev_records = episodes.batch(np.random.default_rng([cfg.seed, 3]), cfg.eval_questions, dev=True)
    devices = jax.devices()[: cfg.devices] if cfg.devices else None
    mesh = make_mesh(MeshConfig.from_spec("data=-1,fsdp=1,tensor=1"), devices=devices)
    with jax.set_mesh(mesh):
        built, reader = train_reader(cfg, episodes, mesh, log=log)
        reader_scores = reader_exact_match(built, reader, dev_records, cfg.top_k, cfg.seed)
        log(
            f"[reader] dev exact match reading the gold passage {reader_scores['em_gold']:.3f}, "
            f"a wrong one {reader_scores['em_wrong_doc']:.3f}"
        )
        curves = {
            run: run_stage3(
                cfg,
                episodes,
                dev_records,
                built,
                reader,
                mesh,
                straight_through=run == "straight_through",
                log=log,
            )
            for run in ("straight_through", "control")
        }
    return {
        "config": dataclasses.asdict(cfg),
        "n_dev_questions": len(dev_records),
        "chance_recall@1": 1.0 / cfg.n_candidates,
        "reader": reader_scores,
        "curves": curves,
        "seconds": time.perf_counter() - start,
    }


def plot_controlled(result: dict, path: str) -> str:
    """Dev Recall@1 of both runs against chance, and the diagnostics that explain them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("dev/recall@1", "dev Recall@1 (held-out people, 20 candidates)"),
        ("train/grad_norm/query_reasoner", "query reasoner gradient norm"),
        ("train/score_std", "candidate score std"),
        ("train/topk_entropy", "soft top-k entropy (nats)"),
        ("train/gold_outside_topk", "gold outside the top-k (train)"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), sharex=True)
    labels = {"straight_through": "straight-through top-k", "control": "control: top-k weights stop-gradient"}
    for ax, (key, title) in zip(axes, panels):
        for run, rows in result["curves"].items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=labels.get(run, run))
        if key == "dev/recall@1":
            ax.axhline(result["chance_recall@1"], color="grey", ls="--", label="chance")
            ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("stage-3 step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
