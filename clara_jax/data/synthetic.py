"""A tiny synthetic knowledge corpus in every official CLaRa JSONL format (docs/official_code.md §4).

Why synthetic: the CPU demo trains a 2-layer decoder with a ~384-token byte-level BPE through all
three stages in minutes, and it must still show real learning (stage-3 Recall@k above chance, answer
EM/F1 above the untrained model). Real passages are far too long and varied for that. Here every
passage is a handful of templated facts about a made-up person ("Tavo lives in Oslo. Tavo likes
red. Tavo's mentor is Mirel."), values come from small closed sets, and every question has one
fixed phrasing per attribute, so a tiny model can learn to compress, retrieve and read them.

World:
- `n_entities` people with unique syllable names, `attributes_per_entity` facts each (kinds drawn
  from `attribute_kinds`, always rendered in that order), and for `link_fraction` of them a
  mentor (another person), which gives two-hop questions ("Where does Tavo's mentor live?").
- `n_distractors` near-duplicate people: a copy of a real person's facts under a new name with one
  value changed. They are never asked about; they are hard negatives that force retrieval to
  match the name, not the values.

Split (why: eval numbers must measure generalisation, not recall of training strings):
- `eval_entity_fraction` of the people are held out with their near-duplicates. Their passages
  never appear in any training file (unless `stage1_sees_eval_passages`, which adds them to stage 1
  as paraphrase-only records, like SCP over the whole corpus), and every question about them is
  eval-only.
- `dev_entity_fraction` more people are held out the same way for the dev split: their questions
  (and two-hop questions through them) are only in `dev_with_pos.jsonl`, where settings are chosen.
- Of the remaining two-hop questions, `eval_twohop_fraction` are held out too: seen passages, an
  unseen composition.
- Training negatives come only from training passages; eval candidate pools mix seen and unseen
  passages so "unfamiliar passage" is not a shortcut to the gold.

Files written by `write_corpus` (record shapes follow the official loaders):
- `stage1_train.jsonl` / `stage1_eval.jsonl`: SCP records, one QA record (a question for every
  fact) and one paraphrase record per passage; eval holds the held-out passages.
- `stage2_train.jsonl`: `question`, `k` docs (gold among negatives), `gold_answer`, `answer`
  (= gold: there is no teacher model to distil from).
- `stage3_train.jsonl`: `question`, `answer`, `N` candidate docs, `pos_index`.
- `eval_with_pos.jsonl`: end-to-end eval, `question`, `N` docs, `golden_answers`, `pos_index`.
- `dev_with_pos.jsonl`: the same shape for the dev people (choose settings here, never on eval).
- `eval_no_pos.jsonl`: same questions, but each gold is kept only with probability
  `no_pos_gold_rate` (`pos_index` lists the golds still present, possibly none: the official
  stage-2 loader reads `pos_index` in both flavours).
- `stage2_eval.jsonl`: same questions with `k` docs that always hold the gold(s) (the "Oracle"
  compressor eval, which reads `docs[:5]`), in the stage-2 shape plus `golden_answers`/`pos_index`.
- `corpus.jsonl`: every passage as `{"id", "text"}`; `manifest.json`: config, counts, chance
  recall and a sha256 per file.

Gold docs are placed uniformly at random among the candidates: the official top-k breaks ties by
lower index, so any positional bias would let a collapsed (untrained) model beat chance.
`pos_index` lists golds in hop order (the passage naming the mentor first); the metric treats it as
a set.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from clara_jax.file_io import sha256_file

# Each kind: closed value set, passage fact, question (with subject `{s}`, which is "Tavo" or
# "Tavo's mentor"), and the paraphrase sentence. One phrasing each, on purpose: the tiny model
# should spend its capacity on names and values, not on wording.
_KINDS: dict[str, dict] = {
    "city": {
        "values": (
            "Oslo", "Paris", "Cairo", "Tokyo", "Delhi", "Quito", "Berlin", "Madrid",
            "Dublin", "Vienna", "Prague", "Athens", "Lisbon", "Havana", "Seoul", "Nairobi",
        ),
        "fact": "{n} lives in {v}.",
        "question": "Where does {s} live?",
        "paraphrase": "{n}'s home is {v}.",
    },
    "colour": {
        "values": (
            "red", "blue", "green", "yellow", "black", "white", "pink", "grey",
            "orange", "purple", "brown", "gold", "silver", "teal", "cyan", "navy",
        ),
        "fact": "{n} likes {v}.",
        "question": "What colour does {s} like?",
        "paraphrase": "{n}'s favourite colour is {v}.",
    },
    "animal": {
        "values": (
            "cat", "dog", "fox", "hen", "horse", "goat", "duck", "frog",
            "bee", "crow", "lion", "wolf", "bear", "deer", "seal", "crab",
        ),
        "fact": "{n} keeps a {v}.",
        "question": "What animal does {s} keep?",
        "paraphrase": "{n}'s pet is a {v}.",
    },
    "year": {
        "values": tuple(str(y) for y in range(1960, 1976)),
        "fact": "{n} was born in {v}.",
        "question": "When was {s} born?",
        "paraphrase": "{n}'s birth year is {v}.",
    },
    "job": {
        "values": (
            "baker", "nurse", "pilot", "farmer", "doctor", "singer", "tailor", "judge",
            "miner", "poet", "chef", "guard", "potter", "barber", "sailor", "painter",
        ),
        "fact": "{n} works as a {v}.",
        "question": "What job does {s} have?",
        "paraphrase": "{n} is a {v} by trade.",
    },
}  # fmt: skip
ATTRIBUTE_KINDS = tuple(_KINDS)
_MAX_VALUES = min(len(k["values"]) for k in _KINDS.values())

_MENTOR_FACT = "{n}'s mentor is {m}."
_MENTOR_QUESTION = "Who is {n}'s mentor?"
_MENTOR_PARAPHRASE = "{m} is the mentor of {n}."
_TWO_HOP_SUBJECT = "{n}'s mentor"

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

FILE_NAMES = {
    "stage1_train": "stage1_train.jsonl",
    "stage2_train": "stage2_train.jsonl",
    "stage3_train": "stage3_train.jsonl",
    "stage1_eval": "stage1_eval.jsonl",
    "stage2_eval": "stage2_eval.jsonl",
    "eval_with_pos": "eval_with_pos.jsonl",
    "eval_no_pos": "eval_no_pos.jsonl",
    "dev_with_pos": "dev_with_pos.jsonl",
    "corpus": "corpus.jsonl",
}
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class SyntheticCorpusConfig:
    """Everything that determines the corpus; same config ⇒ byte-identical files."""

    seed: int = 0
    n_entities: int = 200
    attributes_per_entity: int = 3
    attribute_kinds: tuple[str, ...] = ATTRIBUTE_KINDS
    values_per_attribute: int = 12  # closed value set size per kind (≤ 16)
    link_fraction: float = 0.5  # share of people with a mentor (two-hop questions)
    n_distractors: int = 100  # near-duplicate people, never asked about
    name_syllables: int = (
        2  # CV syllables per name: all names have the same length, so none is a prefix of another
    )
    n_candidates: int = 20  # N, stage-3 and eval candidates per question
    n_hard_negatives: int = 6  # stage-3/eval negatives that share facts with a gold passage
    docs_per_example: int = 5  # k, stage-2 docs per question
    eval_entity_fraction: float = 0.15
    # people held out like the eval ones, whose questions form dev_with_pos.jsonl: settings are
    # chosen on them, never on the eval questions
    dev_entity_fraction: float = 0.1
    n_dev: int | None = 200  # cap on dev questions
    eval_twohop_fraction: float = 0.2
    n_stage2_train: int = 1600
    n_stage3_train: int = 1600
    n_eval: int | None = 200  # cap on eval questions (None: all held-out questions)
    no_pos_gold_rate: float = 0.5
    stage1_sees_eval_passages: bool = False

    def __post_init__(self):
        unknown = [k for k in self.attribute_kinds if k not in _KINDS]
        if unknown or len(set(self.attribute_kinds)) != len(self.attribute_kinds):
            raise ValueError(
                f"attribute_kinds must be distinct names from {ATTRIBUTE_KINDS}, got {self.attribute_kinds}"
            )
        if not 1 <= self.attributes_per_entity <= len(self.attribute_kinds):
            raise ValueError("attributes_per_entity must be in [1, len(attribute_kinds)]")
        if not 2 <= self.values_per_attribute <= _MAX_VALUES:
            raise ValueError(f"values_per_attribute must be in [2, {_MAX_VALUES}]")
        if self.n_entities < 4 or self.n_distractors < 0:
            raise ValueError("need n_entities >= 4 and n_distractors >= 0")
        if self.name_syllables < 2:
            raise ValueError("name_syllables must be >= 2")
        if (
            2 * (self.n_entities + self.n_distractors)
            > (len(_CONSONANTS) * len(_VOWELS)) ** self.name_syllables
        ):
            raise ValueError("too many names for name_syllables; raise it")
        for f in ("link_fraction", "eval_twohop_fraction", "no_pos_gold_rate"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"{f} must be in [0, 1]")
        if not 0.0 < self.eval_entity_fraction < 1.0:
            raise ValueError("eval_entity_fraction must be in (0, 1)")
        if not 0.0 <= self.dev_entity_fraction < 1.0 - self.eval_entity_fraction:
            raise ValueError("dev_entity_fraction must be in [0, 1 - eval_entity_fraction)")
        if not 2 <= self.docs_per_example <= self.n_candidates:
            raise ValueError(
                "need 2 <= docs_per_example (k) <= n_candidates (N); two-hop questions have 2 golds"
            )
        if not 0 <= self.n_hard_negatives <= self.n_candidates - 2:
            raise ValueError("n_hard_negatives must be in [0, n_candidates - 2]")
        n_train_passages = round((1 - self.eval_entity_fraction) * (self.n_entities + self.n_distractors))
        if self.n_candidates > n_train_passages - 2:
            raise ValueError("n_candidates is larger than the training passage pool")
        if (
            self.n_stage2_train < 0
            or self.n_stage3_train < 0
            or (self.n_eval is not None and self.n_eval < 1)
        ):
            raise ValueError("split sizes must be non-negative (n_eval >= 1 or None)")


@dataclass(frozen=True)
class Entity:
    """One person; passage i of the corpus is about entities[i]."""

    name: str
    facts: tuple[tuple[str, str], ...]  # (kind, value), in attribute_kinds order
    mentor: str | None
    held_out: bool  # its passage and every question about it are eval-only (or dev-only)
    distractor: bool  # near-duplicate, never asked about
    dev: bool = False  # held out for the dev split (choosing settings), not for the final eval


@dataclass(frozen=True)
class Question:
    """A question with its gold passages; two-hop questions have two, the mentor's passage last."""

    text: str
    answer: str
    gold: tuple[int, ...]  # passage indices in hop order
    held_out: bool
    dev: bool = False  # about a dev person: in dev_with_pos, never in eval_with_pos

    @property
    def hops(self) -> int:
        return len(self.gold)


