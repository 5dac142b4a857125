"""Request validation, response objects and incremental detokenisation (no model, no HTTP)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmax_jax.data.chat import load_tokenizer
from dmax_jax.data.tokenizer_build import build_tokenizer
from dmax_jax.serving.detok import TextStream, detokenize
from dmax_jax.serving.protocol import CHAT, COMPLETION, RequestError, chunk_object, parse_request

STRATS = ("spd", "threshold", "llada2")
CHAT_OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMP_OK = {"model": "m", "prompt": "hi"}


def parse(body, kind=CHAT):
    return parse_request(body, kind, strategies=STRATS)


def test_valid_chat_request_with_every_supported_field():
    r = parse({**CHAT_OK, "max_tokens": 7, "temperature": 0.5, "seed": 3, "stop": "x", "stream": True,
               "stream_options": {"include_usage": True}, "dmax": {"provisional": True}, "strategy": "spd",
               "threshold": 0.4, "accept_threshold": 1, "block_length": 8, "n": 1, "top_p": 1, "user": "u",
               "logprobs": False, "presence_penalty": 0, "tools": None,
               "messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]}]})
    assert r.messages == (("system", "be brief"), ("user", "ab"))
    assert (r.max_tokens, r.temperature, r.seed, r.stop, r.stream, r.include_usage, r.provisional) == \
        (7, 0.5, 3, ("x",), True, True, True)
    assert (r.strategy, r.threshold, r.accept_threshold, r.block_length) == ("spd", 0.4, 1.0, 8)
    assert parse({**CHAT_OK, "max_completion_tokens": 5}).max_tokens == 5


def test_valid_completion_prompt_forms():
    assert parse(COMP_OK, COMPLETION).prompts == ("hi",)
    assert parse({**COMP_OK, "prompt": ["hi"]}, COMPLETION).prompts == ("hi",)
    assert parse({**COMP_OK, "prompt": [5, 6]}, COMPLETION).prompts == ((5, 6),)
    assert parse({**COMP_OK, "prompt": [[5, 6]]}, COMPLETION).prompts == ((5, 6),)
    assert parse({**COMP_OK, "prompt": ["a", "b"]}, COMPLETION).prompts == ("a", "b")   # one row each
    assert parse({**COMP_OK, "prompt": [[5], "b"]}, COMPLETION).prompts == ((5,), "b")
    r = parse({**COMP_OK, "n": 3, "top_p": 0.5, "top_k": 7}, COMPLETION)
    assert (r.n, r.top_p, r.top_k) == (3, 0.5, 7)
    r = parse({**COMP_OK, "max_tokens": None, "seed": None}, COMPLETION)     # JSON null = absent
    assert r.max_tokens is None and r.seed is None and r.stop == ()


BAD = [  # (kind, body, param)
    (CHAT, [1, 2], None),
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model"),
    (CHAT, {"model": 3, "messages": []}, "model"),
    (CHAT, {"model": "m"}, "messages"),
    (CHAT, {"model": "m", "messages": []}, "messages"),
    (CHAT, {"model": "m", "messages": "hi"}, "messages"),
    (CHAT, {"model": "m", "messages": ["hi"]}, "messages[0]"),
    (CHAT, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                     "image_url": {}}]}]},
     "messages[0].content[0]"),
    (CHAT, {**CHAT_OK, "max_tokens": 0}, "max_tokens"),
    (CHAT, {**CHAT_OK, "max_tokens": -3}, "max_tokens"),
    (CHAT, {**CHAT_OK, "max_tokens": 2.5}, "max_tokens"),
    (CHAT, {**CHAT_OK, "max_tokens": True}, "max_tokens"),
    (CHAT, {**CHAT_OK, "max_tokens": "10"}, "max_tokens"),
    (CHAT, {**CHAT_OK, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    (CHAT, {**CHAT_OK, "temperature": -0.1}, "temperature"),
    (CHAT, {**CHAT_OK, "temperature": 2.5}, "temperature"),
    (CHAT, {**CHAT_OK, "temperature": float("nan")}, "temperature"),
    (CHAT, {**CHAT_OK, "temperature": "hot"}, "temperature"),
    (CHAT, {**CHAT_OK, "threshold": 1.5}, "threshold"),
    (CHAT, {**CHAT_OK, "threshold": -0.01}, "threshold"),
    (CHAT, {**CHAT_OK, "threshold": float("inf")}, "threshold"),
    (CHAT, {**CHAT_OK, "accept_threshold": 2}, "accept_threshold"),
    (CHAT, {**CHAT_OK, "block_length": 0}, "block_length"),
    (CHAT, {**CHAT_OK, "strategy": "greedy"}, "strategy"),
    (CHAT, {**CHAT_OK, "seed": -(2**31) - 1}, "seed"),
    (CHAT, {**CHAT_OK, "steps": 0}, "steps"),
    (CHAT, {**CHAT_OK, "seed": 2**40}, "seed"),
    (CHAT, {**CHAT_OK, "seed": 1.0}, "seed"),
    (CHAT, {**CHAT_OK, "stop": 3}, "stop"),
    (CHAT, {**CHAT_OK, "stop": ["a", ""]}, "stop"),
    (CHAT, {**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CHAT, {**CHAT_OK, "stream": "yes"}, "stream"),
    (CHAT, {**CHAT_OK, "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {**CHAT_OK, "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    (CHAT, {**CHAT_OK, "stream": True, "stream_options": {"foo": True}}, "stream_options.foo"),
    (CHAT, {**CHAT_OK, "dmax": {"provisional": "yes"}}, "dmax.provisional"),
    (CHAT, {**CHAT_OK, "dmax": {"steps": 3}}, "dmax.steps"),
    (CHAT, {**CHAT_OK, "dmax": True}, "dmax"),
    (CHAT, {**CHAT_OK, "n": 0}, "n"),
    (CHAT, {**CHAT_OK, "n": 1.5}, "n"),
    (CHAT, {**CHAT_OK, "n": 129}, "n"),
    (CHAT, {**CHAT_OK, "top_k": -2}, "top_k"),
    (CHAT, {**CHAT_OK, "top_p": 0}, "top_p"),
    (CHAT, {**CHAT_OK, "logprobs": True}, "logprobs"),
    (CHAT, {**CHAT_OK, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {**CHAT_OK, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {**CHAT_OK, "tool_choice": "auto"}, "tool_choice"),
    (CHAT, {**CHAT_OK, "functions": [{"name": "f"}]}, "functions"),
    (CHAT, {**CHAT_OK, "logit_bias": {"5": 1}}, "logit_bias"),
    (CHAT, {**CHAT_OK, "presence_penalty": 0.5}, "presence_penalty"),
    (CHAT, {**CHAT_OK, "frequency_penalty": 1}, "frequency_penalty"),
    (CHAT, {**CHAT_OK, "top_p": 1.5}, "top_p"),
    (CHAT, {**CHAT_OK, "prompt": "x"}, "prompt"),
    (CHAT, {**CHAT_OK, "colour": "blue"}, "colour"),
    (COMPLETION, {"model": "m"}, "prompt"),
    (COMPLETION, {**COMP_OK, "prompt": ""}, "prompt"),
    (COMPLETION, {**COMP_OK, "prompt": []}, "prompt"),
    (COMPLETION, {**COMP_OK, "prompt": ["a", ""]}, "prompt[1]"),
    (COMPLETION, {**COMP_OK, "prompt": [[1], []]}, "prompt[1]"),
    (COMPLETION, {**COMP_OK, "prompt": [1, "a"]}, "prompt"),
    (COMPLETION, {**COMP_OK, "prompt": {"text": "a"}}, "prompt"),
    (COMPLETION, {**COMP_OK, "echo": True}, "echo"),
    (COMPLETION, {**COMP_OK, "best_of": 3}, "best_of"),
    (COMPLETION, {**COMP_OK, "suffix": "end"}, "suffix"),
    (COMPLETION, {**COMP_OK, "logprobs": 2}, "logprobs"),
    (COMPLETION, {**COMP_OK, "messages": []}, "messages"),
]


@pytest.mark.parametrize("kind,body,param", BAD)
def test_bad_requests_name_the_field(kind, body, param):
    with pytest.raises(RequestError) as e:
        parse(body, kind)
    assert e.value.status == 400 and e.value.param == param
    err = e.value.body()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if param is not None:
        assert param.split(".")[0].split("[")[0] in err["message"]


def test_chunks_follow_the_openai_shapes():
    c = chunk_object(CHAT, "id", "m", 1, text="ab", role=True)
    assert c["object"] == "chat.completion.chunk"
    assert c["choices"][0]["delta"] == {"role": "assistant", "content": "ab"} and "usage" not in c
    c = chunk_object(CHAT, "id", "m", 1, dmax={"provisional": {}}, include_usage=True)
    assert c["choices"][0]["delta"] == {} and c["usage"] is None and c["dmax"] == {"provisional": {}}
    c = chunk_object(COMPLETION, "id", "m", 1, no_choices=True, usage={"total_tokens": 3}, include_usage=True)
    assert c["choices"] == [] and c["usage"] == {"total_tokens": 3} and c["object"] == "text_completion"


# ---- detokenisation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path, vocab_size=384)
    return load_tokenizer(path)


def _stream(tok, ids, cuts, stop=()):
    ts = TextStream(tok, stop)
    deltas, lo = [], 0
    for hi in [*cuts, len(ids)]:
        if ts.stopped:
            break
        deltas.append(ts.push(ids[lo:hi]))
        lo = hi
    deltas.append(ts.finish())
    return ts, deltas, lo


def test_multibyte_characters_split_across_blocks_never_leak_partial_text(tok):
    text = "héllo wörld 日本語 🎉 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for cut in range(1, len(ids)):
        ts, deltas, _ = _stream(tok, ids, [cut])
        assert "".join(deltas) == text == ts.text and "\ufffd" not in deltas[0]
        assert text.startswith(deltas[0])


def test_stop_string_straddling_a_block_boundary_is_cut_and_held_back(tok):
    text = "one two END three"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for cut in range(1, len(ids)):
        ts, deltas, _ = _stream(tok, ids, [cut], stop=("END",))
        assert "".join(deltas) == "one two " == ts.text and ts.stopped
        assert "E" not in deltas[0]              # a possible stop prefix is never emitted early
        assert detokenize(tok, ids[:ts.tokens_used]).find("END") >= 0
        assert detokenize(tok, ids[:ts.tokens_used - 1]).find("END") < 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), stop=st.lists(st.sampled_from(["e", "th", "\n", "日", "zz", "🎉"]),
                                                    max_size=2))
def test_streamed_text_equals_decode_cut_at_first_stop(tok, seed, stop):
    rng = random.Random(seed)
    pool = tok("the cat 日本 🎉 e\nzz! hé", add_special_tokens=False)["input_ids"] + list(range(len(tok)))
    ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
    cuts = sorted(rng.sample(range(1, len(ids) + 1), min(3, len(ids))))
    ts, deltas, consumed = _stream(tok, ids, cuts, stop=tuple(stop))
    full = detokenize(tok, ids[:consumed])
    hits = [full.find(s) for s in stop if s in full]
    assert "".join(deltas) == ts.text == (full[:min(hits)] if hits else full)
    assert ts.stopped == bool(hits)
