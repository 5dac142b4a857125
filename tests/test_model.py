"""Model core: masks, router, MoE backends, whole-model logits vs a float64 NumPy reference, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import forward_numpy, route_numpy, spec_allowed

from dmax_jax.config import tiny_config
from dmax_jax.model.experts import experts_dense, experts_grouped
from dmax_jax.model.kv_cache import init_cache
from dmax_jax.model.llada2 import forward_jit as forward
from dmax_jax.model.llada2 import init_params
from dmax_jax.model.masks import MaskSpec, allowed, default_positions, layout_indices
from dmax_jax.model.moe import route

LAYOUTS = {
    "base": {},
    "mha_no_shared": dict(num_attention_heads=4, num_key_value_heads=4, num_shared_experts=0),
    "gqa4_two_shared": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_shared_experts=2),
    "one_group_k3": dict(num_experts=6, n_group=1, topk_group=1, num_experts_per_tok=3,
                         first_k_dense_replace=0),
    "two_groups_tied": dict(n_group=2, topk_group=1, tie_word_embeddings=True, first_k_dense_replace=2,
                            num_hidden_layers=3, rotary_dim=8),
}


def spread_params(cfg, seed=0):
    """Random params with O(1) spread so routing and softmaxes are far from ties."""
    p = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten_with_path(p)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            out.append(jnp.asarray(1 + 0.2 * rng.standard_normal(x.shape), jnp.float32))
        elif "expert_bias" in name:
            out.append(jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32))
        elif "router" in name:
            out.append(x * 25)
        else:
            out.append(x * 4)
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("kind", ["full", "block_causal", "noisy_clean"])
@pytest.mark.parametrize("length,block", [(16, 4), (14, 4), (20, 3), (8, 32)])
def test_masks_match_spec_set_formulas(kind, length, block):
    want = spec_allowed(kind, length, block)
    blk, clean = layout_indices(MaskSpec(kind, block), length)
    np.testing.assert_array_equal(allowed(blk[:, None], clean[:, None], blk[None], clean[None]), want)


def test_noisy_clean_positions_are_shared():
    np.testing.assert_array_equal(default_positions(MaskSpec("noisy_clean", 4), 10, np), [0, 1, 2, 3, 4] * 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_router_matches_bruteforce(layout):
    cfg = tiny_config(**LAYOUTS[layout])
    rng = np.random.default_rng(1)
    u = rng.standard_normal((20, cfg.hidden_size))
    router = rng.standard_normal((cfg.hidden_size, cfg.num_experts)) * 0.3
    bias = rng.standard_normal(cfg.num_experts) * 0.5
    idx, w = route(jnp.asarray(u @ router, jnp.float32), jnp.asarray(bias, jnp.float32), cfg)
    for t in range(u.shape[0]):
        chosen, wr = route_numpy(u[t], router, bias, cfg)
        assert sorted(np.asarray(idx[t]).tolist()) == sorted(chosen)
        order = {e: i for i, e in enumerate(np.asarray(idx[t]).tolist())}
        np.testing.assert_allclose([w[t, order[e]] for e in chosen], wr, rtol=1e-5)


def test_expert_bias_changes_selection_not_weights():
    cfg = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=1)
    logits = jnp.zeros((1, 8)).at[0, 3].set(2.0)
    bias = jnp.zeros(8).at[5].set(10.0)
    idx, w = route(logits, bias, cfg)
    assert int(idx[0, 0]) == 5
    np.testing.assert_allclose(w[0, 0], jax.nn.sigmoid(0.0) * cfg.routed_scaling_factor, rtol=1e-6)


def test_ragged_moe_equals_dense_reference():
    rng = np.random.default_rng(0)
    n, h, i, e, k = 37, 16, 8, 6, 3
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((e, h, i)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((e, i, h)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = experts_grouped(x, idx, w, wg, wu, wd)
        np.testing.assert_allclose(got, experts_dense(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["full", "block_causal", "noisy_clean"])
def test_whole_model_matches_float64_numpy(layout, kind):
    cfg = tiny_config(**LAYOUTS[layout])
    params = spread_params(cfg, seed=len(layout))
    t, block = 12, 4
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, t))
    spec = MaskSpec(kind, block)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(forward(params, cfg, jnp.asarray(ids), mask=spec)[0])
    pos = np.asarray(default_positions(spec, t, np))
    want = forward_numpy(params, cfg, ids=ids, positions=pos, allowed=spec_allowed(kind, t, block))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_inputs_embeds_path_matches_numpy():
    cfg = tiny_config()
    params = spread_params(cfg, seed=7)
    emb = np.random.default_rng(4).standard_normal((1, 8, cfg.hidden_size))
    spec = MaskSpec("block_causal", 4)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(forward(params, cfg, inputs_embeds=jnp.asarray(emb, jnp.float32), mask=spec)[0])
    want = forward_numpy(params, cfg, embeds=emb, allowed=spec_allowed("block_causal", 8, 4))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ids_and_their_embeddings_agree():
    cfg = tiny_config()
    params = spread_params(cfg, seed=2)
    ids = jnp.asarray([[5, 9, 33, 2, 7, 100]])
    a = forward(params, cfg, ids, mask=MaskSpec("block_causal", 2))[0]
    b = forward(params, cfg, inputs_embeds=params["embedding"][ids], mask=MaskSpec("block_causal", 2))[0]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["base", "two_groups_tied"])
def test_cached_block_forward_equals_full_recompute(layout):
    cfg = tiny_config(**LAYOUTS[layout])
    params = spread_params(cfg, seed=11)
    bs, b = 4, 2
    ids = jnp.asarray(np.random.default_rng(5).integers(3, cfg.vocab_size, (b, 16)))
    spec = MaskSpec("block_causal", bs)
    with jax.default_matmul_precision("highest"):
        full = np.asarray(forward(params, cfg, ids, mask=spec)[0])
        cache = init_cache(cfg, b, 24)
        pos = jnp.broadcast_to(jnp.arange(16), (b, 16))
        # prefill two blocks
        _, cache = forward(params, cfg, ids[:, :8], positions=pos[:, :8], mask=spec, cache=cache, commit=True)
        assert cache.length.tolist() == [8, 8]
        # a block step against the cache, not committed
        lg, c2 = forward(params, cfg, ids[:, 8:12], positions=pos[:, 8:12], mask=spec, cache=cache)
        np.testing.assert_allclose(lg, full[:, 8:12], rtol=1e-5, atol=1e-5)
        assert c2.length.tolist() == [8, 8]
        # cross-block step: previous + current block, commit only the previous one
        lg, c3 = forward(params, cfg, ids[:, 8:16], positions=pos[:, 8:16], mask=spec, cache=cache,
                         commit=True, commit_length=bs)
        np.testing.assert_allclose(lg, full[:, 8:16], rtol=1e-5, atol=1e-5)
        assert c3.length.tolist() == [12, 12]
        lg, _ = forward(params, cfg, ids[:, 12:16], positions=pos[:, 12:16], mask=spec, cache=c3)
        np.testing.assert_allclose(lg, full[:, 12:16], rtol=1e-5, atol=1e-5)


def test_cache_rows_at_different_offsets():
    cfg = tiny_config()
    params = spread_params(cfg, seed=12)
    spec = MaskSpec("block_causal", 4)
    ids = jnp.asarray(np.random.default_rng(6).integers(3, cfg.vocab_size, (2, 12)))
    full = [np.asarray(forward(params, cfg, ids[i:i + 1], mask=spec)[0]) for i in range(2)]
    cache = init_cache(cfg, 2, 16)
    # row 0 has 4 cached tokens, row 1 has 8; both then run one block at their own offset
    _, cache = forward(params, cfg, ids[:, :4], positions=jnp.broadcast_to(jnp.arange(4), (2, 4)), mask=spec,
                       cache=cache, commit=True)
    pos1 = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]])
    step_ids = jnp.stack([ids[0, :4], ids[1, 4:8]])
    _, c2 = forward(params, cfg, step_ids, positions=pos1, mask=spec, cache=cache, commit=True)
    # row 0 rewrote its own first block (same tokens) → length stays 4; row 1 advanced to 8
    assert c2.length.tolist() == [4, 8]
    pos2 = jnp.asarray([[4, 5, 6, 7], [8, 9, 10, 11]])
    lg, _ = forward(params, cfg, jnp.stack([ids[0, 4:8], ids[1, 8:12]]), positions=pos2, mask=spec, cache=c2)
    np.testing.assert_allclose(lg[0], full[0][0, 4:8], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lg[1], full[1][0, 8:12], rtol=1e-4, atol=1e-4)


def test_cache_window_skips_only_slots_no_row_can_see():
    """``cache_window=W`` (the serving engine's scratch columns) gives the same logits bit for bit
    and the same committed cache as attending to every slot, while every row's length is <= W; the
    commit still writes past W."""
    cfg = tiny_config()
    params = spread_params(cfg, seed=13)
    spec = MaskSpec("block_causal", 4)
    ids = jnp.asarray(np.random.default_rng(7).integers(3, cfg.vocab_size, (2, 12)))
    cache = init_cache(cfg, 2, 24)
    _, cache = forward(params, cfg, ids[:, :8], positions=jnp.broadcast_to(jnp.arange(8), (2, 8)), mask=spec,
                       cache=cache, commit=True)
    pos = jnp.asarray([[8, 9, 10, 11], [12, 13, 14, 15]])  # row 1 writes past the window (scratch)
    want = forward(params, cfg, ids[:, 8:12], positions=pos, mask=spec, cache=cache, commit=True)
    got = forward(params, cfg, ids[:, 8:12], positions=pos, mask=spec, cache=cache, commit=True,
                  cache_window=12)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.asarray(got[1].k["moe_layers"][:, 1, 12:16]).any()  # the write landed past the window
    short = forward(params, cfg, ids[:, 8:12], positions=pos, mask=spec, cache=cache, cache_window=4)[0]
    assert not np.allclose(short, want[0], atol=1e-3)  # a window that hides valid slots is seen


def test_bf16_compute_close_to_f32():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)))
    spec = MaskSpec("block_causal", 4)
    a = forward(params, cfg, ids, mask=spec)[0]
    b = forward(params, cfg, ids, mask=spec, dtype=jnp.bfloat16)[0]
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(a).max()))


def test_remat_gives_same_gradients():
    cfg = tiny_config()
    params = spread_params(cfg, seed=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8)))

    def loss(p, remat):
        return forward(p, cfg, ids, mask=MaskSpec("noisy_clean", 2), remat=remat)[0].sum()

    g0 = jax.grad(loss)(params, None)
    g1 = jax.grad(loss)(params, "full")
    # f32 summation-order noise only: remat recomputes the same ops in a different fusion
    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))

    jax.tree.map(close, g0, g1)
    assert float(jnp.abs(g0["moe_layers"]["moe"]["expert_bias"]).max()) == 0.0  # frozen


def test_exactly_one_input_kind():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="exactly one"):
        forward(params, cfg)
