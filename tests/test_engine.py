"""The slot engine against ``generate``: every request's tokens, NFE and TPF equal decoding it alone,
whatever shares the batch and whenever it arrives (batch invariance), through chunked prefill, early
departure, aborts at every stage and a background thread; one compilation; typed request errors.

Shapes are chosen so that few programs compile: engine block 8, capacity 96, prefill chunk 16;
``generate`` with prompt bucket 64 and ``max_tokens`` in 17..24 (one gen bucket), so each
(strategy, greedy) pair compiles once. The tiny random model's lm_head is scaled up (as in
test_decoding.py) so decisions are confident, multi-token and revised.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np
import pytest
from test_decoding_oracle import random_params

from dmax_jax.config import tiny_config
from dmax_jax.decoding import DecodeConfig, DecodeConfigError, generate
from dmax_jax.serving import (
    BlockCommitted,
    Engine,
    EngineClosedError,
    EngineRequest,
    EngineRequestError,
    Finished,
    ProvisionalStep,
)

CFG = tiny_config()
B, CAP, CHUNK, BUCKET = 8, 96, 16, 64
M = CFG.resolved_mask_token_id
DEFAULTS = DecodeConfig(block_length=B)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=0, lm_head_scale=10.0)


def engine(params, max_batch=3, **kw):
    """An engine of ``DEFAULTS`` (DecodeConfig fields among ``kw`` override them)."""
    knobs = {k: kw.pop(k) for k in list(kw) if k in DecodeConfig.field_names()}
    return Engine((params, CFG), DEFAULTS.replace(**knobs), max_batch=max_batch, capacity=CAP,
                  prefill_chunk=CHUNK, **kw)


def request(prompt_ids, max_tokens, *, request_id=0, provisional=False, **knobs):
    """An :class:`EngineRequest` with ``DEFAULTS`` and these knobs (``max_tokens`` = ``gen_length``)."""
    return EngineRequest(prompt_ids, DEFAULTS.replace(gen_length=max_tokens, **knobs), request_id=request_id,
                         provisional=provisional)


def alone(params, req: EngineRequest, eos_id=None):
    """``generate`` on the request's prompt alone (request id = its request_id; 0 for a lone prompt)."""
    return generate((params, CFG), [list(req.prompt_ids)], req.decode, request_ids=[req.request_id],
                    prompt_bucket=BUCKET, eos_id=eos_id)


def assert_same(fin: Finished, ref, tag=""):
    assert list(fin.token_ids) == ref.token_ids[0], tag
    assert fin.usage.nfe == ref.nfe[0], tag
    assert fin.usage.tokens_ref == ref.tokens_ref[0] and fin.usage.tokens == ref.tokens[0], tag
    assert fin.usage.tpf == pytest.approx(ref.tpf[0]), tag


def random_requests(rng, n, *, max_prompt, tokens=(17, 24)):
    """Greedy and sampled requests (sampled ones with top-p / top-k and a sample index as the server's
    ``n`` gives them: ``request_id`` = the sample)."""
    reqs = []
    for i in range(n):
        plen = int(rng.integers(1, max_prompt + 1))
        prompt = [int(t) for t in rng.integers(3, CFG.vocab_size, plen)]
        strategy = ["spd", "threshold"][i % 2]
        temperature = [0.0, 0.0, 0.8, 0.8][i % 4]
        sampled = dict(top_p=float(rng.choice([1.0, 0.9, 0.6])), sample_top_k=int(rng.choice([0, 5])),
                       request_id=int(rng.integers(0, 3))) if temperature else {}
        reqs.append(request(prompt, int(rng.integers(tokens[0], tokens[1] + 1)), strategy=strategy,
                                  threshold=float(rng.choice([0.02, 0.05, 0.3])),
                                  accept_threshold=float(rng.choice([0.5, 0.9])), temperature=temperature,
                                  seed=int(rng.integers(0, 1000)), **sampled))
    return reqs


def samples_of(req: EngineRequest, n: int) -> list[EngineRequest]:
    """The server's ``n`` samples of one prompt: the same request on sampling streams 0 .. n-1."""
    return [dataclasses.replace(req, request_id=i) for i in range(n)]


def serve_with_arrivals(eng: Engine, reqs, arrivals):
    """Submit request i at round ``arrivals[i]`` (synchronous rounds); returns the handles."""
    handles, rounds = {}, 0
    while len(handles) < len(reqs) or eng.stats()["queued"] or any(not h.finished for h in handles.values()):
        for i, r in enumerate(reqs):
            if arrivals[i] == rounds and i not in handles:
                handles[i] = eng.submit(r)
        eng.step()
        rounds += 1
        assert rounds < 500
    return [handles[i] for i in range(len(reqs))]