@dataclass(frozen=True)
class SyntheticCorpus:
    """The world and every file's records, for tests and demos that skip the disk."""

    config: SyntheticCorpusConfig
    entities: tuple[Entity, ...]
    passages: tuple[str, ...]
    questions: tuple[Question, ...]  # every question of the world, train and held out
    eval_questions: tuple[Question, ...]  # the (capped) held-out questions in the eval files
    files: dict[str, list[dict]]  # FILE_NAMES key -> records


def _rng(cfg: SyntheticCorpusConfig, tag: str) -> random.Random:
    """One independent stream per purpose, so changing one split size does not reshuffle the rest."""
    return random.Random(f"clara_jax.synthetic:{cfg.seed}:{tag}")


def attribute_values(kind: str, n: int = _MAX_VALUES) -> tuple[str, ...]:
    """The first `n` values of an attribute kind's closed set (what `values_per_attribute` keeps)."""
    return _KINDS[kind]["values"][:n]


def render_passage(e: Entity) -> str:
    sents = [_KINDS[k]["fact"].format(n=e.name, v=v) for k, v in e.facts]
    if e.mentor is not None:
        sents.append(_MENTOR_FACT.format(n=e.name, m=e.mentor))
    return " ".join(sents)


def paraphrase_passage(e: Entity) -> str:
    """The deterministic rewording used as the stage-1 paraphrase target: same facts, new words."""
    sents = [_KINDS[k]["paraphrase"].format(n=e.name, v=v) for k, v in e.facts]
    if e.mentor is not None:
        sents.append(_MENTOR_PARAPHRASE.format(n=e.name, m=e.mentor))
    return " ".join(sents)


