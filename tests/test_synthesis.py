"""SCP data synthesis: parsing repairs, prompts, the per-document state machine, resumable output,
the remote backend's retries, and kill-and-resume of the CLI. No model: scripted replies only."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clara_jax.data.sources import read_records
from clara_jax.synthesis import prompts
from clara_jax.synthesis.backends import (
    BACKEND_ERROR,
    REQUEST_REJECTED,
    BackendError,
    Completion,
    RemoteBackend,
    Request,
    ScriptedBackend,
)
from clara_jax.synthesis.parsing import (
    REFUSAL,
    Parsed,
    ParseFailure,
    Refusal,
    parse_answer,
    parse_coverage,
    parse_paraphrase,
    parse_questions,
    parse_verdict,
)
from clara_jax.synthesis.pipeline import SynthesisConfig, Synthesizer
from clara_jax.synthesis.store import ShardStore, StoreError, ledger_path, records_path

REPO = Path(__file__).resolve().parents[1]
PASSAGES = [
    "The Orvik Bridge crosses the Talla River at Hemsford. It was opened in 1931 and is 412 metres long.",
    "Selka Moran is a violinist from Dunmere. She won the Aster Prize in 2009 and teaches at the Coll Academy.",
    "The Pelham Canal links Ashby to the sea. Work began in 1802 and the canal opened nine years later.",
    "Quill Fell is the highest hill in the Brann district, rising to 731 metres above sea level.",
]

# ------------------------------------------------------------------------------------ parsing repairs

Q1, Q2 = "When was the Orvik Bridge opened?", "How long is the Orvik Bridge?"


@pytest.mark.parametrize(
    "reply, repair",
    [
        (json.dumps({"Question1": Q1, "Question2": Q2}), None),
        (
            f'Here you go:\n```json\n{{"Question1": "{Q1}", "Question2": "{Q2}"}}\n```\nAnything else?',
            "code_fence",
        ),
        (f'Sure. {{"Question1": "{Q1}", "Question2": "{Q2}"}} Those are all.', "prose_around_json"),
        (f'{{"Question1": "{Q1}", "Question1": "{Q2}"}}', "duplicate_keys"),
        (f'{{"question 1": "{Q1}", "Q2": "{Q2}"}}', "key_variant"),
        (json.dumps({"questions": [Q1, Q2]}), "key_variant"),
        (f'{{"Question1": "{Q1}", "Question2": "{Q2}",}}', "trailing_comma"),
        (f"{{'Question1': '{Q1}', 'Question2': '{Q2}'}}", "python_literal"),
        (f"Question 1: {Q1}\nQuestion 2: {Q2}", "line_format"),
        (f"1. {Q1}\n2) {Q2}\n", "line_format"),
        (
            f'{{"Question1": "{Q1}", "Question2": "{Q2}", "Question3": "What river does the Orv',
            "truncated_json",
        ),
    ],
)
def test_questions_are_read_through_every_repair(reply, repair):
    parsed = parse_questions(reply)
    assert isinstance(parsed, Parsed), parsed
    assert parsed.value == [Q1, Q2]  # the truncated third question is not kept half-written
    if repair is None:
        assert parsed.repairs == ()
    else:
        assert repair in parsed.repairs


def test_truncated_json_keeps_a_complete_last_item_and_drops_an_open_one():
    closed_last = parse_questions(f'{{"Question1": "{Q1}", "Question2": "{Q2}"')
    assert closed_last.value == [Q1, Q2] and "truncated_json" in closed_last.repairs
    nested = parse_questions(f'{{"questions": ["{Q1}", "{Q2}", "How many spans does')
    assert nested.value == [Q1, Q2]


@pytest.mark.parametrize("reply", ["", "   ", "I cannot help with that.", '{"Question1": "Why?"}', "{]"])
def test_unreadable_questions_are_a_typed_failure(reply):
    parsed = parse_questions(reply)
    assert isinstance(parsed, ParseFailure) and parsed.reason in ("empty_reply", "no_questions")


def test_duplicate_questions_are_removed_and_long_lists_capped():
    many = {f"Question{i}": f"What is fact number {i} about the Orvik Bridge?" for i in range(1, 11)}
    parsed = parse_questions(json.dumps({**many, "Question11": many["Question1"].upper()}), limit=4)
    assert len(parsed.value) == 4 and "capped" in parsed.repairs


@pytest.mark.parametrize(
    "reply, expected, repair",
    [
        ("Answer: 1931", "1931", None),
        (
            "Let me check.\n**Answer:** 412 metres\nIt says so in sentence two.",
            "412 metres",
            "prose_around_answer",
        ),
        ('{"Answer": "1931"}', "1931", "json_answer"),
        ("1931", "1931", "no_answer_prefix"),
        ('Answer: "Hemsford"', "Hemsford", None),
    ],
)
def test_answers(reply, expected, repair):
    parsed = parse_answer(reply)
    assert parsed.value == expected
    assert (repair in parsed.repairs) if repair else parsed.repairs == ()


@pytest.mark.parametrize(
    "reply", [f"Answer: {REFUSAL}", "Answer: The passage does not mention the architect."]
)
def test_refusals_are_recognised(reply):
    assert isinstance(parse_answer(reply).value, Refusal)


def test_unreadable_answers_fail_with_reasons():
    assert parse_answer("").reason == "empty_reply"
    assert parse_answer("First line\nsecond line without a marker").reason == "no_answer_line"
    assert parse_answer("Answer: " + "word " * 200).reason == "answer_too_long"


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ('{"Judgment": "Correct"}', True),
        ('{"Judgment": "Incorrect"}', False),
        ('```json\n{"judgement": "correct"}\n```', True),
        ('{"Judgment": "Correct", "Judgment": "Correct"}', True),
        ("CORRECT.", True),
        ("Incorrect. The passage says 1931.", False),
        ("Judgment: incorrect", False),
        ("Yes", True),
        ("No, it adds a fact.", False),
        ("**Yes** - everything is kept.", True),
        ('{"Judgment": "Incorrect"', False),
    ],
)
def test_verdicts(reply, verdict):
    parsed = parse_verdict(reply)
    assert isinstance(parsed, Parsed) and parsed.value is verdict


@pytest.mark.parametrize(
    "reply, reason",
    [("", "empty_reply"), ("Hmm.", "no_verdict"), ("It is correct, no wait, incorrect", "ambiguous_verdict")],
)
def test_unreadable_verdicts(reply, reason):
    assert parse_verdict(reply) == ParseFailure(reason, reply[:200]) or parse_verdict(reply).reason == reason


def test_coverage_replies():
    assert parse_coverage('{"Number of Supplementary Questions": 0}').value == (0, [])
    assert parse_coverage("Number of Supplementary Questions: 0").value == (0, [])
    full = parse_coverage(
        f'{{"Number of Supplementary Questions": 2, "Question1": "{Q1}", "Question2": "{Q2}"}}'
    )
    assert full.value == (2, [Q1, Q2]) and full.repairs == ()
    missing_n = parse_coverage(f'{{"Question1": "{Q1}"}}')
    assert missing_n.value == (1, [Q1]) and "missing_number" in missing_n.repairs
    mismatch = parse_coverage(f'{{"number_of_supplementary_questions": "3", "Question1": "{Q1}"}}')
    assert mismatch.value == (1, [Q1]) and {"key_variant", "number_mismatch"} <= set(mismatch.repairs)
    assert parse_coverage('{"Number of Supplementary Questions": 2}').reason == "missing_questions"
    assert parse_coverage("All good!").reason == "no_coverage_verdict"


def test_paraphrase_replies():
    source = PASSAGES[0]
    good = parse_paraphrase(
        "Here is the rewrite:\nAt Hemsford, a 412-metre bridge named Orvik spans the Talla; it opened in 1931.",
        source,
    )
    assert good.value.startswith("At Hemsford") and "lead_in" in good.repairs
    assert parse_paraphrase(source, source).reason == "copied_sentence"
    copied = "It opened in 1931. The Orvik Bridge crosses the Talla River at Hemsford."
    assert parse_paraphrase(copied, source).reason == "copied_sentence"
    assert (
        parse_paraphrase("At Hemsford a bridge spans", source, finish_reason="length").reason == "truncated"
    )
    assert parse_paraphrase("Too short.", source).reason == "too_short"


# -------------------------------------------------------------------------------------------- prompts


def test_few_shot_replies_are_in_the_format_our_parsers_read():
    """The examples teach the output format: each must parse cleanly (no repair needed)."""
    for _doc, questions in prompts.SIMPLE_EXAMPLES + prompts.MULTIHOP_EXAMPLES:
        assert parse_questions(json.dumps(questions)).value == list(questions.values())
    for _, _, answer in prompts.ANSWER_EXAMPLES:
        parsed = parse_answer(f"Answer: {answer}")
        assert parsed.repairs == () and (
            isinstance(parsed.value, Refusal) if answer == REFUSAL else parsed.value == answer
        )
    for _, _, _, verdict in prompts.JUDGE_EXAMPLES:
        assert parse_verdict(json.dumps({"Judgment": verdict})).value is (verdict == "Correct")
    for _, _pairs, reply in prompts.COVERAGE_EXAMPLES:
        assert parse_coverage(json.dumps(reply)).value[0] == reply["Number of Supplementary Questions"]
    for doc, rewrite in prompts.PARAPHRASE_EXAMPLES:
        assert parse_paraphrase(rewrite, doc).value == rewrite  # and copies no sentence of its source
    for _, _, verdict in prompts.PARAPHRASE_JUDGE_EXAMPLES:
        assert parse_verdict(verdict).value is (verdict == "Yes")


def test_prompt_builders_put_the_document_last_and_trim_shots():
    doc = PASSAGES[1]
    built = [
        prompts.questions_prompt(doc),
        prompts.questions_prompt(doc, multihop=True),
        prompts.answer_prompt(doc, Q1),
        prompts.qa_judge_prompt(doc, Q1, "1931"),
        prompts.coverage_prompt(doc, [(Q1, "1931")]),
        prompts.coverage_prompt(doc, [], multihop=True),
        prompts.paraphrase_prompt(doc),
        prompts.paraphrase_judge_prompt(doc, "rewrite"),
    ]
    assert len({b[0]["content"] for b in built}) == len(built)  # eight distinct instructions
    for messages in built:
        assert (
            messages[0]["role"] == "system"
            and messages[-1]["role"] == "user"
            and doc in messages[-1]["content"]
        )
        assert len(messages) > 3  # few-shot turns present by default
    assert REFUSAL in built[2][0]["content"]
    assert "Q1: " + Q1 in built[4][-1]["content"] and "none" in built[5][-1]["content"]
    assert (
        len(prompts.questions_prompt(doc, shots=0)) == 2 and len(prompts.questions_prompt(doc, shots=1)) == 4
    )


# ------------------------------------------------------------------------------------------- pipeline


def _happy(req: Request) -> str:
    """A well-behaved LLM, with the format slips the parsers must absorb."""
    last = req.messages[-1]["content"]
    if req.step in ("simple_questions", "multihop_questions"):
        kind = "hop" if req.step == "multihop_questions" else "fact"
        qs = {f"Question{i}": f"What is {kind} number {i} of this passage's subject?" for i in (1, 2, 3)}
        return "Sure!\n```json\n" + json.dumps(qs) + "\n```"
    if req.step == "answer":
        return "Answer: " + (
            "forty-two" if "number 1" in last or "number 2" in last or "extra" in last else REFUSAL
        )
    if req.step == "qa_judge":
        return "CORRECT." if "number 1" in last or "extra" in last else '{"Judgment": "Incorrect"}'
    if req.step.startswith("coverage"):
        if "extra" in last:
            return '{"Number of Supplementary Questions": 0}'
        return (
            '{"Number of Supplementary Questions": 1, "Question1": "Which extra fact completes the picture?"}'
        )
    if req.step == "paraphrase":
        return "Here is the rewrite: A freshly worded account that keeps every single fact."
    if req.step == "paraphrase_judge":
        return "Yes"
    raise AssertionError(req.step)


def _corpus(tmp_path: Path, passages=PASSAGES) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": p}) + "\n" for i, p in enumerate(passages)))
    return str(path)


def _run(tmp_path, respond, config=None, out="out", **kw):
    backend = ScriptedBackend(respond)
    report = Synthesizer(config or SynthesisConfig()).run(
        _corpus(tmp_path), str(tmp_path / out), backend, progress=False, **kw
    )
    return report, backend


def _records(out_dir) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(Path(out_dir).glob("records-*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def _adds_up(report):
    d = report["documents"]
    assert d["read"] == d["kept"] + sum(d["dropped"].values()) + d["pending"]
    errors = sum(
        v
        for k, v in d["dropped"].items()
        if k in ("backend_error", "prompt_too_long", "request_rejected", "internal_error")
    )
    for track in report["tracks"].values():
        assert track["kept"] + sum(track["dropped"].values()) == d["processed"] - errors


def test_happy_path_writes_stage1_records_and_a_report_that_adds_up(tmp_path):
    report, backend = _run(
        tmp_path, _happy, SynthesisConfig(max_rounds=3), num_shards=2, in_flight=3, trace=True
    )
    _adds_up(report)
    d = report["documents"]
    assert d == {"read": 4, "processed": 4, "pending": 0, "kept": 4, "dropped": {}} and report["complete"]
    for name in ("simple_qa", "multihop_qa"):
        track = report["tracks"][name]
        # question 1 kept, 2 judged incorrect, 3 refused; round 1 adds the extra question, round 2 says covered
        assert track["kept"] == 4 and track["qa_pairs"] == {
            "total": 8,
            "mean_per_kept_document": 2.0,
            "histogram": {"2": 4},
        }
        assert track["rounds_histogram"] == {"2": 4}
    assert report["qa_pairs"] == {"proposed": 32, "kept": 16, "judged_incorrect": 8, "unanswerable": 8}
    assert report["records"] == {"simple_qa": 4, "multihop_qa": 4, "paraphrase": 4}
    assert report["calls"]["total"] == len(backend.calls) and report["calls"]["parse_retries"] == 0
    assert {"code_fence", "free_text_verdict", "lead_in"} <= set(report["calls"]["repairs"])
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    trace = [json.loads(line) for line in (tmp_path / "out" / "trace-00000.jsonl").read_text().splitlines()]
    assert len(trace) == len(backend.calls) and {t["doc"] for t in trace} == {0, 1, 2, 3}
    assert all(t["reply"] for t in trace) and trace[0]["prompt_end"].endswith(PASSAGES[trace[0]["doc"]])
    # Every shard reads back as stage-1 input, one QA record per track and one paraphrase per passage.
    records = []
    for shard in (0, 1):
        got, rr = read_records(records_path(tmp_path / "out", shard), "stage1")
        assert rr.kept == rr.read == 6 and not rr.skipped
        records += got
    assert sorted(r.kind for r in records) == ["paraphrase"] * 4 + ["qa"] * 8
    for r in records:
        assert r.doc in PASSAGES
        if r.kind == "qa":
            assert (
                r.questions[1] == "Which extra fact completes the picture?"
                and r.answers == ("forty-two",) * 2
            )
    raw = _records(tmp_path / "out")
    assert {r["data_type"] for r in raw} == {"qa", "multihop_qa", "paraphrase"}
    assert all(r["question"] == "" for r in raw if r["data_type"] == "paraphrase")
    # Documents are batched across the pipeline: some backend batches mix several passages.
    assert (
        max(
            len({c.messages[-1]["content"].split("Passage:\n")[-1][:20] for c in backend.calls[i : i + 3]})
            for i in range(0, 30, 3)
        )
        > 1
    )


def test_coverage_never_reached_excludes_the_track(tmp_path):
    def never_covered(req):
        if req.step.startswith("coverage"):
            n = req.messages[-1]["content"].count("\nQ")
            return json.dumps(
                {"Number of Supplementary Questions": 1, "Question1": f"What is new detail {n} about it?"}
            )
        return _happy(req)

    report, backend = _run(
        tmp_path, never_covered, SynthesisConfig(max_rounds=4, multihop=False, paraphrase=False)
    )
    _adds_up(report)
    assert report["tracks"]["simple_qa"]["dropped"] == {"coverage_not_reached": 4}
    assert report["tracks"]["simple_qa"]["rounds_histogram"] == {"4": 4}
    assert report["documents"]["dropped"] == {"coverage_not_reached": 4} and _records(tmp_path / "out") == []
    coverage_calls = [c for c in backend.calls if c.step == "coverage_simple"]
    assert len(coverage_calls) == 4 * 4


def test_paraphrase_rejections_are_counted_per_reason(tmp_path):
    def picky(req):
        doc = req.messages[-1]["content"]
        if req.step == "paraphrase" and "Orvik" in doc:
            return PASSAGES[0]  # verbatim copy, every attempt
        if req.step == "paraphrase" and "Selka" in doc:
            return "```"  # nothing usable
        if req.step == "paraphrase_judge" and "Pelham" in doc:
            return '{"Judgment": "No"}'
        return _happy(req)

    report, _ = _run(tmp_path, picky, SynthesisConfig(max_rounds=1, simple=False, multihop=False))
    _adds_up(report)
    assert report["tracks"]["paraphrase"] == {
        "kept": 1,
        "dropped": {"paraphrase_copied": 1, "paraphrase_unparsable": 1, "paraphrase_rejected": 1},
    }
    assert report["calls"]["parse_failures"] == {"paraphrase:copied_sentence": 3, "paraphrase:too_short": 3}
    assert report["calls"]["parse_retries"] == 4  # two re-asks for each of the two unreadable ones


def test_parse_failures_are_retried_then_dropped(tmp_path):
    def stubborn(req):
        if req.step == "simple_questions":
            if "Orvik" in req.messages[-1]["content"]:
                return "I would rather not."  # never readable
            return _happy(req) if req.attempt >= 1 else '{"Question1": '  # readable on the first re-ask
        return _happy(req)

    report, backend = _run(
        tmp_path, stubborn, SynthesisConfig(max_rounds=2, multihop=False, paraphrase=False)
    )
    _adds_up(report)
    assert (
        report["tracks"]["simple_qa"]["dropped"] == {"questions_unparsable": 1}
        and report["tracks"]["simple_qa"]["kept"] == 3
    )
    assert report["calls"]["parse_failures"] == {"simple_questions:no_questions": 6}
    retried = [c for c in backend.calls if c.step == "simple_questions" and c.attempt > 0]
    assert report["calls"]["parse_retries"] == len(retried) == 2 + 3
    assert all(c.temperature == 0.7 for c in retried) and all(
        c.temperature == 0.0 for c in backend.calls if c.attempt == 0
    )


def test_backend_failures_end_the_document_without_records_and_a_rerun_retries_them(tmp_path):
    state = {"down": True}

    def flaky(req):
        if state["down"] and "Selka" in req.messages[-1]["content"] and req.step == "answer":
            raise ConnectionError("server went away")
        if state["down"] and "Quill" in req.messages[-1]["content"]:
            return BackendError("prompt_too_long", "scripted")
        return _happy(req)

    config = SynthesisConfig(max_rounds=2)
    report, _ = _run(tmp_path, flaky, config)
    _adds_up(report)
    assert report["documents"]["dropped"] == {"backend_error": 1, "prompt_too_long": 1}
    assert report["documents"]["kept"] == 2 and len(_records(tmp_path / "out")) == 6
    state["down"] = False
    report, backend = _run(tmp_path, flaky, config)  # same directory: resume
    _adds_up(report)
    # The transient failure is redone, the permanent one is not; nothing is written twice.
    assert report["documents"]["dropped"] == {"prompt_too_long": 1} and report["documents"]["kept"] == 3
    assert report["this_run"]["documents"] == 1 and report["this_run"]["resumed_done"] == 3
    assert {c.messages[-1]["content"].count("Selka") for c in backend.calls} == {1}
    docs = [r["docs"][0] for r in _records(tmp_path / "out")]
    assert sorted(docs) == sorted([p for p in PASSAGES if "Quill" not in p] * 3)


def test_a_dead_backend_stops_the_run_early(tmp_path):
    from clara_jax.synthesis.pipeline import SynthesisAborted

    with pytest.raises(SynthesisAborted, match="2 documents in a row"):
        _run(tmp_path, lambda req: BackendError(BACKEND_ERROR, "down"), max_consecutive_errors=2, in_flight=1)
    assert len(ledger_path(tmp_path / "out", 0).read_text().splitlines()) == 2


# -------------------------------------------------------------------------------------- resumability


def test_store_repairs_a_torn_ledger_and_an_unfinished_records_tail(tmp_path):
    store = ShardStore(tmp_path, 0)
    store.commit({"doc": 0, "sha": "a"}, ['{"r": 0}'])
    store.commit({"doc": 2, "sha": "b"}, ['{"r": 2}', '{"r": 2.5}'])
    good_records = records_path(tmp_path, 0).read_bytes()
    with open(records_path(tmp_path, 0), "ab") as f:
        f.write(b'{"r": 4}\n{"r": 4.')  # doc 4's records landed, its ledger line did not finish
    with open(ledger_path(tmp_path, 0), "ab") as f:
        f.write(b'{"doc": 4, "sha": "c", "records_e')
    reopened = ShardStore(tmp_path, 0)
    assert sorted(reopened.done) == [0, 2] and len(reopened.repaired) == 2
    assert records_path(tmp_path, 0).read_bytes() == good_records
    assert ledger_path(tmp_path, 0).read_text().count("\n") == 2
    os.truncate(records_path(tmp_path, 0), 3)
    with pytest.raises(StoreError, match="truncated or replaced"):
        ShardStore(tmp_path, 0)


def test_resume_refuses_other_settings_or_a_changed_corpus(tmp_path):
    _run(tmp_path, _happy, SynthesisConfig(max_rounds=1, multihop=False, paraphrase=False))
    with pytest.raises(StoreError, match="max_rounds"):
        _run(tmp_path, _happy, SynthesisConfig(max_rounds=2, multihop=False, paraphrase=False))
    changed = [PASSAGES[0] + " Extra."] + PASSAGES[1:]
    Path(_corpus(tmp_path, changed))
    with pytest.raises(StoreError, match=r"corpus.jsonl:1: this document differs"):
        Synthesizer(SynthesisConfig(max_rounds=1, multihop=False, paraphrase=False)).run(
            str(tmp_path / "corpus.jsonl"), str(tmp_path / "out"), ScriptedBackend(_happy), progress=False
        )


def test_processes_split_shards_and_limit_counts_only_the_first_documents(tmp_path):
    config = SynthesisConfig(max_rounds=2, multihop=False, paraphrase=False)
    for p in (0, 1):
        report, _ = _run(tmp_path, _happy, config, num_shards=4, process_index=p, process_count=2, limit=3)
    assert report["complete"] and report["documents"]["read"] == 3
    assert sorted(path.name for path in (tmp_path / "out").glob("records-*")) == [
        f"records-0000{i}.jsonl" for i in range(3)
    ]
    assert sorted(r["docs"][0] for r in _records(tmp_path / "out")) == sorted(PASSAGES[:3])


def test_corpus_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine passage here"}\n\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no document text"):
        Synthesizer(SynthesisConfig()).run(
            str(path), str(tmp_path / "o"), ScriptedBackend(_happy), progress=False
        )


def _script_file(tmp_path, delay: float) -> Path:
    rules = [
        {"step": "simple_questions", "reply": json.dumps({"Question1": "What does the passage say first?"})},
        {"step": "answer", "reply": "Answer: forty-two"},
        {"step": "qa_judge", "replies": ["maybe", '{"Judgment": "Correct"}']},
        {"step": "coverage_simple", "contains": "A1:", "reply": '{"Number of Supplementary Questions": 0}'},
        {"step": "paraphrase", "reply": "A newly worded version of the passage, facts intact."},
        {"step": "paraphrase_judge", "reply": "Yes"},
    ]
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"delay": delay, "rules": rules}))
    return path


def _cli(tmp_path, corpus, out, script, *extra):
    cmd = [sys.executable, "-m", "clara_jax.cli", "synthesize", "--corpus", corpus, "--out", str(out)]
    cmd += ["--backend", f"scripted:{script}", "--no-multi-hop", "--max-rounds", "2", "--no-progress", *extra]
    return cmd


@pytest.mark.slow
def test_kill_and_resume_processes_every_document_exactly_once(tmp_path):
    passages = [
        f"Passage {i} tells of the village of Norr{i} and its {i} mills on the river." for i in range(14)
    ]
    corpus = _corpus(tmp_path, passages)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Reference: one uninterrupted run (no delay).
    ref = tmp_path / "ref"
    done = subprocess.run(
        _cli(tmp_path, corpus, ref, _script_file(tmp_path, 0.0), "--num-shards", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # Slow run, killed with SIGKILL once a few documents are in the ledgers.
    out, slow = tmp_path / "out", tmp_path / "slow"
    slow.mkdir()
    script = _script_file(slow, 0.04)
    proc = subprocess.Popen(
        _cli(tmp_path, corpus, out, script, "--num-shards", "2", "--in-flight", "2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        ledgers = list(out.glob("ledger-*.jsonl"))
        if sum(p.read_text().count("\n") for p in ledgers) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = sum(p.read_text().count("\n") for p in out.glob("ledger-*.jsonl"))
    assert 4 <= partial < len(passages), "the kill must land mid-run"
    again = subprocess.run(
        _cli(tmp_path, corpus, out, script, "--num-shards", "2", "--in-flight", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["this_run"]["resumed_done"] == partial
    assert report["documents"] == {"read": 14, "processed": 14, "pending": 0, "kept": 14, "dropped": {}}
    # Exactly once: every ledger names each document once, and the records equal the reference run's.
    entries = [
        json.loads(line)["doc"] for p in out.glob("ledger-*.jsonl") for line in p.read_text().splitlines()
    ]
    assert sorted(entries) == list(range(14))
    for shard in (0, 1):
        got = sorted(records_path(out, shard).read_text().splitlines())
        assert got == sorted(records_path(ref, shard).read_text().splitlines()) and len(got) == 14
    assert "documents:" in again.stdout and "report:" in again.stdout


# ---------------------------------------------------------------------------------------- remote


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint that fails on purpose: `plan` lists what to do per POST."""

    plan: list = []
    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        action = type(self).plan.pop(0) if type(self).plan else "ok"
        if action == "sleep":
            time.sleep(1.0)
            action = "ok"
        if action == "ok":
            reply = {"role": "assistant", "content": "Answer: 1931"}
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            self._send(
                200, {"choices": [{"index": 0, "message": reply, "finish_reason": "stop"}], "usage": usage}
            )
        elif action == 429:
            self._send(429, {"error": "slow down"}, [("Retry-After", "0")])
        else:
            self._send(action, {"error": f"status {action}"})


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.plan, _Stub.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


