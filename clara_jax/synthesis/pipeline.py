"""The per-document SCP synthesis state machine, run for many documents at once.

Each document is a Python generator that yields the requests it needs next (questions, answers,
judgments, coverage checks, paraphrase, paraphrase judgment) and receives the replies; up to
`in_flight` documents advance together, and every tick sends all their pending requests to the backend
as one batch, so a local model's jitted batch stays full while each document's logic reads as plain
sequential code. Three independent tracks run per document (simple QA, multi-hop QA, paraphrase);
each ends kept or dropped with a reason, and a backend failure anywhere ends the whole document as an
error with no records, so a resumed run can simply do it again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace

from clara_jax.synthesis import prompts
from clara_jax.synthesis.backends import BACKEND_ERROR, TRANSIENT, Backend, BackendError, Completion, Request
from clara_jax.synthesis.corpus import Document, read_documents
from clara_jax.synthesis.parsing import (
    Parsed,
    ParseFailure,
    Refusal,
    normalise,
    parse_answer,
    parse_coverage,
    parse_paraphrase,
    parse_questions,
    parse_verdict,
)
from clara_jax.synthesis.report import TRACKS, build_report, document_reason
from clara_jax.synthesis.store import ShardStore, StoreError, check_manifest, shard_of

log = logging.getLogger(__name__)

# data_type of each track's record; every value but "paraphrase" takes stage 1's QA path.
DATA_TYPES = {"simple_qa": "qa", "multihop_qa": "multihop_qa", "paraphrase": "paraphrase"}
INTERNAL_ERROR = "internal_error"

Replies = list[Completion | BackendError]
Flow = Generator[list[Request], Replies, object]


@dataclass(frozen=True)
class SynthesisConfig:
    """What is synthesised and how hard to try; saved in OUT/manifest.json (a resume must match)."""

    simple: bool = True
    multihop: bool = True
    paraphrase: bool = True
    max_rounds: int = 10  # coverage checks per QA track; 0 skips the coverage step
    parse_retries: int = 2  # re-asks after an unreadable reply (at retry_temperature)
    shots: int | None = None  # few-shot examples per prompt (None: all)
    max_questions: int = 40  # per reply
    question_tokens: int = 512
    answer_tokens: int = 96
    judge_tokens: int = 32
    paraphrase_tokens: int = 768
    temperature: float = 0.0
    retry_temperature: float = 0.7

    def __post_init__(self):
        if not (self.simple or self.multihop or self.paraphrase):
            raise ValueError("nothing to synthesise: simple QA, multi-hop QA and paraphrase are all disabled")
        for name in ("max_rounds", "parse_retries", "max_questions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "question_tokens",
            "answer_tokens",
            "judge_tokens",
            "paraphrase_tokens",
            "max_questions",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shots is not None and self.shots < 0:
            raise ValueError(f"shots must be >= 0 or None, got {self.shots}")

    def tracks(self) -> tuple[str, ...]:
        return tuple(t for t, on in zip(TRACKS, (self.simple, self.multihop, self.paraphrase)) if on)


class DocumentAborted(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SynthesisAborted(RuntimeError):
    """Too many documents in a row failed in the backend: it is down, not the documents' fault."""


@dataclass
class DocCounters:
    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pairs: Counter = field(default_factory=Counter)
    parse_failures: Counter = field(default_factory=Counter)  # "step:reason"
    repairs: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs.
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}


def _parallel(flows: list[Flow]) -> Flow:
    """Run sub-flows side by side: yield their requests together, hand each its own replies."""
    results: list[object] = [None] * len(flows)
    pending: dict[int, list[Request]] = {}
    for i, flow in enumerate(flows):
        try:
            pending[i] = next(flow)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        order = list(pending.items())
        replies = yield [req for _, reqs in order for req in reqs]
        pending, pos = {}, 0
        for i, reqs in order:
            part, pos = replies[pos : pos + len(reqs)], pos + len(reqs)
            try:
                pending[i] = flows[i].send(part)
            except StopIteration as stop:
                results[i] = stop.value
    return results


