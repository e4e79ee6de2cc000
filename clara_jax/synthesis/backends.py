"""Where synthesis gets its completions: a local ChatModel, an OpenAI-compatible endpoint, or a script.

A `Backend` answers a batch of `Request`s with one `Completion` or one `BackendError` per request,
in order, and never raises for a single bad request: the pipeline counts failures per document
instead of crashing. The local backend sends the whole batch through `ChatModel.chat` (one jitted,
padded batch per group of equal settings); the remote one runs requests concurrently with bounded
retries; the scripted one replays fixed replies for tests.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

# Reasons a BackendError carries; TRANSIENT ones are retried when a run is resumed.
BACKEND_ERROR = "backend_error"
PROMPT_TOO_LONG = "prompt_too_long"
REQUEST_REJECTED = "request_rejected"
TRANSIENT = frozenset({BACKEND_ERROR})


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    step: str = ""  # which pipeline step asks (prompts.STEPS); scripted backends match on it
    attempt: int = 0  # 0 for the first try, then 1, 2, ... for retries after a parse failure


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BackendError(Exception):
    """A request the backend could not complete (after its own retries); `reason` is counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class Backend(Protocol):
    name: str

    def complete(self, requests: list[Request]) -> list[Completion | BackendError]: ...

    def close(self) -> None: ...


# -------------------------------------------------------------------------------------------- local


