"""The OpenAI-compatible HTTP server: FastAPI on uvicorn in front of one :class:`Engine`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``, the tokenizer endpoints lm-eval uses (``GET /tokenizer_info``, ``POST
/tokenize``, ``POST /detokenize``: :mod:`~dmax_jax.serving.tokenizer_routes`) and Prometheus ``GET
/metrics`` (:mod:`~dmax_jax.serving.metrics`). One request: :mod:`~dmax_jax.serving.respond`.
Why a thin layer: the engine already batches, aborts and accounts; the
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
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dmax_jax.decoding.config import DecodeConfig
from dmax_jax.serving.engine import Engine
from dmax_jax.serving.guard import MAX_BODY_BYTES, Admission, install_error_handlers
from dmax_jax.serving.metrics import Metrics, add_metrics_route
from dmax_jax.serving.protocol import CHAT, COMPLETION, RequestError
from dmax_jax.serving.respond import serve
from dmax_jax.serving.tokenizer_routes import add_tokenizer_routes


@dataclasses.dataclass
class ServeConfig:
    """What the server answers with when a request leaves a field out: ``decode`` holds the default
    strategy's thresholds, temperature, top-p / top-k, seed and steps (an absent ``max_tokens`` is all
    that fits the slot: ``generation.check_fits``; ``decode.gen_length`` plays no part); ``per_strategy``
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
    metrics: Metrics
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, tokenizer: Any, config: ServeConfig, *, mask_id: int,
               vocab_size: int) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine (if not yet) and stops it at shutdown, after
    uvicorn has drained (or cancelled, past its graceful timeout) the open requests."""
    ctx = ServeContext(engine, tokenizer, config, int(mask_id), int(vocab_size),
                       Admission(engine.max_batch, config.max_queue), Metrics(engine))

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
        return await serve(ctx, request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(ctx, request, COMPLETION)

    add_tokenizer_routes(app, ctx)
    add_metrics_route(app, ctx.metrics)

    return app


def _model_card(ctx: ServeContext) -> dict:
    return {"id": ctx.config.model_name, "object": "model", "created": ctx.created, "owned_by": "dmax-jax",
            "max_model_len": ctx.engine.capacity, "block_length": ctx.engine.block_length,
            "strategies": list(ctx.engine.strategies), "prompt_template": ctx.config.prompt_template}
