"""Hostile and broken request bodies, and the admission bound, against the real HTTP app.

The app runs under uvicorn on a loopback port with the real tokenizer and a stub engine (no model,
no compilation): everything these tests exercise happens before a request reaches the engine, or is
the server's bookkeeping around it (the admission bound). Fuzzed with ``hypothesis`` over JSON values
and raw byte strings: a bad body is a 400 with the OpenAI error object, never a 500.
"""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_util import serve_in_thread

from dmax_jax.data.chat import load_tokenizer
from dmax_jax.data.tokenizer_build import build_tokenizer
from dmax_jax.decoding import DecodeConfig
from dmax_jax.serving.guard import MAX_DEPTH
from dmax_jax.serving.requests import Finished, Usage
from dmax_jax.serving.server import ServeConfig, create_app

NAME, VOCAB, MASK, BODY_LIMIT = "stub", 384, 383, 64 << 10
OK = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class StubEngine:
    """What the server needs of an Engine. ``hold``: submitted requests stay in the engine until
    :meth:`release`; otherwise each finishes at once with no tokens."""

    max_batch, block_length, capacity, strategies, error = 1, 8, 96, ("spd", "threshold"), None

    def __init__(self) -> None:
        self.hold, self.held, self.lock = False, [], threading.Lock()

    def start(self) -> None: ...
    def stop(self, drain: bool = True, timeout: float | None = None) -> None: ...
    def stats(self) -> dict: return {}
    def compile_count(self) -> int: return 0
    def abort(self, request_id: int, reason: str = "abort") -> bool: return False

    def submit(self, request, listener):
        with self.lock:
            rid = len(self.held)
            self.held.append((rid, listener))
        if not self.hold:
            self.release()
        return type("Handle", (), {"id": rid})()

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held, []
        for rid, listener in held:
            listener(Finished(rid, "length", (), Usage(1, 0, 0, 1, 1)))


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    path = tmp_path_factory.mktemp("stub_tok")
    build_tokenizer(path, vocab_size=VOCAB)
    engine = StubEngine()
    config = ServeConfig(model_name=NAME, decode=DecodeConfig(block_length=8, gen_length=8), max_queue=1,
                         max_body_bytes=BODY_LIMIT)
    app = create_app(engine, load_tokenizer(path), config, mask_id=MASK, vocab_size=VOCAB)
    served = serve_in_thread(app, engine, None)
    yield served
    served.stop()


def post(stub, raw, path: str = "/chat/completions", headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(stub.v1 + path, content=raw, headers=headers, timeout=30)


def assert_error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("invalid_request_error" if status == 400 else "server_error")
    assert err["param"] == param, err
    return err


def test_a_valid_request_passes_the_guards(stub):
    r = post(stub, json.dumps(OK))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def _nested(depth: int) -> dict:
    content: object = "x"
    for _ in range(depth):
        content = [content]
    return {**OK, "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("raw,param,code", [
    ("[" * 20_000 + "]" * 20_000, None, "too_deep"),                         # RecursionError in json
    (json.dumps(_nested(MAX_DEPTH + 5)), "messages", "too_deep"),
    ('{"model": "stub", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content", "invalid_unicode"),
    ('{"model": "stub", "stop": "\\udfff", "messages": [{"role": "user", "content": "a"}]}',
     "stop", "invalid_unicode"),
    ('{"model": "stub", "\\ud83d": 1, "messages": []}', None, "invalid_unicode"),
    (b'{"model": "stub", "messages": "\xc3\x28"}', None, "invalid_encoding"),
    (json.dumps(OK).encode("utf-16"), None, "invalid_encoding"),
    ('{"model": "stub", "max_tokens": ' + "9" * 5000 + "}", None, "invalid_json"),   # int() digit limit
    ('{"model": "stub", "messages": [}', None, "invalid_json"),
    ("", None, "invalid_json"),
    ("\ufeff" + json.dumps(OK), None, "invalid_json"),
    ("null", None, "invalid_type"),
    ('{"model": "stub", "temperature": NaN, "messages": [{"role": "user", "content": "a"}]}',
     "temperature", "invalid_type"),
], ids=lambda v: str(v)[:24] if isinstance(v, (str, bytes)) else None)
def test_malformed_bodies_are_400_naming_the_field(stub, raw, param, code):
    assert assert_error(post(stub, raw), 400, param)["code"] == code


def test_huge_body_is_refused_by_its_declared_and_by_its_real_size(stub):
    big = json.dumps({**OK, "user": "u" * BODY_LIMIT})
    assert assert_error(post(stub, big), 400)["code"] == "body_too_large"

    def chunks():                       # no Content-Length: refused while streaming in
        yield big[:1000].encode()
        yield big[1000:].encode()
    assert assert_error(post(stub, chunks()), 400)["code"] == "body_too_large"


def test_each_refusal_is_one_log_line_without_the_prompt(stub, caplog):
    secret = "my secret prompt \ud800"
    raw = json.dumps({**OK, "messages": [{"role": "user", "content": secret}]})
    with caplog.at_level(logging.WARNING, logger="dmax_jax.serve"):
        r = post(stub, raw, headers={"X-Request-Id": "probe-42"})
    assert_error(r, 400, "messages[0].content")
    assert r.headers["x-request-id"] == "probe-42"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dmax_jax.serve"]
    assert len(lines) == 1, lines
    assert "probe-42" in lines[0] and " 400 " in lines[0] and "param=messages[0].content" in lines[0]
    assert "secret" not in lines[0]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                  max_size=4),
                     max_leaves=12)