class LocalBackend:
    """A `clara_jax.inference.chat.ChatModel` in this process (batched, jitted, data parallel)."""

    def __init__(self, chat_model):
        self.model = chat_model
        self.name = f"local:{chat_model.name}"

    def __repr__(self) -> str:
        return f"LocalBackend({self.model.name!r}, batch_size={self.model.batch_size})"

    def complete(self, requests: list[Request]) -> list[Completion | BackendError]:
        results: list[Completion | BackendError | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                n_prompt = self.model.count_tokens(req.messages)
            except Exception as err:  # malformed messages are the pipeline's bug, but never crash a run
                results[i] = BackendError(BACKEND_ERROR, f"{type(err).__name__}: {err}")
                continue
            budget = min(req.max_new_tokens, self.model.max_context - n_prompt)
            if budget < min(16, req.max_new_tokens):
                results[i] = BackendError(
                    PROMPT_TOO_LONG,
                    f"{n_prompt} prompt tokens leave {max(budget, 0)} of the model's {self.model.max_context}",
                )
                continue
            temperature = float(req.temperature)
            groups.setdefault((budget, temperature, req.seed if temperature > 0 else 0), []).append(i)
        for (budget, temperature, seed), members in groups.items():
            try:
                outs = self.model.chat(
                    [requests[i].messages for i in members],
                    max_new_tokens=budget,
                    temperature=temperature,
                    seed=seed,
                )
            except Exception as err:
                log.warning("local generation failed for %d requests: %s", len(members), err)
                for i in members:
                    results[i] = BackendError(BACKEND_ERROR, f"{type(err).__name__}: {err}")
                continue
            for i, out in zip(members, outs):
                results[i] = Completion(out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- remote


def sends_in_clear(url: str) -> bool:
    """Whether a request to `url` crosses a network unencrypted (plain http to a non-loopback host)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return True


# What reading a hostile reply body can raise: bad JSON or UTF-8 (ValueError), a missing or mistyped
# field (KeyError, IndexError, TypeError, AttributeError), int(1e400) (OverflowError), deep nesting.
_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError, RecursionError)


class _Abandoned(Exception):
    """An attempt this client gave up on (over its deadline or its size cap), not the network."""

    def __init__(self, detail: str, *, retry: bool):
        super().__init__(detail)
        self.detail, self.retry = detail, retry


def normalise_base_url(url: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1`; a URL that already has a path is kept as given."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--base-url: expected http(s)://host[:port][/path], got {url!r}")
    url = url.rstrip("/")
    return url + "/v1" if parts.path in ("", "/") else url


class RemoteBackend:
    """Any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp server, `clara-jax serve`).

    At most `concurrency` requests are in flight; each is retried up to `retries` times on timeouts,
    connection and protocol errors, 429 and 5xx, waiting `backoff · 2^attempt` seconds with ±50 %
    jitter (or the server's Retry-After, capped at `max_backoff`). The API key is read from the
    environment variable named `api_key_env` and never appears in a repr, log line, error message or
    report; sending it over plain http to another host is warned about.

    `timeout` bounds each attempt as a whole, not only each phase as httpx's timeouts do: a server
    that trickles its reply is cut off at the first chunk after the deadline (a silent one by httpx's
    per-phase timeout of the same length). A reply over `max_response_bytes` (after decompression)
    is refused as soon as it is that long.
    """

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        seed: int = 0,
        sleep: Callable[[float], None] = time.sleep,
        max_response_bytes: int = 4 << 20,
    ):
        import httpx

        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base_url = normalise_base_url(base_url)
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise ValueError(f"--api-key-env: environment variable {api_key_env!r} is not set or empty")
            if sends_in_clear(self.base_url):
                log.warning(
                    "the API key from $%s is sent over plain http to %s: anyone on the network path can "
                    "read it; use https (or a loopback address)",
                    api_key_env,
                    self.base_url,
                )
        self.max_response_bytes = max_response_bytes
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff, self._sleep = backoff, max_backoff, sleep
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.Client(
            timeout=timeout,
            headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="synth-http")
        self.stats = {"http_requests": 0, "http_retries": 0}
        self.model = model or self._first_model()
        self.name = f"remote:{self.model}"

    def __repr__(self) -> str:
        key = "***" if self._key else None
        return f"RemoteBackend({self.base_url!r}, model={self.model!r}, api_key={key!r}, concurrency={self.concurrency})"

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _exchange(self, method: str, url: str, **kw) -> tuple[int, str | None, bytes]:
        """One HTTP exchange within the deadline and the size cap: (status, Retry-After, body).
        Raises httpx.HTTPError from the network and `_Abandoned` from the caps."""
        deadline = time.monotonic() + self.timeout
        with self._client.stream(method, url, **kw) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise _Abandoned(self._too_large(f"{int(declared):,}"), retry=False)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > self.max_response_bytes:
                    raise _Abandoned(self._too_large(f"over {self.max_response_bytes:,}"), retry=False)
                if time.monotonic() > deadline:
                    raise _Abandoned(f"no complete reply within the {self.timeout:g} s deadline", retry=True)
            return response.status_code, response.headers.get("retry-after"), bytes(body)

    def _too_large(self, size: str) -> str:
        return f"a reply of {size} bytes; the limit is {self.max_response_bytes:,} (max_response_bytes)"

    def _first_model(self) -> str:
        try:
            status, _, body = self._exchange("GET", f"{self.base_url}/models")
            if status != 200:
                raise ValueError(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
            data = json.loads(body)["data"]
            return str(data[0]["id"])
        except Exception as err:
            raise BackendError(
                BACKEND_ERROR,
                self.redact(
                    f"{self.base_url}/models: cannot list models ({type(err).__name__}: {err}); pass --remote-model"
                ),
            ) from None

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        with self._lock:
            jitter = 0.5 + self._random.random()
        return min(self.max_backoff, self.backoff * 2**attempt) * jitter

    def _one(self, req: Request) -> Completion | BackendError:
        import httpx

        body = {
            "model": self.model,
            "messages": req.messages,
            "max_tokens": req.max_new_tokens,
            "temperature": req.temperature,
            "seed": req.seed,
        }
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            with self._lock:
                self.stats["http_requests"] += 1
                if attempt:
                    self.stats["http_retries"] += 1
            try:
                status, retry_after, reply = self._exchange(
                    "POST", f"{self.base_url}/chat/completions", json=body
                )
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
            except httpx.HTTPError as err:  # transport, protocol and decoding errors alike
                last = f"{type(err).__name__}: {err}"
            except _Abandoned as err:
                if not err.retry:
                    return BackendError(BACKEND_ERROR, self.redact(err.detail))
                last = err.detail
            else:
                if status == 200:
                    return self._completion(reply)
                last = f"HTTP {status}: {reply[:200].decode('utf-8', 'replace')}"
                if status not in self.RETRY_STATUS:
                    return BackendError(REQUEST_REJECTED, self.redact(last))
            if attempt < self.retries:
                wait = self._delay(attempt, retry_after)
                log.info(
                    "%s (attempt %d of %d); retrying in %.1f s",
                    self.redact(last),
                    attempt + 1,
                    self.retries + 1,
                    wait,
                )
                self._sleep(wait)
        return BackendError(BACKEND_ERROR, self.redact(f"{last} (after {self.retries + 1} attempts)"))

    def _completion(self, reply: bytes) -> Completion | BackendError:
        try:
            data = json.loads(reply)
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}, not a string")
            text.encode("utf-8")  # a lone surrogate would only fail later, when the record is written
            usage = data.get("usage") or {}
            return Completion(
                text=text,
                finish_reason=str(choice.get("finish_reason") or "stop"),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        except _MALFORMED as err:
            detail = f"malformed response ({type(err).__name__}: {str(err)[:200]!r}): {reply[:200]!r}"
            return BackendError(BACKEND_ERROR, self.redact(detail))

    def complete(self, requests: list[Request]) -> list[Completion | BackendError]:
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()


# ----------------------------------------------------------------------------------------- scripted


@dataclass
class ScriptRule:
    """Reply `reply` (or `replies[attempt]`) to requests of `step` whose last message contains `contains`."""

    reply: str | None = None
    replies: list[str] = field(default_factory=list)
    step: str | None = None
    contains: str | None = None
    error: str | None = None  # raise a BackendError with this reason instead of replying
    finish_reason: str = "stop"

    def matches(self, req: Request) -> bool:
        if self.step is not None and self.step != req.step:
            return False
        return self.contains is None or self.contains in req.messages[-1]["content"]

    def answer(self, req: Request) -> Completion | BackendError:
        if self.error:
            return BackendError(self.error, "scripted failure")
        text = self.replies[min(req.attempt, len(self.replies) - 1)] if self.replies else self.reply or ""
        return Completion(
            text, self.finish_reason, prompt_tokens=len(req.messages), completion_tokens=len(text.split())
        )


class ScriptedBackend:
    """Replies from a function or from rules (first match wins): tests of every path, no model.

    `delay` seconds are slept per batch (a slow backend for kill-and-resume tests)."""

    def __init__(
        self,
        respond: Callable[[Request], str | Completion | BackendError] | list[ScriptRule],
        *,
        delay: float = 0.0,
    ):
        self.name = "scripted"
        self.delay = delay
        self.calls: list[Request] = []
        if callable(respond):
            self._respond = respond
        else:
            rules = list(respond)

            def by_rules(req: Request) -> Completion | BackendError:
                for rule in rules:
                    if rule.matches(req):
                        return rule.answer(req)
                return BackendError(REQUEST_REJECTED, f"no scripted reply for step {req.step!r}")

            self._respond = by_rules

    @classmethod
    def from_file(cls, path: str) -> ScriptedBackend:
        """A JSON file `{"delay": seconds, "rules": [{"step", "contains", "reply" | "replies" | "error"}]}`."""
        with open(path) as f:
            spec = json.load(f)
        known = set(ScriptRule.__dataclass_fields__)
        rules = []
        for i, rule in enumerate(spec.get("rules", [])):
            unknown = set(rule) - known
            if unknown:
                raise ValueError(
                    f"{path}: rules[{i}]: unknown keys {sorted(unknown)}; expected some of {sorted(known)}"
                )
            rules.append(ScriptRule(**rule))
        return cls(rules, delay=float(spec.get("delay", 0.0)))

    def complete(self, requests: list[Request]) -> list[Completion | BackendError]:
        if self.delay:
            time.sleep(self.delay)
        out = []
        for req in requests:
            self.calls.append(req)
            try:
                reply = self._respond(req)
            except BackendError as err:
                reply = err
            except Exception as err:  # a scripted function that raises stands for a crashing backend
                reply = BackendError(BACKEND_ERROR, f"{type(err).__name__}: {err}")
            out.append(Completion(reply) if isinstance(reply, str) else reply)
        return out

    def close(self) -> None:
        pass


def describe(backend) -> str:
    """A log-safe one-line description (never contains an API key)."""
    return re.sub(r"api_key='[^']*'", "api_key='***'", repr(backend))
