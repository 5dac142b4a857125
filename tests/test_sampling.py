"""top-p / top-k / temperature against a NumPy oracle of LLaDA2 ``generate``'s sampler
(``_sample_with_temperature_topk_topp``: temperature, then ``_top_k_logits``, then ``_top_p_logits``),
and the knobs end to end through ``generate`` (per-row traced values: one program for every value)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding_oracle import random_params

import dmax_jax
from dmax_jax.config import tiny_config
from dmax_jax.decoding import strategies as st
from dmax_jax.decoding.config import DecodeConfig, DecodeConfigError


def oracle_filter(logits: np.ndarray, k: int, p: float) -> np.ndarray:
    """The reference's filters on one row of logits, written as the PyTorch code reads."""
    out = logits.astype(np.float64).copy()
    if k > 0:
        kth = np.sort(out)[::-1][min(k, out.size) - 1]
        out = np.where(out < kth, -np.inf, out)
    if p < 1.0:
        order = np.argsort(-out, kind="stable")
        srt = out[order]
        probs = np.exp(srt - srt.max())
        probs /= probs.sum()
        remove = np.cumsum(probs) > p
        remove[1:] = remove[:-1].copy()
        remove[0] = False
        mask = np.zeros(out.size, bool)
        mask[order] = remove
        out = np.where(mask, -np.inf, out)
    return out


def test_filter_logits_matches_the_oracle():
    rng = np.random.default_rng(0)
    b, T, V = 6, 3, 50
    logits = rng.normal(0, 2.5, (b, T, V)).astype(np.float32)
    ks = np.array([0, 1, 5, 0, 7, 60], np.int32)
    ps = np.array([1.0, 1.0, 0.9, 0.5, 0.3, 0.05], np.float32)
    got = np.asarray(st.filter_logits(jnp.asarray(logits), jnp.asarray(ks), jnp.asarray(ps)))
    for i in range(b):
        for t in range(T):
            want = oracle_filter(logits[i, t], int(ks[i]), float(ps[i]))
            np.testing.assert_array_equal(np.isinf(got[i, t]), np.isinf(want), err_msg=f"row {i} pos {t}")
            kept = ~np.isinf(want)
            np.testing.assert_allclose(got[i, t][kept], want[kept], rtol=1e-6)
    assert np.isinf(got[2]).any() and not np.isinf(got[0]).any()   # the cases are not all trivial


@pytest.mark.parametrize("tempered", [False, True])
def test_choose_tokens_samples_the_filtered_distribution(tempered):
    """x0 = argmax(filtered tempered logits + the row's Gumbel noise); confidence p(x0) under the
    filtered tempered softmax (LLaDA2, ``tempered``) or the plain softmax (dInfer); a row at
    temperature 0 stays the argmax whatever its filters."""
    rng = np.random.default_rng(1)
    b, T, V = 4, 5, 40
    logits = rng.normal(0, 2.0, (b, T, V)).astype(np.float32)
    temp = np.array([0.7, 1.3, 0.0, 1.0], np.float32)
    ks, ps = np.array([3, 0, 2, 10], np.int32), np.array([1.0, 0.6, 0.5, 0.8], np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(np.arange(b))
    x0, conf, _ = st.choose_tokens(jax.numpy.asarray(logits), greedy=False, temperature=temp, keys=keys,
                                   tempered_confidence=tempered, top_p=ps, top_k=ks)
    x0, conf = np.asarray(x0), np.asarray(conf)
    for i in range(b):
        noise = np.asarray(jax.random.gumbel(keys[i], (T, V), np.float32))
        for t in range(T):
            if temp[i] == 0:
                want = int(np.argmax(logits[i, t]))
                base = logits[i, t].astype(np.float64)
            else:
                filt = oracle_filter(logits[i, t] / temp[i], int(ks[i]), float(ps[i]))
                want = int(np.argmax(filt + noise[t]))
                base = filt if tempered else logits[i, t].astype(np.float64)
            assert x0[i, t] == want, (i, t)
            pr = np.exp(base - base.max())
            np.testing.assert_allclose(conf[i, t], pr[want] / pr.sum(), rtol=1e-5)


def test_decode_config_validates_the_knobs():
    for field, value in (("top_p", 0.0), ("top_p", 1.5), ("sample_top_k", -1), ("top_p", float("nan"))):
        with pytest.raises(DecodeConfigError) as e:
            DecodeConfig(**{field: value})
        assert e.value.field == field


CFG = tiny_config()


@pytest.fixture(scope="module")
def model():
    return random_params(CFG, seed=3, lm_head_scale=4.0), CFG


@pytest.mark.parametrize("strategy", ["spd", "threshold", "llada2"])
def test_generate_top_k_1_and_tiny_top_p_equal_greedy(model, strategy):
    """A sampled row restricted to its most likely token decodes the greedy tokens (spd, threshold:
    dInfer's confidence is the plain softmax); llada2's confidence is under the filtered distribution
    (the reference's ``x0_p``), 1 for a one-token nucleus, so it commits differently — but top-k 1 and a
    tiny top-p agree. A wider nucleus with a seed is deterministic and differs from greedy."""
    ids = [[3, 4, 5, 6, 7]]
    kw = dict(strategy=strategy, block_length=8, gen_length=16, threshold=0.9)
    greedy = dmax_jax.generate(model, ids, **kw).token_ids
    top1 = dmax_jax.generate(model, ids, temperature=1.5, sample_top_k=1, seed=5, **kw).token_ids
    assert top1 == dmax_jax.generate(model, ids, temperature=1.5, top_p=1e-6, seed=5, **kw).token_ids
    assert (top1 == greedy) == (strategy != "llada2")
    a = dmax_jax.generate(model, ids, temperature=1.5, top_p=0.95, seed=5, **kw).token_ids
    assert a == dmax_jax.generate(model, ids, temperature=1.5, top_p=0.95, seed=5, **kw).token_ids
    assert a != greedy
