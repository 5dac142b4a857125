"""The server as a new user meets it: ``python -m dmax_jax.serve``'s default flags (the shipped demo
model, slots of its 512 positions), driven by the real clients people point at an OpenAI-compatible
server — lm-eval (local-completions with batch 4, local-chat-completions with the chat template),
LangChain, LiteLLM, openai (n = 2, prompt arrays, top-p with a seed) — plus the tokenizer endpoints
and ``/metrics``. Every answer is checked against ``dmax_jax.generate`` on the prompt alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_util import serve_in_thread

import dmax_jax
from dmax_jax.data.chat import encode
from dmax_jax.eval.benchmarks import get_benchmark, read_jsonl
from dmax_jax.eval.harness import build_input_ids
from dmax_jax.serving.detok import detokenize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
NAME = "dmax"
Q = ("Ella is 8 years old. Liam is 4 times as old as Ella. Ava is 8 years younger than Liam. "
     "How old is Ava?")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENAI_API_KEY": "unused"}


@pytest.fixture(scope="module")
def served():
    from dmax_jax.serve import build, parse_args

    # the default flags, less the persistent compile cache: `build` sets JAX's cache directory for the
    # whole process (right for the CLI), which would leak into every later test of this xdist worker
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        engine, app, name = build(parse_args(["--compile-cache", "none"]))
        assert name == NAME and engine.capacity == 512       # the demo model's max_position_embeddings
        s = serve_in_thread(app, engine, None)
        s.tokenizer = app.state.ctx.tokenizer
        yield s
        s.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


def alone(served, ids, max_tokens=256, request_id=0, **knobs) -> str:
    """``generate`` on one prompt with the server's defaults (what the engine must reproduce)."""
    eng = served.engine
    cfg = eng.defaults.replace(gen_length=max_tokens, **knobs)
    res = dmax_jax.generate((eng.params, eng.config), [ids], cfg, request_ids=[request_id])
    return detokenize(served.tokenizer, res.token_ids[0])


# ---- capacity, tokenizer endpoints, metrics -------------------------------------------------------------
def test_capacity_follows_the_model(client):
    r = client.completions.create(model=NAME, prompt=Q, max_tokens=256)    # LangChain's / lm-eval's default
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text.endswith("#### 24")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=Q, max_tokens=500)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "512" in err["message"] and "500" in err["message"]
    r = client.completions.create(model=NAME, prompt=Q, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_tokenizer_endpoints_and_metrics(served):
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"] and info["max_model_len"] == 512
    ids = httpx.post(served.url + "/tokenize", json={"prompt": Q, "add_special_tokens": False}).json()
    assert ids["count"] == len(ids["tokens"]) > 10
    assert httpx.post(served.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == Q
    bad = httpx.post(served.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"

    def scrape() -> dict[str, float]:
        text = httpx.get(served.url + "/metrics").text
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                if ln and not ln.startswith("#")}

    before = scrape()
    httpx.post(served.v1 + "/completions", json={"model": NAME, "prompt": Q}, timeout=300).raise_for_status()
    after = scrape()
    for name in ("dmax_requests_finished_total{reason=\"eos\"}", "dmax_prompt_tokens_total",
                 "dmax_generation_tokens_total", "dmax_request_nfe_count",
                 "dmax_request_tokens_per_forward_count",
                 "dmax_time_to_first_block_seconds_count", "dmax_request_latency_seconds_count",
                 "dmax_engine_rounds_total"):
        assert after[name] > before.get(name, 0), name
    assert after["dmax_engine_compiles"] == before["dmax_engine_compiles"] > 0
    assert after["dmax_requests_running"] == 0 and after["dmax_requests_queued"] == 0


def test_prefix_cache_serves_a_shared_few_shot_prefix(served, client):
    rows = [r for _, r in read_jsonl(DATA / "demo_arith.jsonl")]
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:3])
    hits = served.engine.stats()["prefix_cache_hit_blocks"]
    prompts = [f"{shots}Question: {r['question']}\nAnswer:" for r in rows[3:5]]
    first, second = (client.completions.create(model=NAME, prompt=p, max_tokens=64) for p in prompts)
    assert first.usage.prompt_tokens_details.cached_tokens == 0        # nobody sent these shots before
    cached = second.usage.prompt_tokens_details.cached_tokens
    chunk = served.engine.spec.prefill_chunk
    assert cached >= chunk and cached % chunk == 0 and cached < second.usage.prompt_tokens
    assert served.engine.stats()["prefix_cache_hit_blocks"] - hits == cached // 32
    assert second.choices[0].text == alone(served, encode(served.tokenizer, prompts[1]), 64)  # same tokens
    metrics = httpx.get(served.url + "/metrics").text
    assert "dmax_prefix_cache_hits_total" in metrics and "dmax_prefix_cache_bytes" in metrics


