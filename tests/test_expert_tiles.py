"""The expert-aligned tile layout (``model.expert_tiles``): every routed row lands in a tile of its
own expert, rows never collide, padding and rows of no expert stay zero, and the tiled grouped
matmul equals a per-expert numpy matmul (float64 reference, float32 tolerance 1e-5 of the largest
magnitude) for any group sizes, including empty experts and rows past ``sizes.sum()``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dmax_jax.model.expert_tiles import tile_layout, tile_rows, tiled_matmul


def _groups(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


M, E = 48, 6   # fixed shapes (rows, experts) so that every example reuses one compiled program
_layout = jax.jit(tile_layout, static_argnums=(1, 2))
_matmul = jax.jit(tiled_matmul)
group_sizes = st.lists(st.integers(0, 12), min_size=E, max_size=E).filter(lambda s: sum(s) <= M)


@settings(max_examples=40, deadline=None)
@given(sizes=group_sizes, tile=st.sampled_from([1, 2, 8, 16]))
def test_layout_puts_each_row_in_a_tile_of_its_expert(sizes, tile):
    """Rows past ``sum(sizes)`` belong to no expert (expert-parallel receive buffers)."""
    dest, tile_expert, n_tiles = _layout(jnp.asarray(sizes, jnp.int32), M, tile)
    dest, tile_expert = np.asarray(dest), np.asarray(tile_expert)
    routed = dest[: sum(sizes)]
    assert len(set(routed.tolist())) == routed.size                     # no two rows share a slot
    assert (routed < n_tiles * tile).all() and (dest[sum(sizes):] == n_tiles * tile).all()
    np.testing.assert_array_equal(tile_expert[routed // tile], _groups(sizes))


@settings(max_examples=25, deadline=None)
@given(sizes=group_sizes, seed=st.integers(0, 2**16))
def test_tiled_matmul_equals_per_expert_matmul(sizes, seed):
    rng = np.random.default_rng(seed)
    lhs, rhs = rng.standard_normal((M, 12)), rng.standard_normal((E, 12, 5))
    want = np.zeros((M, 5))
    for i, g in enumerate(_groups(sizes)):
        want[i] = lhs[i] @ rhs[g]
    got = np.asarray(_matmul(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32),
                             jnp.asarray(sizes, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)


def test_tile_height_follows_rows_per_expert():
    assert tile_rows(64, 8) == 8 and tile_rows(1024, 8) == 128 and tile_rows(2048, 64) == 32
    assert tile_rows(3, 256) == 8 and tile_rows(10**6, 4) == 512


def test_gradients_reach_routed_rows_and_weights_only():
    """d/dlhs and d/drhs of the tiled matmul equal the per-expert formulas; rows of no expert get a
    zero gradient and an expert with no rows a zero weight gradient (nothing leaks via padding)."""
    rng = np.random.default_rng(1)
    sizes = [3, 0, 5, 2]
    m = sum(sizes) + 3
    lhs, rhs = rng.standard_normal((m, 6)), rng.standard_normal((4, 6, 4))
    cot = rng.standard_normal((m, 4))
    f = lambda a, b: jnp.sum(tiled_matmul(a, b, jnp.asarray(sizes, jnp.int32)) * cot)  # noqa: E731
    g_lhs, g_rhs = jax.grad(f, argnums=(0, 1))(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32))
    want_lhs, want_rhs = np.zeros_like(lhs), np.zeros_like(rhs)
    for i, g in enumerate(_groups(sizes)):
        want_lhs[i] = cot[i] @ rhs[g].T
        want_rhs[g] += np.outer(lhs[i], cot[i])
    np.testing.assert_allclose(g_lhs, want_lhs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(g_rhs, want_rhs, atol=1e-5, rtol=0)
    assert not np.asarray(g_lhs[sum(sizes):]).any() and not np.asarray(g_rhs[1]).any()
