"""`clara-jax serve`: a real server process spoken to over HTTP (httpx and the openai client),
plus in-process tests of the batching worker and the request handling with a fake model."""

import asyncio
import concurrent.futures
import json
import os
import signal
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


def _chat_body(content="Hello there", **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


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
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    with running_server(cmd, port, env, log_path, timeout=120) as (url, proc):
        yield dict(url=url, proc=proc, log=log_path)


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


def test_health_and_models(server):
    health = httpx.get(f"{server['url']}/health").json()
    assert health["status"] == "ok" and health["models"] == ["tiny"]
    assert health["clara"]["documents"] == 60 and health["queue"]["max_concurrency"] == 32
    assert "ready at " + server["url"] in server["log"].read_text()
    models = httpx.get(f"{server['url']}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_malformed_requests_get_4xx_with_a_message(server):
    url = f"{server['url']}/v1/chat/completions"
    post = lambda body: httpx.post(url, json=body, timeout=30)
    _assert_error(httpx.post(url, content=b"{not json"), 400, code="invalid_json", says="not valid JSON")
    _assert_error(httpx.post(url, content=b""), 400, code="invalid_json", says="empty")
    _assert_error(httpx.post(url, content=b"[1, 2]"), 400, says="expected a JSON object, got a JSON array")
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
    _assert_error(httpx.post(url, content=nan_top_p), 400, param="top_p", says="finite")
    _assert_error(post(_chat_body(stream=True)), 400, param="stream")
    _assert_error(post(_chat_body(n=2)), 400, param="n")
    _assert_error(post({**_chat_body(), "model": "gpt-9"}), 404, code="model_not_found", says="gpt-9")
    # the tiny model's context is 1024 tokens: a ~2000-token prompt cannot fit
    _assert_error(post(_chat_body("word " * 2000)), 400, code="context_length_exceeded")
    _assert_error(post(_chat_body("x" * MAX_BYTES)), 413, code="request_too_large")
    # the body limit also holds for a chunked upload that declares no length
    chunks = iter([b'{"model": "tiny", "messages": "', b"y" * MAX_BYTES, b'"}'])
    _assert_error(httpx.post(url, content=chunks), 413, code="request_too_large")
    _assert_error(httpx.get(f"{server['url']}/v1/nothing"), 404)


def test_concurrent_requests_are_all_answered_and_batched(server):
    url = f"{server['url']}/v1/chat/completions"
    bodies = [
        _chat_body(f"Question number {i}: how long is the river?" * (1 + i % 3), max_tokens=8)
        for i in range(8)
    ]
    alone = [httpx.post(url, json=b, timeout=120).json() for b in bodies]  # also compiles the shapes
    before = httpx.get(f"{server['url']}/health").json()["queue"]["batches_run"]
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return httpx.post(url, json=body, timeout=120)

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

    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="x", max_retries=0)
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
        return httpx.post(url, json={"question": question, "k": 3, "max_tokens": 8}, timeout=120)

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
    post = lambda body: httpx.post(url, json=body, timeout=30)
    _assert_error(post({"k": 2}), 400, param="question")
    _assert_error(post({"question": "x", "k": 0}), 400, param="k")
    _assert_error(post({"question": "x", "k": 61}), 400, param="k", says="between 1 and 60")
    _assert_error(post({"question": "x", "max_tokens": MAX_TOKENS + 1}), 400, param="max_tokens")


def test_sigterm_lets_the_running_request_finish_and_exits_0(server):
    """Last test of the module: it stops the shared server."""
    proc, url = server["proc"], server["url"]
    result = {}
    # 48 new tokens: a shape not compiled yet, so the request is surely still running at SIGTERM
    body = _chat_body("A long answer please.", max_tokens=48)
    sender = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120))
    )
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
        self.reply, self.release, self.calls = reply, threading.Event(), []
        self.release.set()

    def encode(self, messages):
        return [0] * sum(len(m["content"].split()) + 2 for m in messages)

    def chat(self, conversations, *, max_new_tokens, temperature, top_p, seed):
        self.release.wait(timeout=10)
        self.calls.append((conversations, max_new_tokens, temperature, top_p, seed))
        return [ChatResult(self.reply, len(self.encode(c)), 7, "length") for c in conversations]


def _app_client(model, **kw):
    from fastapi.testclient import TestClient

    return TestClient(create_app(model, max_concurrency=kw.pop("max_concurrency", 8), max_tokens=32, **kw))


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