# ---- openai: arrays, n, sampling ------------------------------------------------------------------------
def test_prompt_arrays_each_a_row_in_order(served, client):
    t = served.tokenizer
    prompts = [get_benchmark("gsm8k").prompt(r) for _, r in read_jsonl(DATA / "demo_arith.jsonl")[3:5]]
    forms = [prompts, [encode(t, p) for p in prompts]]
    singles = [client.completions.create(model=NAME, prompt=p, max_tokens=64) for p in prompts]
    for form in forms:
        r = client.completions.create(model=NAME, prompt=form, max_tokens=64)
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
        assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
        assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_n_samples_each_its_own_stream_and_top_p_with_a_seed(served, client):
    kw = dict(model=NAME, prompt=Q, max_tokens=64, temperature=1.0, top_p=0.9, seed=11)
    r = client.completions.create(n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text != r.choices[1].text
    assert r.choices[0].text == client.completions.create(**kw).choices[0].text      # sample 0 = n=1
    ids = encode(served.tokenizer, Q)
    for i in range(2):      # sample i = generate on sampling stream i
        assert r.choices[i].text == alone(served, ids, 64, temperature=1.0, top_p=0.9, seed=11, request_id=i)
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {0: r.choices[0].text, 1: r.choices[1].text}
    # no seed at temperature > 0: a fresh seed per request, returned, and replayable
    a = client.completions.create(model=NAME, prompt=Q, max_tokens=64, temperature=1.0)
    b = client.completions.create(model=NAME, prompt=Q, max_tokens=64, temperature=1.0)
    sa, sb = a.model_extra["dmax"]["seed"], b.model_extra["dmax"]["seed"]
    assert sa != sb
    again = client.completions.create(model=NAME, prompt=Q, max_tokens=64, temperature=1.0, seed=sa)
    assert again.choices[0].text == a.choices[0].text


# ---- LangChain, LiteLLM ---------------------------------------------------------------------------------
def test_langchain_batch_and_chat_stream(served, client):
    from langchain_openai import ChatOpenAI, OpenAI

    llm = OpenAI(model=NAME, base_url=served.v1, api_key="unused", temperature=0, max_retries=0)
    prompts = [get_benchmark("gsm8k").prompt(r) for _, r in read_jsonl(DATA / "demo_arith.jsonl")[:3]]
    got = llm.batch(prompts)                                   # one request, a prompt array
    assert got == [client.completions.create(model=NAME, prompt=p, max_tokens=256).choices[0].text
                   for p in prompts]
    chat = ChatOpenAI(model=NAME, base_url=served.v1, api_key="unused", temperature=0, max_retries=0)
    pieces = [c.content for c in chat.stream(Q)]
    want = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": Q}])
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == want.choices[0].message.content
    assert want.choices[0].message.content.endswith("#### 24")


def test_litellm_stream(served, client):
    import litellm

    out = litellm.completion(model=f"openai/{NAME}", api_base=served.v1, api_key="unused", stream=True,
                             messages=[{"role": "user", "content": Q}], temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in out)
    want = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": Q}],
                                          temperature=0)
    assert text == want.choices[0].message.content


# ---- lm-eval --------------------------------------------------------------------------------------------
def _lm_eval(served, tmp: Path, model: str, task: str, *extra: str) -> list[dict]:
    endpoint = "/chat/completions" if "chat" in model else "/completions"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
           f"model={NAME},base_url={served.v1}{endpoint}", "--tasks", task, "--include_path", str(DATA),
           "--output_path", str(tmp), "--log_samples", *extra]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = tmp.glob("**/samples_*.jsonl")
    return sorted((json.loads(ln) for ln in path.read_text().splitlines()), key=lambda d: d["doc_id"])


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["completions-batch4", "chat-template"])
def test_lm_eval_scores_what_dmax_eval_scores(served, tmp_path, chat):
    """lm-eval with its default arguments (remote tokenizer from the server, max_gen_toks 256) gets
    the texts ``generate`` gives on the prompts ``dmax_jax.eval`` builds, and scores them as
    ``dmax_jax.eval``'s GSM8K scoring does."""
    if chat:
        samples = _lm_eval(served, tmp_path, "local-chat-completions", "dmax_demo_arith_chat",
                           "--apply_chat_template")
    else:
        samples = _lm_eval(served, tmp_path, "local-completions", "dmax_demo_arith", "--batch_size", "4")
    bench = get_benchmark("gsm8k")
    rows = [r for _, r in read_jsonl(DATA / "demo_arith.jsonl")]
    assert len(samples) == len(rows) == 6
    for s, row in zip(samples, rows):
        ids = build_input_ids(served.tokenizer, bench.prompt(row), chat)
        text = alone(served, ids)
        assert s["resps"][0][0] == text, s["doc_id"]
        assert s["acc"] == float(bench.score(text, row).correct), s["doc_id"]
