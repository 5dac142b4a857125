"""Compacted forwards (decoding/compact.py, serving/compact.py): the rows that need a forward get
exactly its values, the others keep the base, and the forward runs at the smallest compact width
holding them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.serving.compact import compact_widths, compacted, put_rows, take_rows


@pytest.mark.parametrize(("n", "want"), [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)),
                                         (16, (4, 8, 16)), (6, (2, 3, 6))])
def test_compact_widths(n, want):
    assert compact_widths(n) == want


def _put(base, idx, res, keep):
    """Values only where needed (what callers must do); the width marker on every row computed."""
    (vals, width), (v, w) = base, res
    return put_rows(vals, idx, jnp.where(keep[:, None], v, take_rows(vals, idx))), put_rows(width, idx, w)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_needed_rows_get_the_forward_at_the_smallest_width(n):
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    def run(idx):  # the values, and on every row computed the width it was computed at
        w = n if idx is None else idx.shape[0]
        return take_rows(x, idx) * 2.0 + 1.0, jnp.full((w,), w, jnp.int32)

    f = jax.jit(lambda needed: compacted(needed, run, (jnp.full((n, 3), -7.0), jnp.zeros((n,), jnp.int32)),
                                         _put))
    for trial in range(12):
        needed = rng.random(n) < rng.choice([0.0, 0.2, 0.5, 1.0])
        vals, width = f(jnp.asarray(needed))
        vals, width = np.asarray(vals), np.asarray(width)
        count = int(needed.sum())
        np.testing.assert_array_equal(vals[needed], np.asarray(x)[needed] * 2.0 + 1.0)
        if count == 0:
            np.testing.assert_array_equal(vals, -7.0)   # no forward at all: the base, untouched
            continue
        w = min(v for v in compact_widths(n) if v >= count)
        assert set(width[needed]) == {w}, (trial, needed, width)
        assert (width > 0).sum() == w                 # exactly w rows went through the forward
        np.testing.assert_array_equal(vals[~needed], -7.0)  # computed for nothing or not at all: base


def test_resolve_compact():
    from dmax_jax.serving.compact import AUTO_COMPACT, resolve_compact

    params = {"w": jnp.zeros(2)}
    assert resolve_compact("auto", params) is AUTO_COMPACT[jax.default_backend()]
    assert resolve_compact(False, params) is False and resolve_compact(True, params) is True
    with pytest.raises(ValueError, match="compact must be"):
        resolve_compact("yes", params)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("cross", [[1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
def test_step0_logits_of_crossing_rows_are_the_cross_forwards(compact, cross):
    """At step 0 a crossing row's logits are the cross-block forward's, bit for bit, whatever width
    the block forward of the other rows runs at; the others get the block forward's."""
    import types

    from test_decoding_oracle import random_params

    from dmax_jax.config import tiny_config
    from dmax_jax.decoding import block
    from dmax_jax.decoding import forwards as fw
    from dmax_jax.decoding.config import ProgramSpec
    from dmax_jax.model.kv_cache import init_cache

    cfg, n, B = tiny_config(), 4, 8
    params = random_params(cfg, seed=0)
    spec = ProgramSpec(strategies=("spd",), block_length=B, mask_id=cfg.resolved_mask_token_id,
                       max_steps=(B,), greedy=None, top_k=1, max_unroll=4, expected_tpf=4, soft_impl="auto",
                       dtype="float32", platform="cpu", capacity=32, prefill_chunk=16, prefill_batch=1,
                       compact=compact)
    rng = np.random.default_rng(0)
    cache = init_cache(cfg, n, spec.row_len)
    noise = lambda d: {k: jnp.asarray(rng.normal(size=a.shape), jnp.float32) for k, a in d.items()}
    cache = cache.replace(k=noise(cache.k), v=noise(cache.v), length=jnp.asarray([8, 16, 8, 24], jnp.int32))
    r = types.SimpleNamespace(start=cache.length)
    emb = jnp.asarray(rng.normal(size=(n, B, cfg.hidden_size)), jnp.float32)
    logits_c = jnp.full((n, B, cfg.vocab_size), 123.0)
    cross = jnp.asarray(cross, bool)
    need = jnp.ones(n, bool) & ~cross    # step 0: live rows that do not take the cross forward's logits
    got = jax.jit(lambda: block._block_logits(spec, cfg, params, cache, r.start, need, emb, logits_c))()
    full = fw.block_forward(params, cfg, emb, r.start, cache, B, jnp.float32)
    c = np.asarray(cross)
    np.testing.assert_array_equal(np.asarray(got)[c], 123.0)
    np.testing.assert_allclose(np.asarray(got)[~c], np.asarray(full)[~c], rtol=1e-5, atol=1e-5)