def test_requests_arriving_at_random_blocks_equal_generate_alone(params):
    rng = np.random.default_rng(0)
    reqs = random_requests(rng, 5, max_prompt=60)
    reqs += samples_of(request([9, 8, 7], 12, temperature=1.0, top_p=0.8, seed=3), 2)   # n = 2, together
    eng = engine(params, widths=(1, 2, 3), exit_factor=2)  # a round ends once 1 of 3 rows is left
    eng.warmup()
    assert eng.compile_count() == 3 + len(eng.prefill_widths) + 2  # + prefix load / save
    before = jax.tree.leaves(eng._state)
    handles = serve_with_arrivals(eng, reqs, arrivals=[0, 0, 1, 3, 4, 2, 2])
    assert all(a.is_deleted() for a in before)          # the slot buffers were donated, not copied
    for i, (r, h) in enumerate(zip(reqs, handles)):
        assert_same(h.result(0), alone(params, r), f"request {i}")
    assert handles[5].result(0).token_ids != handles[6].result(0).token_ids   # two streams, two samples
    assert eng.stats()["prefill_chunks"] > len(reqs)  # some prompts took several chunks
    assert eng.compile_count() == 3 + len(eng.prefill_widths) + 2  # knobs, arrivals, strategies, widths: flat
    assert sum(eng.stats()[f"rounds_width_{w}"] > 0 for w in eng.widths) >= 2  # slots changed widths
    assert eng.stats()["paused"] > 0  # blocks left mid-way resumed beside others' new blocks


@pytest.mark.slow
def test_many_random_requests_equal_generate_alone(params):
    rng = np.random.default_rng(1)
    reqs = random_requests(rng, 20, max_prompt=70, tokens=(1, 40))
    reqs += [request([7] * 5, 20, steps=3, threshold=0.05, seed=4),                 # spd step cap
             request(list(range(3, 67)), 17, threshold=0.05, request_id=5, temperature=0.5)]
    arrivals = sorted(int(a) for a in rng.integers(0, 30, len(reqs)))
    eng = Engine((params, CFG), DEFAULTS, max_batch=4, capacity=128, prefill_chunk=CHUNK, exit_factor=2)
    handles = serve_with_arrivals(eng, reqs, arrivals)
    for i, (r, h) in enumerate(zip(reqs, handles)):
        assert_same(h.result(0), alone(params, r), f"request {i}")
    assert eng.compile_count() == len(eng.program_names())
    assert eng.stats()["paused"] > 0  # rounds end once half their rows are left


def test_forward_count_is_nfe_alone_and_shared_in_a_batch(params):
    """``stats()["forwards"]`` counts the model forwards a round ran one after another: a lone request
    (prompt in one prefill chunk) runs exactly its NFE; requests decoding together share forwards,
    so the count is below the sum of their NFEs and at least the slowest one's."""
    reqs = [request(list(range(10 + i, 22 + i)), 24, strategy=s, threshold=t, seed=i)
            for i, (s, t) in enumerate([("spd", 0.3), ("threshold", 0.3), ("spd", 0.9), ("spd", 0.05)])]
    eng = engine(params, max_batch=1)
    for r in reqs:
        f0 = eng.stats()["forwards"]
        h = eng.submit(r)
        eng.run_until_idle()
        assert eng.stats()["forwards"] - f0 == h.result(0).usage.nfe == alone(params, r).nfe[0]
    eng = engine(params)  # 3 slots, the programs the other tests here compile
    handles = [eng.submit(r) for r in reqs]
    eng.run_until_idle()
    nfe = [h.result(0).usage.nfe for h in handles]
    assert max(nfe) <= eng.stats()["forwards"] < sum(nfe)


