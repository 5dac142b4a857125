"""One HTTP completion request → its :class:`Generation` rows → one JSON response or one SSE stream.

Why here: a request fans out into ``len(prompts) × n`` engine rows (choice ``index = prompt · n +
sample``); every row is checked and built before any is submitted (a bad prompt in an array refuses
the whole request with nothing left running), and the rows' events are merged back in arrival order,
kept apart by ``choices[i].index``. A client that disconnects aborts every row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dmax_jax.serving.generation import (
    Generation,
    check_fits,
    decode_config,
    dmax_of,
    prompt_ids,
    request_seed,
    usage_of,
)
from dmax_jax.serving.guard import decode_body, read_body, request_id
from dmax_jax.serving.protocol import (
    CHAT,
    ParsedRequest,
    RequestError,
    chunk_object,
    error_body,
    new_id,
    response_object,
)
from dmax_jax.serving.protocol import parse_request as _parse
from dmax_jax.serving.requests import EngineRequest

if TYPE_CHECKING:
    from dmax_jax.serving.server import ServeContext


async def serve(ctx: ServeContext, request: Request, kind: str) -> Response:
    request_id(request)
    body = decode_body(await read_body(request, ctx.config.max_body_bytes))
    parsed = _parse(body, kind, strategies=tuple(ctx.engine.strategies))
    if parsed.model != ctx.config.model_name:
        raise RequestError(f"The model '{parsed.model}' does not exist; this server serves "
                           f"'{ctx.config.model_name}'", "model", "model_not_found", 404)
    mt_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    gens = build(ctx, parsed, mt_param)
    submitted: list[Generation] = []
    try:
        for g in gens:
            g.submit()
            submitted.append(g)
    except RequestError:
        for g in submitted:
            g.abort()
        raise
    rid, created = new_id(kind), int(time.time())
    if parsed.stream:
        return StreamingResponse(_sse(gens, rid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _until_done_or_disconnect(request, gens, rid, created)


def build(ctx: ServeContext, parsed: ParsedRequest, mt_param: str) -> list[Generation]:
    """Every (prompt, sample) row of the request, checked: ids, fit, knobs (nothing submitted)."""
    prompts = (None,) if parsed.kind == CHAT else parsed.prompts
    seed = request_seed(ctx, parsed)
    gens = []
    for j, prompt in enumerate(prompts):
        param = parsed.prompt_param if len(prompts) == 1 else f"prompt[{j}]"
        ids = prompt_ids(ctx, parsed, prompt, param)
        max_tokens = check_fits(ctx, len(ids), parsed.max_tokens, param, mt_param)
        cfg = decode_config(ctx, parsed, max_tokens, seed)
        for i in range(parsed.n):
            ereq = EngineRequest(prompt_ids=tuple(ids), decode=cfg, request_id=i,
                                 provisional=parsed.provisional)
            gens.append(Generation(ctx, parsed, ereq, j * parsed.n + i, mt_param, param))
    return gens


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[Generation, str, Any]]:
    """Every row's pieces, as they come: ``(row, kind, value)``; a row's engine error is its
    ``("error", RuntimeError)`` item. Leaving early aborts every row."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            async for what, value in g.pieces():
                await queue.put((g, what, value))
        except RuntimeError as e:
            await queue.put((g, "error", e))

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        left = len(gens)
        while left:
            g, what, value = await queue.get()
            left -= what in ("done", "error")
            yield g, what, value
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        for g in gens:
            g.abort()


async def _until_done_or_disconnect(request: Request, gens: list[Generation], rid: str,
                                    created: int) -> Response:
    ctx, parsed = gens[0].ctx, gens[0].parsed

    async def collect() -> dict:
        async for _, what, value in _merged(gens):
            if what == "error":
                raise value
        choices = [(g.text.text, g.finish_reason()) for g in gens]
        return response_object(parsed.kind, rid, ctx.config.model_name, choices, usage_of(gens),
                               dmax_of(gens), created)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    if not work.done() or work.cancelled():
        for g in gens:
            g.abort()
        return Response(status_code=499)     # the client is gone; nobody reads this
    try:
        return JSONResponse(work.result())
    except RuntimeError as e:
        return JSONResponse(error_body(str(e), None, "engine_error", "server_error"), status_code=500)


def _sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(gens: list[Generation], rid: str, created: int) -> AsyncIterator[str]:
    """The SSE body: a role chunk per choice (chat), committed-text chunks, provisional chunks (if
    asked), each choice's finish chunk (with its ``dmax`` stats), the usage chunk (if asked),
    ``[DONE]``. Chunks of different choices interleave, told apart by ``index``."""
    p = gens[0].parsed
    kind, model = p.kind, gens[0].ctx.config.model_name
    chunk = lambda g, **kw: chunk_object(kind, rid, model, created, include_usage=p.include_usage,
                                         index=g.index, **kw)
    try:
        if kind == CHAT:
            for g in gens:
                yield _sse_line(chunk(g, role=True, text=""))
        async for g, what, value in _merged(gens):
            if what == "error":
                raise value
            if what == "provisional":
                yield _sse_line(chunk(g, dmax=value))
            elif what == "text":
                yield _sse_line(chunk(g, text=value))
            elif what == "done":
                yield _sse_line(chunk(g, finish_reason=g.finish_reason(), dmax=g.dmax()))
        if p.include_usage:
            yield _sse_line(chunk(gens[0], no_choices=True, usage=usage_of(gens)))
    except RuntimeError as e:
        yield _sse_line(error_body(str(e), None, "engine_error", "server_error"))
    yield "data: [DONE]\n\n"
