"""Per-step decision rules of the three decoders, as pure batched functions over one block.

Shapes: ``xb [batch, block]`` current block tokens, ``logits [batch, block, vocab]`` f32. Nothing
here runs the model; :mod:`dmax_jax.decoding.block` drives these rules inside ``lax.while_loop``.

* ``spd``       Soft Parallel Decoding (algorithm §5.2 step 3-5): left-to-right cutoff transfer, revision of
                already-decoded active tokens, convergence test, soft input embeddings.
* ``threshold`` dInfer threshold decoding (algorithm §5.5a): commit every masked position whose
                confidence reaches ``min(τ, max c − 1e-5)``; committed tokens are final.
* ``llada2``    the LLaDA2 HF ``generate`` rule (algorithm §5.5b): per-step transfer count with a
                threshold override.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.decoding.trace_schema import COMMITTED, MASKED, PROMPT, REVISED, SOFT


def per_row(v) -> jax.Array:
    """A scalar or per-row ``[b]`` knob as a column ``[b, 1]`` that broadcasts against ``[b, B]``."""
    v = jnp.asarray(v)
    return v[:, None] if v.ndim == 1 else v


# ---- token choice --------------------------------------------------------------------------------
def row_keys(seed: jax.Array, request_ids: jax.Array, counters: jax.Array) -> jax.Array:
    """One PRNG key per row from ``(seed, request id, the row's own forward counter)`` so a row's
    samples never depend on which batch it is in. ``seed``: scalar or per row."""
    seed = jnp.broadcast_to(jnp.asarray(seed, jnp.int32), request_ids.shape)
    return jax.vmap(lambda s, r, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), c))(
        seed, request_ids, counters)


def argmax_first(x: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first index on ties) as two plain reductions: XLA:CPU's
    variadic argmax reduce is ~5x slower and dominated the per-step bookkeeping."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == x.max(-1, keepdims=True), iota, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # NaN rows: stay in range


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """LLaDA2 ``generate``'s ``_top_k_logits`` then ``_top_p_logits`` (``_sample_with_temperature_topk_topp``
    in ``modeling_llada2_moe.py``), per row: logits below the row's k-th largest become -inf (k <= 0:
    off); then, in descending order, a token is dropped once the probability mass *before* it exceeds
    ``top_p`` (the most likely token always stays; 1: off). ``logits [b, T, V]`` (already divided by
    the temperature), ``top_k [b]`` int, ``top_p [b]`` float."""
    V = logits.shape[-1]
    srt = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V).astype(jnp.int32)[:, None, None]
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, srt.shape[:-1] + (1,)), axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    srt = jnp.where(jnp.arange(V) < k, srt, -jnp.inf)           # the same filter, in sorted order
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                  # mass of the tokens ranked above
    keep = jnp.maximum((before <= top_p[:, None, None]).sum(-1, keepdims=True), 1)
    keep = jnp.where(top_p[:, None, None] >= 1, k, keep)         # 1: off (no rounding at the tail)
    floor = jnp.take_along_axis(srt, keep - 1, axis=-1)          # the least likely kept logit
    return jnp.where(logits < floor, -jnp.inf, logits)


def choose_tokens(logits: jax.Array, *, greedy: bool, temperature: jax.Array, keys: jax.Array | None,
                  tempered_confidence: bool, need_probs: bool = False, top_p: jax.Array | None = None,
                  top_k: jax.Array | None = None):
    """``(x0 [b, T] int32, confidence [b, T] f32, probs [b, T, V] f32 | None)``.

    Greedy: ``x0 = argmax``. Sampling: ``x0 ~ softmax(logits / temperature)`` by Gumbel-max with the
    row's key (bit-identical to ``jax.random.categorical``; dInfer's ``add_gumbel_noise`` is the same
    rule). The confidence is ``p(x0)`` under the plain softmax (dInfer) or the tempered one
    (``tempered_confidence``: the HF ``generate`` of algorithm §5.5b). ``probs`` only if ``need_probs``.
    ``temperature`` (scalar or per row): a row at 0 is greedy inside a sampling program too, so rows
    of one batch may mix greedy and sampled decoding. ``top_p`` / ``top_k`` (per row; None: off) filter a
    sampled row's tempered logits first (:func:`filter_logits`, skipped when no row filters): the draw
    comes from the filtered distribution; the tempered confidence is under it too, as LLaDA2's
    ``_sample_with_temperature_topk_topp`` returns it, while dInfer's plain confidence stays unfiltered.
    """
    if greedy:
        base = logits
        x0 = argmax_first(logits)
    else:
        t = jnp.asarray(temperature, jnp.float32)
        t = t[:, None, None] if t.ndim == 1 else t
        cold = t == 0
        scaled = jnp.where(cold, logits, logits / jnp.where(cold, 1.0, t))
        if top_p is not None or top_k is not None:
            scaled = _filtered(scaled, cold[:, 0, 0] if cold.ndim == 3 else cold, top_k, top_p)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(keys)
        x0 = jnp.where(cold[..., 0], argmax_first(logits), argmax_first(scaled + noise))
        base = scaled if tempered_confidence else logits
    lse = jax.nn.logsumexp(base, axis=-1)
    conf = jnp.exp(jnp.take_along_axis(base, x0[..., None], axis=-1)[..., 0] - lse)
    probs = jnp.exp(base - lse[..., None]) if need_probs else None
    return x0, conf, probs


def _filtered(scaled: jax.Array, cold: jax.Array, top_k: jax.Array | None, top_p: jax.Array | None):
    """``filter_logits`` for the sampled rows (a greedy row keeps its logits), behind a ``cond`` so a
    batch with no filtering row skips the vocabulary sort."""
    b = scaled.shape[0]
    k = jnp.broadcast_to(jnp.asarray(0 if top_k is None else top_k, jnp.int32), (b,))
    p = jnp.broadcast_to(jnp.asarray(1.0 if top_p is None else top_p, jnp.float32), (b,))
    on = ~jnp.broadcast_to(cold, (b,)) & ((k > 0) | (p < 1))
    pick = lambda: jnp.where(on[:, None, None], filter_logits(scaled, k, p), scaled)
    return jax.lax.cond(on.any(), pick, lambda: scaled)


# ---- SPD (algorithm §5.2) -----------------------------------------------------------------------------
@flax.struct.dataclass
class SpdUpdate:
    tokens: jax.Array    # [b, B] block after the update
    changed: jax.Array   # [b, B] positions whose token changed
    revised: jax.Array   # [b, B] changed positions that were already decoded before this step
    soft: jax.Array      # [b, B] active, decoded positions: next input is a soft embedding
    stop: jax.Array      # [b] converged (all active confidences >= accept) or nothing changed


def first_true(m: jax.Array) -> jax.Array:
    """One-hot of the first True along the last axis (all False if none)."""
    return m & (jnp.cumsum(m, axis=-1) == 1)


def spd_update(xb, active, x0, conf, threshold, accept_threshold, mask_id: int) -> SpdUpdate:
    """The ``decode_uniform`` update (algorithm §5.2 step 3-4)."""
    mask = xb == mask_id
    low = mask & (conf < per_row(threshold))
    cut = jnp.cumsum(low, axis=-1) > 0             # from the first low-confidence masked position on
    cand = mask & ~cut
    cand = jnp.where(cand.any(-1, keepdims=True), cand, first_true(mask))
    update = jnp.where(mask.any(-1, keepdims=True), cand | (active & ~mask), active)
    changed = update & (x0 != xb)
    tokens = jnp.where(update, x0, xb)
    converged = jnp.all(~active | (conf >= per_row(accept_threshold)), axis=-1)
    stop = converged | ~changed.any(-1)
    soft = active & (tokens != mask_id)
    return SpdUpdate(tokens=tokens, changed=changed, revised=changed & ~mask, soft=soft, stop=stop)


def soft_inputs(table: jax.Array, tokens, x0, conf, probs, soft, *, top_k: int, mask_id: int, impl: str,
                dtype, platform: str | None = None) -> jax.Array:
    """Next-step input embeddings ``[b, B, H]`` (algorithm §5.2 step 5): soft positions get
    ``p·e_x0 + (1−p)·e_mask`` rescaled to the probability-weighted norm (top-k mixing if
    ``top_k > 1``); every other position its hard embedding (MASK rows stay ``e_mask``, prompt tail
    stays hard). Equivalent to the reference's incremental ``base``/``emb`` bookkeeping because a
    non-soft position is always either prompt or MASK."""
    from dmax_jax.model.partitioned import rows_per_shard
    from kernels_pallas.soft_embedding import soft_embeddings  # lazy: kernels are optional at import

    if top_k == 1:
        ids, p = x0[..., None], conf[..., None]
    else:
        p, ids = jax.lax.top_k(probs, top_k)
    def mix(ids_, p_, table_):
        return soft_embeddings(table_, ids_, p_, mask_id, impl=impl, out_dtype=dtype, platform=platform)

    ids, p = ids.astype(jnp.int32), p.astype(jnp.float32)
    if platform in ("gpu", "tpu"):  # a Pallas kernel there: XLA cannot partition it, run it per shard
        mixed = rows_per_shard(mix, (ids, p), (table,))
    else:
        mixed = mix(ids, p, table)
    hard = jnp.take(table, tokens, axis=0).astype(dtype)
    return jnp.where(soft[..., None], mixed, hard)


def spd_states(update: SpdUpdate, prompt: jax.Array, final: jax.Array, mask_id: int) -> jax.Array:
    """Trace state per position: on a block's last step soft tokens are shown as committed."""
    s = jnp.where(update.tokens == mask_id, MASKED, jnp.where(final[:, None], COMMITTED, SOFT))
    s = jnp.where(update.revised, REVISED, s)
    return jnp.where(prompt, PROMPT, s).astype(jnp.int8)