@FUZZ
@given(body=_JSON, path=st.sampled_from(["/chat/completions", "/completions"]))
def test_fuzz_json_values_never_500(stub, body, path):
    r = post(stub, json.dumps(body, allow_nan=True), path)
    assert r.status_code == 400, (body, r.text)
    assert_error(r, 400, r.json()["error"]["param"])


@FUZZ
@given(raw=st.binary(max_size=200) | st.binary(max_size=40).map(lambda b: b'{"model": "stub", ' + b))
def test_fuzz_raw_bytes_never_500(stub, raw):
    r = post(stub, raw)
    assert r.status_code == 400, (raw, r.text)
    assert_error(r, 400, r.json()["error"]["param"])


_ANY_CHAR = st.characters(categories=["Cs"]) | st.characters()   # lone surrogates (Cs) included


@FUZZ
@given(content=st.text(_ANY_CHAR, max_size=30), field=st.sampled_from(["content", "stop", "model", "user"]))
def test_fuzz_any_unicode_in_strings_never_500(stub, content, field):
    body = dict(OK)
    if field == "content":
        body["messages"] = [{"role": "user", "content": content or "x"}]
    else:
        body[field] = content
    r = post(stub, json.dumps(body))              # ensure_ascii: lone surrogates travel as \udXXX
    assert r.status_code in ((200, 400, 404) if field == "model" else (200, 400)), (body, r.text)
    if r.status_code == 400:
        assert_error(r, 400, r.json()["error"]["param"])
    elif r.status_code == 404:         # a string naming a model this server does not serve
        assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


def test_full_admission_queue_is_503_with_retry_after_then_frees(stub):
    stub.engine.hold = True
    results: list[httpx.Response] = []
    workers = [threading.Thread(target=lambda: results.append(post(stub, json.dumps(OK)))) for _ in range(2)]
    try:
        for w in workers:           # 1 slot + --max-queue 1: two requests fit
            w.start()
        for _ in range(200):
            if len(stub.engine.held) == 2:
                break
            threading.Event().wait(0.05)
        r = post(stub, json.dumps(OK))
        err = assert_error(r, 503)
        assert err["code"] == "queue_full" and r.headers["retry-after"] == "1"
    finally:
        stub.engine.hold = False
        stub.engine.release()
        for w in workers:
            w.join(30)
    assert [x.status_code for x in results] == [200, 200]
    assert post(stub, json.dumps(OK)).status_code == 200      # the bound counts only live requests