SECRET = "sk-test-VERY-secret-123"


def test_remote_backend_retries_5xx_429_and_timeouts_with_backoff(stub, monkeypatch, caplog):
    monkeypatch.setenv("SYNTH_TEST_KEY", SECRET)
    waits = []
    backend = RemoteBackend(
        stub,
        api_key_env="SYNTH_TEST_KEY",
        concurrency=1,
        timeout=0.3,
        retries=3,
        backoff=0.5,
        sleep=waits.append,
    )
    assert backend.model == "stub-model" and backend.base_url == stub + "/v1"
    _Stub.plan = [500, 429, "sleep", "ok"]
    caplog.set_level(logging.DEBUG)
    [reply] = backend.complete([Request([{"role": "user", "content": "When?"}], 8)])
    assert reply == Completion("Answer: 1931", "stop", 11, 3)
    assert backend.stats == {"http_requests": 4, "http_retries": 3}
    assert len(waits) == 3 and waits[1] == 0.0  # Retry-After: 0 is honoured
    assert 0.25 <= waits[0] <= 0.75 and 1.0 <= waits[2] <= 3.0  # backoff·2^attempt with ±50 % jitter
    paths = {p for p, _, _ in _Stub.seen}
    assert paths == {"/v1/chat/completions"} and all(auth == f"Bearer {SECRET}" for _, auth, _ in _Stub.seen)
    assert _Stub.seen[0][2]["model"] == "stub-model" and _Stub.seen[0][2]["max_tokens"] == 8
    # Out of retries -> a counted backend error; a 400 is not retried.
    _Stub.plan = [503] * 4 + [400]
    exhausted, rejected = backend.complete([Request([{"role": "user", "content": "a"}], 8)] * 2)
    assert exhausted.reason == BACKEND_ERROR and "after 4 attempts" in str(exhausted)
    assert rejected.reason == REQUEST_REJECTED and "HTTP 400" in str(rejected)
    assert SECRET not in repr(backend) and "***" in repr(backend)
    assert SECRET not in caplog.text
    backend.close()


def test_api_key_never_reaches_logs_or_report(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", SECRET)
    corpus = _corpus(tmp_path, PASSAGES[:2])
    _Stub.plan = [500, 502]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "clara_jax.cli",
        "synthesize",
        "--corpus",
        corpus,
        "--out",
        str(tmp_path / "out"),
    ]
    cmd += ["--backend", "remote", "--base-url", stub, "--api-key-env", "SYNTH_TEST_KEY", "--retries", "2"]
    cmd += ["--max-rounds", "1", "--no-progress", "--timeout", "5"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "retrying" in done.stderr  # the 5xx were logged ...
    for text in (done.stdout, done.stderr, *(p.read_text() for p in (tmp_path / "out").iterdir())):
        assert SECRET not in text  # ... without the key anywhere
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    _adds_up(report)
    assert report["backend"] == "remote:stub-model" and report["documents"]["processed"] == 2
    # "Answer: 1931" to every step: questions fail to parse, so both passages drop with reasons.
    assert report["documents"]["dropped"] == {"questions_unparsable": 2}
    assert (
        report["tracks"]["paraphrase"]["dropped"] == {"paraphrase_judge_unparsable": 2}
        or report["tracks"]["paraphrase"]["kept"] == 0
    )