# exit_factor 1: every round one forward, every block paused; compact False: full-width forwards
@pytest.mark.parametrize(("exit_factor", "compact"), [(4, True), (1, True), (4, False)])
def test_events_blocks_and_provisional_steps(params, exit_factor, compact):
    eng = engine(params, exit_factor=exit_factor, compact=compact)
    req = request(list(range(10, 29)), 20, threshold=0.6, provisional=True)
    quiet = eng.submit(request(list(range(30, 35)), 20, strategy="threshold", threshold=0.3))
    h = eng.submit(req)
    eng.run_until_idle()
    events = list(h)
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "length"
    blocks = [e for e in events if isinstance(e, BlockCommitted)]
    assert [e.block for e in blocks] == list(range(fin.usage.blocks))
    assert sum((list(e.token_ids) for e in blocks), []) == list(fin.token_ids)
    prev_nfe = 1
    for e in blocks:  # one provisional snapshot per forward; the last one is the committed block
        steps = [s for s in events if isinstance(s, ProvisionalStep) and s.block == e.block]
        assert [s.step for s in steps] == list(range(e.nfe - prev_nfe))
        assert list(steps[-1].tokens) == list(e.token_ids)
        prev_nfe = e.nfe
    assert any(M in s.tokens for s in events if isinstance(s, ProvisionalStep))  # snapshots are provisional
    assert not any(isinstance(e, ProvisionalStep) for e in quiet)                # only when asked for
    assert_same(fin, alone(params, req))
    assert_same(quiet.result(0), alone(params, quiet.request))
    assert (eng.stats()["paused"] > 0) == (exit_factor == 1)


def test_eos_and_max_tokens_free_the_slot(params):
    probe = request(list(range(10, 29)), 24, threshold=0.05)
    toks = alone(params, probe).token_ids[0]
    # pretend a token this request first decodes in its second block (generated positions 5..12) is EOS
    eos = next(t for t in toks[5:13] if t not in toks[:5])
    eng = engine(params, max_batch=1, eos_id=eos)
    first = eng.submit(probe)
    second = eng.submit(request([5, 6, 7], 17, strategy="threshold", threshold=0.3, seed=1))
    rounds = 0
    while not first.finished:
        eng.step()
        rounds += 1
    assert first.result(0).reason == "eos" and first.result(0).usage.blocks == 2
    assert_same(first.result(0), alone(params, probe, eos_id=eos))
    assert eng.stats()["free_slots"] == 1 or eng.stats()["prefilling"] + eng.stats()["decoding"] == 1
    eng.run_until_idle()
    fin = second.result(0)
    assert fin.reason in ("length", "eos")
    assert_same(fin, alone(params, second.request, eos_id=eos))
    assert len(fin.token_ids) <= 17


def test_abort_queued_prefilling_decoding_then_serve(params):
    eng = engine(params, max_batch=1)
    long_prompt = list(range(3, 60))                        # 4 prefill chunks of 16
    a = eng.submit(request(long_prompt, 20, threshold=0.05))
    b = eng.submit(request(list(range(40, 52)), 24, threshold=0.05))
    c = eng.submit(request([9, 9, 9], 20))
    assert eng.abort(c.id) and c.result(0).reason == "abort" and c.result(0).token_ids == ()   # queued
    eng.step()
    assert eng.stats()["prefilling"] == 1
    assert eng.abort(a.id) and a.result(0).reason == "abort" and a.result(0).usage.blocks == 0  # prefilling
    assert eng.stats()["free_slots"] == 1
    while not any(isinstance(e, BlockCommitted) for e in list(b._events.queue)):
        eng.step()
    assert eng.abort(b.id, reason="stop")                                                      # decoding
    fin_b = b.result(0)
    assert fin_b.reason == "stop" and 1 <= fin_b.usage.blocks < 3
    full_b = alone(params, b.request)
    assert list(fin_b.token_ids) == full_b.token_ids[0][:len(fin_b.token_ids)]
    assert not eng.abort(b.id)                                                                 # already gone
    d = eng.submit(request(long_prompt, 20, strategy="threshold", threshold=0.3, temperature=0.8,
                                 seed=2))
    eng.run_until_idle()
    assert_same(d.result(0), alone(params, d.request))
    assert eng.compile_count() == len(eng.program_names())


def test_background_thread_concurrent_clients_and_stop(params):
    rng = np.random.default_rng(2)
    reqs = random_requests(rng, 4, max_prompt=30)
    eng = engine(params, max_batch=2).start()
    results, seen = {}, {}

    def client(i):
        evs = []
        h = eng.submit(reqs[i], listener=evs.append)
        results[i] = h.result(timeout=300)
        seen[i] = evs

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    eng.stop(drain=True)
    for i, r in enumerate(reqs):
        assert_same(results[i], alone(params, r), f"request {i}")
        assert seen[i][-1] == results[i]                       # the listener saw every event, in order
    with pytest.raises(EngineClosedError):
        eng.submit(reqs[0])
    assert eng.compile_count() == len(eng.program_names())


