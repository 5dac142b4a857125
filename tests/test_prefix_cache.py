"""The engine's prefix cache: requests sharing a prefix skip its prefill, and nothing else changes.

- the index (host trie) never hands out an entry holding another prefix, under random inserts,
  matches and eviction pressure (a simulated pool records what each entry holds);
- the engine with the cache on decodes every request exactly as with it off (tokens, NFE, TPF) and
  as ``generate`` alone: random requests with random shared prefixes, random arrivals, a pool small
  enough to evict; the compile count stays flat;
- multi-turn chat: the second turn, which resends the first turn and its reply, prefills only from
  the end of the first turn's committed blocks; the still-revisable block never enters the cache.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_decoding_oracle import random_params
from test_engine import CFG, alone, assert_same, engine, params, request, serve_with_arrivals  # noqa: F401

from dmax_jax.serving.prefix_index import PrefixIndex

B = 8


@settings(max_examples=60, deadline=None)
@given(hs.data())
def test_index_never_serves_a_foreign_or_stale_prefix(data):
    entries = data.draw(hs.integers(1, 6), "entries")
    index = PrefixIndex(entries, 2)
    pool: dict[int, tuple] = {}          # entry -> the whole prefix its block's K/V were computed from
    bases = [data.draw(hs.lists(hs.integers(0, 3), min_size=8, max_size=8)) for _ in range(2)]
    for _ in range(data.draw(hs.integers(1, 25), "ops")):
        base = bases[data.draw(hs.integers(0, 1))]
        ids = np.asarray(base[:data.draw(hs.integers(0, 8))] + data.draw(hs.lists(hs.integers(0, 3),
                                                                                  max_size=6)), np.int32)
        n = len(ids) // 2
        if data.draw(hs.booleans()):
            for j, e in index.insert(ids, n):
                pool[e] = tuple(ids[:2 * (j + 1)])
        else:
            for j, e in enumerate(index.match(ids, n)):
                assert pool[e] == tuple(ids[:2 * (j + 1)]), "the entry holds another prefix"
        assert index.cached_blocks <= entries


def test_index_evicts_least_recently_used_leaves_first():
    index = PrefixIndex(3, 1)
    a, b = np.array([1, 2], np.int32), np.array([5], np.int32)
    assert [e for _, e in index.insert(a, 2)] == [0, 1]
    assert index.insert(b, 1) == [(0, 2)]
    index.match(a, 2)                                    # a's chain is now the most recent
    assert index.insert(np.array([7], np.int32), 1) == [(0, 2)]   # b (LRU leaf) goes, not a's blocks
    assert index.match(a, 2) == [0, 1] and index.match(b, 1) == []
    assert index.counters["evictions"] == 1
    with pytest.raises(ValueError, match="prefix cache entries"):
        PrefixIndex(-1, 8)


def _shared_prefix_requests(rng, n, prefixes):
    reqs = []
    for i in range(n):
        head = prefixes[int(rng.integers(0, len(prefixes)))][:int(rng.integers(0, 45))]
        tail = [int(t) for t in rng.integers(3, CFG.vocab_size, int(rng.integers(1, 14)))]
        temperature = [0.0, 0.0, 0.8][i % 3]
        reqs.append(request(head + tail, int(rng.integers(9, 24)), strategy=["spd", "threshold"][i % 2],
                            temperature=temperature, seed=int(rng.integers(0, 100)), request_id=i % 2,
                            threshold=float(rng.choice([0.05, 0.3]))))
    return reqs


@functools.cache
def _params():
    return random_params(CFG, seed=0, lm_head_scale=10.0)


@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(seed=hs.integers(0, 2**16), pool=hs.sampled_from([4, 10, None]))
def test_cache_on_decodes_exactly_as_cache_off(seed, pool):
    rng = np.random.default_rng(seed)
    prefixes = [[int(t) for t in rng.integers(3, CFG.vocab_size, 48)] for _ in range(2)]
    reqs = _shared_prefix_requests(rng, 7, prefixes)
    arrivals = sorted(int(a) for a in rng.integers(0, 12, len(reqs)))
    on = engine(_params(), prefix_cache_blocks=pool)
    off = engine(_params(), prefix_cache_blocks=0)
    got = serve_with_arrivals(on, reqs, arrivals)
    ref = serve_with_arrivals(off, reqs, arrivals)
    for i, (a, b) in enumerate(zip(got, ref)):
        fa, fb = a.result(0), b.result(0)
        assert fa.token_ids == fb.token_ids and fa.usage.nfe == fb.usage.nfe, f"request {i}"
        assert fa.usage.tokens_ref == fb.usage.tokens_ref and fb.usage.cached_tokens == 0
    s = on.stats()
    assert s["prefix_cache_blocks"] <= s["prefix_cache_capacity_blocks"]
    assert s["prefix_cache_hit_blocks"] * B == sum(h.result(0).usage.cached_tokens for h in got)
    assert on.compile_count() == len(on.program_names())
    if pool == 4:
        assert s["prefix_cache_evictions"] > 0


def test_shared_prefix_skips_prefill_and_equals_generate(params):  # noqa: F811
    rng = np.random.default_rng(5)
    shared = [int(t) for t in rng.integers(3, CFG.vocab_size, 45)]      # 5 whole blocks, 2 whole chunks
    reqs = [request(shared + [int(t) for t in rng.integers(3, CFG.vocab_size, n)], 17, request_id=i,
                    strategy=["spd", "threshold"][i % 2]) for i, n in enumerate([3, 11, 6])]
    eng = engine(params)
    handles = serve_with_arrivals(eng, reqs, arrivals=[0, 5, 6])
    fins = [h.result(0) for h in handles]
    for i, (r, f) in enumerate(zip(reqs, fins)):
        assert_same(f, alone(params, r), f"request {i}")
    assert [f.usage.cached_tokens for f in fins] == [0, 32, 32]     # whole prefill chunks of 16
    s = eng.stats()
    assert (s["prefix_cache_hits"], s["prefix_cache_misses"], s["prefix_cache_hit_blocks"]) == (2, 1, 8)
    assert s["prefix_cache_bytes"] == s["prefix_cache_blocks"] * eng.prefix.block_bytes > 0
    assert eng.compile_count() == len(eng.program_names())


def test_second_turn_prefills_only_the_new_turn(params):  # noqa: F811
    rng = np.random.default_rng(9)
    turn1 = request([int(t) for t in rng.integers(3, CFG.vocab_size, 21)], 24)
    eng = engine(params)
    (h1,) = serve_with_arrivals(eng, [turn1], [0])
    f1 = h1.result(0)
    assert len(f1.token_ids) == 24 and f1.usage.blocks == 4      # no EOS: blocks [16, 48) decoded
    committed = 16 + (4 - 1) * B       # the last decoded block was never committed: it is not cached
    assert eng.run_until_idle() == 1   # one more round saves the finished request's blocks
    assert eng.stats()["prefix_cache_blocks"] == committed // B
    user2 = [int(t) for t in rng.integers(3, CFG.vocab_size, 13)]
    turn2 = request(list(turn1.prompt_ids) + list(f1.token_ids) + user2, 17)
    before = eng.stats()["prefill_chunks"]
    (h2,) = serve_with_arrivals(eng, [turn2], [0])
    f2 = h2.result(0)
    assert f2.usage.cached_tokens == 32      # up to the first turn's open block, in whole chunks of 16
    assert eng.stats()["prefill_chunks"] - before == 2          # [32, 48) and [48, 64): the new turn
    assert_same(f2, alone(params, turn2))

    exact = engine(params, prefix_cache_generated=False)      # prompt blocks only: bit-exact reuse
    serve_with_arrivals(exact, [turn1], [0])
    exact.run_until_idle()
    assert exact.stats()["prefix_cache_blocks"] == 16 // B                # turn 1's prompt blocks alone
    (h3,) = serve_with_arrivals(exact, [turn2], [0])
    assert h3.result(0).usage.cached_tokens == 16 and h3.result(0).token_ids == f2.token_ids
