"""Synthesis on hostile input: corpus lines refused with `path:line`, replies that cannot hang or crash
the tolerant parsers, and a remote endpoint that misbehaves (protocol errors, trickling, huge replies)."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clara_jax.synthesis import parsing
from clara_jax.synthesis.backends import BACKEND_ERROR, BackendError, Completion, RemoteBackend, Request
from clara_jax.synthesis.corpus import read_documents
from clara_jax.synthesis.parsing import (
    Parsed,
    ParseFailure,
    find_json,
    parse_answer,
    parse_coverage,
    parse_paraphrase,
    parse_questions,
    parse_verdict,
)
from tests.test_bad_input_cli import run_cli

GOOD_LINE = json.dumps({"text": "The Orvik Bridge was opened in 1931 and is 412 metres long."})

# ----------------------------------------------------------------------------------------- corpus

HOSTILE_LINES = {
    "lone_surrogate": (b'{"text": "Bridge \\ud800 opened"}', "a lone UTF-16 surrogate"),
    "invalid_utf8": (b'{"text": "Bridge \xff opened"}', "invalid UTF-8 (byte 0xff"),
    "nan": (b'{"text": "Bridge", "score": NaN}', "the non-standard JSON constant NaN"),
    "duplicate_key": (b'{"text": "a", "text": "b"}', "the duplicate key 'text'"),
    "huge_integer": (b'{"text": "a", "id": ' + b"9" * 5000 + b"}", "an integer with 5000 digits"),
    "deep_nesting": (b"[" * 200_000 + b"]" * 200_000, "JSON nested deeper than"),
}


@pytest.mark.parametrize("case", HOSTILE_LINES)
def test_corpus_reader_refuses_hostile_lines_with_their_line(tmp_path, case):
    line, expected = HOSTILE_LINES[case]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b"\n\n" + line + b"\n")
    docs = read_documents(str(path))
    assert next(docs).line == 1  # the good line before it is read as usual
    with pytest.raises(ValueError) as info:
        next(docs)
    assert str(info.value).startswith(f"{path}:3: ") and expected in str(info.value), str(info.value)


def test_synthesize_refuses_a_surrogate_corpus_line_before_any_work(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(GOOD_LINE.encode() + b'\n{"text": "Orvik \\udc00 Bridge"}\n')
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"rules": []}))
    out = tmp_path / "out"
    argv = ["synthesize", "--corpus", str(corpus), "--out", str(out), "--backend", f"scripted:{script}"]
    code, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert f"clara-jax synthesize: error: {corpus}:2: " in err and "lone UTF-16 surrogate" in err
    assert not list(out.glob("records-*"))  # refused in the first pass, before any document was done


# ----------------------------------------------------------------------------------------- parsing

PARSERS = {
    "questions": parse_questions,
    "answer": parse_answer,
    "verdict": parse_verdict,
    "coverage": parse_coverage,
    "paraphrase": lambda text: parse_paraphrase(text, "The Orvik Bridge was opened in 1931."),
}


def _parse_all(text: str) -> dict:
    results = {name: parse(text) for name, parse in PARSERS.items()}
    for name, result in results.items():
        assert isinstance(result, Parsed | ParseFailure), (name, result)
    return results


def test_a_python_literal_with_an_unhashable_key_is_a_parse_failure():
    # ast.literal_eval raises TypeError (unhashable list) on it; the parsers must not. The object is
    # passed over, and the list inside it is the first JSON value found.
    assert find_json("{[1]: 2}").value == [1]
    results = _parse_all("{[1]: 2}")
    assert isinstance(results["questions"], ParseFailure) and isinstance(results["verdict"], ParseFailure)
    # A good literal next to it still parses.
    parsed = parse_questions("{'Question1': 'When was the Orvik Bridge opened?'}")
    assert parsed.value == ["When was the Orvik Bridge opened?"] and "python_literal" in parsed.repairs


NESTED_100KB = {
    "items_in_arrays": "[1," * 34_000,
    "open_brackets": "[" * 100_000,
    "objects_in_arrays": '{"a": [' * 14_300,
    "balanced": "[" * 50_000 + "]" * 50_000,
    "blank_run_in_a_line": "1. a" + " " * 100_000 + "b",
    "blank_lines": "Answer:" + "\n" * 100_000 + "x",
}


@pytest.mark.parametrize("case", NESTED_100KB)
def test_a_100kb_hostile_reply_is_parsed_in_well_under_a_second(monkeypatch, case):
    text = NESTED_100KB[case]
    assert len(text) >= 100_000
    # The length cap alone refuses it ...
    assert parse_questions(text) == ParseFailure(
        "reply_too_long", f"{len(text)} characters; the limit is {parsing.MAX_REPLY_CHARS}"
    )
    # ... and without the cap the parsers are still fast: no per-item copy of the bracket stack (the
    # old scanner took 34 s of CPU on such a reply), no quadratic regex on a run of blanks.
    monkeypatch.setattr(parsing, "MAX_REPLY_CHARS", 10 * len(text))
    start = time.process_time()
    _parse_all(text)
    assert find_json(text) is None  # nested past MAX_JSON_DEPTH, or no JSON at all
    elapsed = time.process_time() - start
    assert elapsed < 2.0, f"{case}: {elapsed:.2f} s of CPU"


def test_a_passage_without_full_stops_is_checked_for_copying_in_linear_time():
    # Chinese or Japanese text ends its sentences with "。": the old sentence search was quadratic
    # (20 s on 30 KB); copies are still caught in ordinary text.
    source = "字" * 30_000
    start = time.process_time()
    parsed = parse_paraphrase("A fine rewritten passage that keeps every fact of the source.", source)
    assert isinstance(parsed, Parsed) and time.process_time() - start < 1.0
    source = "The Orvik Bridge crosses the wide Talla River at the town of Hemsford. It opened in 1931."
    copied = "Here it is. The Orvik Bridge crosses the wide Talla River at the town of Hemsford, still."
    assert parse_paraphrase(copied, source).reason == "copied_sentence"


def test_truncation_repair_still_keeps_the_complete_items_of_a_long_reply():
    questions = [f"What is fact number {i} about the Orvik Bridge?" for i in range(40)]
    text = json.dumps({f"Question{i + 1}": q for i, q in enumerate(questions)})
    parsed = parse_questions(text[: len(text) - 20])  # cut inside the last question
    assert parsed.value == questions[:39] and "truncated_json" in parsed.repairs


JSON_PUNCTUATION = st.text(
    alphabet=st.sampled_from("[]{}\",:\\ \n\t0123456789.eE+-atrufnlsQq?'ud800"), max_size=400
)
ANY_TEXT = st.text(max_size=400)


def _json_values():
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    )


@settings(max_examples=150, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=JSON_PUNCTUATION | ANY_TEXT)
def test_any_reply_parses_or_fails_with_a_reason(text):
    results = _parse_all(text)
    for result in results.values():
        if isinstance(result, ParseFailure):
            assert result.reason and isinstance(result.reason, str)


@settings(max_examples=100, deadline=1000, database=None)
@given(value=_json_values(), cut=st.integers(min_value=0, max_value=400))
def test_any_json_reply_whole_or_truncated_parses_or_fails_with_a_reason(value, cut):
    text = json.dumps(value)
    _parse_all(text)
    _parse_all(text[:cut])


# ------------------------------------------------------------------------------------------ remote


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint misbehaving as `action` says (set per test)."""

    protocol_version = "HTTP/1.1"
    action = "ok"
    posts = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        try:
            getattr(self, f"_{type(self).action}")()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def _head(self, length: int | None, extra=()):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()

    def _send(self, body: bytes, extra=()):
        self._head(len(body), extra)
        self.wfile.write(body)

    def _ok(self):
        message = {"role": "assistant", "content": "Answer: 1931"}
        self._send(json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]}).encode())

    def _bad_gzip(self):  # httpx raises DecodingError: an HTTPError that is not a TransportError
        self._send(b"this is not gzip data", [("Content-Encoding", "gzip")])

    def _trickle(self):  # a valid length, one byte every 50 ms: every read succeeds, the reply never ends
        self._head(10_000)
        for _ in range(10_000):
            self.wfile.write(b" ")
            self.wfile.flush()
            time.sleep(0.05)

    def _huge_declared(self):
        self._send(b" " * (3 << 20))

    def _huge_gzip(self):  # 30 KB on the wire, 30 MB once decompressed, no length: the cap is on content
        self.close_connection = True
        self._head(None, [("Content-Encoding", "gzip"), ("Connection", "close")])
        self.wfile.write(gzip.compress(b"[" + b" " * (30 << 20) + b"]"))

    def _surrogate(self):
        message = {"role": "assistant", "content": "Answer: \ud800"}
        self._send(json.dumps({"choices": [{"message": message}]}).encode())

    def _deep(self):
        self._send(b"[" * 100_000 + b"]" * 100_000)


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Endpoint.action, _Endpoint.posts = "ok", 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _ask(endpoint: str, action: str, **kw) -> tuple[Completion | BackendError, float]:
    _Endpoint.action = action
    backend = RemoteBackend(endpoint, "stub", concurrency=1, backoff=0.0, sleep=lambda s: None, **kw)
    start = time.monotonic()
    [reply] = backend.complete([Request([{"role": "user", "content": "When?"}], 8)])
    elapsed = time.monotonic() - start
    backend.close()
    return reply, elapsed