# ---- dInfer threshold decoding (algorithm §5.5a) ------------------------------------------------------
def threshold_update(xb, x0, conf, threshold, mask_id: int):
    """``get_transfer_index_threshold``: masked positions whose argmax is not MASK compete; commit all
    with ``c >= clamp(max c − 1e-5, −1000, τ)`` (≥ 1 unless every candidate predicts MASK).
    Returns ``(tokens, transfer)``."""
    eligible = (xb == mask_id) & (x0 != mask_id)
    c = jnp.where(eligible, conf, -jnp.inf)
    cut = jnp.clip(c.max(-1, keepdims=True) - 1e-5, -1000.0, per_row(threshold))
    transfer = eligible & (c >= cut)
    return jnp.where(transfer, x0, xb), transfer


def unroll_count(n_mask, expected_tpf: int, max_unroll: int):
    """Forwards per progress check (dInfer ``BlockRunner``): ``max(1, min(#mask // tpf, max_unroll))``."""
    return jnp.maximum(1, jnp.minimum(n_mask // expected_tpf, max_unroll))


def threshold_max_forwards(block: int, expected_tpf: int, max_unroll: int) -> int:
    """Worst-case forwards for one block (one token per progress check, :func:`unroll_count`
    forwards per check): threshold decoding's static loop bound."""
    return int(sum(max(1, min(m // expected_tpf, max_unroll)) for m in range(1, block + 1)))


def final_states(tokens, prompt, mask_id: int) -> jax.Array:
    """States for decoders whose decoded tokens are final (threshold, llada2)."""
    s = jnp.where(tokens == mask_id, MASKED, COMMITTED)
    return jnp.where(prompt, PROMPT, s).astype(jnp.int8)


# ---- LLaDA2 HF generate (algorithm §5.5b) -------------------------------------------------------------
def transfer_schedule(block: int, steps: int) -> np.ndarray:
    """``_get_num_transfer_tokens``: ``block // steps`` per step, +1 for the first ``block % steps``."""
    sched = np.full((steps,), block // steps, np.int32)
    sched[: block % steps] += 1
    return sched


def transfer_count(block: int, steps, step):
    """Entry ``step`` of :func:`transfer_schedule` computed from traced ``steps``/``step``."""
    return block // steps + (step < block % steps).astype(jnp.int32)


def llada2_update(xb, x0, conf, threshold, n_transfer, mask_id: int):
    """Commit every masked position with ``p > τ`` if there are at least ``n_transfer`` of them,
    otherwise the ``min(n_transfer, #masked)`` most confident (ties: lowest index). ``(tokens, transfer)``."""
    active = xb == mask_id
    c = jnp.where(active, conf, -jnp.inf)
    high = c > per_row(threshold)
    n_transfer = per_row(n_transfer)
    # rank of each position in descending confidence, ties by index (a [B, B] count, not a sort)
    idx = jnp.arange(c.shape[-1])
    other, this = c[..., None, :], c[..., :, None]
    ahead = (other > this) | ((other == this) & (idx < idx[:, None]))
    rank = ahead.sum(-1)
    k = jnp.minimum(n_transfer, active.sum(-1, keepdims=True))
    top = rank < k
    transfer = jnp.where(high.sum(-1, keepdims=True) >= n_transfer, high, top) & active
    return jnp.where(transfer, x0, xb), transfer