class Synthesizer:
    """Turns one document into its stage-1 records; `run` drives many documents through a backend."""

    def __init__(self, config: SynthesisConfig):
        self.config = config

    # ----------------------------------------------------------------------------------- one call

    def _ask(self, asks: list[tuple[Request, Callable]], counters: DocCounters) -> Flow:
        """Send requests, parse replies, re-ask unreadable ones (bounded); a backend error aborts."""
        cfg = self.config
        results: list[Parsed | ParseFailure | None] = [None] * len(asks)
        todo = list(range(len(asks)))
        attempt = 0
        while todo:
            temperature = cfg.temperature if attempt == 0 else cfg.retry_temperature
            requests = [
                replace(asks[i][0], attempt=attempt, temperature=temperature, seed=attempt) for i in todo
            ]
            replies = yield requests
            retry = []
            for i, reply in zip(todo, replies):
                counters.calls += 1
                if isinstance(reply, BackendError):
                    raise DocumentAborted(reply.reason, reply.detail)
                counters.prompt_tokens += reply.prompt_tokens
                counters.completion_tokens += reply.completion_tokens
                parsed = asks[i][1](reply)
                if isinstance(parsed, ParseFailure):
                    counters.parse_failures[f"{asks[i][0].step}:{parsed.reason}"] += 1
                    if attempt < cfg.parse_retries:
                        counters.retries += 1
                        retry.append(i)
                        continue
                else:
                    counters.repairs.update(parsed.repairs)
                results[i] = parsed
            todo, attempt = retry, attempt + 1
        return results

    # ------------------------------------------------------------------------------------- tracks

    def _answer_and_judge(self, doc: str, questions: list[str], counters: DocCounters) -> Flow:
        cfg = self.config
        answers = yield from self._ask(
            [
                (
                    Request(prompts.answer_prompt(doc, q, shots=cfg.shots), cfg.answer_tokens, step="answer"),
                    lambda c: parse_answer(c.text),
                )
                for q in questions
            ],
            counters,
        )
        candidates = []
        for question, answer in zip(questions, answers):
            counters.pairs["proposed"] += 1
            if isinstance(answer, ParseFailure):
                counters.pairs["answer_unparsable"] += 1
            elif isinstance(answer.value, Refusal):
                counters.pairs["unanswerable"] += 1
            else:
                candidates.append((question, answer.value))
        verdicts = yield from self._ask(
            [
                (
                    Request(
                        prompts.qa_judge_prompt(doc, q, a, shots=cfg.shots), cfg.judge_tokens, step="qa_judge"
                    ),
                    lambda c: parse_verdict(c.text),
                )
                for q, a in candidates
            ],
            counters,
        )
        kept = []
        for pair, verdict in zip(candidates, verdicts):
            if isinstance(verdict, ParseFailure):
                counters.pairs["judge_unparsable"] += 1
            elif not verdict.value:
                counters.pairs["judged_incorrect"] += 1
            else:
                counters.pairs["kept"] += 1
                kept.append(pair)
        return kept

    def _qa_track(self, doc: str, multihop: bool, counters: DocCounters) -> Flow:
        cfg = self.config
        step = "multihop_questions" if multihop else "simple_questions"
        coverage_step = "coverage_multihop" if multihop else "coverage_simple"
        prompt = prompts.questions_prompt(doc, multihop=multihop, shots=cfg.shots)
        [questions] = yield from self._ask(
            [
                (
                    Request(prompt, cfg.question_tokens, step=step),
                    lambda c: parse_questions(c.text, limit=cfg.max_questions),
                )
            ],
            counters,
        )
        if isinstance(questions, ParseFailure):
            return {"dropped": "questions_unparsable", "rounds": 0}
        asked = {normalise(q) for q in questions.value}
        pairs = yield from self._answer_and_judge(doc, questions.value, counters)
        rounds, covered = 0, cfg.max_rounds == 0
        while not covered and rounds < cfg.max_rounds:
            rounds += 1
            prompt = prompts.coverage_prompt(doc, pairs, multihop=multihop, shots=cfg.shots)
            [coverage] = yield from self._ask(
                [
                    (
                        Request(prompt, cfg.question_tokens, step=coverage_step),
                        lambda c: parse_coverage(c.text, limit=cfg.max_questions),
                    )
                ],
                counters,
            )
            if isinstance(coverage, ParseFailure):
                return {"dropped": "coverage_unparsable", "rounds": rounds, "pairs": len(pairs)}
            number, new = coverage.value
            if number == 0:
                covered = True
                break
            fresh = [q for q in new if normalise(q) not in asked]
            if len(fresh) < len(new):
                counters.pairs["repeated_question"] += len(new) - len(fresh)
            asked.update(normalise(q) for q in fresh)
            if fresh and rounds < cfg.max_rounds:  # after the last check nothing would verify them
                pairs += yield from self._answer_and_judge(doc, fresh, counters)
        if not covered:
            return {"dropped": "coverage_not_reached", "rounds": rounds, "pairs": len(pairs)}
        if not pairs:
            return {"dropped": "no_valid_qa", "rounds": rounds}
        return {"kept": True, "rounds": rounds, "pairs": len(pairs), "qa": pairs}

    def _paraphrase_track(self, doc: str, counters: DocCounters) -> Flow:
        cfg = self.config
        [paraphrase] = yield from self._ask(
            [
                (
                    Request(
                        prompts.paraphrase_prompt(doc, shots=cfg.shots),
                        cfg.paraphrase_tokens,
                        step="paraphrase",
                    ),
                    lambda c: parse_paraphrase(c.text, doc, finish_reason=c.finish_reason),
                )
            ],
            counters,
        )
        if isinstance(paraphrase, ParseFailure):
            copied = paraphrase.reason == "copied_sentence"
            return {"dropped": "paraphrase_copied" if copied else "paraphrase_unparsable"}
        prompt = prompts.paraphrase_judge_prompt(doc, paraphrase.value, shots=cfg.shots)
        [verdict] = yield from self._ask(
            [(Request(prompt, cfg.judge_tokens, step="paraphrase_judge"), lambda c: parse_verdict(c.text))],
            counters,
        )
        if isinstance(verdict, ParseFailure):
            return {"dropped": "paraphrase_judge_unparsable"}
        if not verdict.value:
            return {"dropped": "paraphrase_rejected"}
        return {"kept": True, "text": paraphrase.value}

    # ---------------------------------------------------------------------------------- document

    def document(self, doc: Document) -> Flow:
        """Flow of one document; returns (ledger entry, record lines)."""
        counters = DocCounters()
        names = self.config.tracks()
        flows = []
        for name in names:
            if name == "paraphrase":
                flows.append(self._paraphrase_track(doc.text, counters))
            else:
                flows.append(self._qa_track(doc.text, name == "multihop_qa", counters))
        entry = {"doc": doc.index, "id": doc.id, "line": doc.line, "sha": doc.sha}
        try:
            results = yield from _parallel(flows)
        except DocumentAborted as err:
            entry.update(
                status="error", error=err.reason, detail=err.detail[:300], counters=counters.to_json()
            )
            return entry, []
        records, tracks = [], {}
        for name, result in zip(names, results):
            summary = {k: v for k, v in result.items() if k not in ("qa", "text")}
            tracks[name] = summary
            if not result.get("kept"):
                continue
            if name == "paraphrase":
                record = {
                    "data_type": "paraphrase",
                    "question": "",
                    "answers": [result["text"]],
                    "docs": [doc.text],
                }
            else:
                record = {
                    "data_type": DATA_TYPES[name],
                    "question": [q for q, _ in result["qa"]],
                    "answers": [a for _, a in result["qa"]],
                    "docs": [doc.text],
                }
            records.append(json.dumps(record, ensure_ascii=False))
        entry.update(status="done", tracks=tracks, records=len(records), counters=counters.to_json())
        return entry, records

    # --------------------------------------------------------------------------------------- run

    def run(
        self,
        corpus: str,
        out_dir: str,
        backend: Backend,
        *,
        num_shards: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        limit: int | None = None,
        in_flight: int = 16,
        progress: bool = True,
        max_consecutive_errors: int = 32,
        trace: bool = False,
    ) -> dict:
        """Synthesise every not-yet-done document of this process's shards; returns the report."""

        num_shards = num_shards or process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} is outside [0, {process_count})")
        if num_shards < process_count:
            raise ValueError(
                f"--num-shards ({num_shards}) must be at least the number of processes ({process_count})"
            )
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        if not os.path.isfile(corpus):
            raise FileNotFoundError(f"corpus {corpus}: no such file")
        os.makedirs(out_dir, exist_ok=True)
        check_manifest(
            out_dir,
            {"format": 1, "num_shards": num_shards, "config": asdict(self.config), "backend": backend.name},
        )
        stores = {s: ShardStore(out_dir, s) for s in range(num_shards) if s % process_count == process_index}
        for store in stores.values():
            for note in store.repaired:
                log.warning("resume: %s", note)

        # Pass 1: which documents are still to do (done ones must be the same text as before).
        todo: set[int] = set()
        n_read = n_resumed = 0
        for doc in read_documents(corpus, limit):
            n_read += 1
            store = stores.get(shard_of(doc.index, num_shards))
            if store is None:
                continue
            entry = store.done.get(doc.index)
            if entry is not None and entry.get("sha") != doc.sha:
                raise StoreError(
                    f"{corpus}:{doc.line}: this document differs from the one synthesised into {out_dir} "
                    "(the corpus changed); use another --out"
                )
            if entry is None or entry.get("status") == "error" and entry.get("error") in TRANSIENT:
                todo.add(doc.index)
            else:
                n_resumed += 1

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(todo), unit="doc", desc=f"synthesize (process {process_index})", dynamic_ncols=True
            )
        run = {"documents": 0, "kept": 0, "dropped": Counter(), "start": time.time()}
        consecutive = [0]

        def finish(doc: Document, outcome) -> None:
            entry, records = outcome
            stores[shard_of(doc.index, num_shards)].commit(entry, records)
            run["documents"] += 1
            if records:
                run["kept"] += 1
            else:
                run["dropped"][document_reason(entry)] += 1
            failed = entry.get("status") == "error" and entry.get("error") in TRANSIENT
            consecutive[0] = consecutive[0] + 1 if failed else 0
            if bar is not None:
                bar.update(1)
                drops = ", ".join(f"{k} {v}" for k, v in run["dropped"].most_common(3))
                bar.set_postfix_str(
                    f"kept {run['kept']}, dropped {sum(run['dropped'].values())}"
                    + (f" ({drops})" if drops else "")
                )
            if max_consecutive_errors and consecutive[0] >= max_consecutive_errors:
                raise SynthesisAborted(
                    f"{consecutive[0]} documents in a row failed in the backend (last: {entry.get('detail', '')}); "
                    "stopped. Everything finished is saved: fix the backend and rerun the same command "
                    "(failed documents are retried)."
                )

        def advance(doc: Document, flow: Flow, replies: Replies | None):
            # The except blocks only record what happened: the work that can fail itself (hashing the
            # text, committing to the store) runs after them, so its error is not lost in a chain.
            failure = None
            try:
                return flow.send(replies) if replies is not None else next(flow)
            except StopIteration as stop:
                outcome = stop.value
            except (SynthesisAborted, StoreError):
                raise
            except Exception as err:  # a bug must not lose the run: the document is counted as an error
                failure, trace = err, traceback.format_exc()
            if failure is not None:
                log.error("document %s (line %d) failed: %s", doc.id, doc.line, trace)
                entry = {"doc": doc.index, "id": doc.id, "line": doc.line, "sha": doc.sha, "status": "error"}
                entry.update(error=INTERNAL_ERROR, detail=f"{type(failure).__name__}: {failure}"[:300])
                outcome = (entry, [])
            finish(doc, outcome)
            return None

        active: dict[int, tuple[Document, Flow, list[Request]]] = {}
        trace_path = os.path.join(out_dir, f"trace-{process_index:05d}.jsonl")
        source = (doc for doc in read_documents(corpus, limit) if doc.index in todo)
        try:
            exhausted = False
            while True:
                while not exhausted and len(active) < in_flight:
                    doc = next(source, None)
                    if doc is None:
                        exhausted = True
                        break
                    flow = self.document(doc)
                    requests = advance(doc, flow, None)
                    if requests is not None:
                        active[doc.index] = (doc, flow, requests)
                if not active:
                    break
                order = list(active.values())
                batch = [req for _, _, reqs in order for req in reqs]
                try:
                    replies = backend.complete(batch)
                    if len(replies) != len(batch):
                        raise RuntimeError(
                            f"the backend returned {len(replies)} replies for {len(batch)} requests"
                        )
                except Exception as err:
                    log.warning("backend failed on a batch of %d requests: %s", len(batch), err)
                    replies = [BackendError(BACKEND_ERROR, f"{type(err).__name__}: {err}")] * len(batch)
                if trace:
                    _write_trace(trace_path, order, replies)
                pos = 0
                for doc, flow, reqs in order:
                    part, pos = replies[pos : pos + len(reqs)], pos + len(reqs)
                    nxt = advance(doc, flow, part)
                    if nxt is None:
                        del active[doc.index]
                    else:
                        active[doc.index] = (doc, flow, nxt)
        finally:
            if bar is not None:
                bar.close()
            elapsed = time.time() - run["start"]
            this_run = {
                "documents": run["documents"],
                "resumed_done": n_resumed,
                "seconds": round(elapsed, 3),
                "documents_per_second": round(run["documents"] / elapsed, 4) if elapsed > 0 else None,
                "process_index": process_index,
                "process_count": process_count,
                "repaired_on_open": [n for s in stores.values() for n in s.repaired],
            }
            self.last_report = build_report(
                out_dir,
                n_read=n_read,
                corpus=corpus,
                backend=backend.name,
                config=asdict(self.config),
                this_run=this_run,
            )
        return self.last_report


def _write_trace(path: str, order, replies: Replies) -> None:
    """Append every exchange of one batch (document, step, attempt, end of prompt, reply) for debugging."""
    lines, pos = [], 0
    for doc, _, reqs in order:
        for req in reqs:
            reply = replies[pos]
            pos += 1
            item = {"doc": doc.index, "step": req.step, "attempt": req.attempt}
            item["prompt_end"] = req.messages[-1]["content"][-400:]
            if isinstance(reply, BackendError):
                item["error"] = str(reply)
            else:
                item.update(reply=reply.text, finish_reason=reply.finish_reason)
            lines.append(json.dumps(item, ensure_ascii=False) + "\n")
    with open(path, "a") as f:
        f.writelines(lines)
