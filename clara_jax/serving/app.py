"""The HTTP application: OpenAI-compatible chat completions and a CLaRa answer endpoint.

    GET  /health                 status, model ids, queue counters (503 while shutting down)
    GET  /v1/models              the chat model, OpenAI's list format (and /v1/models/{id})
    POST /v1/chat/completions    OpenAI schema, n=1, stream=false
    POST /v1/clara/answer        {question, k?, max_tokens?} -> {answer, documents: [{id, score}]}

Every request is validated before it is queued (errors are OpenAI-style bodies with 400, 404,
413, 429 or 503), then handed to one BatchingWorker that groups concurrent requests into the
model's fixed batch and runs them off the event loop.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clara_jax.data.pipeline import bucket_length
from clara_jax.inference.chat import NEW_TOKEN_BUCKET, ChatModel
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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = RequestError(
        413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large"
    )
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
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


def _error_response(exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(
    chat_model: ChatModel | None = None,
    clara: ClaraBackend | None = None,
    *,
    max_concurrency: int = 64,
    max_request_bytes: int = 1 << 20,
    max_tokens: int = 512,
    default_max_tokens: int | None = None,
    drain_seconds: float = 5.0,
) -> FastAPI:
    """The FastAPI app for a chat model, a CLaRa backend, or both.

    max_concurrency bounds requests in flight (queued + running; more get 429), max_request_bytes
    the body size (413), max_tokens the new tokens a request may ask for (400 beyond).
    """
    if chat_model is None and clara is None:
        raise ValueError("create_app needs a chat model, a CLaRa backend, or both")
    if max_tokens < 1 or max_request_bytes < 1:
        raise ValueError(
            f"max_tokens and max_request_bytes must be >= 1, got {max_tokens}, {max_request_bytes}"
        )
    default_max_tokens = min(default_max_tokens or max_tokens, max_tokens)
    runners, max_batch = {}, {}
    if chat_model is not None:
        runners["chat"] = lambda requests: _run_chat(chat_model, requests)
        max_batch["chat"] = chat_model.batch_size
    if clara is not None:
        runners["clara"] = lambda requests: clara.answer(
            [r.question for r in requests], k=requests[0].k, max_new_tokens=requests[0].max_tokens
        )
        max_batch["clara"] = clara.inference.batch_size
    worker = BatchingWorker(runners, max_batch=max_batch, max_pending=max_concurrency)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await worker.start()
        yield
        app.state.shutting_down = True
        await worker.stop(drain_seconds)

    app = FastAPI(title="clara-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.shutting_down = False

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
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(RequestError(exc.status_code, message))

    @app.get("/health")
    async def health():
        body = {
            "status": "shutting_down" if app.state.shutting_down else "ok",
            "models": [chat_model.name] if chat_model is not None else [],
            "clara": None
            if clara is None
            else {"model": clara.name, "index": clara.index_dir, "documents": clara.n_documents},
            "queue": worker.stats(),
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
                404, f"the model '{model_id}' does not exist here", param="model", code="model_not_found"
            )
        return model_card(chat_model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_open()
        obj = parse_json_object(await read_body(request, max_request_bytes))
        if chat_model is None:
            raise RequestError(
                404, "this server has no chat model (start it with --model)", code="model_not_found"
            )
        req = parse_chat_request(
            obj, model_names=[chat_model.name], max_tokens=max_tokens, default_max_tokens=default_max_tokens
        )
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

    @app.post("/v1/clara/answer")
    async def clara_answer(request: Request):
        check_open()
        obj = parse_json_object(await read_body(request, max_request_bytes))
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

    return app
