"""The OpenAI-compatible HTTP server: FastAPI on uvicorn in front of one :class:`Engine`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``. Why a thin layer: the engine already batches, aborts and accounts; the
server only validates (every refusal is an HTTP 400 with an OpenAI error body naming the field),
builds prompt ids (the tokenizer's chat template), turns committed blocks into text
(:class:`TextStream`: stop strings, UTF-8-safe block boundaries) and streams it as SSE. Text is
streamed only once its block is committed, so nothing sent is ever revised; ``"dmax":
{"provisional": true}`` adds each step's snapshot of the current block in a ``dmax`` chunk field
that standard clients ignore. A client that disconnects aborts its request (its slot is freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dmax_jax.data.chat import apply_chat_template, encode
from dmax_jax.decoding.config import DecodeConfig, DecodeConfigError
from dmax_jax.serving.detok import TextStream, detokenize
from dmax_jax.serving.engine import Engine
from dmax_jax.serving.guard import (
    MAX_BODY_BYTES,
    Admission,
    decode_body,
    install_error_handlers,
    read_body,
    request_id,
)
from dmax_jax.serving.protocol import (
    CHAT,
    COMPLETION,
    ParsedRequest,
    RequestError,
    chunk_object,
    error_body,
    new_id,
    parse_request,
    response_object,
    usage_object,
)
from dmax_jax.serving.requests import (
    BlockCommitted,
    EngineClosedError,
    EngineRequest,
    EngineRequestError,
    Finished,
    ProvisionalStep,
)

FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}
_TEMPLATE_ROLE = {"developer": "system"}   # the LLaDA2 template knows system / user / assistant


@dataclasses.dataclass
class ServeConfig:
    """What the server answers with when a request leaves a field out: ``decode`` holds the default
    strategy's thresholds, temperature, seed, steps and (as ``gen_length``) the default ``max_tokens``
    — absent ``max_tokens`` = ``decode.gen_length``, or what fits the slot if less; ``per_strategy``
    the defaults of the other served strategies (a model's ``dmax_decode.json`` may set e.g. τ 0.95
    for threshold). ``prompt_template`` (``{prompt}`` once; from ``dmax_decode.json``) wraps the content
    of every chat *user* message, the prompt format the model was trained on; completions are raw."""

    model_name: str
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    per_strategy: dict[str, DecodeConfig] = dataclasses.field(default_factory=dict)
    prompt_template: str = "{prompt}"
    drain_timeout: float = 30.0        # seconds engine.stop waits for in-flight requests at shutdown
    max_queue: int | None = None       # requests waiting beyond the slots before 503 (None: no bound)
    max_body_bytes: int = MAX_BODY_BYTES

    def defaults(self, strategy: str | None) -> DecodeConfig:
        """The DecodeConfig a request with ``strategy`` (None: the default one) starts from."""
        if strategy is None or strategy == self.decode.strategy:
            return self.decode
        if strategy in self.per_strategy:
            return self.per_strategy[strategy]
        return self.decode.replace(strategy=strategy, steps=None)

    def wrap(self, content: str) -> str:
        return self.prompt_template.replace("{prompt}", content)


@dataclasses.dataclass
class ServeContext:
    engine: Engine
    tokenizer: Any
    config: ServeConfig
    mask_id: int
    vocab_size: int
    admission: Admission
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, tokenizer: Any, config: ServeConfig, *, mask_id: int,
               vocab_size: int) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine (if not yet) and stops it at shutdown, after
    uvicorn has drained (or cancelled, past its graceful timeout) the open requests."""
    ctx = ServeContext(engine, tokenizer, config, int(mask_id), int(vocab_size),
                       Admission(engine.max_batch, config.max_queue))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.start)       # compiles on first start; idempotent
        yield
        await asyncio.to_thread(engine.stop, drain=True, timeout=config.drain_timeout)

    app = FastAPI(title="dmax-jax", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine serves; 503 with the error once a failed round stopped it."""
        err = engine.error
        body = {"status": "ok" if err is None else "error", "model": config.model_name,
                "engine": engine.stats(), "compile_count": engine.compile_count()}
        if err is not None:
            body["error"] = f"{type(err).__name__}: {err}"
        return JSONResponse(body, status_code=200 if err is None else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != config.model_name:
            raise RequestError(f"The model '{model_id}' does not exist", "model", "model_not_found", 404)
        return _model_card(ctx)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(ctx, request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(ctx, request, COMPLETION)

    return app


def _model_card(ctx: ServeContext) -> dict:
    return {"id": ctx.config.model_name, "object": "model", "created": ctx.created, "owned_by": "dmax-jax",
            "max_model_len": ctx.engine.capacity, "block_length": ctx.engine.block_length,
            "strategies": list(ctx.engine.strategies), "prompt_template": ctx.config.prompt_template}


# ---- one request ---------------------------------------------------------------------------------
async def _serve(ctx: ServeContext, request: Request, kind: str) -> Response:
    request_id(request)
    body = decode_body(await read_body(request, ctx.config.max_body_bytes))
    parsed = parse_request(body, kind, strategies=tuple(ctx.engine.strategies))
    if parsed.model != ctx.config.model_name:
        raise RequestError(f"The model '{parsed.model}' does not exist; this server serves "
                           f"'{ctx.config.model_name}'", "model", "model_not_found")
    prompt_ids = _prompt_ids(ctx, parsed)
    ereq = _engine_request(ctx, parsed, prompt_ids)
    gen = _Generation(ctx, parsed, ereq, max_tokens_param=_max_tokens_param(body))
    gen.submit()
    if parsed.stream:
        return StreamingResponse(_sse(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _until_done_or_disconnect(request, gen)


def _max_tokens_param(body: dict) -> str:
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def _prompt_ids(ctx: ServeContext, parsed: ParsedRequest) -> list[int]:
    param = parsed.prompt_param
    if parsed.kind == CHAT:
        wrap = ctx.config.wrap
        messages = [{"role": _TEMPLATE_ROLE.get(r, r), "content": wrap(c) if r == "user" else c}
                    for r, c in parsed.messages]
        try:
            ids = apply_chat_template(ctx.tokenizer, messages, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError) as e:  # raise_exception (e.g. role order), no template
            raise RequestError(f"the chat template rejected 'messages': {e}", param) from None
    elif isinstance(parsed.prompt, str):
        ids = encode(ctx.tokenizer, parsed.prompt)
    else:
        ids = list(parsed.prompt)
        bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
        if bad:
            raise RequestError(f"'prompt' token id {bad[0]} is outside the vocabulary [0, {ctx.vocab_size})",
                               param)
    if not ids:
        raise RequestError(f"'{param}' encodes to no tokens", param)
    if ctx.mask_id in ids:
        raise RequestError(f"'{param}' contains the mask token (id {ctx.mask_id}); prompts must not hold "
                           "[MASK], it would be decoded as a hole", param, "mask_token_in_prompt")
    return ids


# request field -> DecodeConfig field (the rest have the same name)
_DECODE_FIELD = {"max_tokens": "gen_length"}


def _engine_request(ctx: ServeContext, parsed: ParsedRequest, prompt_ids: list[int]) -> EngineRequest:
    """The server's DecodeConfig with the request's overrides (validated by DecodeConfig: its error
    names the field) turned into an :class:`EngineRequest`."""
    eng, base = ctx.engine, ctx.config.defaults(parsed.strategy)
    if parsed.block_length is not None and parsed.block_length != eng.block_length:
        raise RequestError(f"'block_length' must be {eng.block_length} on this server (the compiled block "
                           f"size), got {parsed.block_length}", "block_length")
    fits = (eng.capacity // eng.block_length) * eng.block_length - len(prompt_ids)
    if fits < 1:
        raise RequestError(f"'{parsed.prompt_param}' is {len(prompt_ids)} tokens; with the block rounding "
                           f"it leaves no room to generate in the {eng.capacity} positions of a slot",
                           parsed.prompt_param, "context_length_exceeded")
    given = {k: getattr(parsed, k) for k in ("max_tokens", "threshold", "accept_threshold", "steps",
                                              "temperature", "seed")
             if getattr(parsed, k) is not None}
    if "max_tokens" not in given:
        given["max_tokens"] = min(base.gen_length, fits)
    try:
        cfg = base.replace(**{_DECODE_FIELD.get(k, k): v for k, v in given.items()})
    except DecodeConfigError as e:
        param = {v: k for k, v in _DECODE_FIELD.items()}.get(e.field, e.field)
        raise RequestError(f"'{param}' {e.reason}", param) from None
    return EngineRequest(prompt_ids=tuple(prompt_ids), decode=cfg, request_id=0,
                         provisional=parsed.provisional)


class _Generation:
    """One submitted request: engine events bridged onto the event loop, text via TextStream."""

    def __init__(self, ctx: ServeContext, parsed: ParsedRequest, ereq: EngineRequest, max_tokens_param: str):
        self.ctx, self.parsed, self.ereq = ctx, parsed, ereq
        self.max_tokens_param = max_tokens_param
        self.text = TextStream(ctx.tokenizer, parsed.stop)
        self.id = new_id(parsed.kind)
        self.created = int(time.time())
        self.finished: Finished | None = None
        self.handle = None
        self._aborted = False
        self._queue: asyncio.Queue = asyncio.Queue()

    def submit(self) -> None:
        loop = asyncio.get_running_loop()

        admission = self.ctx.admission

        def listener(ev) -> None:  # engine thread
            with contextlib.suppress(RuntimeError):   # loop already closed at shutdown
                loop.call_soon_threadsafe(self._queue.put_nowait, ev)
                if isinstance(ev, Finished):          # the engine holds the request no longer
                    loop.call_soon_threadsafe(admission.leave)

        admission.enter()
        try:
            self.handle = self.ctx.engine.submit(self.ereq, listener)
        except EngineRequestError as e:
            admission.leave()
            raise RequestError(str(e), self._param(e.field)) from None
        except EngineClosedError as e:
            admission.leave()
            raise RequestError(f"the server is shutting down: {e}", None, "server_shutting_down", 503,
                               "server_error") from None

    def _param(self, field: str) -> str:
        return {"prompt_ids": self.parsed.prompt_param, "max_tokens": self.max_tokens_param}.get(field, field)

    def abort(self, reason: str = "abort") -> None:
        """End the engine request (once) unless it already finished."""
        if self.handle is not None and self.finished is None and not self._aborted:
            self._aborted = True
            self.ctx.engine.abort(self.handle.id, reason=reason)

    async def pieces(self) -> AsyncIterator[tuple[str, Any]]:
        """``("provisional", dict)`` / ``("text", str)`` items, then one ``("done", Finished)``.
        Leaving early (disconnect, cancellation) aborts the engine request."""
        try:
            while True:
                ev = await self._queue.get()
                if isinstance(ev, ProvisionalStep):
                    if not self.text.stopped:
                        yield "provisional", self._snapshot(ev)
                elif isinstance(ev, BlockCommitted):
                    if self.text.stopped:
                        continue
                    delta = self.text.push(ev.token_ids)
                    if delta:
                        yield "text", delta
                    if self.text.stopped:
                        self.abort(reason="stop")
                elif isinstance(ev, Finished):
                    self.finished = ev
                    self._check_final(ev)
                    delta = self.text.finish()
                    if delta:
                        yield "text", delta
                    yield "done", ev
                    return
        finally:
            self.abort()

    def _check_final(self, ev: Finished) -> None:
        if ev.reason == "error":
            raise RuntimeError(f"engine error: {ev.error}")
        if ev.reason == "abort":
            raise RuntimeError("the request was aborted by the engine (server shutting down)")
        if not self.text.stopped and list(ev.token_ids) != self.text.ids:
            raise RuntimeError("engine Finished.token_ids differ from the committed blocks it streamed")

    def _snapshot(self, ev: ProvisionalStep) -> dict:
        mask = self.ctx.mask_id
        return {"provisional": {"block": ev.block, "step": ev.step, "token_ids": list(ev.tokens),
                                "masked": sum(t == mask for t in ev.tokens),
                                "text": detokenize(self.ctx.tokenizer, [t for t in ev.tokens if t != mask])}}

    def usage(self) -> dict:
        tokens = self.text.tokens_used if self.text.stopped else self.finished.usage.tokens
        return usage_object(len(self.ereq.prompt_ids), tokens)

    def dmax(self) -> dict:
        u = self.finished.usage
        return {"nfe": u.nfe, "tpf": u.tpf, "blocks": u.blocks, "tokens_ref": u.tokens_ref,
                "strategy": self.ereq.decode.strategy}

    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else FINISH_REASON[self.finished.reason]


async def _until_done_or_disconnect(request: Request, gen: _Generation) -> Response:
    async def collect() -> dict:
        async for kind, _ in gen.pieces():
            if kind == "done":
                break
        return response_object(gen.parsed.kind, gen.id, gen.ctx.config.model_name, gen.text.text,
                               gen.finish_reason(), gen.usage(), gen.dmax(), gen.created)

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
        gen.abort()
        return Response(status_code=499)     # the client is gone; nobody reads this
    try:
        return JSONResponse(work.result())
    except RuntimeError as e:
        return JSONResponse(error_body(str(e), None, "engine_error", "server_error"), status_code=500)


def _sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(gen: _Generation) -> AsyncIterator[str]:
    """The SSE body: role chunk (chat), committed-text chunks, provisional chunks (if asked), the
    finish chunk with the ``dmax`` stats, the usage chunk (if asked), ``[DONE]``."""
    kind, model, p = gen.parsed.kind, gen.ctx.config.model_name, gen.parsed
    chunk = lambda **kw: chunk_object(kind, gen.id, model, gen.created, include_usage=p.include_usage, **kw)
    try:
        if kind == CHAT:
            yield _sse_line(chunk(role=True, text=""))
        async for what, value in gen.pieces():
            if what == "provisional":
                yield _sse_line(chunk(dmax=value))
            elif what == "text":
                yield _sse_line(chunk(text=value))
        yield _sse_line(chunk(finish_reason=gen.finish_reason(), dmax=gen.dmax()))
        if p.include_usage:
            yield _sse_line(chunk(no_choices=True, usage=gen.usage()))
    except RuntimeError as e:
        yield _sse_line(error_body(str(e), None, "engine_error", "server_error"))
    yield "data: [DONE]\n\n"
