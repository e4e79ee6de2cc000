"""The HTTP application: OpenAI-compatible chat completions and a CLaRa answer endpoint.

    GET  /health                 status, model names, queue counters (503 while shutting down)
    GET  /v1/models              the chat model, OpenAI's list format (and /v1/models/{id})
    POST /v1/chat/completions    OpenAI schema, n=1, stream=false
    POST /v1/clara/answer        {question, k?, max_tokens?} -> {answer, documents: [{id, score}]}

Every error is an OpenAI-style body {"error": {message, type, param, code}}. A request passes, in
this order, checks that cost nothing before the ones that cost work:

1. the Host header is on the allow-list (400; defeats DNS rebinding against a local server);
2. the bearer key, when the server has one (401; every route but /health);
3. Content-Type: application/json and a declared Content-Length within the limit (415, 413);
4. admission: at most `max_concurrency` requests past this point (429) - before the body is read;
5. then, under the request's deadline (504): the body (413 while streaming), JSON and field
   checks (400), a character cap on the prompt, and only then the chat template and tokenizer
   (400 for a prompt beyond the context), and the model, through one BatchingWorker that groups
   concurrent requests into the model's fixed batch and runs them off the event loop.
Anything unexpected is a 500 in the same shape, never a plain-text traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from clara_jax.data.pipeline import bucket_length
from clara_jax.inference.chat import NEW_TOKEN_BUCKET, ChatModel
from clara_jax.serving import LOOPBACK_HOSTS
from clara_jax.serving.batching import BatchingWorker, ServerBusy, ShuttingDown
from clara_jax.serving.clara_backend import ClaraBackend
from clara_jax.serving.validation import (
    ChatRequest,
    RequestError,
    parse_answer_request,
    parse_chat_request,
    parse_json_object,
)

DEFAULT_ANSWER_TOKENS = 64
DEFAULT_REQUEST_TIMEOUT = 300.0
# Without --max-prompt-chars, a prompt may have 8 characters per token of the model's context
# (English averages about 4); more cannot fit, so it is refused before the tokenizer runs.
CHARS_PER_CONTEXT_TOKEN = 8
OPEN_PATHS = frozenset({"/health"})  # the only route that needs no key


def _error_response(exc: RequestError, headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if exc.status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)


def _host_name(value: str | None) -> str | None:
    """The host part of a Host header (IPv6 literals keep their brackets), lower-cased; None if malformed."""
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[: end + 1], value[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    else:
        host, colon, port = value.partition(":")
        if not host or (colon and not port.isdigit()):
            return None
    return host.lower()


class HostAllowList(TrustedHostMiddleware):
    """starlette's TrustedHostMiddleware, refusing in OpenAI's error shape; the parent's own check
    still runs after this one (and answers in plain text should the two ever disagree)."""

    def __init__(self, app, allowed_hosts: Sequence[str]):
        super().__init__(app, allowed_hosts=list(allowed_hosts), www_redirect=False)

    def _allowed(self, host: str) -> bool:
        return any(host == p or (p.startswith("*") and host.endswith(p[1:])) for p in self.allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allow_any:
            raw = Headers(scope=scope).get("host")
            host = _host_name(raw)
            if host is None or not self._allowed(host):
                shown = "no Host header" if raw is None else f"the Host {raw[:100]!r}"
                message = (
                    f"{shown} is not one this server answers to; add it with --allowed-hosts "
                    "if clients reach the server under that name"
                )
                await _error_response(RequestError(400, message, code="invalid_host"))(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class BearerAuth:
    """`Authorization: Bearer <key>` on every path but /health, compared in constant time; 401
    otherwise. The key lives only in this object: it is never logged or echoed."""

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("the API key is empty")
        self.app, self._key = app, key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        scheme, _, token = (header or "").strip().partition(" ")
        if header is None or scheme.lower() != "bearer" or not token.strip():
            message = (
                "no API key was provided; send it as an 'Authorization: Bearer <key>' header"
                if header is None
                else "the Authorization header is not 'Bearer <key>'"
            )
        elif secrets.compare_digest(token.strip().encode("latin-1"), self._key):
            await self.app(scope, receive, send)
            return
        else:
            message = "incorrect API key provided"
        error = RequestError(401, message, code="invalid_api_key")
        headers = {"WWW-Authenticate": 'Bearer realm="clara-jax"'}
        await _error_response(error, headers)(scope, receive, send)


class Admission:
    """At most `limit` requests past the door at once: the next one gets 429 at once, before its
    body is read, its JSON parsed or its prompt tokenized. One event loop: no lock needed."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    @contextlib.contextmanager
    def slot(self):
        if self.count >= self.limit:
            raise RequestError(
                429,
                f"the server is busy: {self.count} requests are already in flight (the limit is "
                f"{self.limit}); retry later",
                type="rate_limit_error",
                code="server_busy",
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


@contextlib.asynccontextmanager
async def deadline(seconds: float):
    """Raise a 504 RequestError if the block takes longer than `seconds`. What the block awaits is
    cancelled: a request still queued for the model is dropped from the queue; a batch already on
    the device runs to its end (it cannot be interrupted) and its result for this request is dropped."""
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            yield
    except TimeoutError:
        if not scope.expired():
            raise
        raise RequestError(
            504,
            f"the request did not finish within the server's deadline of {seconds:g} s; "
            "retry later or ask for fewer tokens",
            type="timeout_error",
            code="request_timeout",
        ) from None


def _require_json(request: Request, limit: int) -> None:
    """Header checks that cost nothing: JSON content type, and a declared length within `limit`.
    Without the first, a browser page could POST here cross-site (text/plain needs no preflight)."""
    ctype = request.headers.get("content-type")
    if ctype is None or ctype.split(";", 1)[0].strip().lower() != "application/json":
        shown = "no Content-Type" if ctype is None else f"Content-Type {ctype[:80]!r}"
        raise RequestError(
            415,
            f"expected a JSON body with 'Content-Type: application/json', got {shown}",
            code="unsupported_media_type",
        )
    _check_declared_length(request, limit)


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise RequestError(400, f"invalid Content-Length header {declared[:40]!r}")
        if int(declared) > limit:
            raise _too_large(limit)


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (declared or streamed)."""
    _check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut the text before the earliest stop sequence; True when one was found."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _chat_key(req: ChatRequest) -> tuple:
    """What requests in one batch must share: sampling settings and the new-token bucket."""
    sampled = req.temperature > 0
    return (
        req.temperature,
        req.top_p if sampled else 1.0,
        req.seed if sampled else None,
        bucket_length(req.max_tokens, NEW_TOKEN_BUCKET),
    )


def _run_chat(model: ChatModel, requests: list[ChatRequest]):
    first = requests[0]
    seed = first.seed if first.seed is not None else secrets.randbits(31)
    return model.chat(
        [r.messages for r in requests],
        max_new_tokens=[r.max_tokens for r in requests],
        temperature=first.temperature,
        top_p=first.top_p,
        seed=seed,
    )


def _count_prompt(model: ChatModel, messages: list[dict]) -> int:
    from jinja2.exceptions import TemplateError

    try:
        return len(model.encode(messages))
    except TemplateError as exc:  # e.g. roles that do not alternate, for a Mistral template
        raise RequestError(
            400, f"'messages' do not fit the model's chat template: {exc}", param="messages"
        ) from None


def _check_chars(n_chars: int, limit: int, param: str) -> None:
    if n_chars > limit:
        raise RequestError(
            400,
            f"'{param}' has {n_chars} characters, more than this server's limit of {limit} "
            "(--max-prompt-chars); shorten it",
            param=param,
            code="context_length_exceeded",
        )


async def _submit(worker: BatchingWorker, kind: str, key, payload):
    try:
        return await worker.submit(kind, key, payload)
    except ServerBusy as exc:
        raise RequestError(
            429, f"the server is busy: {exc}; retry later", type="rate_limit_error", code="server_busy"
        ) from None
    except ShuttingDown as exc:
        raise RequestError(503, str(exc), type="service_unavailable", code="shutting_down") from None
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None


def create_app(
    chat_model: ChatModel | None = None,
    clara: ClaraBackend | None = None,
    *,
    max_concurrency: int = 64,
    max_request_bytes: int = 1 << 20,
    max_tokens: int = 512,
    default_max_tokens: int | None = None,
    drain_seconds: float = 5.0,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_prompt_chars: int | None = None,
) -> FastAPI:
    """The FastAPI app for a chat model, a CLaRa backend, or both.

    max_concurrency bounds requests in flight (admitted before their body is read; more get 429),
    max_request_bytes the body size (413), max_tokens the new tokens a request may ask for (400
    beyond), request_timeout each request's time from admission to answer (504 beyond).
    api_key: require `Authorization: Bearer <api_key>` on every route but /health (None: no key).
    allowed_hosts: Host header names accepted ("*.example.com" patterns; "*" accepts any).
    max_prompt_chars: the most characters a chat prompt (all message contents) or a CLaRa
    question may have, checked before the tokenizer runs (None: 8 per token of the model's context).
    """
    if chat_model is None and clara is None:
        raise ValueError("create_app needs a chat model, a CLaRa backend, or both")
    if max_tokens < 1 or max_request_bytes < 1 or max_concurrency < 1:
        raise ValueError(
            "max_tokens, max_request_bytes and max_concurrency must be >= 1, got "
            f"{max_tokens}, {max_request_bytes}, {max_concurrency}"
        )
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty; pass None for a server without a key")
    if max_prompt_chars is not None and max_prompt_chars < 1:
        raise ValueError(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
    default_max_tokens = min(default_max_tokens or max_tokens, max_tokens)
    runners, max_batch = {}, {}
    chat_chars = clara_chars = max_prompt_chars
    if chat_model is not None:
        runners["chat"] = lambda requests: _run_chat(chat_model, requests)
        max_batch["chat"] = chat_model.batch_size
        chat_chars = max_prompt_chars or CHARS_PER_CONTEXT_TOKEN * chat_model.max_context
    if clara is not None:
        runners["clara"] = lambda requests: clara.answer(
            [r.question for r in requests], k=requests[0].k, max_new_tokens=requests[0].max_tokens
        )
        max_batch["clara"] = clara.inference.batch_size
        clara_chars = max_prompt_chars or CHARS_PER_CONTEXT_TOKEN * clara.max_context
    worker = BatchingWorker(runners, max_batch=max_batch, max_pending=max_concurrency)
    admission = Admission(max_concurrency)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await worker.start()
        yield
        app.state.shutting_down = True
        await worker.stop(drain_seconds)

    # No /docs, /redoc or /openapi.json: the schema is OpenAI's, and the server lists nothing else.
    app = FastAPI(title="clara-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.admission = admission
    app.state.shutting_down = False
    # Added last = runs first: the Host check, then the key, then the routes.
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(HostAllowList, allowed_hosts=allowed_hosts)

    def check_open():
        if app.state.shutting_down:
            raise RequestError(
                503, "the server is shutting down", type="service_unavailable", code="shutting_down"
            )

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
        return _error_response(RequestError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        # starlette logs the traceback after this; the client learns nothing of the internals
        return _error_response(
            RequestError(500, "the server failed to answer this request", type="server_error", code=None)
        )

    @app.get("/health")
    async def health():
        body = {
            "status": "shutting_down" if app.state.shutting_down else "ok",
            "models": [chat_model.name] if chat_model is not None else [],
            "clara": None
            if clara is None
            else {"model": clara.name, "index": clara.index_name, "documents": clara.n_documents},
            "queue": {"admitted": admission.count, **worker.stats()},
        }
        return JSONResponse(body, status_code=503 if app.state.shutting_down else 200)

    def model_card(model: ChatModel) -> dict:
        return {"id": model.name, "object": "model", "created": started, "owned_by": "clara-jax"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(chat_model)] if chat_model is not None else []}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if chat_model is None or model_id != chat_model.name:
            raise RequestError(
                404,
                f"the model '{model_id[:200]}' does not exist here",
                param="model",
                code="model_not_found",
            )
        return model_card(chat_model)

    async def admitted(request: Request, handle):
        """The cheap header checks, then a slot, then `handle(body)` under the request's deadline."""
        check_open()
        _require_json(request, max_request_bytes)
        with admission.slot():
            async with deadline(request_timeout):
                return await handle(await read_body(request, max_request_bytes))

    async def chat(body: bytes):
        obj = parse_json_object(body)
        if chat_model is None:
            raise RequestError(
                404, "this server has no chat model (start it with --model)", code="model_not_found"
            )
        req = parse_chat_request(
            obj, model_names=[chat_model.name], max_tokens=max_tokens, default_max_tokens=default_max_tokens
        )
        _check_chars(sum(len(m["content"]) for m in req.messages), chat_chars, "messages")
        prompt_tokens = await run_in_threadpool(_count_prompt, chat_model, req.messages)
        if prompt_tokens + req.max_tokens > chat_model.max_context:
            raise RequestError(
                400,
                f"the prompt has {prompt_tokens} tokens and max_tokens is {req.max_tokens}: together more "
                f"than the model's context of {chat_model.max_context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        result = await _submit(worker, "chat", _chat_key(req), req)
        text, stopped = apply_stop(result.text, req.stop)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat_model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if stopped else result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }

    async def answer(body: bytes):
        obj = parse_json_object(body)
        if clara is None:
            raise RequestError(
                404, "this server has no CLaRa model (start it with --clara-model and --index)"
            )
        req = parse_answer_request(
            obj,
            n_documents=clara.n_documents,
            default_k=clara.default_k,
            max_tokens=max_tokens,
            default_max_tokens=min(DEFAULT_ANSWER_TOKENS, max_tokens),
        )
        _check_chars(len(req.question), clara_chars, "question")
        result = await _submit(worker, "clara", (req.k, req.max_tokens), req)
        return {
            "id": f"clara-{uuid.uuid4().hex}",
            "object": "clara.answer",
            "created": int(time.time()),
            "model": clara.name,
            "question": req.question,
            "answer": result.answer,
            "documents": [
                {"rank": r, "id": doc_id, "score": score}
                for r, (doc_id, score) in enumerate(zip(result.ids, result.scores), start=1)
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await admitted(request, chat)

    @app.post("/v1/clara/answer")
    async def clara_answer(request: Request):
        return await admitted(request, answer)

    return app