def passage_qa(e: Entity) -> tuple[list[str], list[str]]:
    """Single-hop questions covering every fact of the passage, with their answers."""
    qs = [_KINDS[k]["question"].format(s=e.name) for k, _ in e.facts]
    ans = [v for _, v in e.facts]
    if e.mentor is not None:
        qs.append(_MENTOR_QUESTION.format(n=e.name))
        ans.append(e.mentor)
    return qs, ans


def _banned_names() -> set[str]:
    """Lower-cased words a name must not equal, so a name never reads as a value or template word."""
    texts = [_MENTOR_FACT, _MENTOR_QUESTION, _MENTOR_PARAPHRASE]
    for spec in _KINDS.values():
        texts += [*spec["values"], spec["fact"], spec["question"], spec["paraphrase"]]
    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}
    return words | {w[:-1] for w in words if w.endswith("s")}


def _make_names(cfg: SyntheticCorpusConfig, n: int) -> list[str]:
    rng = _rng(cfg, "names")
    banned, seen, out = _banned_names(), set(), []
    while len(out) < n:
        name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(cfg.name_syllables))
        if name in seen or name in banned:
            continue
        seen.add(name)
        out.append(name.capitalize())
    return out


def make_entities(cfg: SyntheticCorpusConfig) -> list[Entity]:
    """Real people first (indices [0, n_entities)), then their near-duplicate distractors."""
    rng = _rng(cfg, "entities")
    names = _make_names(cfg, cfg.n_entities + cfg.n_distractors)
    kinds = cfg.attribute_kinds
    facts = []
    for _ in range(cfg.n_entities):
        chosen = sorted(rng.sample(range(len(kinds)), cfg.attributes_per_entity))
        facts.append(
            tuple(
                (kinds[i], rng.choice(_KINDS[kinds[i]]["values"][: cfg.values_per_attribute])) for i in chosen
            )
        )
    linked = set(rng.sample(range(cfg.n_entities), round(cfg.link_fraction * cfg.n_entities)))
    mentors = []
    for i in range(cfg.n_entities):
        j = rng.randrange(cfg.n_entities - 1) if i in linked else None
        mentors.append(None if j is None else names[j + (j >= i)])
    n_eval = max(1, round(cfg.eval_entity_fraction * cfg.n_entities))
    n_dev = round(cfg.dev_entity_fraction * cfg.n_entities)
    held_order = rng.sample(range(cfg.n_entities), n_eval + n_dev)
    held, dev = set(held_order), set(held_order[n_eval:])
    ents = [Entity(names[i], facts[i], mentors[i], i in held, False, i in dev) for i in range(cfg.n_entities)]
    for d in range(cfg.n_distractors):
        src = ents[rng.randrange(cfg.n_entities)]
        f = list(src.facts)
        slot = rng.randrange(len(f))
        kind, old = f[slot]
        f[slot] = (
            kind,
            rng.choice([v for v in _KINDS[kind]["values"][: cfg.values_per_attribute] if v != old]),
        )
        # A near-duplicate of a held-out person is held out too, so eval hard negatives are unseen as well.
        ents.append(Entity(names[cfg.n_entities + d], tuple(f), src.mentor, src.held_out, True, src.dev))
    return ents


