"""Compiled decoders vs the step-by-step oracles of test_decoding_oracle.py, token for token and NFE
for NFE, on a random tiny model whose lm_head is scaled up so that predictions are confident enough
for multi-token transfers, revisions and early stops to actually happen (asserted below).

All tests share one batch shape (3 rows, block 8, gen 24, prompt bucket 16 → capacity 56) so each
strategy compiles once; thresholds and EOS id are runtime values and never recompile.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_decoding_oracle import Oracle, outputs, random_params

from dmax_jax.config import tiny_config
from dmax_jax.decoding import compile_count, generate

B, G, BUCKET, CAPACITY = 8, 24, 16, 56
CFG = tiny_config()
M, EOS = CFG.resolved_mask_token_id, CFG.eos_token_id
# P < B (first block holds the prompt tail), P % B != 0, and a two-block prompt
PROMPTS = [[5, 6, 7], [9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], list(range(10, 29))]
KW = dict(block_length=B, gen_length=G, prompt_bucket=BUCKET)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=0, lm_head_scale=10.0)  # sharpened softmax: confident decisions


def oracle(params, eos_id=EOS, **kw):
    return Oracle(params, CFG, block=B, length=CAPACITY, mask_id=M, eos_id=eos_id, **kw)


def check(res, expected, eos=EOS):
    """``expected``: per row (x, nfe, gen_end) from an oracle."""
    for i, (x, nfe, gen_end) in enumerate(expected):
        toks, ref = outputs(x, len(PROMPTS[i]), gen_end, eos)
        assert res.token_ids[i] == toks, f"row {i}"
        assert res.nfe[i] == nfe, f"row {i}"
        assert res.tokens_ref[i] == ref and res.tokens[i] == len(toks), f"row {i}"
        assert res.tpf[i] == pytest.approx(ref / nfe)


@pytest.mark.parametrize("tau,tau_acc", [(0.05, 0.9), (0.02, 0.05)])
def test_spd_matches_oracle(params, tau, tau_acc):
    res = generate((params, CFG), PROMPTS, strategy="spd", threshold=tau, accept_threshold=tau_acc,
                   trace=True, **KW)
    orc = oracle(params)
    want = [orc.spd(p, G, tau, tau_acc, request_id=i) for i, p in enumerate(PROMPTS)]
    check(res, [w[:3] for w in want])
    assert max(res.tpf) > 1.0                              # multi-token transfers happened
    revised = sum(s["state"].count("revised") for t in res.trace for s in t["steps"])
    assert revised == sum(w[3] for w in want) > 0          # ... and revisions, the same ones
    steps_per_block = [sum(1 for s in t["steps"] if s["block"] == b) for t in res.trace for b in range(4)]
    assert 1 < max(steps_per_block) <= B


@pytest.mark.parametrize("tau", [0.05, 0.1])
def test_threshold_matches_oracle(params, tau):
    res = generate((params, CFG), PROMPTS, strategy="threshold", threshold=tau, trace=True, **KW)
    orc = oracle(params)
    check(res, [orc.threshold(p, G, tau, request_id=i) for i, p in enumerate(PROMPTS)])
    assert max(res.tpf) > 1.0
    states = {s for t in res.trace for st in t["steps"] for s in st["state"]}
    assert states <= {"prompt", "masked", "committed"}


@pytest.mark.parametrize("tau,steps", [(0.3, 8), (0.5, 3)])
def test_llada2_matches_oracle(params, tau, steps):
    res = generate((params, CFG), PROMPTS, strategy="llada2", threshold=tau, steps=steps, trace=True, **KW)
    orc = oracle(params)
    check(res, [orc.llada2(p, G, tau, steps, request_id=i) for i, p in enumerate(PROMPTS)])
    assert all(not t["steps"][0]["cross"] for t in res.trace)


def _mid_eos(res):
    """``(row, token)``: a token that row produces for the first time after its first generated
    block, absent from the prompts and from some other row's output — as EOS it stops that row
    mid-generation while another row goes on."""
    banned = {t for p in PROMPTS for t in p} | {M}
    for r, toks in enumerate(res.token_ids):
        for i in range(B, len(toks)):
            t = toks[i]
            others = [o for j, o in enumerate(res.token_ids) if j != r]
            if t not in banned and t not in toks[:i] and any(t not in o for o in others):
                return r, t
    raise AssertionError("no usable mid-generation token in this random model's output")


@pytest.mark.parametrize("strategy", ["spd", "threshold", "llada2"])
def test_eos_early_stop_matches_oracle(params, strategy):
    kw = dict(strategy=strategy, threshold=0.05, trace=True, **KW)
    base = generate((params, CFG), PROMPTS, **kw)
    row, eos = _mid_eos(base)
    res = generate((params, CFG), PROMPTS, eos_id=eos, **kw)
    orc = oracle(params, eos_id=eos)
    run = {"spd": lambda p, i: orc.spd(p, G, 0.05, 0.9, request_id=i)[:3],
           "threshold": lambda p, i: orc.threshold(p, G, 0.05, request_id=i),
           "llada2": lambda p, i: orc.llada2(p, G, 0.05, B, request_id=i)}[strategy]
    check(res, [run(p, i) for i, p in enumerate(PROMPTS)], eos=eos)
    assert eos not in res.token_ids[row] and len(res.token_ids[row]) < len(base.token_ids[row])
    assert res.nfe[row] < base.nfe[row]                    # the row stopped early ...
    blocks = [max(s["block"] for s in t["steps"]) for t in res.trace]
    assert blocks[row] < max(blocks)                        # ... while another row went on


def test_rows_do_not_depend_on_batch_order(params):
    kw = dict(strategy="spd", threshold=0.05, temperature=0.0, trace=True, **KW)
    res = generate((params, CFG), PROMPTS, **kw)
    perm = [2, 0, 1]
    res_p = generate((params, CFG), [PROMPTS[i] for i in perm], request_ids=perm, **kw)
    for j, i in enumerate(perm):
        assert res_p.token_ids[j] == res.token_ids[i] and res_p.nfe[j] == res.nfe[i]
        assert res_p.trace[j] == res.trace[i]


def test_one_compilation_per_bucket(params):
    rng = np.random.default_rng(0)
    # one prompt bucket: every batch pads to 32 prompt tokens
    lengths = (17, 20, 23, 25, 28, 30, 31, 32)
    prompts = [[int(t) for t in rng.integers(3, CFG.vocab_size, size=n)] for n in lengths]
    generate((params, CFG), prompts[:3], strategy="threshold", threshold=0.2, trace=True, **KW)
    before = compile_count()
    for i in range(0, len(prompts) - 2):
        res = generate((params, CFG), prompts[i:i + 3], strategy="threshold", threshold=0.1 + 0.05 * i,
                       trace=True, eos_id=3 + i, **KW)
        assert len(res.token_ids) == 3 and res.compile_seconds == 0.0
    assert compile_count() == before


def test_trace_contract(params):
    res = generate((params, CFG), PROMPTS, strategy="spd", threshold=0.05, trace=True, **KW)
    for i, t in enumerate(res.trace):
        assert (t["prompt_len"], t["block_length"], t["mask_id"], t["eos_id"]) == (len(PROMPTS[i]), B, M, EOS)
        starts = {s["block"]: s["block_start"] for s in t["steps"]}
        assert starts[0] == (len(PROMPTS[i]) // B) * B
        assert all(starts[b] == starts[0] + b * B for b in starts)
        for s in t["steps"]:
            assert s["cross"] == (s["block"] > 0 and s["step"] == 0)
            assert len(s["tokens"]) == len(s["confidence"]) == len(s["state"]) == B
            pos = range(s["block_start"], s["block_start"] + B)
            assert [st == "prompt" for st in s["state"]] == [p < len(PROMPTS[i]) for p in pos]
            assert all((st == "masked") == (tok == M) for st, tok in zip(s["state"], s["tokens"]))
        last = {}
        for s in t["steps"]:
            last[s["block"]] = s
        final = [tok for b in sorted(last) for tok in last[b]["tokens"]][len(PROMPTS[i]) % B:]
        assert final[: len(res.token_ids[i])] == res.token_ids[i]
        assert all(st in ("prompt", "committed", "revised") for b in last for st in last[b]["state"])
        assert len(t["steps"]) == res.nfe[i] - 1           # every forward but the prefill is a step


def test_invalid_requests_raise_clear_errors(params):
    with pytest.raises(ValueError, match=r"row 1 contains the mask token"):
        generate((params, CFG), [[5, 6], [7, M, 8]], **KW)
    with pytest.raises(ValueError, match=r"row 0.*max_position_embeddings"):
        generate((params, CFG), [[5] * 10], block_length=B, gen_length=CFG.max_position_embeddings)
    with pytest.raises(ValueError, match="strategy"):
        generate((params, CFG), [[5]], strategy="greedy", **KW)
    with pytest.raises(ValueError, match="no steps"):
        generate((params, CFG), [[5]], strategy="threshold", steps=4, **KW)
    with pytest.raises(TypeError, match="params"):
        generate(params, [[5]], **KW)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate((params, CFG), [[5, CFG.vocab_size]], **KW)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["spd", "llada2"])
def test_sampling_matches_oracle_and_is_batch_independent(params, strategy):
    kw = dict(strategy=strategy, threshold=0.05, temperature=0.7, seed=11, **KW)
    res = generate((params, CFG), PROMPTS, **kw)
    orc = oracle(params, temperature=0.7, seed=11)
    if strategy == "spd":
        want = [orc.spd(p, G, 0.05, 0.9, request_id=i)[:3] for i, p in enumerate(PROMPTS)]
    else:
        want = [orc.llada2(p, G, 0.05, B, request_id=i) for i, p in enumerate(PROMPTS)]
    check(res, want)
    greedy = generate((params, CFG), PROMPTS, **{**kw, "temperature": 0.0})
    assert greedy.token_ids != res.token_ids
    perm = [1, 2, 0]
    res_p = generate((params, CFG), [PROMPTS[i] for i in perm], request_ids=perm, **kw)
    assert [res_p.token_ids[j] for j in range(3)] == [res.token_ids[i] for i in perm]
    other_seed = generate((params, CFG), PROMPTS, **{**kw, "seed": 12})
    assert other_seed.token_ids != res.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["spd", "threshold"])
def test_row_alone_equals_row_in_padded_batch(params, strategy):
    kw = dict(strategy=strategy, threshold=0.05, **KW)
    batch = generate((params, CFG), PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        alone = generate((params, CFG), [p], request_ids=[i], **kw)
        assert alone.token_ids[0] == batch.token_ids[i] and alone.nfe[0] == batch.nfe[i]
    padded = generate((params, CFG), PROMPTS[:1], batch_size=3, **kw)   # ragged batch padded to 3 rows
    assert padded.token_ids == batch.token_ids[:1] and padded.nfe == batch.nfe[:1]


@pytest.mark.parametrize("strategy", ["spd", "llada2"])
def test_gen_length_not_a_block_multiple(params, strategy):
    # G = 20 rounds up to the same capacity as G = 24: same compiled program, runtime gen length
    generate((params, CFG), PROMPTS, strategy=strategy, threshold=0.05, trace=True, **KW)
    before = compile_count()
    res = generate((params, CFG), PROMPTS, strategy=strategy, threshold=0.05, trace=True,
                   **{**KW, "gen_length": 20})
    assert compile_count() == before
    orc = oracle(params)
    if strategy == "spd":
        want = [orc.spd(p, 20, 0.05, 0.9, request_id=i)[:3] for i, p in enumerate(PROMPTS)]
    else:
        want = [orc.llada2(p, 20, 0.05, B, request_id=i) for i, p in enumerate(PROMPTS)]
        assert all(len(t) <= 20 for t in res.token_ids)     # HF returns at most gen_length tokens
    check(res, want)