def test_stop_without_drain_aborts_everything(params):
    eng = engine(params, max_batch=1).start()
    hs = [eng.submit(request(list(range(3, 60)), 24, threshold=0.05)) for _ in range(3)]
    eng.stop(drain=False)
    assert all(h.result(timeout=60).reason in ("abort", "length") for h in hs)
    assert hs[-1].result(0).reason == "abort"


@pytest.mark.parametrize("kw,field", [
    (dict(prompt_ids=[5, M, 7], max_tokens=8), "prompt_ids"),
    (dict(prompt_ids=[], max_tokens=8), "prompt_ids"),
    (dict(prompt_ids=[5, CFG.vocab_size], max_tokens=8), "prompt_ids"),
    (dict(prompt_ids=list(range(3, 3 + CAP)), max_tokens=8), "prompt_ids"),
    (dict(prompt_ids=[5, 6], max_tokens=CAP), "max_tokens"),
    (dict(prompt_ids=[5, 6], max_tokens=0), "max_tokens"),
    (dict(prompt_ids=[5, 6], max_tokens=8, threshold=1.5), "threshold"),
    (dict(prompt_ids=[5, 6], max_tokens=8, accept_threshold=-0.1), "accept_threshold"),
    (dict(prompt_ids=[5, 6], max_tokens=8, temperature=-1.0), "temperature"),
    (dict(prompt_ids=[5, 6], max_tokens=8, strategy="llada2"), "strategy"),
    (dict(prompt_ids=[5, 6], max_tokens=8, strategy="beam"), "strategy"),
    (dict(prompt_ids=[5, 6], max_tokens=8, strategy="threshold", steps=4), "steps"),
    (dict(prompt_ids=[5, 6], max_tokens=8, steps=B + 1), "steps"),
    (dict(prompt_ids=[5, 6], max_tokens=8, block_length=16), "block_length"),
    (dict(prompt_ids=[5, 6], max_tokens=8, seed=2**40), "seed"),
])
def test_bad_requests_raise_typed_errors(params, kw, field):
    eng = engine(params)  # validation happens before anything compiles
    with pytest.raises((EngineRequestError, DecodeConfigError)) as e:   # DecodeConfig checks the knobs
        eng.submit(request(**kw))
    assert {"gen_length": "max_tokens"}.get(e.value.field, e.value.field) == field
    assert isinstance(e.value, ValueError)
    assert eng.stats()["queued"] == 0


def test_bad_engine_settings(params):
    with pytest.raises(ValueError, match="llada2"):
        engine(params, strategies=("llada2",))
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine((params, CFG), DecodeConfig(block_length=8), prefill_chunk=12, capacity=CAP)
    with pytest.raises(ValueError, match="capacity"):
        Engine((params, CFG), DecodeConfig(block_length=8), capacity=CFG.max_position_embeddings + 8)
    with pytest.raises(ValueError, match="exit_factor"):
        engine(params, exit_factor=0)
    with pytest.raises(ValueError, match="compact"):
        engine(params, compact="no")


def test_a_failing_round_ends_every_request_with_the_error(params):
    eng = engine(params, max_batch=1)
    eng.warmup()
    hs = [eng.submit(request([5, 6, 7], 17)) for _ in range(2)]

    def broken(*a):
        raise RuntimeError("device lost")

    eng._exe = broken
    eng.start()._thread.join(60)
    assert isinstance(eng.error, RuntimeError)
    assert all(h.result(10).reason == "error" and "device lost" in h.result(0).error for h in hs)
    with pytest.raises(EngineClosedError):
        eng.submit(request([5, 6, 7], 17))


def test_a_failing_listener_does_not_stop_the_engine(params):
    eng = engine(params, max_batch=2)

    def bad(event):
        raise ValueError("client bug")

    h1 = eng.submit(request([5, 6, 7], 17), listener=bad)
    h2 = eng.submit(request(list(range(10, 29)), 20, threshold=0.05))
    eng.run_until_idle()
    assert h1.result(0).reason in ("eos", "length")
    assert_same(h2.result(0), alone(params, h2.request))


def test_soft_top_k_mixing_matches_generate(params):
    eng = engine(params, max_batch=1, top_k=2, strategies=("spd",))
    req = request(list(range(10, 29)), 20, threshold=0.3, temperature=0.7, seed=5)
    h = eng.submit(req)
    eng.run_until_idle()
    ref = generate((params, CFG), [list(req.prompt_ids)], block_length=B, gen_length=20, threshold=0.3,
                   temperature=0.7, seed=5, top_k=2, prompt_bucket=BUCKET)
    assert_same(h.result(0), ref)
