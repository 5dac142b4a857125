"""What stands between raw HTTP bytes and :func:`parse_request`: the body's size, encoding, JSON
syntax, nesting depth and strings; the admission bound; the error handlers and their log line.

Why a module of its own: a hostile or broken client must never reach a 500 (a ``RecursionError``
from the JSON parser, a ``TypeError`` from the tokenizer on a lone UTF-16 surrogate), and every
refusal must be one OpenAI error object plus one log line an operator can grep — request id,
status, ``param`` and reason, never the prompt text.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmax_jax.serving.protocol import RequestError, error_body

log = logging.getLogger("dmax_jax.serve")

MAX_BODY_BYTES = 4 << 20   # 4 MiB: far above any prompt a slot can hold, far below memory trouble
MAX_DEPTH = 32             # an OpenAI body nests 5 levels deep at most (messages[i].content[j].text)
_LOGGED_CHARS = 300


def request_id(request: Request) -> str:
    """The request's id (the client's ``X-Request-Id`` if sane, else a new one), set once."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        ok = 0 < len(given) <= 64 and given.isascii() and given.isprintable()
        rid = request.state.request_id = given if ok else "req-" + uuid.uuid4().hex[:16]
    return rid


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused (400, ``body_too_large``) as soon as it exceeds ``limit`` bytes — by its
    ``Content-Length`` before anything is read, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"the request body is {size} bytes or more; at most {limit} are accepted", None,
                        "body_too_large")


def decode_body(raw: bytes) -> Any:
    """UTF-8 JSON → Python value, every failure a 400: bad bytes, bad syntax, numbers Python
    refuses (over 4,300 digits), nesting deeper than :data:`MAX_DEPTH`, lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 (byte {e.start}: {e.reason})", None,
                           "invalid_encoding") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise RequestError(f"the request body nests deeper than {MAX_DEPTH} levels", None,
                           "too_deep") from None
    except ValueError as e:    # JSONDecodeError, and int() refusing a huge number literal
        raise RequestError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    check_values(body)
    return body


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return key if not parent else f"{parent}.{key}"


def check_values(body: Any) -> None:
    """Walk the decoded body once (iteratively: no recursion to exhaust) and refuse nesting deeper
    than :data:`MAX_DEPTH` and strings (keys included) holding a lone UTF-16 surrogate, which JSON's
    ``\\udXXX`` escapes allow but no tokenizer can encode. ``param`` is the offending field's path."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            top = where.split(".")[0].split("[")[0] or None
            raise RequestError(f"the request body nests deeper than {MAX_DEPTH} levels (in '{top}')", top,
                               "too_deep")
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, where)          # a bad key: the object holding it is named
                stack.append((v, _path(where, k), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, _path(where, i), depth + 1) for i, v in enumerate(value))


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"'{where or 'body'}' holds a lone UTF-16 surrogate (character {e.start}); "
                           "text must be valid Unicode", where or None, "invalid_unicode") from None


class Admission:
    """The bounded admission queue: at most ``slots + max_queue`` requests inside the engine (running
    or queued); past that a request gets 503 with ``Retry-After`` instead of a queue that grows until
    latency or memory gives out. ``max_queue=None``: unbounded."""

    def __init__(self, slots: int, max_queue: int | None, retry_after: int = 1) -> None:
        self.limit = None if max_queue is None else slots + max_queue
        self.max_queue, self.retry_after, self.active = max_queue, retry_after, 0

    def enter(self) -> None:
        if self.limit is not None and self.active >= self.limit:
            raise RequestError(f"the server is at capacity ({self.active} requests in the engine: the "
                               f"slots plus --max-queue {self.max_queue}); retry shortly", None, "queue_full",
                               503, "server_error", retry_after=self.retry_after)
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


def _refused(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    """The error response plus its one log line (the message is ours, never the prompt; cut short)."""
    rid = request_id(request)
    err = body["error"]
    log.warning("refused %s %s: %d param=%s: %s", rid, request.url.path, status, err.get("param"),
                str(err.get("message"))[:_LOGGED_CHARS])
    return JSONResponse(body, status_code=status, headers={"x-request-id": rid, **(headers or {})})


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object with one log line; an unexpected exception is a
    500 ``server_error`` (a bug of ours, logged with its traceback), never a plain-text page."""

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return _refused(request, e.status, e.body(), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        param = ".".join(str(p) for p in errs[0]["loc"][1:]) if errs else None
        msg = errs[0]["msg"] if errs else "invalid request"
        return _refused(request, 400, error_body(msg, param or None, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return _refused(request, e.status_code, error_body(str(e.detail), None, None, kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request_id(request), request.url.path)
        return JSONResponse(error_body(f"internal server error ({type(e).__name__})", None, "internal_error",
                                       "server_error"), status_code=500)
