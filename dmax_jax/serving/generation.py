"""One choice of a request: its prompt ids, its :class:`EngineRequest` and the bridge of its engine
events onto the event loop (:class:`Generation`).

Why a module of its own: a completions request may hold several prompts and ask ``n`` samples of
each; every (prompt, sample) pair is one engine request row — one ``Generation`` — and the server
(:mod:`dmax_jax.serving.respond`) only merges them into one response or one SSE stream by
``choices[i].index``. Sample ``i`` of every prompt decodes the sampling stream ``request_id = i``
(keys ``fold_in(fold_in(key(seed), i), forward)``), so each choice equals that sample requested
alone — ``n = 1`` is sample 0, and ``generate(..., seed=seed, request_ids=[i])`` reproduces any one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import jinja2

from dmax_jax.data.chat import apply_chat_template, encode
from dmax_jax.decoding.buckets import row_geometry
from dmax_jax.decoding.config import DecodeConfig, DecodeConfigError
from dmax_jax.serving.detok import TextStream, detokenize
from dmax_jax.serving.protocol import CHAT, SEED_RANGE, ParsedRequest, RequestError, usage_object
from dmax_jax.serving.requests import (
    BlockCommitted,
    EngineClosedError,
    EngineRequest,
    EngineRequestError,
    Finished,
    ProvisionalStep,
)

if TYPE_CHECKING:
    from dmax_jax.serving.server import ServeContext

FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}
_TEMPLATE_ROLE = {"developer": "system"}   # the LLaDA2 template knows system / user / assistant
# request field -> DecodeConfig field (the rest have the same name)
_DECODE_FIELD = {"max_tokens": "gen_length", "top_k": "sample_top_k"}


def prompt_ids(ctx: ServeContext, parsed: ParsedRequest, prompt: Any, param: str) -> list[int]:
    """Token ids of one prompt (chat: the messages through the chat template; completions: the text
    encoded, or the ids checked against the vocabulary)."""
    if parsed.kind == CHAT:
        wrap = ctx.config.wrap
        messages = [{"role": _TEMPLATE_ROLE.get(r, r), "content": wrap(c) if r == "user" else c}
                    for r, c in parsed.messages]
        try:
            ids = apply_chat_template(ctx.tokenizer, messages, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError) as e:  # raise_exception (e.g. role order), no template
            raise RequestError(f"the chat template rejected 'messages': {e}", param) from None
    elif isinstance(prompt, str):
        ids = encode(ctx.tokenizer, prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
        if bad:
            raise RequestError(f"'{param}' token id {bad[0]} is outside the vocabulary [0, {ctx.vocab_size})",
                               param)
    if not ids:
        raise RequestError(f"'{param}' encodes to no tokens", param)
    if ctx.mask_id in ids:
        raise RequestError(f"'{param}' contains the mask token (id {ctx.mask_id}); prompts must not hold "
                           "[MASK], it would be decoded as a hole", param, "mask_token_in_prompt")
    return ids


def request_seed(ctx: ServeContext, parsed: ParsedRequest) -> int:
    """The request's seed: the client's; else, for a sampled request, a fresh one (returned in the
    response's ``dmax.seed``, so the call can be replayed); else the server's (greedy: unused)."""
    if parsed.seed is not None:
        return parsed.seed
    base = ctx.config.defaults(parsed.strategy)
    temperature = base.temperature if parsed.temperature is None else parsed.temperature
    if temperature > 0:
        return secrets.randbelow(SEED_RANGE[1] + 1)
    return base.seed


def check_fits(ctx: ServeContext, n_prompt: int, max_tokens: int | None, prompt_param: str,
               max_tokens_param: str) -> int:
    """``max_tokens`` of the request: the given one if prompt + it fit a slot, else a 400
    ``context_length_exceeded`` naming both numbers (as vLLM does); absent: all that fits."""
    eng = ctx.engine
    cap, B = eng.capacity, eng.block_length
    fits = (cap // B) * B - n_prompt
    if fits < 1:
        raise RequestError(f"This model's maximum context length is {cap} tokens. However, your prompt "
                           f"('{prompt_param}') is {n_prompt} tokens, which leaves no room to generate "
                           f"(blocks of {B} tokens). Please reduce the length of the prompt.",
                           prompt_param, "context_length_exceeded")
    if max_tokens is None:
        return fits
    _, end, _ = row_geometry(n_prompt, max_tokens, B)
    if end > cap:
        raise RequestError(f"This model's maximum context length is {cap} tokens. However, you requested "
                           f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                           f"completion; {end} once rounded up to blocks of {B}). Please reduce the length "
                           f"of the prompt or '{max_tokens_param}' (at most {fits} here).",
                           max_tokens_param, "context_length_exceeded")
    return max_tokens


def decode_config(ctx: ServeContext, parsed: ParsedRequest, max_tokens: int, seed: int) -> DecodeConfig:
    """The server's DecodeConfig with the request's overrides (validated by DecodeConfig: its error
    names the field)."""
    eng, base = ctx.engine, ctx.config.defaults(parsed.strategy)
    if parsed.block_length is not None and parsed.block_length != eng.block_length:
        raise RequestError(f"'block_length' must be {eng.block_length} on this server (the compiled block "
                           f"size), got {parsed.block_length}", "block_length")
    given = {k: getattr(parsed, k) for k in ("threshold", "accept_threshold", "steps", "temperature",
                                              "top_p", "top_k")
             if getattr(parsed, k) is not None}
    given.update(max_tokens=max_tokens, seed=seed)
    try:
        return base.replace(**{_DECODE_FIELD.get(k, k): v for k, v in given.items()})
    except DecodeConfigError as e:
        param = {v: k for k, v in _DECODE_FIELD.items()}.get(e.field, e.field)
        raise RequestError(f"'{param}' {e.reason}", param) from None


class Generation:
    """One submitted engine request (one choice): engine events bridged onto the event loop, text
    via TextStream; the metrics see its first committed block and its end (engine thread)."""

    def __init__(self, ctx: ServeContext, parsed: ParsedRequest, ereq: EngineRequest, index: int,
                 max_tokens_param: str, prompt_param: str):
        self.ctx, self.parsed, self.ereq, self.index = ctx, parsed, ereq, index
        self.max_tokens_param, self.prompt_param = max_tokens_param, prompt_param
        self.text = TextStream(ctx.tokenizer, parsed.stop)
        self.finished: Finished | None = None
        self.handle = None
        self._aborted = False
        self._queue: asyncio.Queue = asyncio.Queue()

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        admission, metrics, t0 = self.ctx.admission, self.ctx.metrics, time.perf_counter()
        first = [True]

        def listener(ev) -> None:  # engine thread
            if isinstance(ev, BlockCommitted) and first[0]:
                first[0] = False
                metrics.first_block(time.perf_counter() - t0)
            if isinstance(ev, Finished):
                metrics.finished(ev, time.perf_counter() - t0)
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
        return {"prompt_ids": self.prompt_param, "max_tokens": self.max_tokens_param}.get(field, field)

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
                                "masked": sum(t == mask for t in ev.tokens), "index": self.index,
                                "text": detokenize(self.ctx.tokenizer, [t for t in ev.tokens if t != mask])}}

    def completion_tokens(self) -> int:
        return self.text.tokens_used if self.text.stopped else self.finished.usage.tokens

    def dmax(self) -> dict:
        u, cfg = self.finished.usage, self.ereq.decode
        return {"nfe": u.nfe, "tpf": u.tpf, "blocks": u.blocks, "tokens_ref": u.tokens_ref,
                "strategy": cfg.strategy, "seed": cfg.seed}

    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else FINISH_REASON[self.finished.reason]


def usage_of(gens: list[Generation]) -> dict:
    """Usage summed over the choices: each prompt's tokens once (its ``n`` samples share it), every
    choice's completion tokens."""
    prompts = {g.index // g.parsed.n: len(g.ereq.prompt_ids) for g in gens}
    cached: dict[int, int] = {}      # a prompt's tokens the prefix cache served (the least of its samples)
    for g in gens:
        c = g.finished.usage.cached_tokens if g.finished is not None else 0
        cached[g.index // g.parsed.n] = min(c, cached.get(g.index // g.parsed.n, c))
    return usage_object(sum(prompts.values()), sum(g.completion_tokens() for g in gens),
                        sum(cached.values()))


def dmax_of(gens: list[Generation]) -> dict:
    """The ``dmax`` stats: one choice's as they are; several summed (tpf over the sums), each choice's
    under ``choices``."""
    if len(gens) == 1:
        return gens[0].dmax()
    each = [g.dmax() for g in gens]
    nfe, ref = sum(d["nfe"] for d in each), sum(d["tokens_ref"] for d in each)
    return {"nfe": nfe, "tpf": ref / nfe if nfe else 0.0, "blocks": sum(d["blocks"] for d in each),
            "tokens_ref": ref, "strategy": each[0]["strategy"], "seed": each[0]["seed"], "choices": each}
