"""The tokenizer endpoints lm-eval's remote tokenizer (``local-completions`` /
``local-chat-completions``) probes before it falls back to downloading a tokenizer from the hub:
``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize`` — vLLM's shapes, which lm-eval reads.

Why: with them lm-eval runs against this server with its default arguments and no hub access, and
counts tokens with the very tokenizer the model decodes with. Bad input is a 400 naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

from dmax_jax.data.chat import encode
from dmax_jax.serving.detok import detokenize
from dmax_jax.serving.guard import decode_body, read_body, request_id
from dmax_jax.serving.protocol import CHAT, RequestError, parse_request

if TYPE_CHECKING:
    from dmax_jax.serving.server import ServeContext

_INFO_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "add_bos_token",
              "add_eos_token", "clean_up_tokenization_spaces")


def tokenizer_info(ctx: ServeContext) -> dict[str, Any]:
    """What lm-eval's ``RemoteTokenizer`` reads: special tokens, the chat template, the length limit."""
    tok = ctx.tokenizer
    out: dict[str, Any] = {"tokenizer_class": type(tok).__name__, "chat_template": tok.chat_template,
                           "max_model_len": ctx.engine.capacity, "vocab_size": ctx.vocab_size}
    for k in _INFO_KEYS:
        v = getattr(tok, k, None)
        if v is not None and isinstance(v, (str, int, bool)):
            out[k] = v
    out["model_max_length"] = ctx.engine.capacity
    out["eos_token_id"] = tok.eos_token_id
    return out


async def _body(request: Request, ctx: ServeContext) -> dict:
    request_id(request)
    body = decode_body(await read_body(request, ctx.config.max_body_bytes))
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and model != ctx.config.model_name:
        raise RequestError(f"The model '{model}' does not exist; this server serves "
                           f"'{ctx.config.model_name}'", "model", "model_not_found", 404)
    return body


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be a boolean", name, "invalid_type")
    return v


def tokenize(ctx: ServeContext, body: dict) -> dict[str, Any]:
    """``{"prompt": str}`` (``add_special_tokens`` default true) or ``{"messages": [...]}``
    (``add_generation_prompt`` default true: the chat template, as a chat request encodes it)."""
    from dmax_jax.serving.generation import prompt_ids

    extra = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                                "return_token_strs"})
    if extra:
        raise RequestError(f"Unrecognized request argument supplied: {extra[0]}", extra[0],
                           "unknown_parameter")
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("give exactly one of 'prompt' or 'messages'", "prompt",
                           "missing_required_parameter")
    if "messages" in body:
        parsed = parse_request({"model": ctx.config.model_name, "messages": body["messages"]}, CHAT,
                               strategies=tuple(ctx.engine.strategies))
        ids = prompt_ids(ctx, parsed, None, "messages")
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", "prompt", "invalid_type")
        special = _flag(body, "add_special_tokens", True)
        ids = (encode(ctx.tokenizer, prompt) if special
               else list(ctx.tokenizer.encode(prompt, add_special_tokens=False)))
    out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.engine.capacity, "tokens": ids}
    if _flag(body, "return_token_strs", False):
        out["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(ids)
    return out


def detokenize_body(ctx: ServeContext, body: dict) -> dict[str, Any]:
    """``{"tokens": [ids]}`` → ``{"prompt": text}``."""
    extra = sorted(set(body) - {"model", "tokens"})
    if extra:
        raise RequestError(f"Unrecognized request argument supplied: {extra[0]}", extra[0],
                           "unknown_parameter")
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError("'tokens' must be an array of token ids", "tokens", "invalid_type")
    bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
    if bad:
        raise RequestError(f"'tokens' id {bad[0]} is outside the vocabulary [0, {ctx.vocab_size})", "tokens")
    return {"prompt": detokenize(ctx.tokenizer, ids)}


def add_tokenizer_routes(app: FastAPI, ctx: ServeContext) -> None:
    @app.get("/tokenizer_info")
    async def info() -> dict:
        return tokenizer_info(ctx)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict:
        return tokenize(ctx, await _body(request, ctx))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict:
        return detokenize_body(ctx, await _body(request, ctx))
