"""The OpenAI-compatible server against the real engine, driven by the official ``openai`` client.

One tiny random model (a real HF directory) served by uvicorn in a thread on a free loopback port.
Every text is checked against ``dmax_jax.generate`` on the same prompt, seed and knobs.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_util import serve_in_thread, wait_idle, write_model_dir

import dmax_jax
from dmax_jax.config import tiny_config
from dmax_jax.data.chat import apply_chat_template, encode
from dmax_jax.data.tokenizer_build import MASK_TOKEN
from dmax_jax.decoding import DecodeConfig
from dmax_jax.serving import Engine
from dmax_jax.serving.detok import detokenize
from dmax_jax.serving.server import ServeConfig, create_app

CFG = tiny_config(max_position_embeddings=256)
BLOCK, CAPACITY, SLOTS, MAX_TOKENS, LONG = 8, 96, 4, 16, 40
NAME = "tiny-dmax"
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_model_dir(tmp_path_factory.mktemp("tiny_serve"), CFG, seed=1)
    model = dmax_jax.load_pretrained(path)
    defaults = DecodeConfig(block_length=BLOCK, gen_length=MAX_TOKENS)
    engine = Engine(model, defaults, max_batch=SLOTS, capacity=CAPACITY, prefill_chunk=16)
    app = create_app(engine, model.tokenizer, ServeConfig(model_name=NAME, decode=defaults),
                     mask_id=CFG.mask_token_id, vocab_size=CFG.vocab_size)
    s = serve_in_thread(app, engine, model)
    s.warm_compiles = engine.compile_count()
    assert s.warm_compiles >= 1
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=TIMEOUT)


def chat_ids(model, text: str) -> list[int]:
    return apply_chat_template(model.tokenizer, [{"role": "user", "content": text}],
                               add_generation_prompt=True)


def reference(model, ids, *, max_tokens=MAX_TOKENS, strategy="spd", threshold=0.5, accept_threshold=0.9,
              temperature=0.0, seed=0) -> tuple[str, object]:
    res = dmax_jax.generate(model, [ids], strategy=strategy, block_length=BLOCK, gen_length=max_tokens,
                            threshold=threshold, accept_threshold=accept_threshold, temperature=temperature,
                            seed=seed)
    assert len(res.token_ids[0]) <= max_tokens
    return detokenize(model.tokenizer, res.token_ids[0]), res


def stream_chat(client, **kw):
    content, chunks = [], []
    for ch in client.chat.completions.create(model=NAME, stream=True, **kw):
        chunks.append(ch)
        if ch.choices and ch.choices[0].delta.content:
            content.append(ch.choices[0].delta.content)
    return "".join(content), chunks


def test_health_and_models(served, client):
    h = httpx.get(served.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == NAME and h["compile_count"] >= 1
    ids = [m.id for m in client.models.list()]
    assert ids == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_stream_equals_non_stream_equals_generate(served, client):
    msg = [{"role": "user", "content": "Tom has 3 apples."}]
    want, res = reference(served.model, chat_ids(served.model, "Tom has 3 apples."))
    r = client.chat.completions.create(model=NAME, messages=msg, max_tokens=MAX_TOKENS)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if res.tokens[0] == MAX_TOKENS else "stop")
    n_prompt = len(chat_ids(served.model, "Tom has 3 apples."))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, res.tokens[0])
    assert r.usage.total_tokens == n_prompt + res.tokens[0]
    dmax = r.model_extra["dmax"]
    assert dmax["nfe"] == res.nfe[0] and dmax["tpf"] == pytest.approx(res.tpf[0], rel=1e-6)
    assert dmax["blocks"] >= 1
    text, chunks = stream_chat(client, messages=msg, max_tokens=MAX_TOKENS,
                               stream_options={"include_usage": True})
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all("provisional" not in (c.model_extra.get("dmax") or {}) for c in chunks)  # not asked for
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == res.tokens[0]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_sampled_stream_and_not(served, client):
    ids = encode(served.model.tokenizer, "The quick brown fox")
    kw = dict(temperature=0.8, seed=1234, max_tokens=MAX_TOKENS, extra_body={"threshold": 0.3})
    want, res = reference(served.model, ids, temperature=0.8, seed=1234, threshold=0.3)
    r = client.completions.create(model=NAME, prompt="The quick brown fox", **kw)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage.completion_tokens == res.tokens[0] and r.model_extra["dmax"]["nfe"] == res.nfe[0]
    parts = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="The quick brown fox",
                                                                    stream=True, **kw) if c.choices]
    assert "".join(parts) == want
    r2 = client.completions.create(model=NAME, prompt=ids, **kw)        # token-id prompt, same request
    assert r2.choices[0].text == want


@pytest.mark.parametrize("max_tokens", [1, 3, BLOCK + 1])
def test_small_max_tokens_are_honoured(served, client, max_tokens):
    ids = encode(served.model.tokenizer, "count to ten")
    want, res = reference(served.model, ids, max_tokens=max_tokens)
    r = client.completions.create(model=NAME, prompt="count to ten", max_tokens=max_tokens,
                                  stop=None, stream=False)
    assert r.choices[0].text == want and r.usage.completion_tokens == res.tokens[0] <= max_tokens
    assert r.choices[0].finish_reason == ("length" if res.tokens[0] == max_tokens else "stop")


def test_threshold_strategy_knob(served, client):
    ids = chat_ids(served.model, "count")
    want, res = reference(served.model, ids, strategy="threshold", threshold=0.2)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "count"}],
                                       max_tokens=MAX_TOKENS,
                                       extra_body={"strategy": "threshold", "threshold": 0.2})
    assert r.choices[0].message.content == want and r.model_extra["dmax"]["strategy"] == "threshold"
    assert r.model_extra["dmax"]["nfe"] == res.nfe[0]


def test_provisional_snapshots_only_when_asked(served, client):
    msg = [{"role": "user", "content": "snapshots please"}]
    want, _ = reference(served.model, chat_ids(served.model, "snapshots please"))
    text, chunks = stream_chat(client, messages=msg, max_tokens=MAX_TOKENS,
                               extra_body={"dmax": {"provisional": True}})
    assert text == want
    snaps = [c.model_extra["dmax"]["provisional"] for c in chunks
             if "provisional" in (c.model_extra.get("dmax") or {})]
    assert snaps, "provisional snapshots were asked for"
    for s in snaps:
        assert len(s["token_ids"]) <= BLOCK and s["masked"] == s["token_ids"].count(CFG.mask_token_id)
        assert isinstance(s["text"], str) and s["step"] >= 0 and s["block"] >= 0
    first = [c for c in chunks if "provisional" in (c.model_extra.get("dmax") or {})][0]
    assert first.choices[0].delta.content is None      # provisional chunks carry no committed text


def test_stop_string_cuts_text_and_frees_the_slot(served, client):
    msg = [{"role": "user", "content": "Say something long"}]
    full = client.chat.completions.create(model=NAME, messages=msg, max_tokens=LONG)
    full = full.choices[0].message.content
    assert len(full) >= 6, f"the fixed random model should say enough to place a stop string: {full!r}"
    stop = full[len(full) // 2: len(full) // 2 + 2]
    want = full[: full.find(stop)]
    r = client.chat.completions.create(model=NAME, messages=msg, max_tokens=LONG, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    text, chunks = stream_chat(client, messages=msg, max_tokens=LONG, stop=stop)
    assert text == want and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert r.usage.completion_tokens <= LONG
    wait_idle(served.url)


@pytest.fixture
def abort_spy(served, monkeypatch):
    """Records the server's calls of the real engine's ``abort`` (the call still goes through)."""
    calls, real = [], served.engine.abort

    def spy(rid, reason="abort"):
        calls.append((rid, reason))
        return real(rid, reason)

    monkeypatch.setattr(served.engine, "abort", spy)
    return calls


def test_abort_mid_stream_frees_slots_and_server_keeps_serving(served, client, abort_spy):
    body = {"model": NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": LONG,
            "stream": True, "dmax": {"provisional": True}}
    for _ in range(SLOTS + 1):          # more aborts than slots: a leaked slot would block the last one
        with httpx.stream("POST", served.v1 + "/chat/completions", json=body, timeout=TIMEOUT) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and "provisional" in line:
                    break                  # the request is decoding: hang up now
    stats = wait_idle(served.url)
    assert stats["decoding"] == 0 and [r for _, r in abort_spy].count("abort") >= 1
    want, _ = reference(served.model, chat_ids(served.model, "after abort"))
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "after abort"}],
                                       max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == want


def test_disconnect_of_a_non_streamed_request_aborts_it(served, abort_spy):
    body = {"model": NAME, "messages": [{"role": "user", "content": "slow one"}], "max_tokens": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.v1 + "/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.02))
    wait_idle(served.url)
    assert [r for _, r in abort_spy] == ["abort"]


def test_chat_roles_render_through_the_template(served, client):
    msgs = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "developer", "content": "again"}]
    ids = apply_chat_template(served.model.tokenizer, [{**m, "role": m["role"].replace("developer", "system")}
                                                       for m in msgs], add_generation_prompt=True)
    want, _ = reference(served.model, ids)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == len(ids)


def test_32_concurrent_requests_all_answered_correctly(served, client):
    questions = [f"question number {i} about {'xyz'[i % 3]}" for i in range(32)]
    ids = [chat_ids(served.model, q) for q in questions]
    res = dmax_jax.generate(served.model, ids, strategy="spd", block_length=BLOCK, gen_length=MAX_TOKENS,
                            threshold=0.5, accept_threshold=0.9)
    want = [detokenize(served.model.tokenizer, t) for t in res.token_ids]

    def ask(i):
        if i % 2:
            text, _ = stream_chat(client, messages=[{"role": "user", "content": questions[i]}],
                                  max_tokens=MAX_TOKENS)
            return text
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": questions[i]}],
                                           max_tokens=MAX_TOKENS)
        return r.choices[0].message.content

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32), timeout=600))
    assert got == want
    compiles = httpx.get(served.url + "/health", timeout=10).json()["compile_count"]
    assert compiles == served.engine.compile_count() == served.warm_compiles   # flat after warm-up


# ---- refusals -----------------------------------------------------------------------------------------
def post(served, path, body, raw=None):
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(served.v1 + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)


def assert_400(resp, param):
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


OK_CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body,param", [
    ({**OK_CHAT, "threshold": 1.2}, "threshold"),
    ({**OK_CHAT, "accept_threshold": -1}, "accept_threshold"),
    ({**OK_CHAT, "max_tokens": 0}, "max_tokens"),
    ({**OK_CHAT, "max_tokens": CAPACITY}, "max_tokens"),               # beyond the slot's positions
    ({**OK_CHAT, "block_length": BLOCK * 2}, "block_length"),
    ({**OK_CHAT, "strategy": "llada2"}, "strategy"),
    ({**OK_CHAT, "n": 0}, "n"),
    ({**OK_CHAT, "top_p": 1.5}, "top_p"),
    ({**OK_CHAT, "logprobs": True}, "logprobs"),
    ({**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**OK_CHAT, "messages": []}, "messages"),
    ({**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({**OK_CHAT, "messages": [{"role": "user", "content": f"a {MASK_TOKEN} b"}]}, "messages"),
    ({**OK_CHAT, "messages": [{"role": "user", "content": "word " * 200}]}, "messages"),  # prompt too long
    ({**OK_CHAT, "stream": 1}, "stream"),
])
def test_chat_400s(served, body, param):
    assert_400(post(served, "/chat/completions", body), param)


def test_unknown_model_is_404_with_an_openai_error(served, client, caplog):
    r = post(served, "/chat/completions", {**OK_CHAT, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["code"] == "model_not_found"
    with caplog.at_level("WARNING", logger="dmax_jax.serve"), pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="secret prompt text")
    line = [m for m in caplog.messages if "404" in m][-1]
    assert "param=model" in line and "secret prompt text" not in line


def test_completion_400s_and_malformed_json(served):
    ok = {"model": NAME, "prompt": "hi"}
    assert_400(post(served, "/completions", {**ok, "prompt": [CFG.mask_token_id, 5]}), "prompt")
    assert_400(post(served, "/completions", {**ok, "prompt": [CFG.vocab_size]}), "prompt")
    assert_400(post(served, "/completions", {**ok, "echo": True}), "echo")
    assert_400(post(served, "/completions", None, raw='{"model": "x", "prompt": '), None)
    assert_400(post(served, "/completions", None, raw=b"\xff\xfe"), None)
    assert_400(post(served, "/completions", None, raw="[1, 2]"), None)
    r = httpx.get(served.v1 + "/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=0)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"threshold": 3})
    assert e.value.body["param"] == "threshold"


BAD_ROLES = ["bot", "tool", "", "USER"]
_BAD_VALUES = {
    "max_tokens": st.one_of(st.integers(max_value=0), st.text(), st.booleans(), st.floats(allow_nan=True)),
    "temperature": st.one_of(st.floats(min_value=2.0, exclude_min=True), st.floats(max_value=-1e-9),
                             st.text(), st.booleans(), st.just(float("nan"))),
    "threshold": st.one_of(st.floats(min_value=1.0, exclude_min=True), st.floats(max_value=-1e-9),
                           st.text(), st.lists(st.integers(), max_size=2)),
    "accept_threshold": st.one_of(st.floats(min_value=1.0, exclude_min=True), st.text()),
    "seed": st.one_of(st.integers(max_value=-(2**31) - 1), st.integers(min_value=2**31), st.floats(),
                      st.text()),
    "stop": st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                      st.lists(st.text(min_size=1), min_size=5, max_size=6), st.just([""])),
    "messages": st.one_of(st.just([]), st.text(), st.integers(),
                          st.lists(st.integers(), min_size=1, max_size=3),
                          st.lists(st.fixed_dictionaries({"role": st.sampled_from(BAD_ROLES),
                                                          "content": st.text()}), min_size=1, max_size=2)),
    "n": st.one_of(st.integers(min_value=129, max_value=10**6), st.integers(max_value=0)),
    "stream": st.one_of(st.integers(), st.text()),
    "model": st.one_of(st.integers(), st.booleans()),
    "strategy": st.text().filter(lambda s: s not in ("spd", "threshold")),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(_BAD_VALUES)), data=st.data())
def test_hypothesis_bad_bodies_get_400_naming_the_field(served, field, data):
    value = data.draw(_BAD_VALUES[field])
    resp = post(served, "/chat/completions", {**OK_CHAT, field: value})
    assert resp.status_code == 400, (field, value, resp.text)
    param = resp.json()["error"]["param"]
    assert param is not None and param.split(".")[0].split("[")[0] == field, (field, value, param)