def make_questions(cfg: SyntheticCorpusConfig, ents: Sequence[Entity]) -> list[Question]:
    rng = _rng(cfg, "question-split")
    index = {e.name: i for i, e in enumerate(ents)}
    out = []
    for i, e in enumerate(ents[: cfg.n_entities]):
        for q, a in zip(*passage_qa(e)):
            out.append(Question(q, a, (i,), e.held_out, e.dev))
        if e.mentor is None:
            continue
        j = index[e.mentor]
        subject = _TWO_HOP_SUBJECT.format(n=e.name)
        for kind, value in ents[j].facts:
            held = e.held_out or ents[j].held_out or rng.random() < cfg.eval_twohop_fraction
            dev = e.dev or ents[j].dev  # a dev person's passage is gold: dev-only
            out.append(Question(_KINDS[kind]["question"].format(s=subject), value, (i, j), held, dev))
    return out


def _fact_sets(ents: Sequence[Entity]) -> list[frozenset]:
    return [frozenset(e.facts) for e in ents]


def _candidates(
    rng: random.Random,
    gold: Sequence[int],
    n_docs: int,
    n_hard: int,
    pool: Sequence[int],
    facts: Sequence[frozenset],
    unseen_pool: Sequence[int] = (),
    like: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Gold passages + hard negatives (most shared facts first) + random fill, uniformly shuffled.

    With `unseen_pool`, half of the random fill is drawn from it, so eval pools mix seen and
    unseen passages. Hard negatives are ranked against the facts of `like` (default: `gold`).
    Returns (passage indices in order, positions of the golds in hop order).
    """
    gold_set = set(gold) | set(like or ())
    gold_facts = frozenset().union(*(facts[g] for g in (gold if like is None else like)))
    others = [p for p in pool if p not in gold_set]
    ranked = sorted(others, key=lambda p: (-len(facts[p] & gold_facts), rng.random()))
    hard = [p for p in ranked[:n_hard] if facts[p] & gold_facts]
    taken = gold_set | set(hard)
    n_fill = n_docs - len(gold) - len(hard)
    fill: list[int] = []
    if unseen_pool:
        unseen = [p for p in unseen_pool if p not in taken]
        fill = rng.sample(unseen, min(len(unseen), n_fill // 2))
        taken |= set(fill)
    rest = [p for p in others if p not in taken]
    fill += rng.sample(rest, n_fill - len(fill))
    docs = list(gold) + hard + fill
    rng.shuffle(docs)
    return docs, [docs.index(g) for g in gold]


def _cycle(rng: random.Random, items: Sequence, n: int) -> list:
    """n items, every item once per pass, each pass freshly shuffled (epochs with new negatives)."""
    out: list = []
    while items and len(out) < n:
        perm = list(items)
        rng.shuffle(perm)
        out.extend(perm[: n - len(out)])
    return out


def _stage1_records(
    ents: Sequence[Entity], passages: Sequence[str], idx: Iterable[int], qa: bool = True
) -> list[dict]:
    recs = []
    for i in idx:
        if qa:
            qs, ans = passage_qa(ents[i])
            recs.append({"data_type": "qa", "question": qs, "answers": ans, "docs": [passages[i]]})
        recs.append(
            {
                "data_type": "paraphrase",
                "question": "",
                "answers": [paraphrase_passage(ents[i])],
                "docs": [passages[i]],
            }
        )
    return recs


def _eval_subset(
    cfg: SyntheticCorpusConfig, held: Sequence[Question], cap: int | None, name: str
) -> list[Question]:
    """Cap at `cap` with single- and two-hop balanced, then shuffle so any prefix is representative.

    Balanced because two-hop questions outnumber single-hop ones among the held-out questions, yet
    single-hop ones are the clearest signal of learning (Recall@1 of a two-hop question is at most 1/2).
    """
    rng = _rng(cfg, name)
    single = [q for q in held if q.hops == 1]
    double = [q for q in held if q.hops == 2]
    if cap is not None and len(held) > cap:
        n_single = min(len(single), max(cap - len(double), cap // 2))
        single = rng.sample(single, n_single)
        double = rng.sample(double, cap - n_single)
    out = single + double
    rng.shuffle(out)
    return out


def build_corpus(cfg: SyntheticCorpusConfig | None = None) -> SyntheticCorpus:
    """Build the world, the split and every file's records in memory (deterministic in `cfg`)."""
    cfg = cfg or SyntheticCorpusConfig()
    ents = make_entities(cfg)
    passages = [render_passage(e) for e in ents]
    facts = _fact_sets(ents)
    questions = make_questions(cfg, ents)
    train_pool = [i for i, e in enumerate(ents) if not e.held_out]
    unseen_pool = [i for i, e in enumerate(ents) if e.held_out]
    all_pool = list(range(len(ents)))
    if len(train_pool) < cfg.n_candidates + 2:
        raise ValueError(f"only {len(train_pool)} training passages for n_candidates={cfg.n_candidates}")
    train_qs = [q for q in questions if not q.held_out]
    eval_qs = _eval_subset(cfg, [q for q in questions if q.held_out and not q.dev], cfg.n_eval, "eval-subset")
    dev_qs = _eval_subset(cfg, [q for q in questions if q.dev], cfg.n_dev, "dev-subset")
    k, n = cfg.docs_per_example, cfg.n_candidates

    files: dict[str, list[dict]] = {}
    s1 = _stage1_records(ents, passages, train_pool)
    if cfg.stage1_sees_eval_passages:
        s1 += _stage1_records(ents, passages, unseen_pool, qa=False)
    files["stage1_train"] = s1

    rng = _rng(cfg, "stage2")
    files["stage2_train"] = []
    for q in _cycle(rng, train_qs, cfg.n_stage2_train):
        docs, _ = _candidates(rng, q.gold, k, (k - q.hops) // 2, train_pool, facts)
        files["stage2_train"].append(
            {
                "question": q.text,
                "docs": [passages[d] for d in docs],
                "gold_answer": q.answer,
                "answer": q.answer,
            }
        )

    rng = _rng(cfg, "stage3")
    files["stage3_train"] = []
    for q in _cycle(rng, train_qs, cfg.n_stage3_train):
        docs, pos = _candidates(rng, q.gold, n, cfg.n_hard_negatives, train_pool, facts)
        files["stage3_train"].append(
            {"question": q.text, "answer": q.answer, "docs": [passages[d] for d in docs], "pos_index": pos}
        )

    files["stage1_eval"] = _stage1_records(ents, passages, unseen_pool)

    rng = _rng(cfg, "eval")
    with_pos, no_pos, s2_eval = [], [], []
    for q in eval_qs:
        docs, pos = _candidates(rng, q.gold, n, cfg.n_hard_negatives, all_pool, facts, unseen_pool)
        with_pos.append(_retrieval_eval_record(q, [passages[d] for d in docs], pos))
        kept = [g for g in q.gold if rng.random() < cfg.no_pos_gold_rate]
        dropped = set(q.gold) - set(kept)
        # A dropped gold is replaced by one more hard negative, chosen by the full gold's facts.
        docs, _ = _candidates(
            rng,
            kept,
            n,
            cfg.n_hard_negatives + len(dropped),
            [p for p in all_pool if p not in dropped],
            facts,
            [p for p in unseen_pool if p not in dropped],
            like=q.gold,
        )
        no_pos.append(_retrieval_eval_record(q, [passages[d] for d in docs], [docs.index(g) for g in kept]))
        docs, pos = _candidates(rng, q.gold, k, (k - q.hops) // 2, all_pool, facts, unseen_pool)
        s2_eval.append(
            {
                "question": q.text,
                "docs": [passages[d] for d in docs],
                "gold_answer": q.answer,
                "answer": q.answer,
                "golden_answers": [q.answer],
                "pos_index": pos,
            }
        )
    files["stage2_eval"] = s2_eval
    rng = _rng(cfg, "dev")
    files["dev_with_pos"] = []
    for q in dev_qs:
        docs, pos = _candidates(rng, q.gold, n, cfg.n_hard_negatives, all_pool, facts, unseen_pool)
        files["dev_with_pos"].append(_retrieval_eval_record(q, [passages[d] for d in docs], pos))
    files["eval_with_pos"] = with_pos
    files["eval_no_pos"] = no_pos
    files["corpus"] = [{"id": _passage_id(i, e), "text": passages[i]} for i, e in enumerate(ents)]
    return SyntheticCorpus(cfg, tuple(ents), tuple(passages), tuple(questions), tuple(eval_qs), files)


def _retrieval_eval_record(q: Question, docs: list[str], pos_index: list[int]) -> dict:
    """One line of eval_with_pos / eval_no_pos / dev_with_pos."""
    return {"question": q.text, "docs": docs, "golden_answers": [q.answer], "pos_index": pos_index}


def _passage_id(i: int, e: Entity) -> str:
    return f"{'dis' if e.distractor else 'ent'}-{i:05d}"


def chance_recall(records: Iterable[dict], k: int) -> float:
    """Expected official Recall@k (docs/official_code.md §5) of a uniformly random ranking.

    A random top-k holds k·|G|/N golds on average, so recall = (k·|G|/N)/|G| = k/N per question,
    whatever |G|; questions with no gold count 0, as in the official average.
    """
    vals = []
    for r in records:
        n_docs, n_gold = len(r["docs"]), len(set(r.get("pos_index", [])))
        vals.append(min(k, n_docs) * n_gold / n_docs / n_gold if n_gold else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def chance_hit_rate(records: Iterable[dict], k: int) -> float:
    """Probability that a random top-k holds at least one gold (|G|/N at k=1), averaged."""
    vals = []
    for r in records:
        n_docs, n_gold = len(r["docs"]), len(set(r.get("pos_index", [])))
        kk = min(k, n_docs)
        vals.append(1.0 - math.comb(n_docs - n_gold, kk) / math.comb(n_docs, kk))
    return sum(vals) / len(vals) if vals else 0.0


def _dump_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


def write_corpus(out_dir: str | os.PathLike, cfg: SyntheticCorpusConfig | None = None) -> dict[str, Path]:
    """Write every file plus `manifest.json` into `out_dir`; returns {FILE_NAMES key | "manifest": path}."""
    cfg = cfg or SyntheticCorpusConfig()
    corpus = build_corpus(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, fname in FILE_NAMES.items():
        paths[key] = out / fname
        _dump_jsonl(paths[key], corpus.files[key])

    chance = {}
    for key in ("eval_with_pos", "eval_no_pos", "dev_with_pos", "stage3_train"):
        recs = corpus.files[key]
        chance[key] = {
            f"{m}@{k}": round(fn(recs, k), 6)
            for m, fn in (("recall", chance_recall), ("hit", chance_hit_rate))
            for k in (1, 5)
        }
    eval_hops = [q.hops for q in corpus.eval_questions]
    manifest = {
        "format": "clara_jax.synthetic/1",
        "config": asdict(cfg),
        "files": {
            key: {
                "path": FILE_NAMES[key],
                "records": len(corpus.files[key]),
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for key, p in paths.items()
        },
        "chance": chance,
        "stats": {
            "passages": len(corpus.passages),
            "held_out_passages": sum(e.held_out for e in corpus.entities),
            "train_questions": sum(not q.held_out for q in corpus.questions),
            "held_out_questions": sum(q.held_out for q in corpus.questions),
            "eval_questions": {"single_hop": eval_hops.count(1), "two_hop": eval_hops.count(2)},
            "max_passage_words": max(len(p.split()) for p in corpus.passages),
            "mean_passage_words": round(
                sum(len(p.split()) for p in corpus.passages) / len(corpus.passages), 3
            ),
            "distinct_chars": "".join(
                sorted(set("".join(corpus.passages) + "".join(q.text for q in corpus.questions)))
            ),
        },
    }
    paths["manifest"] = out / MANIFEST_NAME
    paths["manifest"].write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths
