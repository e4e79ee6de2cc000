"""`clara-jax serve`: a real server process spoken to over HTTP (httpx and the openai client),
plus in-process tests of the batching worker and the request handling with a fake model.

Two servers, both on 127.0.0.1: the main one (module-wide, with a key, CLaRa endpoint) and a
"strict" one (tiny chat model, a 0.5 s request deadline, extra allowed Host names)."""

import argparse
import asyncio
import concurrent.futures
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from clara_jax.cli import main as cli_main
from clara_jax.inference.chat import ChatResult
from clara_jax.inference.export import export_corpus
from clara_jax.serving.app import create_app
from clara_jax.serving.batching import BatchingWorker, ServerBusy, ShuttingDown
from tests.server_process import free_port, running_server
from tests.test_export_index import _corpus_records, _save_model, _write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS, MAX_BYTES = 64, 20_000
QUESTIONS = ["Where does Mava 0 live?", "What does Sumi keep?", "When was Teme born?"]
KEY_ENV, KEY = "CLARA_JAX_TEST_KEY", f"sk-test-{secrets.token_hex(16)}"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
TINY_CONTEXT = 1024  # the tiny chat model's: its default prompt cap is 8 characters per token


def _chat_body(content="Hello there", **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def _get(url, **kw):
    return httpx.get(url, headers={**AUTH, **kw.pop("headers", {})}, timeout=kw.pop("timeout", 30), **kw)


def _post(url, **kw):
    """POST with the key (and, for raw `content`, the JSON content type)."""
    headers = {**AUTH, **(JSON if "content" in kw else {}), **kw.pop("headers", {})}
    return httpx.post(url, headers=headers, timeout=kw.pop("timeout", 120), **kw)


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny CLaRa model directory and a 60-document index exported with it."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = _save_model(root / "model", seed=0)
    corpus = _write_jsonl(root / "corpus.jsonl", _corpus_records())
    index = str(root / "index")
    export_corpus(model_dir, corpus, index, shard_size=16, batch_size=8, progress=False)
    return dict(root=root, model=model_dir, index=index)


@pytest.fixture(scope="module")
def server(assets):
    port = free_port()
    log_path = assets["root"] / "server.log"
    cmd = [sys.executable, "-m", "clara_jax.cli", "serve", "--model", "tiny", "--port", str(port)]
    cmd += ["--clara-model", assets["model"], "--index", assets["index"], "--max-tokens", str(MAX_TOKENS)]
    cmd += ["--max-request-bytes", str(MAX_BYTES), "--batch-size", "8", "--max-concurrency", "32"]
    cmd += ["--api-key-env", KEY_ENV]
    with running_server(cmd, port, _env(**{KEY_ENV: KEY}), log_path, timeout=120) as (url, proc):
        yield dict(url=url, proc=proc, log=log_path)


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """No key (loopback), a request deadline far shorter than the first (compiling) generation,
    and extra Host names."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("strict") / "server.log"
    cmd = [sys.executable, "-m", "clara_jax.cli", "serve", "--model", "tiny", "--port", str(port)]
    cmd += ["--request-timeout", "0.5", "--allowed-hosts", "clara.test,*.corp.example", "--no-access-log"]
    with running_server(cmd, port, _env(), log_path, timeout=120) as (url, proc):
        yield dict(url=url, proc=proc, log=log_path, port=port)


def _assert_error(response, status, *, param=None, code=None, says=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if says is not None:
        assert says in error["message"], error["message"]


def _assert_completion(body, max_tokens):
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= max_tokens and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_health_and_models(server, assets):
    health = httpx.get(f"{server['url']}/health")  # the one route that needs no key
    body = health.json()
    assert body["status"] == "ok" and body["models"] == ["tiny"]
    assert body["clara"] == {"model": "model", "index": "index", "documents": 60}  # names, not paths
    assert str(assets["root"]) not in health.text
    assert body["queue"]["max_concurrency"] == 32 and body["queue"]["admitted"] == 0
    log = server["log"].read_text()
    assert "ready at " + server["url"] in log
    assert f"authentication: a bearer key from ${KEY_ENV}" in log and KEY not in log
    models = _get(f"{server['url']}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_malformed_requests_get_4xx_with_a_message(server):
    url = f"{server['url']}/v1/chat/completions"
    post = lambda body: _post(url, json=body, timeout=30)
    _assert_error(_post(url, content=b"{not json"), 400, code="invalid_json", says="not valid JSON")
    _assert_error(_post(url, content=b""), 400, code="invalid_json", says="empty")
    _assert_error(_post(url, content=b"[1, 2]"), 400, says="expected a JSON object, got a JSON array")
    _assert_error(post({"model": "tiny"}), 400, param="messages", says="'messages'")
    _assert_error(post({"messages": [{"role": "user", "content": "hi"}]}), 400, param="model")
    bad_role = _chat_body()
    bad_role["messages"][0]["role"] = "robot"
    _assert_error(post(bad_role), 400, param="messages[0].role")
    two_users = _chat_body()
    two_users["messages"] *= 2  # the tiny model's Mistral template wants user/assistant turns
    _assert_error(post(two_users), 400, param="messages", says="must alternate")
    _assert_error(post(_chat_body(max_tokens=MAX_TOKENS + 1)), 400, param="max_tokens", says=str(MAX_TOKENS))
    _assert_error(post(_chat_body(max_completion_tokens=0)), 400, param="max_completion_tokens")
    _assert_error(post(_chat_body(temperature="hot")), 400, param="temperature")
    nan_top_p = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}'
    _assert_error(_post(url, content=nan_top_p), 400, param="top_p", says="finite")
    _assert_error(post(_chat_body(stream=True)), 400, param="stream")
    _assert_error(post(_chat_body(n=2)), 400, param="n")
    _assert_error(post({**_chat_body(), "model": "gpt-9"}), 404, code="model_not_found", says="gpt-9")
    # the tiny model's context is 1024 tokens: a ~1500-token prompt cannot fit (found by the
    # tokenizer), nor can one of over 8 characters per token (found without it)
    _assert_error(post(_chat_body("word " * 1500)), 400, code="context_length_exceeded", says="tokens")
    too_long = _chat_body("x" * (8 * TINY_CONTEXT + 1))
    _assert_error(post(too_long), 400, code="context_length_exceeded", says="characters")
    _assert_error(post(_chat_body("x" * MAX_BYTES)), 413, code="request_too_large")
    # the body limit also holds for a chunked upload that declares no length
    chunks = iter([b'{"model": "tiny", "messages": "', b"y" * MAX_BYTES, b'"}'])
    _assert_error(_post(url, content=chunks), 413, code="request_too_large")
    _assert_error(_get(f"{server['url']}/v1/nothing"), 404)
    _assert_error(_get(url), 405)


def test_concurrent_requests_are_all_answered_and_batched(server):
    url = f"{server['url']}/v1/chat/completions"
    bodies = [
        _chat_body(f"Question number {i}: how long is the river?" * (1 + i % 3), max_tokens=8)
        for i in range(8)
    ]
    alone = [_post(url, json=b).json() for b in bodies]  # also compiles the shapes
    before = httpx.get(f"{server['url']}/health").json()["queue"]["batches_run"]
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return _post(url, json=body)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for r, single in zip(responses, alone):
        _assert_completion(r.json(), 8)
        # greedy answers do not depend on which requests shared the batch
        assert r.json()["choices"][0]["message"] == single["choices"][0]["message"]
    assert len({r.json()["id"] for r in responses}) == len(bodies)
    after = httpx.get(f"{server['url']}/health").json()["queue"]
    assert after["batches_run"] - before < len(bodies)  # some requests shared a batch
    assert after["in_flight"] == 0


def test_openai_client_talks_to_the_server(server):
    import openai

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    completion = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who won two Nobel Prizes?"},
        ],
        max_tokens=12,
        temperature=0.7,
        seed=3,
    )
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 12
    again = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who won two Nobel Prizes?"},
        ],
        max_tokens=12,
        temperature=0.7,
        seed=3,
    )
    assert again.choices[0].message.content == completion.choices[0].message.content  # seeded sampling
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6
        )


def test_clara_answer_returns_the_top_k_of_clara_jax_search(server, assets, capsys):
    url = f"{server['url']}/v1/clara/answer"

    def ask(question):
        return _post(url, json={"question": question, "k": 3, "max_tokens": 8})

    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        responses = list(pool.map(ask, QUESTIONS))
    code = cli_main(
        [
            "search",
            "--model",
            assets["model"],
            "--index",
            assets["index"],
            "-k",
            "3",
            "--json",
            "--question",
            *QUESTIONS,
        ]
    )
    assert code == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for question, response, want in zip(QUESTIONS, responses, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["question"] == question == want["question"] and isinstance(body["answer"], str)
        assert [d["rank"] for d in body["documents"]] == [1, 2, 3]
        assert [d["id"] for d in body["documents"]] == want["ids"]
        scores = [d["score"] for d in body["documents"]]
        np.testing.assert_allclose(scores, want["scores"], atol=1e-5)
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    post = lambda body: _post(url, json=body, timeout=30)
    _assert_error(post({"k": 2}), 400, param="question")
    _assert_error(post({"question": "x", "k": 0}), 400, param="k")
    _assert_error(post({"question": "x", "k": 61}), 400, param="k", says="between 1 and 60")
    _assert_error(post({"question": "x", "max_tokens": MAX_TOKENS + 1}), 400, param="max_tokens")


def test_every_route_but_health_needs_the_key(server):
    import openai

    base, chat = server["url"], f"{server['url']}/v1/chat/completions"
    bad_keys = [
        {},  # no header
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ]
    for headers in bad_keys:
        for response in (
            httpx.get(f"{base}/v1/models", headers=headers),
            httpx.get(f"{base}/v1/models/tiny", headers=headers),
            httpx.post(chat, json=_chat_body(), headers=headers),
            httpx.post(f"{base}/v1/clara/answer", json={"question": "q"}, headers=headers),
            httpx.get(f"{base}/v1/nothing", headers=headers),  # no hint of which routes exist
            httpx.get(f"{base}/openapi.json", headers=headers),
        ):
            _assert_error(response, 401, code="invalid_api_key")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert KEY not in response.text
    assert httpx.get(f"{base}/health").status_code == 200
    assert _get(f"{base}/v1/models/tiny").status_code == 200
    assert _get(f"{base}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    for path in ("/openapi.json", "/docs", "/redoc"):  # with the key: not served at all
        _assert_error(_get(f"{base}{path}"), 404)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert KEY not in server["log"].read_text()


def test_host_header_allow_list_defeats_dns_rebinding(server):
    port = server["url"].rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert _get(f"{server['url']}/v1/models", headers={"Host": host}).status_code == 200, host
    # what a browser sends after attacker.example has been re-pointed at 127.0.0.1
    for host in (f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost:x", "[::2]"):
        for path in ("/health", "/v1/models"):
            response = _get(f"{server['url']}{path}", headers={"Host": host})
            _assert_error(response, 400, code="invalid_host", says="--allowed-hosts")


def test_posts_must_declare_json(server):
    url = f"{server['url']}/v1/chat/completions"
    body = json.dumps({"model": "tiny"}).encode()  # parsed, it is a 400 for the missing messages
    before = httpx.get(f"{server['url']}/health").json()["queue"]["batches_run"]
    # a cross-site form or fetch() can send these without a CORS preflight: never parsed
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = _post(url, content=body, headers={"Content-Type": ctype})
        _assert_error(response, 415, code="unsupported_media_type", says="application/json")
    response = httpx.post(url, content=body, headers=AUTH)  # no Content-Type at all
    _assert_error(response, 415, code="unsupported_media_type")
    valid = json.dumps(_chat_body(max_tokens=4)).encode()
    _assert_error(_post(url, content=valid, headers={"Content-Type": "text/plain"}), 415)
    _assert_error(
        _post(f"{server['url']}/v1/clara/answer", content=b'{"question": "q"}', headers={"Content-Type": ""}),
        415,
    )
    assert httpx.get(f"{server['url']}/health").json()["queue"]["batches_run"] == before  # nothing ran
    for ctype in ("application/json; charset=utf-8", "Application/JSON"):
        response = _post(url, content=body, headers={"Content-Type": ctype})
        _assert_error(response, 400, param="messages")  # accepted and parsed


def test_payloads_that_used_to_crash_the_server_get_400(server, strict_server):
    chat, answer = f"{server['url']}/v1/chat/completions", f"{server['url']}/v1/clara/answer"
    huge = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}'
    _assert_error(_post(chat, content=huge % (b"7" * 5000)), 400, code="invalid_json", says="digits")
    _assert_error(_post(answer, content=b'{"question": "q", "k": 1%s}' % (b"0" * 4400)), 400, says="digits")
    # 100k nested brackets: on the strict server, whose body limit is the default 1 MiB
    strict_chat = f"{strict_server['url']}/v1/chat/completions"
    deep = b"[" * 100_000
    _assert_error(_post(strict_chat, content=deep), 400, code="invalid_json", says="nested too deeply")
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _assert_error(_post(strict_chat, content=deep), 400, code="invalid_json", says="nested too deeply")
    _assert_error(_post(chat, content=b"[" * 10_000), 400, code="invalid_json", says="nested too deeply")
    lone = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    _assert_error(_post(chat, content=lone), 400, param="messages[0].content", says="surrogate")
    raw = '{"model": "tiny", "messages": [{"role": "user", "content": "\udc00"}]}'.encode(
        "utf-8", "surrogatepass"
    )
    _assert_error(_post(chat, content=raw), 400, says="surrogate")  # the same as raw bytes
    _assert_error(_post(answer, content=b'{"question": "\\udfff?"}'), 400, param="question")
    _assert_error(_post(chat, content=b'{"model": "\\ud800"}'), 400, param="model")
    odd_role = {"model": "tiny", "messages": [{"role": [], "content": "hi"}]}
    _assert_error(_post(chat, json=odd_role), 400, param="messages[0].role")
    health = httpx.get(f"{server['url']}/health").json()
    assert health["status"] == "ok" and health["queue"]["admitted"] == 0
    for log in (server["log"], strict_server["log"]):
        assert "Traceback" not in log.read_text()


def test_a_flood_of_oversized_requests_is_refused_while_a_good_one_is_answered(server):
    """200 refused requests from 24 connections at once (under the 32 admitted): bodies over the
    byte limit (413 from the headers alone) and prompts over the character cap (400 before the
    tokenizer); meanwhile one well-formed request gets its answer."""
    url = f"{server['url']}/v1/chat/completions"
    over_bytes = json.dumps(_chat_body("x" * MAX_BYTES)).encode()
    over_chars = json.dumps(_chat_body("y" * (MAX_BYTES - 200))).encode()
    assert len(over_chars) < MAX_BYTES < len(over_bytes) and MAX_BYTES - 200 > 8 * TINY_CONTEXT
    started = threading.Event()
    statuses = []

    def flood(worker):
        with httpx.Client(headers={**AUTH, **JSON}, timeout=60) as client:
            for i in range(worker, 200, 24):
                response = client.post(url, content=over_bytes if i % 2 else over_chars)
                statuses.append(response.status_code)
                assert response.json()["error"]["code"] in ("request_too_large", "context_length_exceeded")
                started.set()

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        floods = [pool.submit(flood, w) for w in range(24)]
        assert started.wait(60)
        good = _post(url, json=_chat_body("What is the capital of France?", max_tokens=8))
        for f in floods:
            f.result(timeout=120)
    assert good.status_code == 200, good.text
    _assert_completion(good.json(), 8)
    assert sorted(set(statuses)) == [400, 413] and len(statuses) == 200
    assert time.monotonic() - t0 < 120
    queue = httpx.get(f"{server['url']}/health").json()["queue"]
    assert queue["admitted"] == 0 and queue["in_flight"] == 0


def test_a_request_past_its_deadline_gets_504_and_the_worker_moves_on(strict_server):
    url = f"{strict_server['url']}/v1/chat/completions"
    t0 = time.monotonic()
    # a cold server (template, tokenizer, then compiling the model) takes far longer than 0.5 s
    response = httpx.post(url, json=_chat_body(max_tokens=8), timeout=60)
    _assert_error(response, 504, code="request_timeout", says="0.5 s")
    assert response.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - t0 < 30
    # nothing stays stuck: a batch already on the device runs to its end, then all is idle
    deadline = time.monotonic() + 180
    while True:
        queue = httpx.get(f"{strict_server['url']}/health").json()["queue"]
        if queue["in_flight"] == queue["running"] == queue["queued"] == queue["admitted"] == 0:
            break
        assert time.monotonic() < deadline, queue
        time.sleep(0.1)
    _assert_error(httpx.post(url, content=b"{", headers=JSON), 400)  # and the server still answers


def test_allowed_hosts_flag_and_no_key_on_loopback(strict_server):
    url, port = strict_server["url"], strict_server["port"]
    for host in (f"clara.test:{port}", "api.corp.example", f"a.b.corp.example:{port}", f"localhost:{port}"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ("corp.example", "evil.test", f"clara.test.evil:{port}"):
        _assert_error(httpx.get(f"{url}/v1/models", headers={"Host": host}), 400, code="invalid_host")
    assert httpx.get(f"{url}/v1/models").status_code == 200  # loopback without --api-key-env: no key
    log = strict_server["log"].read_text()
    assert "authentication: none" in log and "clara.test, *.corp.example" in log


def test_a_non_loopback_address_without_a_key_is_refused(tmp_path):
    port = str(free_port())
    cmd = [sys.executable, "-m", "clara_jax.cli", "serve", "--model", "tiny", "--port", port]
    done = subprocess.run(
        [*cmd, "--host", "0.0.0.0"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not a loopback address" in done.stderr and "--api-key-env" in done.stderr
    assert "--insecure-no-auth" in done.stderr and "Traceback" not in done.stderr
    assert "loading" not in done.stdout  # refused before any model was loaded


def test_sigterm_lets_the_running_request_finish_and_exits_0(server):
    """Last test of the module: it stops the shared server."""
    proc, url = server["proc"], server["url"]
    result = {}
    # 48 new tokens: a shape not compiled yet, so the request is surely still running at SIGTERM
    body = _chat_body("A long answer please.", max_tokens=48)
    sender = threading.Thread(target=lambda: result.update(r=_post(f"{url}/v1/chat/completions", json=body)))
    sender.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").json()["queue"]["in_flight"] == 0:
        assert time.monotonic() < deadline and sender.is_alive(), "the request never showed up in flight"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    sender.join(timeout=60)
    assert result["r"].status_code == 200, result["r"].text
    _assert_completion(result["r"].json(), 48)
    log = server["log"].read_text()
    assert "Shutting down" in log and "clara-jax serve: stopped" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


# --------------------------------------------------------------------------------- in process


def _run(coro):
    return asyncio.run(coro)


def test_worker_groups_queued_requests_by_key_up_to_the_batch_size():
    release = threading.Event()
    batches = []

    def runner(payloads):
        release.wait(timeout=10)
        batches.append(payloads)
        return [p.upper() for p in payloads]

    async def scenario():
        worker = BatchingWorker({"echo": runner}, max_batch={"echo": 3}, max_pending=16, gather_seconds=0)
        await worker.start()
        first = asyncio.create_task(worker.submit("echo", "a", "x0"))
        while worker.stats()["running"] == 0:  # the first request occupies the model thread
            await asyncio.sleep(0.001)
        keys = ["a", "a", "b", "a", "a", "b", "a"]
        rest = [asyncio.create_task(worker.submit("echo", k, f"{k}{i}")) for i, k in enumerate(keys, start=1)]
        while worker.stats()["queued"] < len(keys):
            await asyncio.sleep(0.001)
        release.set()
        results = await asyncio.gather(first, *rest)
        await worker.stop()
        return results

    results = _run(scenario())
    assert results == ["X0", "A1", "A2", "B3", "A4", "A5", "B6", "A7"]  # each caller gets its own result
    # oldest first; same key together, at most 3; other keys wait their turn
    assert batches == [["x0"], ["a1", "a2", "a4"], ["b3", "b6"], ["a5", "a7"]]


def test_worker_refuses_when_full_fails_batches_together_and_drains_on_stop():
    release = threading.Event()

    def runner(payloads):
        release.wait(timeout=10)
        if "boom" in payloads:
            raise ValueError("bad payload")
        return payloads

    async def scenario():
        worker = BatchingWorker({"w": runner}, max_batch={"w": 8}, max_pending=3, gather_seconds=0)
        await worker.start()
        running = asyncio.create_task(worker.submit("w", 1, "ok"))
        while worker.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        queued = [asyncio.create_task(worker.submit("w", 2, p)) for p in ("boom", "fine")]
        while worker.stats()["queued"] < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(ServerBusy, match="3 requests are already in flight"):
            await worker.submit("w", 1, "one too many")
        release.set()
        assert await running == "ok"
        for task in queued:  # one bad payload fails its whole batch
            with pytest.raises(ValueError, match="bad payload"):
                await task
        release.clear()
        held = asyncio.create_task(worker.submit("w", 3, "held"))
        while worker.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        waiting = asyncio.create_task(worker.submit("w", 4, "waiting"))
        while worker.stats()["queued"] == 0:
            await asyncio.sleep(0.001)
        stopping = asyncio.create_task(worker.stop(drain_seconds=0))
        with pytest.raises(ShuttingDown):
            await waiting
        with pytest.raises(ShuttingDown):
            await held
        await stopping
        release.set()
        with pytest.raises(ShuttingDown):
            await worker.submit("w", 1, "late")

    _run(scenario())


class _FakeChatModel:
    """The ChatModel surface the app uses; replies are canned, calls can be held."""

    name, max_context, batch_size = "fake", 64, 4

    def __init__(self, reply="Hello world. STOP and more"):
        self.reply, self.release, self.calls, self.encoded = reply, threading.Event(), [], 0
        self.release.set()

    def encode(self, messages):
        self.encoded += 1  # how often the app rendered and tokenized a prompt
        return self._ids(messages)

    @staticmethod
    def _ids(messages):
        return [0] * sum(len(m["content"].split()) + 2 for m in messages)

    def chat(self, conversations, *, max_new_tokens, temperature, top_p, seed):
        self.release.wait(timeout=10)
        self.calls.append((conversations, max_new_tokens, temperature, top_p, seed))
        return [ChatResult(self.reply, len(self._ids(c)), 7, "length") for c in conversations]


def _app_client(model, raise_server_exceptions=True, **kw):
    from fastapi.testclient import TestClient

    app = create_app(model, max_concurrency=kw.pop("max_concurrency", 8), max_tokens=32, **kw)
    # "localhost": the default Host allow-list refuses TestClient's own "testserver"
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=raise_server_exceptions)


def _fake_body(content="hi", **kw):
    return {"model": "fake", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def _wait_for(predicate, what, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_stop_sequences_text_parts_and_the_context_limit():
    model = _FakeChatModel()
    with _app_client(model) as client:
        parts = [{"type": "text", "text": "one two"}, {"type": "text", "text": "three"}]
        body = {
            "model": "fake",
            "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": parts}],
        }
        r = client.post("/v1/chat/completions", json={**body, "stop": ["STOP", "more"], "max_tokens": 5})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == "Hello world. " and choice["finish_reason"] == "stop"
        [(conversations, limits, temperature, _, _)] = model.calls
        assert conversations == [
            [{"role": "system", "content": "sys"}, {"role": "user", "content": "one two\nthree"}]
        ]
        assert limits == [5] and temperature == 1.0  # OpenAI's default temperature
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 32})
        assert r.json()["choices"][0]["finish_reason"] == "length"
        long = {"model": "fake", "messages": [{"role": "user", "content": "w " * 40}], "max_tokens": 30}
        _assert_error(client.post("/v1/chat/completions", json=long), 400, code="context_length_exceeded")
        _assert_error(client.post("/v1/clara/answer", json={"question": "q"}), 404, says="no CLaRa model")
        assert len(model.calls) == 2  # refused requests never reached the model


def test_a_full_server_answers_429_with_retry_after():
    model = _FakeChatModel()
    model.release.clear()
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    with _app_client(model, max_concurrency=1) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/chat/completions", json=body)
            deadline = time.monotonic() + 10
            while client.get("/health").json()["queue"]["in_flight"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            busy = client.post("/v1/chat/completions", json=body)
            _assert_error(busy, 429, code="server_busy")
            assert busy.headers["retry-after"] == "1"
            model.release.set()
            assert first.result(timeout=10).status_code == 200


def test_requests_during_shutdown_get_503():
    model = _FakeChatModel()
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with _app_client(model) as client:
        assert client.get("/health").status_code == 200
        client.app.state.shutting_down = True  # what SIGTERM sets before uvicorn drains
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        _assert_error(client.post("/v1/chat/completions", json=body), 503, code="shutting_down")
        assert model.calls == []


def test_admission_comes_before_the_body_and_the_char_cap_before_the_tokenizer():
    model = _FakeChatModel()
    model.release.clear()
    with _app_client(model, max_concurrency=1, max_prompt_chars=100) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/chat/completions", json=_fake_body())
            _wait_for(lambda: client.get("/health").json()["queue"]["running"] == 1, "the first request")
            # the slot is taken: refused before this body is read (it is not even JSON)
            busy = client.post("/v1/chat/completions", content=b"{not json", headers=JSON)
            _assert_error(busy, 429, code="server_busy")
            assert busy.headers["retry-after"] == "1"
            # a header-only refusal (content type, declared length) needs no slot
            _assert_error(client.post("/v1/chat/completions", content=b"{}"), 415)
            model.release.set()
            assert first.result(timeout=10).status_code == 200
        encoded = model.encoded
        long = _fake_body("w " * 60)  # 120 characters
        _assert_error(client.post("/v1/chat/completions", json=long), 400, code="context_length_exceeded")
        assert model.encoded == encoded  # refused without rendering or tokenizing
        at_the_cap = _fake_body("w " * 50, max_tokens=5)  # 100 characters: tokenized, and it fits
        assert client.post("/v1/chat/completions", json=at_the_cap).status_code == 200
        assert model.encoded == encoded + 1
        assert client.get("/health").json()["queue"]["admitted"] == 0


def test_deadline_gives_504_drops_queued_work_and_leaves_the_worker_free():
    model = _FakeChatModel()
    model.release.clear()
    with _app_client(model, request_timeout=0.3) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/v1/chat/completions", json=_fake_body("a"))
            _wait_for(lambda: client.get("/health").json()["queue"]["running"] == 1, "the running batch")
            queued = client.post("/v1/chat/completions", json=_fake_body("b", temperature=0.5))
            _assert_error(queued, 504, code="request_timeout")
            _assert_error(running.result(timeout=10), 504, code="request_timeout")
        queue = client.get("/health").json()["queue"]
        assert queue["admitted"] == 0 and queue["in_flight"] == 0
        model.release.set()  # the batch on the "device" ends; the expired queued request never runs
        r = client.post("/v1/chat/completions", json=_fake_body("c"))
        assert r.status_code == 200, r.text
        assert [conv[0][0]["content"] for conv, *_ in model.calls] == ["a", "c"]


def test_bearer_key_in_process():
    model = _FakeChatModel()
    with _app_client(model, api_key="s3cret") as client:
        _assert_error(client.get("/v1/models"), 401, code="invalid_api_key", says="no API key")
        _assert_error(
            client.get("/v1/models", headers={"Authorization": "Bearer s3cre"}), 401, says="incorrect"
        )
        _assert_error(client.get("/v1/models", headers={"Authorization": "Token s3cret"}), 401, says="Bearer")
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
        # a key with non-ASCII bytes in the header is a wrong key, not a crash
        _assert_error(client.get("/v1/models", headers={"Authorization": b"Bearer s3cr\xe9t"}), 401)
    with pytest.raises(ValueError, match="empty"):
        _app_client(model, api_key="")


def test_unexpected_errors_are_500_in_openai_shape():
    model = _FakeChatModel()

    def broken(*args, **kwargs):
        raise RuntimeError("/secret/path/weights.safetensors is corrupt")

    model.chat = broken
    with _app_client(model, raise_server_exceptions=False) as client:
        response = client.post("/v1/chat/completions", json=_fake_body())
        _assert_error(response, 500, says="failed")
        assert response.json()["error"]["type"] == "server_error" and "secret" not in response.text
        assert client.get("/health").json()["queue"]["admitted"] == 0


def test_serve_access_rules(capsys):
    from clara_jax.cli.serve import _access, allowed_hosts, is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "LocalHost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.org", "localhost.evil", ""]))
    assert allowed_hosts("::1", ["a.example, B.example", "*.c.example"]) == [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "a.example",
        "b.example",
        "*.c.example",
    ]

    def args(host, key_env=None, insecure=False):
        return argparse.Namespace(
            host=host, api_key_env=key_env, insecure_no_auth=insecure, allowed_hosts=None
        )

    assert _access(args("127.0.0.1")) == (None, ["localhost", "127.0.0.1", "[::1]"])
    assert _access(args("0.0.0.0")) == 2
    assert _access(args("0.0.0.0", insecure=True)) == (None, ["localhost", "127.0.0.1", "[::1]", "0.0.0.0"])
    # the key comes from the environment; a name that is not set (or empty) is refused
    assert _access(args("127.0.0.1", key_env="CLARA_JAX_TEST_UNSET_KEY")) == 2
    assert "'CLARA_JAX_TEST_UNSET_KEY' is not set or empty" in capsys.readouterr().err
    os.environ["CLARA_JAX_TEST_ACCESS_KEY"] = "k3y"
    try:
        assert _access(args("10.1.2.3", key_env="CLARA_JAX_TEST_ACCESS_KEY"))[0] == "k3y"
    finally:
        del os.environ["CLARA_JAX_TEST_ACCESS_KEY"]


def test_no_json_body_gets_a_500():
    """Any JSON object in the chat body's fields is answered 200, 400 or 404, never 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    scalars |= st.sampled_from(["\ud800", "fake", "user", "text", ""])
    values = st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=8,
    )
    role = st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | values
    part = st.fixed_dictionaries({}, optional={"type": st.just("text") | values, "text": values})
    content = values | st.lists(part, max_size=2)
    message = st.fixed_dictionaries({}, optional={"role": role, "content": content}) | values
    fields = {
        "model": st.just("fake") | values,
        "messages": st.lists(message, max_size=3) | values,
        **dict.fromkeys(["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed"], values),
        **dict.fromkeys(["stop", "n", "stream"], values),
    }
    body = st.fixed_dictionaries({}, optional=fields)
    model = _FakeChatModel()
    with _app_client(model, raise_server_exceptions=False) as client:

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body)
        def check(obj):
            response = client.post("/v1/chat/completions", content=json.dumps(obj).encode(), headers=JSON)
            assert response.status_code in (200, 400, 404), (obj, response.text)
            assert set(response.json()) <= {"error", "id", "object", "created", "model", "choices", "usage"}

        check()
