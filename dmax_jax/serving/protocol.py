"""OpenAI request bodies → validated :class:`ParsedRequest`; OpenAI response, chunk and error objects.

Why hand-written checks instead of pydantic models: every rejection must be an HTTP 400 whose OpenAI
error body names the offending field (``param``), including fields we deliberately do not support
(``n > 1``, ``logprobs``, ``tools``, ...) and unknown ones, and the JSON types must be exact (a JSON
``true`` is not the integer 1, ``NaN`` is not a threshold). The checks here need no model; the
length checks that need the tokenizer and the engine's geometry live in :mod:`dmax_jax.serving.server`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

CHAT, COMPLETION = "chat", "completion"
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4                      # OpenAI's limit on stop sequences
SEED_RANGE = (-(2**31), 2**31 - 1)  # the seed feeds jax.random.key as an int32
TEMPERATURE_RANGE = (0.0, 2.0)    # OpenAI's range; 0 = greedy
MAX_N = 128                       # OpenAI's limit on n
MAX_PROMPTS = 2048                # OpenAI's limit on the prompts of one completions request


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with an OpenAI error body naming ``param``."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value",
                 status: int = 400, type_: str = "invalid_request_error", *,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_
        self.retry_after = retry_after      # seconds, sent as ``Retry-After`` (503 when at capacity)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: str | None, code: str | None,
               type_: str = "invalid_request_error") -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` — what the ``openai`` client parses."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """One validated request. ``None`` knobs mean "the server's DecodeConfig default"."""

    kind: str                                   # CHAT | COMPLETION
    model: str
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content) for CHAT
    prompts: tuple[str | tuple[int, ...], ...] = ()       # COMPLETION: each prompt (text or token ids)
    n: int = 1                                  # samples per prompt (choice index = prompt * n + sample)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    provisional: bool = False                   # "dmax": {"provisional": true}
    strategy: str | None = None
    threshold: float | None = None
    accept_threshold: float | None = None
    block_length: int | None = None
    steps: int | None = None

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == CHAT else "prompt"


# ---- typed field readers (JSON types are exact: bool is not an int) -------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    if not _is_int(v):
        raise RequestError(f"'{name}' must be an integer, got {_json_type(v)}", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"'{name}' must be {rng}, got {v}", name)
    return int(v)


def _number(v: Any, name: str, lo: float, hi: float) -> float:
    if not _is_number(v):
        what = "a non-finite number" if isinstance(v, float) else _json_type(v)
        raise RequestError(f"'{name}' must be a finite number, got {what}", name, "invalid_type")
    if not lo <= v <= hi:
        raise RequestError(f"'{name}' must be in [{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be a boolean, got {_json_type(v)}", name, "invalid_type")
    return v


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise RequestError(f"'{name}' must be a string, got {_json_type(v)}", name, "invalid_type")
    return v


def _json_type(v: Any) -> str:
    for t, n in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                 (dict, "object"), (type(None), "null")):
        if isinstance(v, t):
            return n
    return type(v).__name__


# ---- fields accepted only at their neutral value ----------------------------------------------------
_NEUTRAL = {
    "best_of": (lambda v: v == 1 and _is_int(v), "only best_of = 1 is supported"),
    "logprobs": (lambda v: v is False, "logprobs are not supported"),
    "top_logprobs": (lambda v: False, "top_logprobs are not supported"),
    "echo": (lambda v: v is False, "echo is not supported"),
    "suffix": (lambda v: False, "suffix (insertion) is not supported"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
    "presence_penalty": (lambda v: _is_number(v) and v == 0, "presence_penalty is not supported"),
    "frequency_penalty": (lambda v: _is_number(v) and v == 0, "frequency_penalty is not supported"),
    "response_format": (lambda v: v == {"type": "text"}, "response_format other than text is not supported"),
    "tools": (lambda v: v == [], "tools are not supported"),
    "tool_choice": (lambda v: v == "none", "tool_choice is not supported"),
    "functions": (lambda v: v == [], "functions are not supported"),
    "function_call": (lambda v: v == "none", "function_call is not supported"),
    "parallel_tool_calls": (lambda v: False, "parallel_tool_calls is not supported"),
}
_CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
              "functions", "function_call", "parallel_tool_calls"}
_COMPLETION_ONLY = {"prompt", "best_of", "echo", "suffix"}
_COMMON = {"model", "max_tokens", "temperature", "seed", "stop", "stream", "stream_options", "user", "dmax",
           "strategy", "threshold", "accept_threshold", "block_length", "steps", "n", "logprobs",
           "logit_bias", "presence_penalty", "frequency_penalty", "top_p", "top_k"}


def _check_fields(body: dict, kind: str) -> None:
    allowed = _COMMON | (_CHAT_ONLY if kind == CHAT else _COMPLETION_ONLY)
    for key in body:
        if key not in allowed:
            raise RequestError(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    for key, (ok, why) in _NEUTRAL.items():
        if key in body and body[key] is not None and not ok(body[key]):
            raise RequestError(f"'{key}': {why}", key, "unsupported_parameter")


def parse_request(body: Any, kind: str, *, strategies: tuple[str, ...]) -> ParsedRequest:
    """Validate a decoded JSON body for ``/v1/chat/completions`` (CHAT) or ``/v1/completions``."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(body)}", None,
                           "invalid_type")
    _check_fields(body, kind)
    if "model" not in body:
        raise RequestError("you must provide a model parameter", "model", "missing_required_parameter")
    get = lambda k: body.get(k)  # JSON null = absent, as in the OpenAI API
    fields: dict[str, Any] = {"kind": kind, "model": _str(body["model"], "model")}
    if kind == CHAT:
        fields["messages"] = _messages(body.get("messages", _MISSING))
        if get("max_tokens") is not None and get("max_completion_tokens") is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if get("max_completion_tokens") is not None:
            fields["max_tokens"] = _int(body["max_completion_tokens"], "max_completion_tokens", 1)
    else:
        fields["prompts"] = _prompts(body.get("prompt", _MISSING))
    if get("max_tokens") is not None:
        fields["max_tokens"] = _int(body["max_tokens"], "max_tokens", 1)
    if get("temperature") is not None:
        fields["temperature"] = _number(body["temperature"], "temperature", *TEMPERATURE_RANGE)
    if get("n") is not None:
        fields["n"] = _int(body["n"], "n", 1, MAX_N)
    if get("top_p") is not None:
        fields["top_p"] = _number(body["top_p"], "top_p", 0.0, 1.0)
        if fields["top_p"] == 0:
            raise RequestError("'top_p' must be in (0, 1], got 0", "top_p")
    if get("top_k") is not None:
        fields["top_k"] = max(0, _int(body["top_k"], "top_k", -1))   # -1 (vLLM) and 0: no top-k limit
    if get("seed") is not None:
        fields["seed"] = _int(body["seed"], "seed", *SEED_RANGE)
    if get("stop") is not None:
        fields["stop"] = _stop(body["stop"])
    if get("stream") is not None:
        fields["stream"] = _bool(body["stream"], "stream")
    if get("stream_options") is not None:
        fields["include_usage"] = _stream_options(body["stream_options"], fields.get("stream", False))
    if get("user") is not None:
        _str(body["user"], "user")
    if get("dmax") is not None:
        fields["provisional"] = _dmax_options(body["dmax"])
    if get("strategy") is not None:
        s = _str(body["strategy"], "strategy")
        if s not in strategies:
            raise RequestError(f"'strategy' must be one of {list(strategies)}, got {s!r}", "strategy")
        fields["strategy"] = s
    for name in ("threshold", "accept_threshold"):
        if get(name) is not None:
            fields[name] = _number(body[name], name, 0.0, 1.0)
    for name in ("block_length", "steps"):
        if get(name) is not None:
            fields[name] = _int(body[name], name, 1)
    return ParsedRequest(**fields)


