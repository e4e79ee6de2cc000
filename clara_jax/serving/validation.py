"""Request bodies of the server, checked field by field with OpenAI-style errors.

Why by hand and not with pydantic models: every refusal must say which field was wrong and what
was expected, with the status code and error body OpenAI clients understand (400 for a bad value,
404 for an unknown model, 413 for a body over the limit), and unknown extra fields (sent by many
clients) must be ignored rather than rejected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence

# System-like roles: "developer" is what newer OpenAI clients send instead of "system".
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_SEQUENCES = 4
MAX_TOP_K = 100
_JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class RequestError(Exception):
    """A refused request: HTTP status plus OpenAI's {message, type, param, code}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object, or a 400 saying why not.

    Also refused with 400, where json.loads alone would raise something else: an integer over
    Python's digit limit (4,300), nesting deeper than the interpreter's recursion limit, and any
    string holding a lone UTF-16 surrogate ("\\ud800"), which no tokenizer or UTF-8 encoder accepts.
    """
    if not body.strip():
        raise RequestError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise _not_json(reason) from None
    except UnicodeDecodeError:
        raise _not_json("not UTF-8") from None
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        digits = sys.get_int_max_str_digits()
        reason = f"a number has more than {digits} digits" if "digits" in str(exc) else "a bad value"
        raise _not_json(reason) from None
    except RecursionError:
        raise _not_json("nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"expected a JSON object, got a JSON {_kind(obj)}", code="invalid_json")
    _check_strings(obj)
    return obj


def _not_json(reason: str) -> RequestError:
    return RequestError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")


def _kind(value) -> str:
    return "object" if isinstance(value, dict) else _JSON_KINDS.get(type(value), type(value).__name__)


def _brief(value) -> str:
    """A short rendering of a JSON value for an error message (never the whole of a large one)."""
    if isinstance(value, dict | list):
        return f"a JSON {_kind(value)}"
    if isinstance(value, str):
        return json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from the JSON escape "\\ud800"
        return False
    return True


def _check_strings(obj) -> None:
    """Refuse a lone surrogate in any key or string value, naming where. No recursion (any depth
    json.loads accepted is fine), and a path is only spelled out for the error."""
    stack = [(obj, None)]
    while stack:
        value, path = stack.pop()
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and not _is_text(key):
                raise _surrogate((path, key))
            if isinstance(item, str):
                if not _is_text(item):
                    raise _surrogate((path, key))
            elif isinstance(item, dict | list):
                stack.append((item, (path, key)))


def _surrogate(path) -> RequestError:
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    where = "".join(reversed(parts)).lstrip(".")
    where = where.encode("utf-8", "backslashreplace").decode("ascii", "replace")[:100]
    return RequestError(
        400,
        f"'{where}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send valid Unicode",
        param=where,
        code="invalid_json",
    )


def _required(obj: dict, field: str):
    if obj.get(field) is None:
        raise RequestError(400, f"missing required field '{field}'", param=field, code="missing_field")
    return obj[field]


def _integer(obj: dict, field: str, default: int | None, low: int, high: int) -> int | None:
    value = obj.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{field}' must be an integer, got {_brief(value)}", param=field)
    if not low <= value <= high:
        raise RequestError(
            400,
            f"'{field}' must be between {low} and {high}, got {_brief(value)}",
            param=field,
            code="invalid_value",
        )
    return value


def _number(obj: dict, field: str, default: float, low: float, high: float, *, open_low=False) -> float:
    value = obj.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(400, f"'{field}' must be a finite number, got {_brief(value)}", param=field)
    if (value <= low if open_low else value < low) or value > high:
        bound = "(" if open_low else "["
        raise RequestError(
            400, f"'{field}' must be in {bound}{low}, {high}], got {value}", param=field, code="invalid_value"
        )
    return float(value)


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    400,
                    f"'{where}[{j}]': only text parts ({{'type': 'text', 'text': ...}}) are supported",
                    param=where,
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(400, f"'{where}' must be a string or a list of text parts", param=where)


def parse_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError(
            400, "'messages' must be a non-empty list of {role, content} objects", param="messages"
        )
    messages = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLE_ALIASES:
            raise RequestError(
                400,
                f"'{where}.role' must be one of {sorted(_ROLE_ALIASES)}, got {_brief(role)}",
                param=f"{where}.role",
            )
        if msg.get("content") is None:
            raise RequestError(400, f"missing required field '{where}.content'", param=f"{where}.content")
        messages.append(
            {"role": _ROLE_ALIASES[role], "content": _content(msg["content"], f"{where}.content")}
        )
    return messages


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError(
            400,
            f"'stop' must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them",
            param="stop",
        )
    return tuple(stops)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


def parse_chat_request(obj: dict, *, model_names: Sequence[str], max_tokens: int, default_max_tokens: int):
    """Validate a POST /v1/chat/completions body (OpenAI schema; n=1 and stream=false only)."""
    model = _required(obj, "model")
    if not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", param="model")
    messages = parse_messages(_required(obj, "messages"))
    if model not in model_names:
        raise RequestError(
            404,
            f"the model '{model}' does not exist here; this server has {list(model_names)}",
            param="model",
            code="model_not_found",
        )
    field = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    limit = _integer(obj, field, min(default_max_tokens, max_tokens), 1, max_tokens)
    if obj.get("stream"):
        raise RequestError(400, "'stream': streaming is not supported; send stream=false", param="stream")
    if _integer(obj, "n", 1, 1, 1 << 30) != 1:
        raise RequestError(400, "'n': only one choice per request (n=1) is supported", param="n")
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=limit,
        temperature=_number(obj, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_integer(obj, "seed", None, -(1 << 63), (1 << 63) - 1),
        stop=_stop(obj.get("stop")),
    )


@dataclasses.dataclass(frozen=True)
class AnswerRequest:
    question: str
    k: int
    max_tokens: int


def parse_answer_request(
    obj: dict, *, n_documents: int, default_k: int, max_tokens: int, default_max_tokens: int
):
    """Validate a POST /v1/clara/answer body: {question, k?, max_tokens?}."""
    question = _required(obj, "question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(400, "'question' must be a non-empty string", param="question")
    high = min(n_documents, MAX_TOP_K)
    k = _integer(obj, "k", min(default_k, high), 1, high)
    limit = _integer(obj, "max_tokens", min(default_max_tokens, max_tokens), 1, max_tokens)
    return AnswerRequest(question=question, k=k, max_tokens=limit)
