"""Plain step-by-step Python/NumPy decoders written from spec §5.2, §5.5a and §5.5b, plus unit tests
of the per-step rules.

The oracles share no code with ``dmax_jax.decoding``: Python loops over positions, NumPy float64
softmax, the reference's incremental soft-embedding bookkeeping, and no KV cache — every step
recomputes the window ``[0, block end)`` from scratch under the block-causal mask (hard embeddings
for finished positions, SPD's soft embeddings for the current block). The window is padded with
[MASK] embeddings to one fixed length so the model compiles once; block-causality makes the padding
invisible to the window. Sampling uses the documented key rule ``fold_in(fold_in(key(seed),
request_id), forward_index)`` so temperature > 0 can be compared too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.decoding import strategies as st
from dmax_jax.model.llada2 import forward, init_params
from dmax_jax.model.masks import MaskSpec


def random_params(cfg, seed: int = 0, lm_head_scale: float = 1.0) -> dict:
    """Random tiny-model parameters without compiling the initializer (slow on a busy CPU): shapes
    from ``eval_shape``, N(0, 0.02) weights, unit norms, zero expert bias (as ``init_params``).
    ``lm_head_scale`` sharpens the random model's softmax so decoders take multi-token decisions."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(s.shape, s.dtype)
        if "expert_bias" in name:
            return jnp.zeros(s.shape, s.dtype)
        w = rng.normal(0.0, 0.02, s.shape) * (lm_head_scale if "lm_head" in name else 1.0)
        return jnp.asarray(w, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _window_logits(params, cfg, block, embeds):
    return forward(params, cfg, inputs_embeds=embeds[None], mask=MaskSpec("block_causal", block))[0][0]


class Oracle:
    def __init__(self, params, cfg, *, block, length, mask_id, eos_id, temperature=0.0, seed=0):
        self.params, self.cfg, self.B, self.length = params, cfg, block, length
        self.M, self.E, self.temperature, self.seed = mask_id, eos_id, temperature, seed
        self.table = np.asarray(params["embedding"], np.float32)

    def logits(self, embeds: np.ndarray, start: int) -> np.ndarray:
        """Block logits ``[B, V]`` from a full recompute of the window ``embeds [end, H]``."""
        pad = np.repeat(self.table[self.M][None], self.length - len(embeds), axis=0)
        full = _window_logits(self.params, self.cfg, self.B, jnp.asarray(np.concatenate([embeds, pad])))
        return np.asarray(full, np.float64)[start:start + self.B]

    def choose(self, logits, request_id, counter, tempered=False):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.temperature == 0:
            x0 = logits.argmax(-1)
        else:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), request_id), counter)
            x0 = np.asarray(jax.random.categorical(key, jnp.asarray(logits, jnp.float32) / self.temperature))
            if tempered:
                t = logits / self.temperature
                probs = np.exp(t - t.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
        return x0, probs[np.arange(len(x0)), x0]

    def soft(self, tok, p):
        e_t, e_m = self.table[tok].astype(np.float64), self.table[self.M].astype(np.float64)
        r = max(0.0, 1.0 - p)
        h = p * e_t + r * e_m
        target = p * np.linalg.norm(e_t) + r * np.linalg.norm(e_m)
        return (h * target / (np.linalg.norm(h) + 1e-6)).astype(np.float32)

    def _layout(self, prompt, gen_length):
        P, B = len(prompt), self.B
        end = -(-(P + gen_length) // B) * B
        x = np.full(end, self.M, np.int64)
        x[:P] = prompt
        return x, (P // B) * B, end

    # ---- SPD, spec §5.2 --------------------------------------------------------------------------
    def spd(self, prompt, gen_length, threshold, accept_threshold, request_id=0, cap=None):
        B, M = self.B, self.M
        x, s0, T = self._layout(prompt, gen_length)
        cap = cap or B
        nfe, revisions, gen_end = 1, 0, s0  # prefill counted
        for start in range(s0, T, B):
            end = gen_end = start + B
            active = x[start:end] == M
            emb, step = None, 0
            while step < cap:
                step += 1
                block_in = self.table[x[start:end]] if emb is None else emb
                logits = self.logits(np.concatenate([self.table[x[:start]], block_in]), start)
                x0, p = self.choose(logits, request_id, nfe)
                nfe += 1
                blk = x[start:end]  # view: updates land in x
                mask = blk == M
                cand = []
                for j in range(B):          # left-to-right cutoff
                    if mask[j] and p[j] < threshold:
                        break
                    if mask[j]:
                        cand.append(j)
                if not cand and mask.any():
                    cand = [int(np.flatnonzero(mask)[0])]
                if mask.any():
                    upd = set(cand) | {j for j in range(B) if active[j] and not mask[j]}
                else:
                    upd = {j for j in range(B) if active[j]}
                changed = {j for j in upd if x0[j] != blk[j]}
                revisions += sum(1 for j in changed if not mask[j])
                for j in upd:
                    blk[j] = x0[j]
                if all(p[j] >= accept_threshold for j in range(B) if active[j]) or not changed:
                    break
                soft = active & (blk != M)
                base = self.table[blk].copy() if emb is None else emb.copy()
                if emb is not None:
                    for j in changed:
                        if not soft[j]:
                            base[j] = self.table[blk[j]]
                for j in np.flatnonzero(soft):
                    base[j] = self.soft(x0[j], p[j])
                emb = base
            if (x[start:end] == self.E).any():
                x[end:] = self.E
                break
        return x, nfe, min(gen_end, len(prompt) + gen_length), revisions  # cut to gen_length

    # ---- dInfer threshold decoding, spec §5.5a ---------------------------------------------------
    def threshold(self, prompt, gen_length, threshold, request_id=0, expected_tpf=4, max_unroll=4):
        B, M = self.B, self.M
        x, s0, T = self._layout(prompt, gen_length)
        nfe, gen_end = 1, s0
        for start in range(s0, T, B):
            end = gen_end = start + B
            stuck = False
            while (x[start:end] == M).sum() > 0 and not stuck:
                unroll = int(max(min((x[start:end] == M).sum() // expected_tpf, max_unroll), 1))
                for _ in range(unroll):
                    logits = self.logits(self.table[x[:end]], start)
                    x0, p = self.choose(logits, request_id, nfe)
                    nfe += 1
                    blk = x[start:end]
                    elig = (blk == M) & (x0 != M)
                    conf = np.where(elig, p, -np.inf)
                    cut = min(max(conf.max() - 1e-5, -1000.0), threshold)
                    transfer = elig & (conf >= cut)
                    blk[transfer] = x0[transfer]
                    if not transfer.any() and (blk == M).any():  # would repeat forever at T = 0
                        stuck = True
                        break
            if (x[start:end] == self.E).any():
                x[end:] = self.E
                break
        return x, nfe, min(gen_end, len(prompt) + gen_length)  # cut to gen_length

    # ---- LLaDA2 HF generate, spec §5.5b ----------------------------------------------------------
    def llada2(self, prompt, gen_length, threshold, steps, request_id=0):
        B, M, P = self.B, self.M, len(prompt)
        x, _, T = self._layout(prompt, gen_length)
        steps = min(steps, gen_length)
        sched = [B // steps + (1 if i < B % steps else 0) for i in range(steps)]
        nfe, wend = 0, 0
        for nb in range(P // B, T // B):
            wend = (nb + 1) * B
            for step in range(steps):
                blk = x[wend - B:wend]
                active = blk == M
                if not active.any():
                    break
                logits = self.logits(self.table[x[:wend]], wend - B)
                x0, p = self.choose(logits, request_id, nfe, tempered=True)
                nfe += 1
                conf = np.where(active, p, -np.inf)
                high = conf > threshold
                if high.sum() >= sched[step]:
                    transfer = high
                else:
                    k = min(sched[step], int(active.sum()))
                    transfer = np.zeros(B, bool)
                    transfer[np.argsort(-conf, kind="stable")[:k]] = True
                blk[transfer] = x0[transfer]
            if (x[P:wend] == self.E).any():
                break
        return x, nfe, min(wend, P + gen_length)


def outputs(x, prompt_len, gen_end, eos_id):
    """(tokens before the first EOS, non-EOS count) of the generated region."""
    region = [int(t) for t in x[prompt_len:gen_end]]
    cut = region.index(eos_id) if eos_id in region else len(region)
    return region[:cut], sum(t != eos_id for t in region)


# ---- unit tests of the per-step rules ------------------------------------------------------------
M = 2


def _j(a, dtype=jnp.int32):
    return jnp.asarray([a], dtype)


def test_spd_cutoff_stops_at_first_low_confidence_mask_and_revises_decoded():
    xb = _j([7, M, M, M, M])                 # position 0 decoded earlier (active), 1..4 masked
    active = _j([1, 1, 1, 1, 1], bool)
    x0 = _j([8, 10, 11, 12, 13])
    conf = _j([0.95, 0.9, 0.2, 0.9, 0.9], jnp.float32)
    u = st.spd_update(xb, active, x0, conf, 0.5, 0.9, M)
    # 1 transferred; 2 is the first low masked position → 2.. cut; 0 revised 7 → 8
    assert u.tokens.tolist() == [[8, 10, M, M, M]]
    assert u.revised.tolist() == [[True, False, False, False, False]]
    assert u.soft.tolist() == [[True, True, False, False, False]]
    assert not bool(u.stop[0])


def test_spd_fallback_takes_first_mask_and_prompt_tail_never_changes():
    xb = _j([5, 6, M, M])
    active = _j([0, 0, 1, 1], bool)          # prompt tail at 0, 1
    x0 = _j([9, 9, 3, 4])
    conf = _j([0.99, 0.99, 0.1, 0.99], jnp.float32)
    u = st.spd_update(xb, active, x0, conf, 0.5, 0.9, M)
    assert u.tokens.tolist() == [[5, 6, 3, M]]
    # all masks filled and nothing changes → stop even with low confidence
    u2 = st.spd_update(_j([5, 6, 3, 4]), active, _j([9, 9, 3, 4]), _j([1, 1, 0.1, 0.2], jnp.float32),
                       0.5, 0.9, M)
    assert bool(u2.stop[0]) and not u2.changed.any()
    # converged: all active confidences >= accept, although a token changed
    u3 = st.spd_update(_j([5, 6, 3, 4]), active, _j([9, 9, 7, 4]), _j([0, 0, 0.95, 0.91], jnp.float32),
                       0.5, 0.9, M)
    assert bool(u3.stop[0]) and u3.tokens.tolist() == [[5, 6, 7, 4]]


def test_threshold_rule_relative_cut_and_mask_predictions_excluded():
    xb = _j([M, M, M, 4])
    x0 = _j([M, 6, 7, 9])                    # position 0 predicts MASK: excluded
    conf = _j([0.99, 0.3, 0.3 - 5e-6, 0.99], jnp.float32)
    tokens, transfer = st.threshold_update(xb, x0, conf, 0.9, M)
    assert transfer.tolist() == [[False, True, True, False]]   # max−1e-5 cut takes the near-tie
    assert tokens.tolist() == [[M, 6, 7, 4]]
    _, none = st.threshold_update(_j([M, 4]), _j([M, 5]), _j([0.9, 0.9], jnp.float32), 0.5, M)
    assert not none.any()
    assert st.threshold_max_forwards(8, 4, 4) == 9 and st.threshold_max_forwards(32, 4, 4) == 95


def test_llada2_rule_threshold_override_and_topk():
    xb = _j([M, M, M, 3])
    x0 = _j([5, 6, 7, 8])
    tokens, tr = st.llada2_update(xb, x0, _j([0.2, 0.96, 0.97, 1.0], jnp.float32), 0.95, 1, M)
    assert tr.tolist() == [[False, True, True, False]]          # ≥ n high-confidence: all of them
    tokens, tr = st.llada2_update(xb, x0, _j([0.2, 0.5, 0.4, 1.0], jnp.float32), 0.95, 2, M)
    assert tr.tolist() == [[False, True, True, False]]          # else the top-n masked
    assert tokens.tolist() == [[M, 6, 7, 3]]
    assert st.transfer_schedule(8, 3).tolist() == [3, 3, 2]


def test_soft_inputs_match_the_formula_and_keep_hard_rows():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
    tokens = _j([M, 4, 5])
    x0, conf = _j([3, 4, 5]), _j([0.3, 0.6, 1.0], jnp.float32)
    soft = _j([0, 1, 0], bool)
    out = np.asarray(st.soft_inputs(table, tokens, x0, conf, None, soft, top_k=1, mask_id=M, impl="xla",
                                    dtype=jnp.float32))[0]
    t = np.asarray(table, np.float64)
    h = 0.6 * t[4] + 0.4 * t[M]
    want = h * (0.6 * np.linalg.norm(t[4]) + 0.4 * np.linalg.norm(t[M])) / (np.linalg.norm(h) + 1e-6)
    np.testing.assert_allclose(out[1], want, rtol=1e-5)
    np.testing.assert_allclose(out[0], t[M], rtol=1e-6)
    np.testing.assert_allclose(out[2], t[5], rtol=1e-6)
    # top-2 mixing: the left-over mass goes to MASK
    probs = jnp.zeros((1, 3, 12)).at[0, 1, 4].set(0.5).at[0, 1, 7].set(0.3)
    out2 = np.asarray(st.soft_inputs(table, tokens, x0, conf, probs, soft, top_k=2, mask_id=M, impl="xla",
                                     dtype=jnp.float32))[0, 1]
    h2 = 0.5 * t[4] + 0.3 * t[7] + 0.2 * t[M]
    n2 = 0.5 * np.linalg.norm(t[4]) + 0.3 * np.linalg.norm(t[7]) + 0.2 * np.linalg.norm(t[M])
    np.testing.assert_allclose(out2, h2 * n2 / (np.linalg.norm(h2) + 1e-6), rtol=1e-5)


def test_layout_geometry_buckets_and_validation():
    import pytest

    from dmax_jax.decoding import buckets

    assert buckets.row_geometry(3, 24, 8) == (0, 32, 4)        # prompt tail inside the first block
    assert buckets.row_geometry(16, 24, 8) == (16, 40, 3)      # prompt ends on a block boundary
    assert buckets.row_geometry(np.array([3, 19]), 20, 8)[2].tolist() == [3, 3]
    assert buckets.shapes([3, 19], 20, 8, 16) == (32, 56)
    with pytest.raises(ValueError, match="multiple of block_length"):
        buckets.shapes([3], 20, 8, 12)
    assert buckets.normalize_prompts([4, 5]) == [[4, 5]]
    assert buckets.normalize_prompts(np.array([[4, 5]])) == [[4, 5]]
    ids, lens = buckets.pack_prompts([[4, 5], [6]], 4, M)
    assert ids.tolist() == [[4, 5, M, M], [6, M, M, M]] and lens.tolist() == [2, 1]
    kw = dict(vocab_size=10, mask_id=M, gen_length=8, block=4, max_positions=16)
    with pytest.raises(ValueError, match="row 1 is empty"):
        buckets.validate_prompts([[4], []], **kw)
    with pytest.raises(ValueError, match="row 0 contains the mask token 2 at index 1"):
        buckets.validate_prompts([[4, M]], **kw)
    with pytest.raises(ValueError, match=r"row 0: 9 prompt tokens .* exceed max_position_embeddings 16"):
        buckets.validate_prompts([[4] * 9], **kw)
    buckets.validate_prompts([[4] * 8], **kw)                  # 8 + 8 = 16 positions: fits exactly