_MISSING = object()


def _messages(v: Any) -> tuple[tuple[str, str], ...]:
    if v is _MISSING or v is None:
        raise RequestError("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(v, list):
        raise RequestError(f"'messages' must be an array, got {_json_type(v)}", "messages", "invalid_type")
    if not v:
        raise RequestError("'messages' must contain at least one message", "messages", "empty_array")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{where}' must be an object, got {_json_type(m)}", where, "invalid_type")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise RequestError(f"'{where}.{extra[0]}' is not supported (messages carry role and content)",
                               f"{where}.{extra[0]}", "unsupported_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        out.append((role, _content(m.get("content", _MISSING), f"{where}.content")))
    return tuple(out)


def _content(v: Any, where: str) -> str:
    """A message's content: a string, or an array of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v:
        texts = []
        for j, part in enumerate(v):
            if not (isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}
                    and isinstance(part["text"], str)):
                raise RequestError(f"'{where}[{j}]' must be a text part "
                                   "{\"type\": \"text\", \"text\": ...} (no images, audio or files)",
                                   f"{where}[{j}]", "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    got = "missing" if v is _MISSING else _json_type(v)
    raise RequestError(f"'{where}' must be a string or a non-empty array of text parts, got {got}", where,
                       "invalid_type")


def _prompts(v: Any) -> tuple[str | tuple[int, ...], ...]:
    """``prompt`` in the four forms the OpenAI API allows: a string, an array of strings, an array of
    token ids, an array of such arrays; each prompt is one request row of its own."""
    if v is _MISSING or v is None:
        raise RequestError("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(v, str) or (isinstance(v, list) and v and all(_is_int(t) for t in v)):
        return (_one_prompt(v, "prompt"),)
    if isinstance(v, list) and v and all(isinstance(t, (str, list)) for t in v):
        if len(v) > MAX_PROMPTS:
            raise RequestError(f"'prompt' holds {len(v)} prompts; at most {MAX_PROMPTS} per request",
                               "prompt")
        return tuple(_one_prompt(t, f"prompt[{i}]") for i, t in enumerate(v))
    raise RequestError("'prompt' must be a non-empty string, array of strings, array of token ids or array "
                       f"of token-id arrays, got {_json_type(v)}", "prompt", "invalid_type")


def _one_prompt(v: Any, where: str) -> str | tuple[int, ...]:
    if isinstance(v, str):
        if not v:
            raise RequestError(f"'{where}' must not be empty", where)
        return v
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return tuple(int(t) for t in v)
    raise RequestError(f"'{where}' must be a non-empty string or array of token ids", where, "invalid_type")


def _stop(v: Any) -> tuple[str, ...]:
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise RequestError(f"'stop' holds {len(stops)} sequences; at most {MAX_STOP} are allowed", "stop")
    if any(s == "" for s in stops):
        raise RequestError("'stop' sequences must not be empty strings", "stop")
    return tuple(dict.fromkeys(stops))


def _options_object(v: Any, name: str, known: tuple[str, ...],
                    unknown_hint: str = "is not supported") -> dict:
    """An extension object (``stream_options``, ``dmax``): a JSON object holding only ``known`` keys."""
    if not isinstance(v, dict):
        raise RequestError(f"'{name}' must be an object, got {_json_type(v)}", name, "invalid_type")
    extra = sorted(set(v) - set(known))
    if extra:
        raise RequestError(f"'{name}.{extra[0]}' {unknown_hint}", f"{name}.{extra[0]}", "unknown_parameter")
    return v


def _stream_options(v: Any, stream: bool) -> bool:
    v = _options_object(v, "stream_options", ("include_usage",))
    if not stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return _bool(v.get("include_usage", False), "stream_options.include_usage")


def _dmax_options(v: Any) -> bool:
    v = _options_object(v, "dmax", ("provisional",), "is not a DMax option (known: provisional)")
    return _bool(v.get("provisional", False), "dmax.provisional")


# ---- response objects ---------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]


def usage_object(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix
    cache served instead of prefilling."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response_object(kind: str, rid: str, model: str, choices: list[tuple[str, str]], usage: dict,
                    dmax: dict, created: int | None = None) -> dict[str, Any]:
    """The non-streamed ``chat.completion`` / ``text_completion`` object (plus our ``dmax`` stats);
    ``choices``: ``(text, finish_reason)`` in index order."""
    out = []
    for i, (text, finish_reason) in enumerate(choices):
        if kind == CHAT:
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish_reason})
        else:
            out.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason})
    obj = "chat.completion" if kind == CHAT else "text_completion"
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model,
            "choices": out, "usage": usage, "dmax": dmax}


def chunk_object(kind: str, rid: str, model: str, created: int, *, text: str | None = None,
                 role: bool = False, finish_reason: str | None = None, usage: dict | None = None,
                 no_choices: bool = False, dmax: dict | None = None, include_usage: bool = False,
                 index: int = 0) -> dict:
    """One streamed chunk. ``text`` is committed text only; ``dmax`` carries the extension fields
    (provisional snapshots, final stats) that standard clients ignore."""
    if no_choices:
        choices = []
    elif kind == CHAT:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    obj = "chat.completion.chunk" if kind == CHAT else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage          # null on every chunk but the last, as OpenAI streams it
    if dmax is not None:
        out["dmax"] = dmax
    return out