def test_remote_protocol_errors_are_retried_then_counted(endpoint):
    reply, _ = _ask(endpoint, "bad_gzip", retries=2, timeout=5)
    assert isinstance(reply, BackendError) and reply.reason == BACKEND_ERROR
    assert "DecodingError" in str(reply) and "after 3 attempts" in str(reply)
    assert _Endpoint.posts == 3
    reply, _ = _ask(endpoint, "ok", retries=2, timeout=5)
    assert reply == Completion("Answer: 1931", "stop", 0, 0)


def test_remote_deadline_bounds_a_trickling_reply(endpoint):
    # httpx's per-phase read timeout never fires (a byte arrives every 50 ms); the deadline does.
    reply, elapsed = _ask(endpoint, "trickle", retries=1, timeout=0.5)
    assert isinstance(reply, BackendError) and reply.reason == BACKEND_ERROR
    assert "no complete reply within the 0.5 s deadline" in str(reply) and "after 2 attempts" in str(reply)
    assert _Endpoint.posts == 2 and elapsed < 3.0  # the whole reply would take 500 s


@pytest.mark.parametrize("action", ["huge_declared", "huge_gzip"])
def test_remote_reply_size_is_capped(endpoint, action):
    reply, elapsed = _ask(endpoint, action, retries=3, timeout=10, max_response_bytes=1 << 20)
    assert isinstance(reply, BackendError) and reply.reason == BACKEND_ERROR
    assert "the limit is 1,048,576 (max_response_bytes)" in str(reply)
    assert _Endpoint.posts == 1  # not retried: the same request would get the same reply
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "action, expected", [("surrogate", "UnicodeEncodeError"), ("deep", "RecursionError")]
)
def test_remote_malformed_replies_are_counted_not_raised(endpoint, action, expected):
    reply, _ = _ask(endpoint, action, retries=0, timeout=10)
    assert isinstance(reply, BackendError) and "malformed response" in str(reply) and expected in str(reply)
    json.dumps(reply.detail, ensure_ascii=False).encode("utf-8")  # writable to the ledger as is


@pytest.mark.parametrize(
    "url, warned",
    [
        ("http://10.1.2.3:8000/v1", True),
        ("http://inference.example:8000", True),
        ("https://10.1.2.3:8000/v1", False),
        ("http://127.0.0.1:8000", False),
        ("http://[::1]:8000", False),
        ("http://localhost:8000", False),
    ],
)
def test_a_key_over_plain_http_to_another_host_is_warned_about(monkeypatch, caplog, url, warned):
    monkeypatch.setenv("HOSTILE_TEST_KEY", "sk-hostile-secret")
    with caplog.at_level(logging.WARNING, logger="clara_jax.synthesis.backends"):
        backend = RemoteBackend(url, "stub", api_key_env="HOSTILE_TEST_KEY")  # a model: no request made
    backend.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("sent over plain http" in m for m in messages) == warned, messages
    assert not any("sk-hostile-secret" in m for m in messages)
    caplog.clear()
    RemoteBackend(url, "stub").close()  # no key, nothing to warn about
    assert not caplog.records
