"""Pallas kernels for block-decoding attention over a KV cache (flash-decoding style).

Both formulations take the queries of one kv head as one row block: ``ops.py`` lays q out as
``[B, Nkv, M, D]`` with ``M = Tq * G`` rows (row ``t * G + g`` = token t, query head ``j*G + g``),
so one ``[M, D] x [D, bk]`` product scores all G heads sharing a kv head against a cache tile
(GQA without repeating K/V). Per row b (and kv head j) a kernel walks the cache in tiles of ``bk``
slots with an online softmax, stops at ``cache_len[b]`` (tiles past it are never read), then
adds the step's own keys with the block-causal mask ``k_new_blk <= q_blk``.

* **TPU (Mosaic)** — ``decode_attention_tpu``: grid ``(B, S, C / bk / S)``, the tile axis is the
  sequential reduction; one ``[bk, Nkv, D]`` cache block serves every kv head (a static loop);
  S > 1 cache splits (merged like the GPU's) let a megacore chip's two cores share one row.
  ``cache_len`` is scalar-prefetched into SMEM; the cache ``index_map`` clamps the tile index to
  the row's last valid tile, so steps past ``cache_len`` name the block already in VMEM and the
  pipeline issues no DMA, and ``pl.when`` skips their compute.
* **GPU (Triton)** — ``decode_attention_gpu``: grid ``(B, Nkv x row tiles, S)`` (row tiles of at
  most 128 query rows keep the accumulator in registers); split s walks tiles
  ``[s * per_split, min((s + 1) * per_split, ceil(cache_len / bk)))`` in a ``fori_loop`` whose
  bounds come from ``cache_len``, so a short row costs its length, not C; split 0 also does the
  own keys. Each split writes a normalised partial output and its log-sum-exp; ``ops.py``
  combines the S partials (S > 1 gives small batches enough programs to fill the GPU).

Scores and softmax statistics are float32; probabilities are cast to v's dtype for the PV
product (as the dense reference does). Cache rows past ``cache_len`` are zeroed before the PV
product, so stale or NaN data in unused slots cannot leak. No gradients: inference only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.decode_attention.reference import NEG


def _online_update(carry, s, ok, v, pv, keepdims: bool):
    """One flash step: fold masked scores ``s [M, n]`` and values ``v [n, D]`` into
    ``(acc [M, D], m, den)``; m/den are ``[M, 1]`` (keepdims, Mosaic) or ``[M]`` (Triton)."""
    acc, m, den = carry
    col = (lambda x: x) if keepdims else (lambda x: x[:, None])
    s = jnp.where(ok, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=keepdims))
    corr = jnp.exp(m - m_new)
    p = jnp.where(ok, jnp.exp(s - col(m_new)), 0.0)
    acc = acc * col(corr) + pv(p.astype(v.dtype), v)
    return acc, m_new, den * corr + jnp.sum(p, axis=1, keepdims=keepdims)


def _precision(a, b):
    # f32 inputs: full precision (no TF32 / bf16 passes) so results match the XLA reference.
    return lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None


def _qk(q, k):  # [M, D] x [n, D] -> [M, n] f32
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_precision(q, k),
                           preferred_element_type=jnp.float32)


def _pv(p, v):  # [M, n] x [n, D] -> [M, D] f32
    return lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=_precision(p, v),
                           preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)


def _tpu_kernel(len_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, qb_ref, kb_ref, *refs, scale: float,
                bk: int, partial: bool):
    """Grid step (b, s, t): cache tile ``s * T + t`` of row b for every kv head (head j's keys are
    the strided slice ``ref[:, j, :]`` of a ``[bk, Nkv, D]`` block); the last step of split 0 adds
    the own keys; the last step of each split writes (``partial``: f32 output + log-sum-exp)."""
    o_ref, lse_ref = (refs[0], refs[1]) if partial else (refs[0], None)
    acc_ref, m_ref, l_ref = refs[-3:]
    b, s, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, last = len_ref[b], pl.num_programs(2) - 1
    start = (s * pl.num_programs(2) + t) * bk
    heads = acc_ref.shape[0]

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    def fold(j, k, v, ok):
        sc = _qk(q_ref[j], k) * scale
        acc, m, den = _online_update((acc_ref[j], m_ref[j], l_ref[j]), sc, ok, v, _pv, True)
        acc_ref[j], m_ref[j], l_ref[j] = acc, m, den

    @pl.when(start < n)
    def _cache_tile():
        ok = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1) < n
        row_ok = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < n
        for j in range(heads):  # static: Nkv is small (a dynamic strided head index won't lower)
            v = jnp.where(row_ok, vc_ref[:, j, :].astype(vn_ref.dtype), 0)
            fold(j, kc_ref[:, j, :].astype(kn_ref.dtype), v, ok)

    @pl.when((t == last) & (s == 0))
    def _own():
        own_ok = kb_ref[...] <= qb_ref[...]  # [1, Tq] vs [M, 1]
        for j in range(heads):
            fold(j, kn_ref[:, j, :], vn_ref[:, j, :], own_ok)

    @pl.when(t == last)
    def _write():
        for j in range(heads):
            den = l_ref[j]
            safe = jnp.where(den > 0, den, 1.0)
            o_ref[j] = (acc_ref[j] / safe).astype(o_ref.dtype)
            if partial:
                lse_ref[j] = jnp.where(den > 0, m_ref[j] + jnp.log(safe), NEG)


def decode_attention_tpu(q_rows, k_cache, v_cache, cache_len, k_new, v_new, q_blk_rows, k_new_blk, *,
                         scale: float, bk: int, out_dtype, splits: int = 1, interpret: bool = False):
    """q_rows ``[B, Nkv, M, D]``; k/v_cache ``[B, C, Nkv, D]`` (C a multiple of bk); k/v_new
    ``[B, Tq, Nkv, D]``; q_blk_rows ``[B, M]``; k_new_blk ``[B, Tq]`` -> ``[B, Nkv, M, D]`` in
    out_dtype, or with ``splits`` > 1 the partials ``o [B, S, Nkv, M, D]`` f32 and ``lse [B, S,
    Nkv, M, 1]`` f32 (the split axis is "parallel": both TensorCores of a megacore chip work on
    one row).

    A cache block holds all kv heads (``[bk, Nkv, D]``: Mosaic blocks must keep the last two dims
    whole or (8, 128)-aligned, and a head-major copy of the cache would cost a full cache pass)."""
    b, nkv, m, d = q_rows.shape
    cap, tq = k_cache.shape[1], k_new.shape[1]
    per_split = pl.cdiv(cap // bk, splits)

    def kv_map(i, s, t, len_ref):  # clamp to the row's last valid tile: no DMA past cache_len
        last = jnp.maximum(lax.div(len_ref[i] + bk - 1, bk) - 1, 0)  # lax.div: no sign op
        return i, jnp.minimum(s * per_split + t, last), 0, 0

    whole = lambda shape: pl.BlockSpec((None, *shape), lambda i, s, t, len_ref: (i,) + (0,) * len(shape))
    split = lambda shape: pl.BlockSpec((None, None, *shape),
                                       lambda i, s, t, len_ref: (i, s) + (0,) * len(shape))
    partial = splits > 1
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, splits, per_split),
        in_specs=[whole((nkv, m, d)), pl.BlockSpec((None, bk, nkv, d), kv_map),
                  pl.BlockSpec((None, bk, nkv, d), kv_map), whole((tq, nkv, d)), whole((tq, nkv, d)),
                  whole((m, 1)), whole((1, tq))],
        out_specs=[split((nkv, m, d)), split((nkv, m, 1))] if partial else whole((nkv, m, d)),
        scratch_shapes=[pltpu.VMEM((nkv, m, d), jnp.float32), pltpu.VMEM((nkv, m, 1), jnp.float32),
                        pltpu.VMEM((nkv, m, 1), jnp.float32)],
    )
    out_shape = ([jax.ShapeDtypeStruct((b, splits, nkv, m, d), jnp.float32),
                  jax.ShapeDtypeStruct((b, splits, nkv, m, 1), jnp.float32)] if partial
                 else jax.ShapeDtypeStruct((b, nkv, m, d), out_dtype))
    itemsize = k_cache.dtype.itemsize
    cost = pl.CostEstimate(flops=int(4 * b * nkv * m * d * (cap + tq)),
                           transcendentals=int(b * nkv * m * (cap + tq)),
                           bytes_accessed=int(2 * b * cap * nkv * d * itemsize + 2 * q_rows.size * itemsize))
    return pl.pallas_call(
        functools.partial(_tpu_kernel, scale=scale, bk=bk, partial=partial),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="decode_attention_tpu",
    )(cache_len.astype(jnp.int32), q_rows, k_cache, v_cache, k_new, v_new,
      q_blk_rows.astype(jnp.int32)[:, :, None], k_new_blk.astype(jnp.int32)[:, None, :])


# ---------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(len_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, qb_ref, kb_ref, o_ref, lse_ref,
                *, scale: float, bk: int, per_split: int):
    """Program (b, kv head x row tile, s): the cache tiles of split s for those query rows of row
    b (+ the own keys if s == 0)."""
    b, s = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]
    n = len_ref[b]
    lo = s * per_split
    hi = jnp.minimum(lo + per_split, lax.div(n + bk - 1, bk))

    def body(t, carry):
        start = t * bk
        rows = pl.ds(pl.multiple_of(start, bk), bk)
        slot_ok = start + jnp.arange(bk) < n
        k = kc_ref[rows, :].astype(kn_ref.dtype)
        v = jnp.where(slot_ok[:, None], vc_ref[rows, :].astype(vn_ref.dtype), 0)
        return _online_update(carry, _qk(q, k) * scale, slot_ok[None, :], v, _pv, False)

    mp = q.shape[0]
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((mp,), NEG, jnp.float32), jnp.zeros((mp,), jnp.float32))
    carry = lax.fori_loop(lo, hi, body, init)
    own_ok = (kb_ref[...][None, :] <= qb_ref[...][:, None]) & (s == 0)
    acc, m, den = _online_update(carry, _qk(q, kn_ref[...]) * scale, own_ok, vn_ref[...], _pv, False)
    seen = den > 0
    l_safe = jnp.where(seen, den, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), NEG)


def decode_attention_gpu(q_rows, k_cache, v_cache, cache_len, k_new, v_new, q_blk_rows, k_new_blk, *,
                         scale: float, bk: int, splits: int, bm: int, interpret: bool = False):
    """q_rows ``[B, Nkv, Mp, Dp]``; k/v_cache ``[B, C, Nkv, Dp]``; k/v_new ``[B, Tqp, Nkv, Dp]``;
    q_blk_rows ``[B, Mp]``; k_new_blk ``[B, Tqp]`` (Mp, Tqp, Dp, bk, bm powers of two >= 16, C a
    multiple of bk, Mp of bm) -> partials ``o [B, Nkv, S, Mp, Dp]`` f32 (normalised per split) and
    ``lse [B, Nkv, S, Mp]`` f32 (``NEG`` for a split that saw nothing). Grid axis 1 runs over
    (kv head, tile of ``bm`` query rows): a program keeps its rows' accumulator in registers."""
    b, nkv, mp, dp = q_rows.shape
    cap, tqp = k_cache.shape[1], k_new.shape[1]
    n_rt = mp // bm
    per_split = pl.cdiv(cap // bk, splits)
    head_of, tile_of = (lambda h: lax.div(h, n_rt)), (lambda h: lax.rem(h, n_rt))
    whole = pl.BlockSpec((b,), lambda i, h, s: (0,))
    keys = lambda rows: pl.BlockSpec((None, rows, None, dp), lambda i, h, s: (i, 0, head_of(h), 0))
    warps = 4 if bm * max(dp, bk) <= 64 * 128 else 8
    return pl.pallas_call(
        functools.partial(_gpu_kernel, scale=scale, bk=bk, per_split=per_split),
        grid=(b, nkv * n_rt, splits),
        in_specs=[whole, pl.BlockSpec((None, None, bm, dp), lambda i, h, s: (i, head_of(h), tile_of(h), 0)),
                  keys(cap), keys(cap), keys(tqp), keys(tqp),
                  pl.BlockSpec((None, bm), lambda i, h, s: (i, tile_of(h))),
                  pl.BlockSpec((None, tqp), lambda i, h, s: (i, 0))],
        out_specs=[pl.BlockSpec((None, None, None, bm, dp),
                                lambda i, h, s: (i, head_of(h), s, tile_of(h), 0)),
                   pl.BlockSpec((None, None, None, bm), lambda i, h, s: (i, head_of(h), s, tile_of(h)))],
        out_shape=[jax.ShapeDtypeStruct((b, nkv, splits, mp, dp), jnp.float32),
                   jax.ShapeDtypeStruct((b, nkv, splits, mp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret,
        name="decode_attention_gpu",
    )(cache_len.astype(jnp.int32), q_rows, k_cache, v_cache, k_new, v_new,
      q_blk_rows.astype(jnp.int32), k_new_blk.astype(jnp.int32))
