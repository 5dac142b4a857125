"""Compacted forwards (serving/compact.py): the rows that need a forward get exactly its values, the
others keep the base, and the forward runs at the smallest compact width holding them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.serving.compact import compact_widths, compacted


@pytest.mark.parametrize(("n", "want"), [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)),
                                         (16, (4, 8, 16)), (6, (2, 3, 6))])
def test_compact_widths(n, want):
    assert compact_widths(n) == want


def _put(base, idx, res):
    return jax.tree.map(lambda b, r: b.at[idx].set(r), base, res)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_needed_rows_get_the_forward_at_the_smallest_width(n):
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    f = jax.jit(lambda needed: compacted(
        needed, lambda idx: (x[idx] * 2.0 + 1.0, jnp.full(idx.shape, idx.shape[0], jnp.int32)),
        (jnp.full((n, 3), -7.0), jnp.zeros((n,), jnp.int32)), _put))
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
        untouched = width == 0
        np.testing.assert_array_equal(vals[untouched], -7.0)


def test_resolve_compact():
    from dmax_jax.serving.compact import AUTO_COMPACT, resolve_compact

    params = {"w": jnp.zeros(2)}
    assert resolve_compact("auto", params) is AUTO_COMPACT[jax.default_backend()]
    assert resolve_compact(False, params) is False and resolve_compact(True, params) is True
    with pytest.raises(ValueError, match="compact must be"):
        resolve_compact("yes", params)
